"""Training losses and the variational bound.

Dimension counting: a molecule of N atoms with F feature channels has ``3 (N - 1) + F N`` degrees
of freedom (positions live in the zero-CoM subspace). Squared errors summed over a molecule are
divided by that number, so that molecules of every size weigh the same per dimension.
"""

from __future__ import annotations

import math

import torch

from moldiff.geometry import num_nodes_per_graph, scatter_sum

__all__ = ["degrees_of_freedom", "squared_error_per_molecule", "epsilon_loss", "continuous_vlb_diffusion_term"]


def degrees_of_freedom(batch: torch.Tensor, num_graphs: int, num_features: int) -> torch.Tensor:
    """``(B,)`` float: ``3 (N_k - 1) + F N_k`` for each molecule."""
    n = num_nodes_per_graph(batch, num_graphs).to(torch.float64)
    return 3.0 * (n - 1.0) + num_features * n


def squared_error_per_molecule(
    pred_pos: torch.Tensor, target_pos: torch.Tensor, pred_h: torch.Tensor, target_h: torch.Tensor, batch: torch.Tensor, num_graphs: int
) -> torch.Tensor:
    """``(B,)`` sum of squared errors over each molecule's positions ``(n, 3)`` and features ``(n, F)``."""
    per_atom = ((pred_pos - target_pos) ** 2).sum(-1) + ((pred_h - target_h) ** 2).sum(-1)
    return scatter_sum(per_atom, batch, num_graphs)


def epsilon_loss(
    pred_pos, eps_pos, pred_h, eps_h, batch, num_graphs, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """EDM's L2 objective: mean over molecules of ``w_k ||eps - eps_hat||^2 / dof_k``; scalar.

    ``weight`` ``(B,)`` optionally reweights molecules (e.g. by SNR); ``None`` is EDM's uniform weight.
    """
    err = squared_error_per_molecule(pred_pos, eps_pos, pred_h, eps_h, batch, num_graphs)
    dof = degrees_of_freedom(batch, num_graphs, eps_h.shape[-1]).to(err.dtype)
    per_mol = err / dof
    if weight is not None:
        per_mol = per_mol * weight.to(per_mol.dtype)
    return per_mol.mean()


def continuous_vlb_diffusion_term(sq_err: torch.Tensor, dgamma_dt: torch.Tensor) -> torch.Tensor:
    """Diffusion part of the continuous-time VLB in nats per molecule (Kingma et al. 2021, eq. 17):
    ``0.5 * gamma'(t) * ||eps - eps_hat||^2`` for one uniform draw of t; unbiased over t ~ U(0, 1).
    """
    return 0.5 * dgamma_dt.to(sq_err.dtype) * sq_err


def gaussian_kl_prior(mean_sq: torch.Tensor, sigma1: torch.Tensor, dof: torch.Tensor) -> torch.Tensor:
    """KL(q(z_1|x) || N(0, I)) summed over ``dof`` dimensions: mean_sq = alpha_1^2 ||x||^2 (B,)."""
    var = sigma1**2
    return 0.5 * (mean_sq + dof * (var - 1.0 - torch.log(var)))


LOG_2PI = math.log(2.0 * math.pi)
