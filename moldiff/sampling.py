"""The reverse-diffusion loop, written once, and what it returns.

:func:`denoise_batch` runs the reverse process for one batch of molecules: draw the initial noise,
then for each time pair ``(t, s)`` ask the network for its prediction and let the sampler
(:mod:`moldiff.diffusion.samplers`) take one step, then decode at ``t = 0``. Everything that
changes *what* is sampled plugs into it as a :class:`SamplingHook` instead of copying the loop:
given atom types (:class:`GivenTypes`), RePaint clamping of a fragment or formula and open-valence
guidance (:mod:`moldiff.inpainting`). A hook sees the state at fixed points of every step:

- ``begin``: after the initial noise is drawn, before the first network call;
- ``guide``: after each network call, to change the prediction (guidance);
- ``after_step``: after each sampler step, and once after the final decode (``final=True``), to
  impose what is known;
- ``finish``: after faults are recorded, just before the state is decoded into elements.

A property-conditional model gets its per-molecule ``context`` through the loop's one network call,
and classifier-free guidance (:func:`guided_noise`) mixes its conditional and unconditional
predictions there, before the hooks' ``guide``.

With ``resample = r > 1`` every step is taken ``r`` times, the state pushed back from ``s`` to ``t``
by the forward process in between (RePaint's resampling). Numerical faults are recorded per
molecule, never repaired (:func:`record_faults`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

from types import SimpleNamespace

import numpy as np
import torch

from moldiff.chemistry.elements import QM9_ELEMENTS
from moldiff.diffusion.process import centred_noise, symmetric_edge_noise
from moldiff.geometry import fully_connected_edges, num_nodes_per_graph, remove_mean, reverse_edges

if TYPE_CHECKING:
    from moldiff.diffusion.samplers import Sampler

__all__ = ["SampledArrays", "record_faults", "network_inputs", "batch_ticker", "DEFAULT_TIME_POWER", "DEFAULT_NOISE_SCALE",
           "DEFAULT_LATE_RESAMPLE", "DEFAULT_RESAMPLE_BELOW", "network_evaluations",
           "SamplingHook", "GivenTypes", "BatchContext", "LoopState", "BatchResult", "denoise_batch", "guided_noise"]

#: Default time grid of sampling, ``t_k = (k / K) ** DEFAULT_TIME_POWER`` (1 would be EDM's uniform
#: grid). Measured on the shipped model with 50 and 100 ancestral steps (docs/experiments.md,
#: "Time grid"): a power of 2 gave higher stability and validity than the uniform grid at no cost.
DEFAULT_TIME_POWER = 2.0

#: Default factor on the noise drawn at each reverse step (1 is the model's posterior, as EDM
#: samples). Below 1 is lower-temperature sampling: same means, less fresh noise, which the
#: session-5 study in docs/experiments.md ("Noise scale") found raises validity and stability
#: with uniqueness and novelty kept; ``noise_scale=1`` restores EDM's ancestral sampler.
DEFAULT_NOISE_SCALE = 0.5

#: Plain sampling's default late resampling: each step that starts at ``t <= DEFAULT_RESAMPLE_BELOW``
#: is taken ``DEFAULT_LATE_RESAMPLE`` times, pushed back up by the forward process in between
#: (RePaint's resampling, on the late steps only), so the network re-decides elements, charges and
#: bonds on a nearly final geometry. On the shipped ``qm9-bonds`` at 50 steps (1,000 samples, seed 0)
#: it took molecule stability from 67.9% to 84.7% and validity from 89.0% to 94.3% for 22 more
#: network calls (73 per molecule); 100 plain steps give 72.9% (docs/experiments.md, session 27).
DEFAULT_LATE_RESAMPLE = 2
DEFAULT_RESAMPLE_BELOW = 0.2


def resample_rounds(starts, resample: int = 1, resample_below: float = 1.0) -> list[int]:
    """Rounds of each step whose start times are ``starts``: ``resample`` for a step starting at
    ``t <= resample_below``, 1 for the others (the rule :func:`denoise_batch` follows)."""
    return [resample if float(t) <= resample_below else 1 for t in starts]


def network_evaluations(times, resample: int = 1, resample_below: float = 1.0) -> int:
    """Network calls per molecule of :func:`denoise_batch` on the time grid ``times`` (``K + 1``
    times, from 1 down): the rounds of every step (:func:`resample_rounds`) and one call for the
    final decode."""
    return sum(resample_rounds(list(times)[:-1], resample, resample_below)) + 1


def batch_ticker(on_step, start: int, size: int):
    """``tick(i, total)`` for one batch of ``size`` molecules starting at molecule ``start``: calls
    ``on_step(start + size * i / total)`` after the batch's i-th of ``total`` network evaluations
    (``None`` when ``on_step`` is ``None``)."""
    if on_step is None:
        return None
    return lambda i, total: on_step(start + size * i / total)


@dataclass
class SampledArrays:
    """Raw output of the reverse process for ``B`` molecules.

    ``positions`` list of ``(N_k, 3)`` float arrays (Å, zero centroid); ``types`` list of ``(N_k,)``
    element indices; ``charges`` list of ``(N_k,)`` decoded charge channels (or ``None``);
    ``fault_step[k]`` is the reverse step at which molecule k first became non-finite, or -1;
    ``bonds``: for models that generate bonds, one ``(P_k, 3)`` int array per molecule of rows
    ``[i, j, order]`` (``i < j`` atom indices, order 1-3), else empty; ``formal_charges``: for
    categorical models with charge classes, one ``(N_k,)`` array per molecule, else empty.
    """

    positions: list[np.ndarray]
    types: list[np.ndarray]
    charges: list[np.ndarray | None]
    fault_step: np.ndarray
    elements: tuple[str, ...] = QM9_ELEMENTS
    steps: int = 0
    sampler: str = ""
    seed: int | None = None
    time_power: float = 1.0
    noise_scale: float = 1.0
    extra: dict = field(default_factory=dict)
    bonds: list[np.ndarray] = field(default_factory=list)
    #: categorical models with charge classes: one ``(N_k,)`` int array of formal charges per molecule
    formal_charges: list[np.ndarray] = field(default_factory=list)

    def symbols(self, k: int) -> list[str]:
        return [self.elements[i] for i in self.types[k]]

    def add_batch(self, start: int, sizes, pos: np.ndarray, types: np.ndarray, charges, fault: np.ndarray,
                  bonds: list[np.ndarray] | None = None, formal_charges: np.ndarray | None = None) -> None:
        """Split one denoised flat batch (molecules ``start .. start + len(sizes) - 1``) into per-molecule
        arrays (the fields of a :class:`BatchResult`, in order)."""
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        for lo, hi in zip(offsets[:-1], offsets[1:]):
            self.positions.append(pos[lo:hi])
            self.types.append(types[lo:hi])
            self.charges.append(None if charges is None else charges[lo:hi])
            if formal_charges is not None:
                self.formal_charges.append(formal_charges[lo:hi])
        if bonds is not None:
            self.bonds.extend(bonds)
        self.fault_step[start : start + len(sizes)] = fault



def record_faults(fault: torch.Tensor, pos: torch.Tensor, h: torch.Tensor, batch: torch.Tensor, num_graphs: int, step_index: int) -> None:
    """Set ``fault[k] = step_index`` for molecules whose atoms became non-finite at this step
    (first occurrence only). Faulty molecules are flagged, never repaired: their whole state
    ``pos``/``h`` is set to NaN in place, so that what comes out shows the fault (the network sees
    zeros in their place, :func:`network_inputs`, and would otherwise move them on finitely)."""
    bad_atom = ~(torch.isfinite(pos).all(-1) & torch.isfinite(h).all(-1))
    if bad_atom.any():
        bad_mol = num_nodes_per_graph(batch[bad_atom], num_graphs) > 0
        fault[bad_mol & (fault < 0)] = step_index
    if bool((fault >= 0).any()):
        rows = (fault >= 0)[batch].unsqueeze(-1)
        pos.masked_fill_(rows, float("nan"))
        h.masked_fill_(rows, float("nan"))


def network_inputs(fault: torch.Tensor, batch: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The states as the network should see them: rows of molecules that already faulted set to 0.

    A faulted molecule stays non-finite in the sampler's state (and flagged), but its NaNs must not
    reach the network: under bf16 autocast on CPU a NaN row in one matrix product can turn other
    rows of the same product into NaN (seen with oneDNN: one fault took its neighbour in the flat
    batch with it, docs/experiments.md session 8), so a fault would spread to healthy molecules.
    ``states``: ``(n, *)`` tensors indexed like ``batch``, or ``(E, *)`` with ``batch`` given per edge.
    """
    if not bool((fault >= 0).any()):
        return states
    out = []
    for x in states:
        rows = (fault >= 0)[batch]
        out.append(x.masked_fill(rows.view(-1, *([1] * (x.dim() - 1))), 0.0))
    return tuple(out)


