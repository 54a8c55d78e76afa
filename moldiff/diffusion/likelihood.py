"""The variational bound on -log p(x, h, N): the NLL estimate EDM reports on QM9.

For a molecule with N atoms, positions ``x`` in the zero-CoM subspace (dimension ``d = 3 (N - 1)``)
and features ``h`` (scaled one-hot types, scaled charges), with ``T`` discrete steps
``t_i = i / T``, ``gamma = -log SNR`` and ``sigma_x0 = exp(gamma_0 / 2)`` (Hoogeboom et al. 2022,
sec. 3 and appendix; Kingma et al. 2021, "Variational Diffusion Models"):

    -log p(x, h, N) <= KL(q(z_1 | x, h) || N(0, I))                         prior term
                       + E_i [ T * 0.5 * (SNR(t_{i-1}) / SNR(t_i) - 1) * |eps - eps_hat|^2 ]   i ~ U{1..T}
                       - log p(x, h | z_0)                                   reconstruction
                       - log p(N)                                            size prior

``-log p(x | z_0)`` is Gaussian in the subspace (``0.5 |eps_x - eps_hat_x|^2 + d (log sigma_x0 +
0.5 log 2 pi)``); ``p(h | z_0)`` puts on each atom type (and each integer charge) the Gaussian mass
of its unit-width bin around the unscaled ``z_0``, normalised over types, as EDM does. All terms
are in nats, per molecule, from one Monte-Carlo draw of ``i`` and of the noise. The network enters
only as a ``predict(pos_t, h_t, t, batch) -> (eps_pos, eps_h)`` callable: this module knows nothing
of models.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from moldiff.diffusion.process import AtomFeatures, add_noise
from moldiff.diffusion.schedules import NoiseSchedule
from moldiff.geometry import num_nodes_per_graph, scatter_sum

__all__ = ["NLLTerms", "kl_prior", "reconstruction_nll", "estimate_nll"]

Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class NLLTerms(NamedTuple):
    """Per-molecule terms of the bound, ``(B,)`` float64 nats each; ``total`` is their sum."""

    prior: torch.Tensor
    diffusion: torch.Tensor
    reconstruction: torch.Tensor
    size: torch.Tensor  #: -log p(N)

    @property
    def total(self) -> torch.Tensor:
        return self.prior + self.diffusion + self.reconstruction + self.size


def _cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def kl_prior(pos: torch.Tensor, h: torch.Tensor, alpha_1: torch.Tensor, sigma_1: torch.Tensor,
             batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """``KL(N(alpha_1 [x, h], sigma_1^2 I) || N(0, I))`` per molecule, positions counted in the
    ``3 (N - 1)``-dimensional subspace. ``alpha_1``, ``sigma_1`` are per molecule ``(B,)``."""
    n = num_nodes_per_graph(batch, num_graphs).to(torch.float64)
    a2, s2 = alpha_1.double() ** 2, sigma_1.double() ** 2
    dims = 3.0 * (n - 1.0) + h.shape[-1] * n
    mean_sq = scatter_sum((pos.double() ** 2).sum(-1) + (h.double() ** 2).sum(-1), batch, num_graphs) * a2
    return 0.5 * (dims * s2 + mean_sq - dims - dims * torch.log(s2))


def reconstruction_nll(pos_err_sq: torch.Tensor, z0_h: torch.Tensor, types: torch.Tensor, charges: torch.Tensor | None,
                       gamma_0: torch.Tensor, sigma_0: torch.Tensor, features: AtomFeatures,
                       batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """``-log p(x, h | z_0)`` per molecule.

    ``pos_err_sq`` ``(B,)``: ``|eps_x - eps_hat_x|^2`` at t = 0; ``z0_h`` ``(n, F)`` the noisy features
    at t = 0; ``gamma_0``, ``sigma_0`` per molecule ``(B,)``.
    """
    n = num_nodes_per_graph(batch, num_graphs).to(torch.float64)
    d = 3.0 * (n - 1.0)
    log_sigma_x = 0.5 * gamma_0.double()
    nll_x = 0.5 * pos_err_sq.double() + d * (log_sigma_x + 0.5 * math.log(2.0 * math.pi))
    k = features.num_types
    s_atom = sigma_0.double()[batch]
    # types: unscale z_0 (one-hot lives at 0 / 1), bin of width 1 around 1 for each candidate type
    sig_t = (s_atom / features.type_scale).unsqueeze(-1)
    centred = z0_h[:, :k].double() / features.type_scale - 1.0
    log_mass = torch.log(_cdf((centred + 0.5) / sig_t) - _cdf((centred - 0.5) / sig_t) + 1e-10)
    log_p_types = log_mass - torch.logsumexp(log_mass, dim=-1, keepdim=True)
    nll_h = -log_p_types.gather(1, types.long().unsqueeze(-1)).squeeze(-1)
    if features.include_charges:
        if charges is None:
            raise ValueError("these features include charges: pass charges")
        sig_c = s_atom / features.charge_scale
        diff = charges.double() - z0_h[:, k].double() / features.charge_scale
        nll_h = nll_h - torch.log(_cdf((diff + 0.5) / sig_c) - _cdf((diff - 0.5) / sig_c) + 1e-10)
    return nll_x + scatter_sum(nll_h, batch, num_graphs)


@torch.no_grad()
def estimate_nll(predict: Predict, schedule: NoiseSchedule, features: AtomFeatures, pos: torch.Tensor,
                 types: torch.Tensor, charges: torch.Tensor | None, batch: torch.Tensor, num_graphs: int,
                 log_p_size: torch.Tensor, *, steps: int = 1000, generator: torch.Generator | None = None) -> NLLTerms:
    """One-sample estimate of the bound for each molecule of a batch (zero-CoM ``pos`` ``(n, 3)``).

    ``log_p_size`` ``(B,)``: log p(N) of each molecule's size. ``steps`` is EDM's T (1000).
    """
    dtype = pos.dtype
    h = features.encode(types, charges, dtype=dtype)
    device = pos.device
    ones = torch.ones(num_graphs, dtype=torch.float64, device=device)
    # prior term at t = 1
    a1, s1 = schedule.alpha_sigma(ones)
    prior = kl_prior(pos, h, a1, s1, batch, num_graphs)
    # diffusion term at a random step i in 1..T
    i = torch.randint(1, steps + 1, (num_graphs,), generator=generator, device=device)
    t, s = i.double() / steps, (i - 1).double() / steps
    alpha, sigma = schedule.alpha_sigma(t)
    z = add_noise(pos, h, alpha, sigma, batch, generator=generator)
    eps_pos, eps_h = predict(z.pos_t, z.h_t, t.to(dtype), batch)
    err = scatter_sum(((eps_pos - z.eps_pos) ** 2).sum(-1).double() + ((eps_h - z.eps_h) ** 2).sum(-1).double(), batch, num_graphs)
    weight = torch.expm1(schedule.gamma(t) - schedule.gamma(s))  # SNR(s) / SNR(t) - 1
    diffusion = steps * 0.5 * weight * err
    # reconstruction at t = 0
    zero = torch.zeros(num_graphs, dtype=torch.float64, device=device)
    a0, s0 = schedule.alpha_sigma(zero)
    z0 = add_noise(pos, h, a0, s0, batch, generator=generator)
    eps0_pos, _ = predict(z0.pos_t, z0.h_t, zero.to(dtype), batch)
    pos_err = scatter_sum(((eps0_pos - z0.eps_pos) ** 2).sum(-1).double(), batch, num_graphs)
    recon = reconstruction_nll(pos_err, z0.h_t, types, charges, schedule.gamma(zero), s0, features, batch, num_graphs)
    return NLLTerms(prior, diffusion, recon, -log_p_size.double())
