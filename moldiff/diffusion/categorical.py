"""Discrete diffusion of categorical variables with marginal transitions (D3PM, Austin et al. 2021;
the marginal prior of DiGress, Vignac et al. 2023, and MiDi, Vignac et al. 2023).

One variable with ``K`` classes and data marginal ``m`` ``(K,)`` is noised in continuous time
``t`` in [0, 1] (0: data, 1: noise) by

    q(x_t | x_0) = alpha_bar(t) onehot(x_0) + (1 - alpha_bar(t)) m,

the cumulative product of per-step transitions ``Q_{t|s} = a I + (1 - a) 1 m^T`` with
``a = alpha_bar(t) / alpha_bar(s)`` (matrices of this form compose by multiplying their ``a``, because
``m`` sums to 1). With probability ``alpha_bar(t)`` the class is kept, else redrawn from ``m``; at
``t = 1`` every variable is a draw from ``m``, the prior sampling starts from.

The schedule ``alpha_bar`` is one of :data:`CATEGORICAL_SCHEDULES`:

* ``"coordinate"`` (default): the coordinate schedule's signal fraction ``alpha_t^2`` (EDM's
  polynomial or the cosine :class:`~moldiff.diffusion.schedules.NoiseSchedule`), rescaled affinely so
  that ``alpha_bar(0) = 1`` and ``alpha_bar(1) = 0`` exactly (the polynomial schedule's ``alpha^2``
  runs from ``1 - 1e-5`` to ``1e-5``). One time variable then means one noise level for
  positions and classes alike: a sampler's time grid tuned for the coordinates serves both, and
  the network's time input describes both. Numerically it is close to MiDi's cosine anyway
  (``alpha_bar`` 0.88 / 0.56 / 0.19 at t = 0.25 / 0.5 / 0.75 against the cosine's 0.85 / 0.49 / 0.15).
* ``"cosine"``: MiDi's / DiGress's ``alpha_bar(t) = cos^2(pi/2 (t + s)/(1 + s)) / cos^2(pi/2 s/(1 + s))``,
  ``s = 0.008``, exactly 1 at t = 0 and 0 at t = 1.

The reverse model is x0-parametrised: the network gives logits of the clean class, and

    p(x_s | x_t) = sum_c p_theta(x_0 = c | x_t) q(x_s | x_t, x_0 = c),

with the posterior of Bayes' rule ``q(x_s | x_t, x_0) = q(x_t | x_s) q(x_s | x_0) / q(x_t | x_0)``.
All probabilities are float64. Edge variables (bond classes of atom pairs) are symmetric: one draw
per unordered pair, copied to the reverse edge (``*_edges`` methods, ``rev`` from
:func:`moldiff.geometry.reverse_edges`). Random draws take an explicit ``torch.Generator`` on the
device of the tensors.

:class:`CategoricalFeatures` is how a categorical-mode pipeline encodes atoms for the network (one-hot
element [+ one-hot formal charge]) and carries the marginals and schedule; :class:`CategoricalDiffusion`
holds the three variables' :class:`MarginalTransition` objects (types, charges, bonds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple

import torch

__all__ = [
    "CATEGORICAL_SCHEDULES",
    "CHARGE_VALUES",
    "CategoricalDiffusion",
    "CategoricalFeatures",
    "MarginalTransition",
    "categorical_alpha_bar",
    "cosine_alpha_bar",
    "sample_classes",
    "symmetric_sample",
]

#: schedules of ``alpha_bar(t)`` (see the module docstring)
CATEGORICAL_SCHEDULES = ("coordinate", "cosine")
#: formal-charge classes of categorical-mode models (QM9 with RDKit's DetermineBonds charges)
CHARGE_VALUES = (-1, 0, 1)


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """MiDi's cosine ``alpha_bar(t) = cos^2(pi/2 (t + s)/(1 + s)) / cos^2(pi/2 s/(1 + s))`` in float64,
    ``t`` clamped to [0, 1]; exactly 1 at ``t = 0`` and 0 at ``t = 1``."""
    t = t.to(torch.float64).clamp(0.0, 1.0)
    f = torch.cos((t + s) / (1.0 + s) * (math.pi / 2)) ** 2 / math.cos(s / (1.0 + s) * (math.pi / 2)) ** 2
    return torch.where(t >= 1.0, torch.zeros_like(f), f.clamp(0.0, 1.0))


def categorical_alpha_bar(kind: str, noise_schedule=None, cosine_s: float = 0.008) -> Callable[[torch.Tensor], torch.Tensor]:
    """``alpha_bar`` as a function of ``t`` (any shape, float64 out) for a schedule ``kind`` of
    :data:`CATEGORICAL_SCHEDULES`; ``"coordinate"`` needs the coordinates' ``noise_schedule``
    (:class:`~moldiff.diffusion.schedules.NoiseSchedule`)."""
    if kind == "cosine":
        return lambda t: cosine_alpha_bar(t, cosine_s)
    if kind != "coordinate":
        raise ValueError(f"unknown categorical schedule {kind!r}; choose one of {', '.join(CATEGORICAL_SCHEDULES)}")
    if noise_schedule is None:
        raise ValueError("the 'coordinate' categorical schedule needs the coordinates' noise schedule")

    def alpha_bar(t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float64)
        ends = torch.tensor([0.0, 1.0], dtype=torch.float64, device=t.device)
        a0, a1 = torch.sigmoid(-noise_schedule.gamma(ends)).unbind()
        a2 = torch.sigmoid(-noise_schedule.gamma(t.clamp(0.0, 1.0)))  # alpha_t^2
        return ((a2 - a1) / (a0 - a1)).clamp(0.0, 1.0)

    return alpha_bar


def sample_classes(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One class per row of ``probs`` ``(n, K)`` (non-negative, each row with positive sum): ``(n,)`` long.
    Classes of probability 0 are never drawn."""
    if probs.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def symmetric_sample(probs: torch.Tensor, edge_index: torch.Tensor, rev: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """One class per atom pair: drawn from the row of edge ``i -> j`` with ``i < j`` of ``probs``
    ``(E, K)`` and copied to its reverse ``j -> i`` (``rev``); ``(E,)`` long, equal on both directions."""
    return _pair_draws(lambda upper: probs[upper], edge_index, rev, generator)


def _pair_draws(probs_of: Callable[[torch.Tensor], torch.Tensor], edge_index: torch.Tensor, rev: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
    """:func:`symmetric_sample` with the probabilities computed only where they are drawn from:
    ``probs_of(upper)`` gives the rows ``(P, K)`` of the edges ``upper`` (the ``i < j`` half, in edge
    order), so the same draws come out at half the arithmetic."""
    upper = torch.nonzero(edge_index[0] < edge_index[1]).squeeze(-1)
    draw = sample_classes(probs_of(upper), generator)
    out = torch.empty(edge_index.shape[1], dtype=torch.long, device=edge_index.device)
    out[upper] = draw
    out[rev[upper]] = draw
    return out


def _rows(x, upper: torch.Tensor, num_edges: int):
    """``x[upper]`` for a tensor with one row per edge; anything else (a scalar time) as it is."""
    if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == num_edges:
        return x[upper]
    return x


class MarginalTransition:
    """The marginal-transition diffusion of one categorical variable with ``K`` classes.

    Args:
        marginals: ``(K,)`` non-negative class frequencies of the training data (normalised here).
        alpha_bar: ``t -> alpha_bar(t)`` (float64), from :func:`categorical_alpha_bar`.

    Class arguments ``x`` are ``(n,)`` long tensors; times ``t``, ``s`` are ``(n,)`` (one per item:
    index a per-molecule time with the batch vector first) or scalars; probabilities are ``(n, K)``
    float64. ``logits`` are the network's ``(n, K)`` scores of the clean class.
    """

    def __init__(self, marginals, alpha_bar: Callable[[torch.Tensor], torch.Tensor]):
        m = torch.as_tensor(marginals, dtype=torch.float64).flatten()
        if m.numel() < 2 or not bool(torch.isfinite(m).all()) or bool((m < 0).any()) or not float(m.sum()) > 0:
            raise ValueError(f"marginals must be at least 2 non-negative numbers with a positive sum, got {m.tolist()}")
        self.marginals = m / m.sum()
        self.alpha_bar = alpha_bar

    @property
    def num_classes(self) -> int:
        return int(self.marginals.numel())

    # ------------------------------------------------------------------ helpers
    def _m(self, device) -> torch.Tensor:
        return self.marginals.to(device)

    def _ab(self, t, n: int, device) -> torch.Tensor:
        """``alpha_bar`` as an ``(n, 1)`` float64 column."""
        ab = self.alpha_bar(torch.as_tensor(t, dtype=torch.float64, device=device)).reshape(-1, 1)
        if ab.shape[0] == 1:
            return ab.expand(n, 1)
        if ab.shape[0] != n:
            raise ValueError(f"{ab.shape[0]} times for {n} variables")
        return ab

    def _probs_of(self, x: torch.Tensor) -> torch.Tensor:
        """Long classes ``(n,)`` as one-hot float64 rows, or probability rows ``(n, K)`` as float64."""
        if x.dim() == 1:
            return torch.nn.functional.one_hot(x.long(), self.num_classes).to(torch.float64)
        if x.shape[-1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} classes, got rows of {x.shape[-1]}")
        return x.to(torch.float64)

    def clean_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``p_theta(x_0 | x_t)`` ``(n, K)``: ``softmax(logits)`` in float64."""
        return torch.softmax(logits.to(torch.float64), -1)

    # ------------------------------------------------------------------ forward process
    def forward_probs(self, x0: torch.Tensor, t, floor: float = 0.0) -> torch.Tensor:
        """``q(x_t | x_0)`` ``(n, K)`` for classes ``x0`` ``(n,)`` (or clean probabilities ``(n, K)``).
        ``floor > 0`` (training only): each class is redrawn from ``m`` with probability at least
        ``floor``, i.e. ``alpha_bar`` is capped at ``1 - floor`` (``diffusion.class_floor``)."""
        p0 = self._probs_of(x0)
        ab = self._ab(t, p0.shape[0], p0.device)
        if floor > 0:
            ab = ab.clamp(max=1.0 - floor)
        return ab * p0 + (1.0 - ab) * self._m(p0.device)

    def sample_forward(self, x0: torch.Tensor, t, generator: torch.Generator | None = None,
                       floor: float = 0.0) -> torch.Tensor:
        """A draw of ``x_t ~ q(x_t | x_0)`` (with ``floor``, see :meth:`forward_probs`): ``(n,)`` long."""
        return sample_classes(self.forward_probs(x0, t, floor), generator)

    def transition_probs(self, x_s: torch.Tensor, s, t) -> torch.Tensor:
        """``q(x_t | x_s)`` ``(n, K)`` for ``t >= s``: ``a [x_s = j] + (1 - a) m_j`` with
        ``a = alpha_bar_t / alpha_bar_s``, so that ``q(x_t | x_0) = sum_i q(x_t | x_s = i) q(x_s = i | x_0)``
        (used to push a state back up, RePaint's resampling)."""
        p = self._probs_of(x_s)
        n, device = p.shape[0], p.device
        a = self._ab(t, n, device) / self._ab(s, n, device).clamp(min=torch.finfo(torch.float64).tiny)
        return a * p + (1.0 - a) * self._m(device)

    def sample_transition(self, x_s: torch.Tensor, s, t, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw of ``x_t ~ q(x_t | x_s)`` (``t >= s``): ``(n,)`` long."""
        return sample_classes(self.transition_probs(x_s, s, t), generator)

    def prior_probs(self, n: int, device=None) -> torch.Tensor:
        """``(n, K)`` rows of the marginal ``m``: the distribution of ``x_1`` sampling starts from."""
        return self._m(device).expand(n, self.num_classes)

    def sample_prior(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """``n`` draws from ``m``: ``(n,)`` long."""
        return sample_classes(self.prior_probs(n, device), generator)

    # ------------------------------------------------------------------ posterior and reverse model
    def posterior_probs(self, x_t: torch.Tensor, x0: torch.Tensor, s, t) -> torch.Tensor:
        """``q(x_s | x_t, x_0)`` ``(n, K)`` for ``s < t``; with probability rows ``x0`` ``(n, K)`` (a
        distribution over the clean class) the mixture ``sum_c x0_c q(x_s | x_t, x_0 = c)``.

        Closed form, O(nK): with ``a = alpha_bar_t / alpha_bar_s`` and ``j = x_t``,
        ``q(x_t = j | x_s = i) = a [i = j] + (1 - a) m_j`` (``L_i``),
        ``q(x_s = i | x_0 = c) = alpha_bar_s [c = i] + (1 - alpha_bar_s) m_i`` and
        ``q(x_t = j | x_0 = c) = alpha_bar_t [c = j] + (1 - alpha_bar_t) m_j`` (``D_c``), so
        ``sum_c p_c q(x_s = i | x_t, c) = L_i (alpha_bar_s p_i / D_i + (1 - alpha_bar_s) m_i sum_c p_c / D_c)``.
        Clean classes ``c`` that cannot have produced ``x_t`` (``D_c = 0``: a class of zero marginal
        unless ``c = x_t``) are left out and the rest renormalised (the mixture then conditions
        ``x0`` on ``x_t``); a row with no possible clean class stays at ``x_t``.
        """
        x_t = x_t.long()
        p0 = self._probs_of(x0)
        n, device = x_t.shape[0], x_t.device
        m = self._m(device)
        ab_t, ab_s = self._ab(t, n, device), self._ab(s, n, device)
        a = ab_t / ab_s.clamp(min=torch.finfo(torch.float64).tiny)
        onehot_t = torch.nn.functional.one_hot(x_t, self.num_classes).to(torch.float64)
        m_t = m[x_t].unsqueeze(-1)
        left = a * onehot_t + (1.0 - a) * m_t
        den = ab_t * onehot_t + (1.0 - ab_t) * m_t
        w = torch.where(den > 0, p0 / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(p0))
        out = left * (ab_s * w + (1.0 - ab_s) * m * w.sum(-1, keepdim=True))
        total = out.sum(-1, keepdim=True)
        return torch.where(total > 0, out / torch.where(total > 0, total, torch.ones_like(total)), onehot_t)

    def reverse_probs(self, x_t: torch.Tensor, logits: torch.Tensor, s, t) -> torch.Tensor:
        """``p(x_s | x_t) = sum_c p_theta(x_0 = c | x_t) q(x_s | x_t, x_0 = c)`` ``(n, K)`` from the
        network's clean-class ``logits`` ``(n, K)``."""
        return self.posterior_probs(x_t, self.clean_probs(logits), s, t)

    def reverse_kl(self, x_t: torch.Tensor, x0: torch.Tensor, logits: torch.Tensor, s, t) -> torch.Tensor:
        """``KL(q(x_s | x_t, x_0) || p(x_s | x_t))`` per variable ``(n,)`` float64 nats: one step's term
        of the variational bound (D3PM, Austin et al. 2021, eq. 1) for clean classes ``x0`` ``(n,)``.
        At ``s = 0`` (``alpha_bar_s = 1``) the posterior is ``onehot(x0)`` and the term is the
        reconstruction ``-log p(x_0 | x_t)``. A class the posterior allows and the model gives
        probability 0 (an underflowed softmax) makes the term ``inf``: counted by the caller, not
        clipped here."""
        q = self.posterior_probs(x_t, x0, s, t)
        p = self.reverse_probs(x_t, logits, s, t)
        on = q > 0
        safe_q = torch.where(on, q, torch.ones_like(q))
        return torch.where(on, q * (torch.log(safe_q) - torch.log(p)), torch.zeros_like(q)).sum(-1)

    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """``KL(q(x_1 | x_0) || m)`` per variable ``(n,)`` float64: the bound's prior term, 0 for both
        schedules (``alpha_bar(1) = 0`` exactly), computed rather than assumed."""
        q = self.forward_probs(x0, 1.0)
        m = self._m(q.device).expand_as(q)
        on = q > 0
        ratio = torch.where(on, q, torch.ones_like(q)) / torch.where(on, m, torch.ones_like(m))
        return torch.where(on, q * torch.log(ratio), torch.zeros_like(q)).sum(-1)

    def sample_reverse(self, x_t: torch.Tensor, logits: torch.Tensor, s, t,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw of ``x_s ~ p(x_s | x_t)``: ``(n,)`` long."""
        return sample_classes(self.reverse_probs(x_t, logits, s, t), generator)

    def decode(self, logits: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """The clean class at the end of sampling: ``argmax`` of ``logits`` (``sample=False``) or a draw
        from ``p_theta(x_0 | x_t)``; ``(n,)`` long."""
        if not sample:
            return logits.argmax(-1)
        return sample_classes(self.clean_probs(logits), generator)

    # ------------------------------------------------------------------ symmetric edge variables
    def sample_forward_edges(self, x0: torch.Tensor, t, edge_index: torch.Tensor, rev: torch.Tensor,
                             generator: torch.Generator | None = None, floor: float = 0.0) -> torch.Tensor:
        """``x_t ~ q(x_t | x_0)`` on the directed edges ``edge_index`` ``(2, E)`` of symmetric ``x0``
        ``(E,)``: one draw per atom pair, equal on ``i -> j`` and ``j -> i``; ``(E,)`` long
        (``floor``: see :meth:`forward_probs`)."""
        E = edge_index.shape[1]
        return _pair_draws(lambda u: self.forward_probs(_rows(x0, u, E), _rows(t, u, E), floor), edge_index, rev,
                           generator)

    def sample_transition_edges(self, x_s: torch.Tensor, s, t, edge_index: torch.Tensor, rev: torch.Tensor,
                                generator: torch.Generator | None = None) -> torch.Tensor:
        """``x_t ~ q(x_t | x_s)`` per atom pair (``t >= s``), equal on both directions: ``(E,)`` long."""
        E = edge_index.shape[1]
        return _pair_draws(lambda u: self.transition_probs(_rows(x_s, u, E), _rows(s, u, E), _rows(t, u, E)),
                           edge_index, rev, generator)

    def sample_prior_edges(self, edge_index: torch.Tensor, rev: torch.Tensor,
                           generator: torch.Generator | None = None) -> torch.Tensor:
        """``x_1 ~ m`` per atom pair, equal on both directions: ``(E,)`` long."""
        return _pair_draws(lambda u: self.prior_probs(u.shape[0], edge_index.device), edge_index, rev, generator)

    def sample_reverse_edges(self, x_t: torch.Tensor, logits: torch.Tensor, s, t, edge_index: torch.Tensor,
                             rev: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x_s ~ p(x_s | x_t)`` per atom pair (from the ``i < j`` edge's logits), equal on both
        directions: ``(E,)`` long."""
        E = edge_index.shape[1]
        return _pair_draws(lambda u: self.reverse_probs(_rows(x_t, u, E), _rows(logits, u, E), _rows(s, u, E),
                                                        _rows(t, u, E)), edge_index, rev, generator)

    def decode_edges(self, logits: torch.Tensor, edge_index: torch.Tensor, rev: torch.Tensor, sample: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """The clean class of every atom pair (argmax, or a draw of ``p_theta(x_0 | x_t)``), taken from
        the ``i < j`` edge and copied to ``j -> i``: ``(E,)`` long."""
        if sample:
            return _pair_draws(lambda u: self.clean_probs(logits[u]), edge_index, rev, generator)
        chosen = logits.argmax(-1)
        return torch.where(edge_index[0] < edge_index[1], chosen, chosen[rev])


@dataclass(frozen=True)
class CategoricalFeatures:
    """Atoms (and bonds) of a categorical-diffusion model as the network sees them, with the data
    marginals and the ``alpha_bar`` schedule of their diffusion.

    The network's atom input is ``[onehot(type_t), onehot(charge class_t)]`` (``dim`` columns; the
    charge block only with ``charge_values``) and its atom output in the same layout is read as the
    logits of the clean type and charge class (:meth:`split`). Bond models take ``onehot(bond_t)``
    ``(E, bond_types)`` per directed edge and give clean-bond logits.

    Attributes:
        num_types: element classes (QM9: 5).
        type_marginals: ``(num_types,)`` fraction of training atoms of each element.
        charge_values: formal charge of each charge class (:data:`CHARGE_VALUES`), or ``()``.
        charge_marginals: fraction of training atoms in each charge class.
        bond_types: bond classes (0: no bonds; 4: none / single / double / triple).
        bond_marginals: fraction of training atom pairs (all ``i < j``) in each bond class.
        schedule: ``alpha_bar`` schedule, one of :data:`CATEGORICAL_SCHEDULES`.
        cosine_s: offset of the ``"cosine"`` schedule.
    """

    kind: ClassVar[str] = "categorical"

    num_types: int
    type_marginals: tuple[float, ...]
    charge_values: tuple[int, ...] = ()
    charge_marginals: tuple[float, ...] = ()
    bond_types: int = 0
    bond_marginals: tuple[float, ...] = ()
    schedule: str = "coordinate"
    cosine_s: float = 0.008

    def __post_init__(self):
        object.__setattr__(self, "type_marginals", tuple(float(x) for x in self.type_marginals))
        object.__setattr__(self, "charge_values", tuple(int(x) for x in self.charge_values))
        object.__setattr__(self, "charge_marginals", tuple(float(x) for x in self.charge_marginals))
        object.__setattr__(self, "bond_marginals", tuple(float(x) for x in self.bond_marginals))
        if len(self.type_marginals) != self.num_types:
            raise ValueError(f"{len(self.type_marginals)} type marginals for {self.num_types} types")
        if len(self.charge_marginals) != len(self.charge_values):
            raise ValueError(f"{len(self.charge_marginals)} charge marginals for {len(self.charge_values)} charge classes")
        if len(self.bond_marginals) != self.bond_types:
            raise ValueError(f"{len(self.bond_marginals)} bond marginals for {self.bond_types} bond classes")
        if self.schedule not in CATEGORICAL_SCHEDULES:
            raise ValueError(f"unknown categorical schedule {self.schedule!r}; choose one of {', '.join(CATEGORICAL_SCHEDULES)}")

    @property
    def dim(self) -> int:
        """Network input / output channels per atom: ``num_types`` + charge classes."""
        return self.num_types + len(self.charge_values)

    @property
    def include_charges(self) -> bool:
        return bool(self.charge_values)

    def charge_classes(self, formal_charges: torch.Tensor) -> torch.Tensor:
        """Formal charges ``(n,)`` -> class indices into ``charge_values`` ``(n,)`` long; raises
        ``ValueError`` for a charge that is not a class."""
        values = torch.as_tensor(self.charge_values, dtype=torch.long, device=formal_charges.device)
        hit = formal_charges.long().unsqueeze(-1) == values
        if not bool(hit.any(-1).all()):
            bad = sorted(set(formal_charges[~hit.any(-1)].tolist()))
            raise ValueError(f"formal charges {bad} are not among the classes {list(self.charge_values)}")
        return hit.long().argmax(-1)

    def charge_values_of(self, classes: torch.Tensor) -> torch.Tensor:
        """Charge class indices ``(n,)`` -> formal charges ``(n,)`` long."""
        return torch.as_tensor(self.charge_values, dtype=torch.long, device=classes.device)[classes.long()]

    def encode(self, types: torch.Tensor, charge_classes: torch.Tensor | None = None, dtype=torch.float32) -> torch.Tensor:
        """Type indices ``(n,)`` [and charge class indices ``(n,)``] -> network input ``(n, dim)``."""
        onehot = torch.nn.functional.one_hot(types.long(), self.num_types).to(dtype)
        if not self.charge_values:
            return onehot
        if charge_classes is None:
            raise ValueError("these features include charge classes: pass them")
        return torch.cat([onehot, torch.nn.functional.one_hot(charge_classes.long(), len(self.charge_values)).to(dtype)], -1)

    def encode_bonds(self, bond_classes: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Bond classes ``(E,)`` -> network edge input ``(E, bond_types)`` (one-hot)."""
        return torch.nn.functional.one_hot(bond_classes.long(), self.bond_types).to(dtype)

    def split(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Network atom output ``(n, dim)`` -> ``(type logits (n, num_types), charge logits (n, C) or None)``."""
        return h[:, : self.num_types], (h[:, self.num_types :] if self.charge_values else None)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "num_types": self.num_types, "type_marginals": list(self.type_marginals),
                "charge_values": list(self.charge_values), "charge_marginals": list(self.charge_marginals),
                "bond_types": self.bond_types, "bond_marginals": list(self.bond_marginals),
                "schedule": self.schedule, "cosine_s": self.cosine_s}

    @classmethod
    def from_dict(cls, d: dict) -> "CategoricalFeatures":
        d = dict(d)
        if d.pop("kind", cls.kind) != cls.kind:
            raise ValueError("not a categorical feature description")
        return cls(**d)


class CategoricalDiffusion(NamedTuple):
    """The categorical variables of a categorical-mode model: atom ``types``, formal ``charges``
    (``None`` without charge classes) and atom-pair ``bonds`` (``None`` for models without bonds)."""

    types: MarginalTransition
    charges: MarginalTransition | None
    bonds: MarginalTransition | None

    @classmethod
    def from_features(cls, features: CategoricalFeatures, noise_schedule=None) -> "CategoricalDiffusion":
        """Build from a pipeline's :class:`CategoricalFeatures` and its coordinate ``noise_schedule``
        (used by the ``"coordinate"`` schedule)."""
        ab = categorical_alpha_bar(features.schedule, noise_schedule, features.cosine_s)
        return cls(
            MarginalTransition(features.type_marginals, ab),
            MarginalTransition(features.charge_marginals, ab) if features.charge_values else None,
            MarginalTransition(features.bond_marginals, ab) if features.bond_types else None,
        )