def guided_noise(pipe, pos_t: torch.Tensor, h_t: torch.Tensor, t: torch.Tensor, batch: torch.Tensor,
                 context: torch.Tensor | None, guidance_scale: float | None = None, *,
                 edge_index: torch.Tensor | None = None, **extra) -> tuple:
    """The network's prediction (``pipe.predict_noise``'s tuple) for context ``context`` ``(B, C)``,
    with classifier-free guidance at scale ``w = guidance_scale``:
    ``eps = eps_uncond + w (eps_cond - eps_uncond)`` for every output, ``eps_uncond`` the prediction
    with every property dropped (an all-zero context, :class:`moldiff.data.properties.PropertyConditioning`).

    ``w = 0`` calls the network with the all-zero context only (exactly the unconditional model's
    prediction); ``w = 1`` or ``None`` with ``context`` only (the plain conditional one); any other
    ``w`` makes one network call on a doubled batch, the molecules with ``context`` and again with
    the zero context. ``context=None``: the plain call. ``extra``: ``predict_noise``'s other keyword
    arguments (``t_h``, ``cond``, ``e_t`` with edges indexed by ``edge_index``).
    """
    if context is None or guidance_scale is None or guidance_scale == 1:
        return pipe.predict_noise(pos_t, h_t, t, batch, context=context, edge_index=edge_index, **extra)
    uncond = torch.zeros_like(context)
    if guidance_scale == 0:
        return pipe.predict_noise(pos_t, h_t, t, batch, context=uncond, edge_index=edge_index, **extra)
    num_graphs, num_atoms = context.shape[0], pos_t.shape[0]
    if edge_index is None:
        edge_index = fully_connected_edges(batch)
    both = {}
    for key, value in extra.items():  # per-molecule, per-atom or per-edge inputs: the same for both halves
        if value is None:
            both[key] = None
        elif isinstance(value, tuple):
            both[key] = tuple(torch.cat([v, v]) for v in value)
        else:
            both[key] = torch.cat([value, value])
    out = pipe.predict_noise(torch.cat([pos_t, pos_t]), torch.cat([h_t, h_t]), torch.cat([t, t]),
                             torch.cat([batch, batch + num_graphs]), context=torch.cat([context, uncond]),
                             edge_index=torch.cat([edge_index, edge_index + num_atoms], 1), **both)
    mixed = []
    for x in out:
        half = x.shape[0] // 2
        cond, free = x[:half], x[half:]
        mixed.append(free + guidance_scale * (cond - free))
    return tuple(mixed)


