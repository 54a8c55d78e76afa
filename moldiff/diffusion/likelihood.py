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

Categorical models (elements, formal-charge classes and bond orders by discrete diffusion,
:mod:`moldiff.diffusion.categorical`) have the same chain with one time grid for both parts:
:func:`estimate_nll_categorical` bounds ``-log p(x, elements, charges, bonds, N)``. Given the
noisy state the reverse model draws coordinates and classes independently, so each step's KL is the
Gaussian term of the coordinates plus, per atom and per atom pair, the discrete
``KL(q(c_s | c_t, c_0) || p(c_s | c_t))`` (D3PM, Austin et al. 2021). Because ``alpha_bar(0) = 1``
the classes at ``t_0 = 0`` are the data's, step 1's discrete KL is their reconstruction
``-log p(c_0 | z_{t_1})``, and the reconstruction term is the coordinates' alone. The number
bounds a different quantity from EDM's (it scores bonds and charges too, and no Gaussian bins on
``h``), so it is not comparable with EDM's -110.7.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from moldiff.diffusion.process import AtomFeatures, add_noise
from moldiff.diffusion.schedules import NoiseSchedule
from moldiff.geometry import num_nodes_per_graph, scatter_sum

__all__ = ["NLLTerms", "kl_prior", "reconstruction_nll", "position_reconstruction_nll", "estimate_nll",
           "estimate_nll_categorical"]

Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class NLLTerms(NamedTuple):
    """Per-molecule terms of the bound, ``(B,)`` float64 nats each; ``total`` is their sum."""

    prior: torch.Tensor
    diffusion: torch.Tensor
    reconstruction: torch.Tensor
    size: torch.Tensor  #: -log p(N)
    #: categorical models: the discrete classes' share of ``diffusion`` (already in it); else None
    classes: torch.Tensor | None = None

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


def position_reconstruction_nll(pos_err_sq: torch.Tensor, gamma_0: torch.Tensor, batch: torch.Tensor,
                                num_graphs: int) -> torch.Tensor:
    """``-log p(x | z_0)`` per molecule: Gaussian in the ``3 (N - 1)``-dimensional subspace with
    ``sigma_x0 = exp(gamma_0 / 2)``; ``pos_err_sq`` ``(B,)`` is ``|eps_x - eps_hat_x|^2`` at t = 0."""
    n = num_nodes_per_graph(batch, num_graphs).to(torch.float64)
    d = 3.0 * (n - 1.0)
    return 0.5 * pos_err_sq.double() + d * (0.5 * gamma_0.double() + 0.5 * math.log(2.0 * math.pi))


def reconstruction_nll(pos_err_sq: torch.Tensor, z0_h: torch.Tensor, types: torch.Tensor, charges: torch.Tensor | None,
                       gamma_0: torch.Tensor, sigma_0: torch.Tensor, features: AtomFeatures,
                       batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """``-log p(x, h | z_0)`` per molecule.

    ``pos_err_sq`` ``(B,)``: ``|eps_x - eps_hat_x|^2`` at t = 0; ``z0_h`` ``(n, F)`` the noisy features
    at t = 0; ``gamma_0``, ``sigma_0`` per molecule ``(B,)``.
    """
    nll_x = position_reconstruction_nll(pos_err_sq, gamma_0, batch, num_graphs)
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


PredictCategorical = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor],
                              "tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]"]


