"""Training losses.

Dimension counting: a molecule of N atoms with F feature channels has ``3 (N - 1) + F N`` degrees
of freedom (positions live in the zero-CoM subspace). Squared errors summed over a molecule are
divided by that number, so that molecules of every size weigh the same per dimension.
"""

from __future__ import annotations

import torch

from moldiff.geometry import num_nodes_per_graph, scatter_sum

__all__ = ["degrees_of_freedom", "squared_error_per_molecule", "epsilon_loss", "loss_weight", "LOSS_WEIGHTINGS",
           "even_parity_probability", "valence_parity_loss", "bond_epsilon_loss"]


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


LOSS_WEIGHTINGS = ("uniform", "min_snr:<gamma>", "snr_plus_one:<cap>")


def loss_weight(snr: torch.Tensor, kind: str = "uniform") -> torch.Tensor | None:
    """Per-molecule weights ``(B,)`` of the epsilon loss as a function of SNR(t) = alpha^2 / sigma^2.

    - ``"uniform"``: ``None`` (EDM's L2 objective).
    - ``"min_snr:<gamma>"``: ``min(SNR, gamma) / SNR`` (Hang et al. 2023, Min-SNR-gamma for epsilon
      prediction): caps the weight of the low-noise end relative to an x0 loss.
    - ``"snr_plus_one:<cap>"``: ``min(1 + SNR, cap)``: the epsilon loss plus an x0 loss
      (``SNR * ||eps - eps_hat||^2 = ||x - x_hat||^2 / sigma^2 * sigma^2 / alpha^2 ...`` in epsilon
      units), capped; emphasises the low-noise end where bond lengths are decided.
    """
    name, _, arg = kind.partition(":")
    if name == "uniform" and not arg:
        return None
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"loss weighting {kind!r}: expected one of {', '.join(LOSS_WEIGHTINGS)}") from None
    if not value > 0:
        raise ValueError(f"loss weighting {kind!r}: the parameter must be positive")
    if name == "min_snr":
        return torch.clamp(snr, max=value) / snr
    if name == "snr_plus_one":
        return torch.clamp(1.0 + snr, max=value)
    raise ValueError(f"unknown loss weighting {kind!r}; expected one of {', '.join(LOSS_WEIGHTINGS)}")



def even_parity_probability(q: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """``(B,)`` probability that an even number of a molecule's atoms are "odd", atom ``i`` being odd
    independently with probability ``q[i]``: ``(1 + prod_i (1 - 2 q_i)) / 2``.

    The product is taken as sign x exp(sum of logs), so molecules of any size stay finite.
    """
    f = 1.0 - 2.0 * q.to(torch.float32)
    log_abs = scatter_sum(torch.log(f.abs().clamp(min=1e-30)), batch, num_graphs)
    negatives = scatter_sum((f < 0).to(torch.float32), batch, num_graphs)
    sign = 1.0 - 2.0 * torch.remainder(negatives, 2.0)
    return 0.5 * (1.0 + sign * torch.exp(log_abs))


def valence_parity_loss(type_logits: torch.Tensor, odd_types: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """``(B,)`` ``-log P(the molecule's valence sum is even)`` under independent per-atom type
    probabilities ``softmax(type_logits)`` ``(n, K)``; ``odd_types`` ``(K,)`` bool marks the types of
    odd valence (H, N, F in QM9). A real molecule's valence sum is always even (every bond adds its
    order to two atoms), so this is 0 for a confident, valence-consistent composition and grows
    as the composition's parity becomes a coin flip (log 2) or is confidently odd.
    """
    q = (type_logits.to(torch.float32).softmax(-1) * odd_types.to(torch.float32)).sum(-1)
    return -torch.log(even_parity_probability(q, batch, num_graphs).clamp(min=1e-6))


def bond_epsilon_loss(pred_e: torch.Tensor, eps_e: torch.Tensor, edge_batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """``(B,)`` mean squared error of the bond-feature noise per molecule: the sum over its directed
    edges ``(E, K)`` (each atom pair twice, both equal) divided by ``K`` x its number of edges, so each
    molecule's bond term is on the per-dimension scale of :func:`epsilon_loss`. Single atoms: 0."""
    err = scatter_sum(((pred_e - eps_e) ** 2).sum(-1), edge_batch, num_graphs)
    edges = torch.bincount(edge_batch, minlength=num_graphs).to(err.dtype)
    return err / (edges.clamp(min=1) * eps_e.shape[-1])