# ---------------------------------------------------------------------------------------- the loop


@dataclass(eq=False)
class BatchContext:
    """What stays fixed while one batch is denoised (read by hooks).

    ``sizes`` ``(B,)`` atoms per molecule; ``batch`` ``(A,)`` molecule of each atom; ``local``
    ``(A,)`` index of each atom inside its molecule; ``edge_index`` the fully connected graph;
    ``initial_noise`` the standard normal draws ``(positions (A, 3), features (A, F))`` the state
    started from (positions before projection to zero CoM).
    """

    pipe: object
    sampler: "Sampler"
    generator: torch.Generator
    sizes: np.ndarray
    batch: torch.Tensor
    local: torch.Tensor
    edge_index: torch.Tensor
    num_graphs: int
    dtype: torch.dtype
    initial_noise: tuple[torch.Tensor, torch.Tensor]
    #: ``(B, context_dim)`` conditioning of a property-conditional model (``None``: none given)
    context: torch.Tensor | None = None
    #: classifier-free guidance scale (``None``: the plain conditional prediction)
    guidance_scale: float | None = None

    @property
    def device(self) -> torch.device:
        return self.batch.device

    @property
    def num_atoms(self) -> int:
        return int(self.batch.shape[0])

    def per_atom(self, x: torch.Tensor) -> torch.Tensor:
        """A per-molecule ``(B,)`` quantity as an ``(A, 1)`` column in the state's dtype."""
        return x.to(self.dtype)[self.batch].unsqueeze(-1)


@dataclass(eq=False)
class LoopState:
    """The reverse process's state: ``pos`` ``(A, 3)``, ``h`` ``(A, F)``, bond features ``e``
    ``(E, K)`` (bond models, else ``None``), ``fault`` ``(B,)`` first faulty step per molecule (-1:
    none), ``cond`` the self-conditioning estimate (or ``None``). Hooks may replace the tensors."""

    pos: torch.Tensor
    h: torch.Tensor
    e: torch.Tensor | None
    fault: torch.Tensor
    cond: tuple[torch.Tensor, torch.Tensor] | None = None
    #: categorical models: the classes behind ``h`` and ``e`` (types, charge classes, bond classes)
    classes: dict[str, torch.Tensor] = field(default_factory=dict)