@torch.no_grad()
def estimate_nll_categorical(predict: PredictCategorical, schedule: NoiseSchedule, features, cat, pos: torch.Tensor,
                             types: torch.Tensor, charge_classes: torch.Tensor | None, bonds: torch.Tensor | None,
                             edge_index: torch.Tensor | None, rev: torch.Tensor | None, batch: torch.Tensor,
                             num_graphs: int, log_p_size: torch.Tensor, *, steps: int = 1000,
                             generator: torch.Generator | None = None) -> NLLTerms:
    """One-sample estimate of the bound on ``-log p(x, elements, charges, bonds, N)`` per molecule of
    a categorical model (module docstring).

    ``features``: the model's :class:`~moldiff.diffusion.categorical.CategoricalFeatures`; ``cat``
    its :class:`~moldiff.diffusion.categorical.CategoricalDiffusion`. ``types`` / ``charge_classes``
    ``(n,)`` class indices (``charge_classes`` None without charge classes); ``bonds`` ``(E,)``
    the bond class of every directed edge of ``edge_index`` (fully connected per molecule, ``rev``
    its reverse edges; all None for models without bonds). ``predict(pos_t, h_t, e_t, t)`` returns
    ``(eps_pos, atom logits (n, features.dim), bond logits (E, K) or None)`` at times ``t`` ``(B,)``.
    Random draws, in order: the step ``i`` of every molecule, the coordinate noise, the noisy
    elements, charges and bonds at ``t_i``, then the coordinate noise at ``t = 0``. Atom pairs count
    once (the ``i < j`` edge). ``classes`` in the result is the discrete part of ``diffusion``.
    """
    dtype, device = pos.dtype, pos.device
    if (cat.charges is None) != (charge_classes is None):
        raise ValueError("pass charge classes exactly when the model has them")
    if (cat.bonds is None) != (bonds is None):
        raise ValueError("pass bond classes exactly when the model generates bonds")
    no_h = pos.new_zeros(pos.shape[0], 0)
    ones = torch.ones(num_graphs, dtype=torch.float64, device=device)
    upper = edge_of = None
    if bonds is not None:
        upper = torch.nonzero(edge_index[0] < edge_index[1]).squeeze(-1)
        edge_of = batch[edge_index[0][upper]]

    def per_molecule(kl_types, kl_charges, kl_bonds):
        total = scatter_sum(kl_types, batch, num_graphs)
        if kl_charges is not None:
            total = total + scatter_sum(kl_charges, batch, num_graphs)
        if kl_bonds is not None:
            total = total + scatter_sum(kl_bonds, edge_of, num_graphs)
        return total

    # prior term at t = 1: the coordinates' Gaussian KL and the classes' KL to the marginals
    a1, s1 = schedule.alpha_sigma(ones)
    prior = kl_prior(pos, no_h, a1, s1, batch, num_graphs) + per_molecule(
        cat.types.prior_kl(types), None if charge_classes is None else cat.charges.prior_kl(charge_classes),
        None if bonds is None else cat.bonds.prior_kl(bonds[upper]))
    # one step i in 1..T per molecule
    i = torch.randint(1, steps + 1, (num_graphs,), generator=generator, device=device)
    t, s = i.double() / steps, (i - 1).double() / steps
    alpha, sigma = schedule.alpha_sigma(t)
    z = add_noise(pos, no_h, alpha, sigma, batch, generator=generator)
    t_atom, s_atom = t[batch], s[batch]
    types_t = cat.types.sample_forward(types, t_atom, generator)
    charges_t = None if charge_classes is None else cat.charges.sample_forward(charge_classes, t_atom, generator)
    bonds_t = e_t = None
    if bonds is not None:
        bonds_t = cat.bonds.sample_forward_edges(bonds, t[batch[edge_index[0]]], edge_index, rev, generator)
        e_t = features.encode_bonds(bonds_t, dtype)
    eps_pos, logits_h, logits_e = predict(z.pos_t, features.encode(types_t, charges_t, dtype=dtype), e_t, t.to(dtype))
    err = scatter_sum(((eps_pos - z.eps_pos) ** 2).sum(-1).double(), batch, num_graphs)
    weight = torch.expm1(schedule.gamma(t) - schedule.gamma(s))  # SNR(s) / SNR(t) - 1
    type_logits, charge_logits = features.split(logits_h)
    kl_bonds = None
    if bonds is not None:
        t_pair, s_pair = t[edge_of], s[edge_of]
        kl_bonds = cat.bonds.reverse_kl(bonds_t[upper], bonds[upper], logits_e[upper], s_pair, t_pair)
    classes = steps * per_molecule(
        cat.types.reverse_kl(types_t, types, type_logits, s_atom, t_atom),
        None if charge_classes is None else cat.charges.reverse_kl(charges_t, charge_classes, charge_logits, s_atom, t_atom),
        kl_bonds)
    diffusion = steps * 0.5 * weight * err + classes
    # reconstruction of the coordinates at t = 0, the classes clean (alpha_bar(0) = 1)
    zero = torch.zeros(num_graphs, dtype=torch.float64, device=device)
    a0, s0 = schedule.alpha_sigma(zero)
    z0 = add_noise(pos, no_h, a0, s0, batch, generator=generator)
    e0 = None if bonds is None else features.encode_bonds(bonds, dtype)
    eps0_pos = predict(z0.pos_t, features.encode(types, charge_classes, dtype=dtype), e0, zero.to(dtype))[0]
    pos_err = scatter_sum(((eps0_pos - z0.eps_pos) ** 2).sum(-1).double(), batch, num_graphs)
    recon = position_reconstruction_nll(pos_err, schedule.gamma(zero), batch, num_graphs)
    return NLLTerms(prior, diffusion, recon, -log_p_size.double(), classes)