class SamplingHook:
    """A plug-in for :func:`denoise_batch`; every method is optional (see the module docstring)."""

    def begin(self, ctx: BatchContext, state: LoopState, t: torch.Tensor) -> None:
        """After the initial noise at time ``t`` ``(B,)`` (= 1), before the first network call."""

    def guide(self, ctx: BatchContext, state: LoopState, eps_pos: torch.Tensor, eps_h: torch.Tensor,
              t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's noise prediction at ``t``, possibly changed; returns ``(eps_pos, eps_h)``."""
        return eps_pos, eps_h

    def after_step(self, ctx: BatchContext, state: LoopState, s: torch.Tensor, final: bool = False) -> None:
        """After the step to ``s`` (``final``: after the decode at ``t = 0``), before faults are recorded."""

    def finish(self, ctx: BatchContext, state: LoopState) -> None:
        """After the final faults are recorded (``state.pos`` is float64), before elements are decoded."""


class GivenTypes(SamplingHook):
    """Every atom's element given: the network sees its clean features at every step (models trained
    with ``diffusion.known_types_prob > 0`` learned p(positions | types) this way) and the output
    keeps them, faulted molecules included. ``types`` ``(A,)`` element indices of the batch's atoms."""

    def __init__(self, types: torch.Tensor):
        self.types = types

    def clean(self, ctx: BatchContext) -> torch.Tensor:
        pipe = ctx.pipe
        numbers = torch.as_tensor(pipe.atomic_numbers, device=ctx.device)[self.types]
        return pipe.features.encode(self.types, numbers, dtype=ctx.dtype)

    def begin(self, ctx, state, t):
        self._h = self.clean(ctx)
        state.h = self._h.clone()

    def after_step(self, ctx, state, s, final=False):
        state.h = self._h.clone()

    def finish(self, ctx, state):
        state.h = self._h.clone()


class EvenValence(SamplingHook):
    """Keep every molecule's composition to an even valence sum from time ``t_start`` down.

    An odd sum of the atoms' valences (H + N + F odd, with QM9's elements) makes a molecule unstable
    whatever its geometry (:func:`moldiff.chemistry.elements.valence_sum_parity`), and the EDM model
    leaves about 40% of its samples so. At every network call with ``t <= t_start`` this hook reads
    the clean estimate of each molecule's elements (the argmax of the one-hot block of
    ``x_hat = (h_t - sigma_t eps_hat) / alpha_t``); where their valence sum is odd, it moves one atom
    to an element of the other parity: the atom and element whose estimated one-hot value is closest
    to that of the atom's current element (the cheapest change of the parity the network offers).
    That atom's clean estimate becomes the element's clean encoding, and its ``eps_h`` the noise
    that gives it, so the sampler steps towards it and the network sees it at the next call, with the
    steps left to fit the geometry. The last call (the decode at ``t = 0``) is included, so every
    molecule without a numerical fault comes out with an even sum. Gaussian element features only.

    ``steered`` ``(B,)`` counts the calls at which each molecule was changed.
    """

    def __init__(self, pipe, t_start: float):
        from moldiff.chemistry.elements import allowed_valences

        if not (math.isfinite(t_start) and 0.0 <= t_start <= 1.0):
            raise ValueError(f"even-valence start time must be in [0, 1], got {t_start}")
        if pipe.categorical is not None:
            raise ValueError("even valence sums: for models with Gaussian element features (not categorical ones)")
        parities = []
        for symbol in pipe.elements:
            found = {v % 2 for v in allowed_valences(symbol)}
            if len(found) != 1:
                raise ValueError(f"even valence sums: element {symbol} has no valence of a single parity")
            parities.append(found.pop())
        if len(set(parities)) < 2:
            raise ValueError("even valence sums: the model's elements all have valences of one parity")
        self.t_start = float(t_start)
        self.parity = torch.tensor(parities, dtype=torch.long)
        self.steered: torch.Tensor | None = None

    def begin(self, ctx, state, t):
        self.parity = self.parity.to(ctx.device)
        self.steered = torch.zeros(ctx.num_graphs, dtype=torch.long, device=ctx.device)

    def guide(self, ctx, state, eps_pos, eps_h, t):
        if float(t[0]) > self.t_start:
            return eps_pos, eps_h
        pipe, batch = ctx.pipe, ctx.batch
        k = pipe.features.num_types
        alpha, sigma = pipe.schedule.alpha_sigma(t)
        a, s = ctx.per_atom(alpha), ctx.per_atom(sigma)
        scores = ((state.h - s * eps_h) / a)[:, :k]
        ok = torch.isfinite(scores).all(-1) & (state.fault < 0)[batch]
        scores = torch.where(ok.unsqueeze(-1), scores, torch.zeros_like(scores))
        types = scores.argmax(-1)
        odd = torch.zeros(ctx.num_graphs, dtype=torch.long, device=ctx.device)
        odd.index_add_(0, batch, self.parity[types])
        bad_mol = torch.zeros(ctx.num_graphs, dtype=torch.bool, device=ctx.device)
        bad_mol[batch[~ok]] = True
        fix = (odd % 2 == 1) & ~bad_mol
        if not fix.any():
            return eps_pos, eps_h
        # the best element of the other parity for each atom, and what moving to it costs
        other = self.parity.unsqueeze(0) != self.parity[types].unsqueeze(1)
        alt_score, alt = scores.masked_fill(~other, -math.inf).max(-1)
        cost = scores.gather(1, types.unsqueeze(1)).squeeze(1) - alt_score
        cost = cost.masked_fill(~fix[batch], math.inf)
        best = torch.full((ctx.num_graphs,), math.inf, dtype=cost.dtype, device=ctx.device)
        best.scatter_reduce_(0, batch, cost, reduce="amin")
        first = torch.arange(ctx.num_atoms, device=ctx.device)
        pick = torch.full((ctx.num_graphs,), ctx.num_atoms, dtype=torch.long, device=ctx.device)
        pick.scatter_reduce_(0, batch, torch.where(cost == best[batch], first, ctx.num_atoms), reduce="amin")
        atoms = pick[fix]
        new = alt[atoms]
        numbers = torch.as_tensor(pipe.atomic_numbers, device=ctx.device)[new]
        clean = pipe.features.encode(new, numbers if pipe.features.include_charges else None, dtype=eps_h.dtype)
        eps_h = eps_h.clone()
        eps_h[atoms] = (state.h[atoms] - a[atoms] * clean) / s[atoms]
        self.steered += fix.long()
        return eps_pos, eps_h


class BatchResult(NamedTuple):
    """One denoised batch as numpy: ``pos`` ``(A, 3)`` float64 Å, ``types`` ``(A,)``, ``charges``
    ``(A,)`` (EDM's atomic-number channel) or ``None``, ``fault`` ``(B,)``, ``bonds``: per molecule
    ``(P_k, 3)`` rows ``[i, j, order]`` for bond models, else ``None``; ``formal_charges`` ``(A,)``
    for categorical models with charge classes, else ``None``."""

    pos: np.ndarray
    types: np.ndarray
    charges: np.ndarray | None
    fault: np.ndarray
    bonds: list[np.ndarray] | None
    formal_charges: np.ndarray | None = None


class CategoricalStep:
    """The reverse step of a categorical model's classes (elements, charge classes, bond orders):
    marginal-transition discrete diffusion (:mod:`moldiff.diffusion.categorical`), from the
    network's clean-class logits. The classes live in ``state.classes``; ``state.h`` / ``state.e``
    are their one-hot encodings, the network's inputs. Molecules whose logits are not finite are
    recorded as faults (their classes stay put; the loop keeps them flagged, never repaired)."""

    def __init__(self, pipe, ctx: BatchContext, edge_index: torch.Tensor | None, rev: torch.Tensor | None):
        self.cat, self.features = pipe.categorical, pipe.features
        self.ctx, self.edge_index, self.rev = ctx, edge_index, rev

    def begin(self, state: LoopState) -> None:
        gen, dev, n = self.ctx.generator, self.ctx.device, self.ctx.num_atoms
        state.classes["types"] = self.cat.types.sample_prior(n, gen, dev)
        if self.cat.charges is not None:
            state.classes["charges"] = self.cat.charges.sample_prior(n, gen, dev)
        if self.cat.bonds is not None:
            state.classes["bonds"] = self.cat.bonds.sample_prior_edges(self.edge_index, self.rev, gen)
        self.encode(state)

    def encode(self, state: LoopState) -> None:
        dtype = self.ctx.dtype
        state.h = self.features.encode(state.classes["types"], state.classes.get("charges"), dtype=dtype)
        if "bonds" in state.classes:
            state.e = self.features.encode_bonds(state.classes["bonds"], dtype=dtype)

    def _finite(self, state: LoopState, logits_h: torch.Tensor, logits_e: torch.Tensor | None, step_index: int):
        """Logits with the rows of faulted (or now non-finite) molecules set to 0, after recording faults."""
        ctx = self.ctx
        bad = ~torch.isfinite(logits_h).all(-1)
        bad_mol = num_nodes_per_graph(ctx.batch[bad], ctx.num_graphs) > 0
        if logits_e is not None:
            bad_e = ~torch.isfinite(logits_e).all(-1)
            bad_mol |= num_nodes_per_graph(ctx.batch[self.edge_index[0][bad_e]], ctx.num_graphs) > 0
        state.fault[bad_mol & (state.fault < 0)] = step_index
        faulty = state.fault >= 0
        logits_h = logits_h.masked_fill(faulty[ctx.batch].unsqueeze(-1), 0.0)
        if logits_e is not None:
            logits_e = logits_e.masked_fill(faulty[ctx.batch[self.edge_index[0]]].unsqueeze(-1), 0.0)
        return logits_h, logits_e

    @staticmethod
    def _per(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Per-molecule times ``x`` ``(B,)`` per variable (``x[index]``), or as one time ``(1,)`` when
        every molecule has the same (the plain loop): the same numbers, without a time per bond."""
        return x[:1] if x.numel() and bool((x == x[0]).all()) else x[index]

    def step(self, state: LoopState, logits_h, logits_e, t, s, step_index: int) -> None:
        """Draw the classes at ``s`` from p(x_s | x_t) (per-molecule times ``t``, ``s`` ``(B,)``)."""
        logits_h, logits_e = self._finite(state, logits_h, logits_e, step_index)
        gen, batch = self.ctx.generator, self.ctx.batch
        type_logits, charge_logits = self.features.split(logits_h)
        c = state.classes
        ta, sa = self._per(t, batch), self._per(s, batch)
        c["types"] = self.cat.types.sample_reverse(c["types"], type_logits, sa, ta, gen)
        if "charges" in c:
            c["charges"] = self.cat.charges.sample_reverse(c["charges"], charge_logits, sa, ta, gen)
        if "bonds" in c:
            edge = batch[self.edge_index[0]]
            te, se = self._per(t, edge), self._per(s, edge)
            c["bonds"] = self.cat.bonds.sample_reverse_edges(c["bonds"], logits_e, se, te, self.edge_index, self.rev, gen)
        self.encode(state)

    def renoise(self, state: LoopState, s: torch.Tensor, t: torch.Tensor) -> None:
        """Push the classes from ``s`` back up to ``t > s`` (per-molecule ``(B,)``) with draws of
        ``q(x_t | x_s)`` (RePaint's resampling)."""
        gen, batch = self.ctx.generator, self.ctx.batch
        c = state.classes
        ta, sa = self._per(t, batch), self._per(s, batch)
        c["types"] = self.cat.types.sample_transition(c["types"], sa, ta, gen)
        if "charges" in c:
            c["charges"] = self.cat.charges.sample_transition(c["charges"], sa, ta, gen)
        if "bonds" in c:
            edge = batch[self.edge_index[0]]
            c["bonds"] = self.cat.bonds.sample_transition_edges(c["bonds"], self._per(s, edge), self._per(t, edge),
                                                                self.edge_index, self.rev, gen)
        self.encode(state)

    def decode(self, state: LoopState, logits_h, logits_e, step_index: int) -> None:
        """The clean classes at the end: argmax of the last logits."""
        logits_h, logits_e = self._finite(state, logits_h, logits_e, step_index)
        type_logits, charge_logits = self.features.split(logits_h)
        c = state.classes
        c["types"] = self.cat.types.decode(type_logits)
        if "charges" in c:
            c["charges"] = self.cat.charges.decode(charge_logits)
        if "bonds" in c:
            c["bonds"] = self.cat.bonds.decode_edges(logits_e, self.edge_index, self.rev)
        self.encode(state)


def _renoise(ctx: BatchContext, state: LoopState, s: torch.Tensor, t: torch.Tensor,
             categorical: CategoricalStep | None = None) -> None:
    """Push the state from ``s`` back to ``t > s`` with a draw of q(z_t | z_s) (EDM eq. 3; a
    categorical model's classes by their own transition, :meth:`CategoricalStep.renoise`)."""
    schedule = ctx.pipe.schedule
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    a_ts = alpha_t / alpha_s
    std = torch.sqrt((sigma_t**2 - a_ts**2 * sigma_s**2).clamp(min=0.0))
    noise_pos = centred_noise(ctx.batch, ctx.num_graphs, generator=ctx.generator, dtype=ctx.dtype)
    noise_h = torch.randn(state.h.shape, generator=ctx.generator, dtype=ctx.dtype, device=ctx.device)
    a, sd = ctx.per_atom(a_ts), ctx.per_atom(std)
    state.pos, state.h = a * state.pos + sd * noise_pos, a * state.h + sd * noise_h
    if categorical is not None:
        categorical.renoise(state, s, t)


def split_bonds(orders: torch.Tensor, edge_index: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> list[np.ndarray]:
    """Per molecule ``(P_k, 3)`` rows ``[i, j, order]`` (local ``i < j``, order > 0) from the bond
    order ``(E,)`` of every directed edge."""
    row, col = edge_index
    keep = (row < col) & (orders > 0)
    starts = torch.cumsum(torch.bincount(batch, minlength=num_graphs), 0)
    starts = torch.cat([starts.new_zeros(1), starts[:-1]])
    mol = batch[row[keep]]
    local = torch.stack([row[keep] - starts[mol], col[keep] - starts[mol], orders[keep]], -1).cpu().numpy()
    mol = mol.cpu().numpy()
    return [local[mol == k] for k in range(num_graphs)]


@torch.no_grad()
def denoise_batch(
    pipe,
    sizes: Sequence[int],
    steps: int,
    sampler: "Sampler",
    generator: torch.Generator,
    *,
    hooks: Sequence[SamplingHook] = (),
    resample: int = 1,
    resample_below: float = 1.0,
    initial_noise: tuple[torch.Tensor, torch.Tensor] | None = None,
    tick: Callable[[int, int], None] | None = None,
    type_lag: float = 0.0,
    type_steps: int = 0,
    context: torch.Tensor | None = None,
    guidance_scale: float | None = None,
) -> BatchResult:
    """Run the reverse process for one batch of molecules of ``sizes`` atoms.

    Args:
        pipe: a :class:`~moldiff.pipeline.MolDiffPipeline` (its network, schedule and features).
        steps: reverse steps; the network is called ``steps * resample + 1`` times.
        sampler: the reverse step (:func:`moldiff.diffusion.make_sampler`).
        generator: every random draw comes from it, in a fixed order: same seed, same molecules.
        hooks: :class:`SamplingHook` objects, called in order.
        resample: RePaint resampling rounds per step (1: none).
        resample_below: resample only the steps that start at ``t <= resample_below`` (1: every
            step); the others take one round.
        initial_noise: standard normal ``(positions (A, 3), features (A, F))`` to start from
            instead of drawing it (``A = sum(sizes)``).
        tick: ``tick(i, total)`` after the i-th of ``total`` network evaluations.
        type_lag: ``d > 0`` (``type_time`` models): the element features run behind the coordinates,
            at ``t_h = min(1, t + d)`` while the coordinates go down their grid; then ``type_steps``
            more steps take the elements from ``t_min + d`` to ``t_min`` on a uniform grid with the
            coordinates held at ``t_min`` (the grid's last time): the network decides the elements
            jointly, from a nearly final geometry. 0: one time for both (EDM).
        context: ``(B, context_dim)`` per-molecule conditioning of a property-conditional model
            (``None``: the model's unconditional mode, every property dropped).
        guidance_scale: classifier-free guidance ``w`` with ``context`` (:func:`guided_noise`; 0: the
            unconditional model, exactly; 1 or ``None``: the plain conditional model).
    """
    device = pipe.device
    dtype = next(pipe.denoiser.parameters()).dtype
    num_graphs = len(sizes)
    sizes_t = torch.as_tensor(np.asarray(sizes), device=device)
    batch = torch.repeat_interleave(torch.arange(num_graphs, device=device), sizes_t)
    num_atoms = batch.shape[0]
    local = torch.arange(num_atoms, device=device) - (torch.cumsum(sizes_t, 0) - sizes_t)[batch]
    edge_index = fully_connected_edges(batch)
    if initial_noise is None:
        eps_pos = torch.randn(num_atoms, 3, generator=generator, dtype=dtype, device=device)
        eps_h = torch.randn(num_atoms, pipe.features.dim, generator=generator, dtype=dtype, device=device)
    else:
        eps_pos, eps_h = (x.to(device=device, dtype=dtype) for x in initial_noise)
    if context is not None:
        context = torch.as_tensor(context, device=device)
        if context.shape != (num_graphs, int(getattr(pipe.denoiser.config, "context_dim", 0))) or not context.shape[1]:
            raise ValueError(f"context of shape {tuple(context.shape)} for {num_graphs} molecules of a model with "
                             f"context_dim={getattr(pipe.denoiser.config, 'context_dim', 0)}")
    if guidance_scale is not None and not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"guidance scale must be a number >= 0, got {guidance_scale}")
    ctx = BatchContext(pipe, sampler, generator, np.asarray(sizes), batch, local, edge_index, num_graphs, dtype,
                       (eps_pos, eps_h), context, guidance_scale)
    state = LoopState(remove_mean(eps_pos, batch, num_graphs), eps_h.clone(), None,
                      torch.full((num_graphs,), -1, dtype=torch.long, device=device))
    bonded = pipe.bond_types > 0
    edge_batch = rev = None
    if bonded:  # bond features of every directed edge, equal on i -> j and j -> i
        edge_batch, rev = batch[edge_index[0]], reverse_edges(edge_index, num_atoms)
    categorical = None
    if pipe.categorical is not None:  # classes instead of Gaussian features (the h noise above is unused)
        categorical = CategoricalStep(pipe, ctx, edge_index, rev)
        categorical.begin(state)
    elif bonded:
        state.e = symmetric_edge_noise(rev, pipe.bond_types, generator=generator, dtype=dtype)
    times = sampler.timesteps(steps, device=device)
    lagged = type_lag > 0
    if lagged:
        if categorical is not None or bonded or pipe.self_condition or resample != 1 or hooks:
            raise ValueError("type_lag samples plain Gaussian-type models only (no categorical, bond or "
                             "self-conditioned models, no RePaint or given types)")
        if not getattr(pipe.denoiser.config, "type_time", False):
            raise ValueError("type_lag needs a model trained with the elements' own noise time (model.type_time)")
        if type_steps < 1:
            raise ValueError(f"type_steps must be at least 1 with type_lag, got {type_steps}")
        h_times = torch.clamp(times + type_lag, max=1.0)
        late = torch.linspace(float(h_times[-1]), float(times[-1]), type_steps + 1, dtype=times.dtype, device=device)
    for hook in hooks:
        hook.begin(ctx, state, times[0].expand(num_graphs))

    def predict(t, t_h=None):
        net_pos, net_h = network_inputs(state.fault, batch, state.pos, state.h)  # a faulted molecule's NaNs stay out
        extra = {} if t_h is None else {"t_h": t_h}
        if pipe.self_condition:
            extra["cond"] = state.cond
        if bonded:
            extra["e_t"] = network_inputs(state.fault, edge_batch, state.e)[0]
        eps_pos, eps_h, *eps_e = guided_noise(pipe, net_pos, net_h, t, batch, context, guidance_scale,
                                              edge_index=edge_index, **extra)
        for hook in hooks:
            eps_pos, eps_h = hook.guide(ctx, state, eps_pos, eps_h, t)
        return eps_pos, eps_h, (eps_e[0] if eps_e else None)

    # (t, s) of the coordinates and (t_h, s_h) of the element features at each step; the same but
    # for type_lag, whose elements run behind and then take `type_steps` more steps alone
    grid = [(times[i], times[i + 1], times[i], times[i + 1]) for i in range(steps)]
    if lagged:
        grid = [(times[i], times[i + 1], h_times[i], h_times[i + 1]) for i in range(steps)]
        grid += [(times[-1], times[-1], late[j], late[j + 1]) for j in range(type_steps)]
    if int(resample) != resample or resample < 1 or not 0.0 <= resample_below <= 1.0:
        raise ValueError(f"resample must be an integer >= 1 and resample_below a time in [0, 1], got "
                         f"{resample} and {resample_below}")
    rounds = resample_rounds([t for t, *_ in grid], resample, resample_below)
    evaluations, done = sum(rounds) + 1, 0
    for i, (t, s, t_h, s_h) in enumerate(grid):
        t, s, t_h, s_h = (x.expand(num_graphs) for x in (t, s, t_h, s_h))
        for r in range(rounds[i]):
            eps_pos, eps_h, eps_e = predict(t, t_h if lagged else None)
            if pipe.self_condition:
                state.cond = sampler.clean_estimate(state.pos, state.h, eps_pos, eps_h, t, batch)
            if categorical is not None:  # positions by the sampler; eps_h holds class logits
                step = sampler.step(eps_pos, torch.zeros_like(state.h), t, s, state.pos, state.h, batch, generator=generator)
                categorical.step(state, eps_h, eps_e, t, s, i)
                step = step._replace(h=state.h)
            elif lagged:  # each part on its own times; a part whose time stands still is not stepped
                pos = state.pos if float(s[0]) >= float(t[0]) else \
                    sampler.step(eps_pos, eps_h, t, s, state.pos, state.h, batch, generator=generator).pos
                h = state.h if float(s_h[0]) >= float(t_h[0]) else \
                    sampler.step(eps_pos, eps_h, t_h, s_h, state.pos, state.h, batch, generator=generator).h
                step = SimpleNamespace(pos=pos, h=h)  # (only the new state is read below)
            else:
                step = sampler.step(eps_pos, eps_h, t, s, state.pos, state.h, batch, generator=generator)
            if bonded and categorical is None:
                state.e, _ = sampler.edge_step(eps_e, state.e, t, s, edge_batch, rev, generator=generator)
                bad_edge = ~torch.isfinite(state.e).all(-1)
                if bad_edge.any():  # counted as a fault of the molecule, like a bad atom
                    bad_mol = num_nodes_per_graph(edge_batch[bad_edge], num_graphs) > 0
                    state.fault[bad_mol & (state.fault < 0)] = i
            state.pos, state.h = step.pos, step.h
            for hook in hooks:
                hook.after_step(ctx, state, s)
            record_faults(state.fault, state.pos, state.h, batch, num_graphs, i)
            if r < rounds[i] - 1:
                _renoise(ctx, state, s, t, categorical)
            done += 1
            if tick is not None:
                tick(done, evaluations)
    # Final decode at t = 0: x = (z_0 - sigma_0 eps_hat) / alpha_0 (mean of p(x | z_0), EDM eq. 9-10).
    t0 = times[-1].expand(num_graphs)
    eps_pos, eps_h, eps_e = predict(t0, t0 if lagged else None)
    bonds = None
    if categorical is not None:
        categorical.decode(state, eps_h, eps_e, steps)
        state.pos, _ = sampler.clean_estimate(state.pos, state.h, eps_pos, torch.zeros_like(state.h), t0, batch)
    else:
        if bonded:
            alpha0, sigma0 = (x.to(dtype)[edge_batch].unsqueeze(-1) for x in pipe.schedule.alpha_sigma(t0))
            e0 = ((state.e - sigma0 * eps_e) / alpha0).nan_to_num(0.0).float()  # non-finite estimates: no bond
            bonds = split_bonds(pipe.bond_features.decode(e0), edge_index, batch, num_graphs)
        state.pos, state.h = sampler.clean_estimate(state.pos, state.h, eps_pos, eps_h, t0, batch)
    for hook in hooks:
        hook.after_step(ctx, state, t0, final=True)
    record_faults(state.fault, state.pos, state.h, batch, num_graphs, len(grid))
    if tick is not None:
        tick(evaluations, evaluations)
    state.pos = state.pos.double()
    for hook in hooks:
        hook.finish(ctx, state)
    if categorical is not None:  # the classes as the hooks left them (a fragment's bonds set exactly)
        if bonded:
            bonds = split_bonds(state.classes["bonds"], edge_index, batch, num_graphs)
        formal = None
        if "charges" in state.classes:
            formal = pipe.features.charge_values_of(state.classes["charges"]).cpu().numpy()
        return BatchResult(state.pos.cpu().numpy(), state.classes["types"].cpu().numpy(), None,
                           state.fault.cpu().numpy(), bonds, formal)
    types, charges = pipe.features.decode(state.h.nan_to_num(0.0))  # decode only; faulty molecules stay flagged
    return BatchResult(state.pos.cpu().numpy(), types.cpu().numpy(), None if charges is None else charges.cpu().numpy(),
                       state.fault.cpu().numpy(), bonds)
