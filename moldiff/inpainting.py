"""Inpainting with a trained unconditional model: grow molecules from a fragment, or place the atoms
of a given formula (isomer generation), or both. No retraining: the known part of the state is
imposed at every reverse step (RePaint, Lugmayr et al. 2022, Algorithm 1).

The state is ``z_t = (pos_t (n, 3), h_t (n, F))`` over each molecule's atoms. Two masks say what is
known: the *fragment atoms* (the first k atoms of every molecule, in the fragment's element order)
know their positions and types; with a *formula* every atom knows its type. At each step t -> s:

1. the model proposes ``z_s`` for every atom (one sampler step, exactly as in plain sampling);
2. the known parts are replaced by a draw of the forward process at level s,
   ``alpha_s x + sigma_s eps`` (features: ``h_s = alpha_s h_x + sigma_s eps_h``, h_x the one-hot
   encoding; positions: see below);
3. with ``resample = r > 1`` the state is pushed back to t with ``q(z_t | z_s)`` and steps 1-2 are
   redone, r times in all (RePaint's jumps of length 1), so the free atoms can adapt to the
   imposed ones.

Centre of mass. Positions live in the zero-CoM subspace, but a fragment comes in its own frame and
its place inside the molecule (where its centroid sits relative to the other atoms) is unknown. Its
*shape* is known: the fragment atoms' positions relative to their own centroid. In the zero-CoM
subspace that shape is a linear subspace (the fragment atoms' relative coordinates, 3(k - 1)
dimensions) orthogonal to everything else (the fragment centroid and the free atoms), so the
forward process factorises over the two and RePaint's replacement applies to the shape only:

    pos_s[frag] <- centroid(pos_s^model[frag]) + alpha_s (F - mean F) + sigma_s (e - mean e),
    e ~ N(0, I) on the fragment atoms,

i.e. the fragment's relative coordinates follow the forward-noised fragment, and its centroid
stays where the model put it. The molecule's CoM does not move (the fragment centroid is kept),
and we still project back onto the zero-CoM subspace (a uniform translation) for numerical
hygiene. The simpler "place the noised fragment at the origin, then subtract the molecule's mean"
would pin the fragment's centroid to the molecule's centre and, step after step, pull the fragment
into the middle of the molecule (its offset from the other atoms shrinks by k/N per step). At the
end the fragment atoms are set to the clean fragment, translated to the centroid the model gave
them, so they match the fragment exactly up to a translation (and the orientation it came in).

Equivariance. The fragment fixes the orientation; every operation above commutes with a rotation
or reflection Q of the fragment *together with* the noise: rotate the fragment and the initial
noise (``initial_noise``) by Q and a deterministic run (``sampler="ddim"``, eta = 0, resample = 1)
returns the same molecules rotated by Q. With a deterministic sampler the fragment follows the
fixed-noise trajectory ``alpha_t x + sigma_t eps``, ``eps`` being the initial noise of its atoms
(exactly the path DDIM takes for a point it predicts perfectly), so that the whole run is a
function of the initial noise; stochastic samplers draw ``eps`` afresh at every step (RePaint).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moldiff.chemistry import fragments as chem_fragments
from moldiff.chemistry.elements import to_symbols
from moldiff.diffusion import DDIMSampler, make_sampler
from moldiff.geometry import remove_mean, reverse_edges, scatter_mean
from moldiff.sampling import SampledArrays, SamplingHook, batch_ticker, denoise_batch

#: RePaint rounds per step unless asked otherwise. Measured on 20 QM9 fragments (docs/results/inpainting/reports.jsonl runs
#: s13814_resample1 / s13814_resample10, 50 ancestral steps): 10 rounds instead of 1 raise fragment retention from 11% to 27%
#: and validity from 8% to 28% (unconditional at the same sizes: 35%); formulas: atom stability 41% -> 59%.
DEFAULT_RESAMPLE = 10
#: Time grid of conditioned sampling unless asked otherwise: EDM's uniform grid. Plain sampling uses
#: ``t_k = (k/K)^2`` (moldiff.sampling.DEFAULT_TIME_POWER), but with RePaint resampling the uniform
#: grid kept fragments better: on 20 QM9 fragments (step 24,603, 50 steps, resample 10) retention
#: 31% vs 20% and validity 28% vs 21% (docs/results/inpainting/reports.jsonl: s24603_p1 / s24603_p2).
DEFAULT_INPAINT_TIME_POWER = 1.0
#: Noise factor of conditioned sampling unless asked otherwise: 0.5, as plain sampling
#: (moldiff.sampling.DEFAULT_NOISE_SCALE). On 20 QM9 fragments and 20 formulas (shipped step 42,911,
#: 50 steps, resample 10, 100 molecules per row) 0.5 against 1: fragment retention 31% vs 24%,
#: validity 25% vs 24%, formula validity 13% vs 7%; fragment molecule stability 0% vs 3%
#: (docs/results/inpainting/reports.jsonl: s42911_noise0.5 / s42911_noise1); benzene validity 95% vs 85%.
DEFAULT_INPAINT_NOISE_SCALE = 0.5
#: Formula-only conditioning first draws up to this many unconditional molecules per requested one at
#: the formula's size (plain sampling and its defaults) and keeps those with exactly the formula: the
#: model's own conditional distribution. Molecules still missing are made by clamping the types
#: (inpainting). 0: clamp only. Step 54,838, 20 QM9 test formulas: 9% of unconditional samples at
#: the same size have the exact formula, at 87% validity; clamped types give 8% validity
#: (docs/results/inpainting/reports.jsonl: s54838_formulas).
DEFAULT_FORMULA_DRAWS = 20
#: Strength of open-valence guidance unless asked otherwise, for fragments with bonds (see
#: :func:`inpaint_arrays`; 0: off). On 20 QM9 fragments (shipped step 54,838, 50 steps, resample 10,
#: noise 0.5, 100 molecules) guidance 1 against 0: fragment retention 66% vs 34%, validity 66% vs
#: 32%, molecule stability 12% vs 3% (docs/results/inpainting/reports.jsonl: s54838_noise0.5_guidance0 / _guidance1).
DEFAULT_VALENCE_GUIDANCE = 1.0
#: Open-valence guidance counts a free atom as a fragment atom's new neighbour with weight
#: ``sigmoid((NEIGHBOUR_CUTOFF - d) / NEIGHBOUR_WIDTH)``: ~1 at covalent distances (C-H 1.09 Å,
#: C-C 1.54 Å: 0.96), 0.02-0.007 at the 2.1-2.2 Å of next-nearest neighbours.
NEIGHBOUR_CUTOFF = 1.8
NEIGHBOUR_WIDTH = 0.08
GRADIENT_WIDTH = 0.3  #: width of the kernel the guidance gradient is taken through (see _valence_guide)
#: Gradient iterations on the clean estimate per network evaluation, and the largest move of one
#: atom per iteration (Å), so that guidance cannot throw atoms about at high noise.
GUIDANCE_ITERATIONS = 5
GUIDANCE_MAX_MOVE = 0.1

__all__ = [
    "DEFAULT_RESAMPLE",
    "DEFAULT_INPAINT_TIME_POWER",
    "DEFAULT_INPAINT_NOISE_SCALE",
    "DEFAULT_VALENCE_GUIDANCE",
    "DEFAULT_FORMULA_DRAWS",
    "Fragment",
    "FragmentReport",
    "inpaint_arrays",
    "fragment_report",
    "fragment_reports",
    "formula_honoured",
]


# ---------------------------------------------------------------------------------------- inputs


@dataclass(eq=False)
class Fragment:
    """A fragment to grow molecules from.

    Attributes:
        symbols: k element symbols (atomic numbers are accepted and converted).
        positions: (k, 3) float64 coordinates in Å, in any frame (only the shape is used; the
            orientation fixes the orientation of the generated molecules).
        mol: optional RDKit molecule whose atom i is fragment atom i, with bonds; the query for
            the substructure check. Without it, :func:`fragment_report` uses the connectivity
            found from the coordinates, with any bond order.
        name: label for reports.
    """

    symbols: tuple[str, ...]
    positions: np.ndarray
    mol: Any = None
    name: str = ""

    def __post_init__(self) -> None:
        self.symbols = to_symbols(list(self.symbols))
        positions = np.asarray(self.positions, dtype=np.float64)
        if len(self.symbols) == 0:
            raise ValueError("a fragment needs at least one atom")
        if positions.shape != (len(self.symbols), 3):
            raise ValueError(f"fragment positions must have shape ({len(self.symbols)}, 3), got {positions.shape}")
        if not np.isfinite(positions).all():
            raise ValueError("fragment positions must be finite")
        self.positions = positions

    @classmethod
    def from_smiles(cls, smiles: str, seed: int = 0, *, keep_hydrogens: bool = False) -> "Fragment":
        """Embed ``smiles`` in 3D (ETKDGv3, explicit H, ``randomSeed=seed``, MMFF94-relaxed).

        By default only the heavy atoms become fragment atoms (the SMILES' hydrogen positions
        stay free for the model); ``keep_hydrogens=True`` keeps every hydrogen too.
        """
        loaded = chem_fragments.fragment_from_smiles(smiles, seed, keep_hydrogens=keep_hydrogens)
        return cls(loaded.symbols, loaded.positions, loaded.mol, str(smiles))

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, index: int = 0, keep_hydrogens: bool = True) -> "Fragment":
        """Read record ``index`` of an ``.sdf`` / ``.mol`` / ``.xyz`` file (3D coordinates, Å);
        all its atoms, hydrogens included unless ``keep_hydrogens=False``."""
        loaded = chem_fragments.fragment_from_file(path, index=index, keep_hydrogens=keep_hydrogens)
        return cls(loaded.symbols, loaded.positions, loaded.mol, os.fspath(path))

    @property
    def num_atoms(self) -> int:
        return len(self.symbols)

    def open_valences(self) -> np.ndarray | None:
        """How many new neighbours each fragment atom takes: RDKit's hydrogen count of the atom in
        ``mol`` (implicit hydrogens of a SMILES, or the open valences of a cut), each of which a
        hydrogen or a substituent fills; ``None`` without ``mol``. A cut double bond counts two
        (one neighbour by a double bond would satisfy it too)."""
        return None if self.mol is None else chem_fragments.open_valences(self.mol)

    def element_counts(self) -> dict[str, int]:
        return chem_fragments.element_counts(self.symbols)

    def transformed(self, matrix: np.ndarray, shift: np.ndarray | None = None) -> "Fragment":
        """The fragment moved rigidly: ``positions @ matrix.T + shift`` (``matrix`` (3, 3)
        orthogonal, ``shift`` (3,) Å); ``mol`` (bonds) is shared."""
        positions = self.positions @ np.asarray(matrix, dtype=np.float64).T
        if shift is not None:
            positions = positions + np.asarray(shift, dtype=np.float64)
        return Fragment(self.symbols, positions, self.mol, self.name)

    def query(self):
        """The RDKit substructure query: ``mol`` if given, else connectivity with generic bonds."""
        if self.mol is not None:
            return self.mol
        return chem_fragments.fragment_query(self.symbols, self.positions)


@dataclass(frozen=True)
class _Plan:
    """What is known about each molecule: sizes ``(n,)``; the fragment's vocabulary indices
    ``(k,)`` and centred positions ``(k, 3)`` Å; the other atoms' types ``(N - k,)`` (formula) or
    ``None`` (free)."""

    sizes: np.ndarray
    frag_types: np.ndarray
    frag_pos: np.ndarray
    rest_types: np.ndarray | None
    formula: str | None
    frag_slots: np.ndarray | None = None  #: new neighbours per fragment atom (open-valence guidance)
    #: categorical models: bond classes 0-3 between fragment atoms ``(k, k)`` (Kekulé form) and the
    #: fragment atoms' charge classes ``(k,)``, each ``None`` where the fragment does not say (XYZ)
    frag_bonds: np.ndarray | None = None
    frag_charge_classes: np.ndarray | None = None

    @property
    def num_known(self) -> int:
        return len(self.frag_types)


def _vocabulary_indices(symbols: Sequence[str], elements: Sequence[str], what: str) -> np.ndarray:
    index = {e: i for i, e in enumerate(elements)}
    for s in symbols:
        if s not in index:
            raise ValueError(f"{what} element {s} is not in the model's vocabulary ({', '.join(elements)})")
    return np.array([index[s] for s in symbols], dtype=np.int64)


def _fixed_sizes(num_atoms, n: int) -> np.ndarray | None:
    if num_atoms is None:
        return None
    if isinstance(num_atoms, (int, np.integer)):
        return np.full(n, int(num_atoms), dtype=np.int64)
    sizes = np.asarray(list(num_atoms), dtype=np.int64)
    if len(sizes) != n:
        raise ValueError(f"got {len(sizes)} sizes for {n} molecules")
    return sizes


def plan_conditioning(
    pipe,
    n: int,
    fragment: Fragment | None,
    formula: str | Mapping[str, int] | None,
    num_atoms,
    rng: np.random.Generator,
) -> _Plan:
    """Check the conditioning against the model and fix every molecule's size and known atoms."""
    elements = pipe.elements
    max_atoms = pipe.statistics.max_atoms
    if fragment is None and formula is None:
        raise ValueError("give a fragment, a formula or both (plain sampling is MolDiffPipeline.sample_arrays)")
    if fragment is not None and not isinstance(fragment, Fragment):
        raise TypeError(f"fragment must be a Fragment (Fragment.from_smiles / Fragment.from_file), got {type(fragment).__name__}")
    sizes = _fixed_sizes(num_atoms, n)
    k = 0 if fragment is None else fragment.num_atoms
    frag_types = np.zeros(0, dtype=np.int64)
    frag_pos = np.zeros((0, 3))
    if fragment is not None:
        frag_types = _vocabulary_indices(fragment.symbols, elements, "fragment")
        if k > max_atoms:
            raise ValueError(f"fragment has {k} atoms, more than the model's maximum of {max_atoms}")
        frag_pos = fragment.positions - fragment.positions.mean(0)
    rest_types = None
    formula_text = None
    if formula is not None:
        counts = chem_fragments.parse_formula(formula)
        formula_text = chem_fragments.format_formula(counts)
        _vocabulary_indices(list(counts), elements, f"formula {formula_text}")
        total = sum(counts.values())
        if total > max_atoms:
            raise ValueError(f"formula {formula_text} has {total} atoms, more than the model's maximum of {max_atoms}")
        if total < 2:
            raise ValueError(f"formula {formula_text} has {total} atom; a molecule needs at least 2")
        problem = chem_fragments.formula_problem(counts)
        if problem is not None:
            raise ValueError(f"formula {formula_text} cannot make a neutral closed-shell molecule: {problem}")
        if sizes is not None and np.any(sizes != total):
            raise ValueError(f"formula {formula_text} has {total} atoms but num_atoms is {int(sizes[sizes != total][0])}")
        remaining = dict(counts)
        if fragment is not None:
            for symbol, have in fragment.element_counts().items():
                if have > remaining.get(symbol, 0):
                    raise ValueError(
                        f"fragment has {have} {symbol} but formula {formula_text} has {counts.get(symbol, 0)}"
                    )
                remaining[symbol] -= have
        rest = [s for s, c in remaining.items() for _ in range(c)]
        rest_types = _vocabulary_indices(rest, elements, "formula")
        sizes = np.full(n, total, dtype=np.int64)
    if sizes is None:
        sizes = pipe.statistics.sample_sizes(n, rng, min_atoms=max(k, 2)).astype(np.int64)
    too_small = sizes[sizes < k]
    if len(too_small):
        raise ValueError(f"fragment has {k} atoms but num_atoms is {int(too_small[0])}")
    bad = sizes[(sizes < 2) | (sizes > max_atoms)]
    if len(bad):
        raise ValueError(f"num_atoms must be between 2 and {max_atoms} (the largest training molecule), got {int(bad[0])}")
    slots = None if fragment is None else fragment.open_valences()
    frag_bonds = frag_charge_classes = None
    cat = pipe.categorical
    if fragment is not None and fragment.mol is not None and cat is not None:
        if cat.bonds is not None:
            frag_bonds = chem_fragments.kekule_orders(fragment.mol)
            if frag_bonds is not None and frag_bonds.max(initial=0) >= cat.bonds.num_classes:
                raise ValueError(f"the fragment has a bond of order {int(frag_bonds.max())}; the model knows "
                                 f"orders below {cat.bonds.num_classes}")
        if cat.charges is not None:
            charges = chem_fragments.formal_charges(fragment.mol)
            allowed = pipe.features.charge_values
            bad = [int(c) for c in charges if int(c) not in allowed]
            if bad:
                raise ValueError(f"the fragment has an atom of formal charge {bad[0]:+d}; the model knows "
                                 f"{', '.join(f'{v:+d}' for v in allowed)}")
            frag_charge_classes = np.array([allowed.index(int(c)) for c in charges], dtype=np.int64)
    return _Plan(sizes, frag_types, frag_pos, rest_types, formula_text, slots, frag_bonds, frag_charge_classes)


# ---------------------------------------------------------------------------------------- sampling


def _as_noise(initial_noise, total_atoms: int, num_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        pos_noise, h_noise = initial_noise
    except (TypeError, ValueError):
        raise ValueError("initial_noise must be a pair (positions (A, 3), features (A, F))") from None
    pos_noise = torch.as_tensor(pos_noise, dtype=torch.float64).cpu()
    h_noise = torch.as_tensor(h_noise, dtype=torch.float64).cpu()
    if tuple(pos_noise.shape) != (total_atoms, 3) or tuple(h_noise.shape) != (total_atoms, num_features):
        raise ValueError(
            f"initial_noise must have shapes ({total_atoms}, 3) and ({total_atoms}, {num_features}) "
            f"(all atoms of all molecules), got {tuple(pos_noise.shape)} and {tuple(h_noise.shape)}"
        )
    return pos_noise, h_noise


def default_valence_guidance(fragment) -> float:
    """:data:`DEFAULT_VALENCE_GUIDANCE` for a fragment with bonds (they define its open valences), else 0."""
    has_bonds = isinstance(fragment, Fragment) and fragment.mol is not None
    return DEFAULT_VALENCE_GUIDANCE if has_bonds else 0.0


@torch.no_grad()
def inpaint_arrays(
    pipe,
    n: int,
    *,
    fragment: Fragment | None = None,
    formula: str | Mapping[str, int] | None = None,
    num_atoms: int | Sequence[int] | None = None,
    steps: int = 100,
    sampler: str = "ancestral",
    resample: int | None = None,
    seed: int | None = 0,
    batch_size: int = 256,
    initial_noise: tuple[Any, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    time_power: float | None = None,
    on_step: Callable[[float], None] | None = None,
    noise_scale: float | None = None,
    valence_guidance: float | None = None,
) -> SampledArrays:
    """Sample ``n`` molecules that contain ``fragment`` and/or have the composition ``formula``, by
    RePaint (the known parts imposed at every step). :meth:`moldiff.pipeline.MolDiffPipeline.generate`
    chooses between this and the faster routes a formula alone can take (drawing, given types).

    Args:
        pipe: a trained (unconditional) pipeline.
        n: number of molecules.
        fragment: atoms with fixed relative geometry; they become atoms ``0..k-1`` of every
            molecule, in the fragment's order, and end exactly at its geometry up to a translation
            (orientation as given).
        formula: composition of the whole molecule (``"C7H8O"`` or ``{"C": 7, "H": 8, "O": 1}``);
            every atom's type is then fixed: the fragment's atoms first, then the rest in the
            formula's order. Fixes ``N`` to the formula's atom count.
        num_atoms: ``N`` per molecule: an int, one per molecule, or ``None`` to draw from the
            training size distribution restricted to ``N >= max(k, 2)``.
        steps: reverse steps (network calls: ``steps * resample + 1``).
        sampler: ``"ancestral"``, ``"ddim"`` (deterministic) or ``"ddim:<eta>"``.
        resample: RePaint resampling: each step is done ``resample`` times, re-noising in between;
            ``None``: :data:`DEFAULT_RESAMPLE`.
        seed: seeds sizes and all noise; same seed, same output (same device and torch version).
        batch_size: molecules per network batch.
        time_power: the time grid ``t_k = (k / steps) ** time_power``; ``None``:
            :data:`DEFAULT_INPAINT_TIME_POWER` (1, the uniform grid).
        initial_noise: optional pair ``(positions (A, 3), features (A, F))`` of standard normal
            noise for all ``A = sum(N)`` atoms, molecule after molecule (positions are projected
            to zero CoM here). Needs fixed sizes (``num_atoms`` or ``formula``). Rotating it
            together with the fragment rotates the output of a deterministic run.
        progress: called with the number of molecules finished after each batch.
        on_step: called after every network evaluation with the molecules done so far, the batch
            in progress counted by the fraction of its evaluations made (for progress bars).
        noise_scale: factor on each reverse step's fresh noise, in [0, 1]; ``None``:
            :data:`DEFAULT_INPAINT_NOISE_SCALE` (0.5; 1 is the model's posterior).
        valence_guidance: strength ``g >= 0`` of open-valence guidance (``None``:
            :data:`DEFAULT_VALENCE_GUIDANCE` for a fragment with bonds, else 0). After each network evaluation the clean estimate of
            the free atoms' positions takes :data:`GUIDANCE_ITERATIONS` steps of ``-g`` times the
            gradient of ``sum_i (c_i - v_i)^2`` (each atom's move capped, :data:`GUIDANCE_MAX_MOVE`), where ``v_i`` is fragment atom i's open valence
            (:meth:`Fragment.open_valences`) and ``c_i`` its soft count of free atoms within
            bonding distance; the step's noise estimate is recomputed from the moved estimate.
            So a benzene ring's carbons are steered to one new neighbour each rather than two or
            none. Needs the fragment's bonds (``Fragment.mol``); ignored without a fragment.

    Returns:
        :class:`~moldiff.pipeline.SampledArrays` (positions zero-centroid, Å); ``extra`` holds
        ``conditioning``, ``num_known_atoms`` (k), ``fragment_symbols``, ``formula`` (Hill
        order), ``resample``, ``network_evaluations`` per molecule and, with a fragment,
        ``fragment_offset`` ``(n, 3)`` Å: ``positions[j] + fragment_offset[j]`` puts molecule
        j's fragment atoms exactly on ``fragment.positions`` (e.g. a binding-site frame).

    Raises:
        ValueError: one-line reasons: elements outside ``pipe.elements``, a fragment larger than
            N or the model's maximum, a formula that does not parse / has the wrong atom count /
            cannot be a neutral closed-shell molecule / does not contain the fragment.
    """
    if n <= 0:
        raise ValueError(f"number of molecules must be positive, got {n}")
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    if pipe.categorical is None:  # categorical models clamp the fragment's bonds with its atoms
        pipe.require_no_bonds("fragment- or formula-conditioned sampling")
    pipe.require_type_generation("RePaint-conditioned sampling" if fragment is None else "fragment-conditioned sampling")
    if resample is None:
        resample = DEFAULT_RESAMPLE
    if time_power is None:
        time_power = DEFAULT_INPAINT_TIME_POWER
    if noise_scale is None:
        noise_scale = DEFAULT_INPAINT_NOISE_SCALE
    if valence_guidance is None:
        valence_guidance = default_valence_guidance(fragment)
    if not (math.isfinite(valence_guidance) and valence_guidance >= 0):
        raise ValueError(f"valence_guidance must be a finite number >= 0, got {valence_guidance}")
    if valence_guidance > 0 and isinstance(fragment, Fragment) and fragment.mol is None:
        raise ValueError("valence guidance needs the fragment's bonds (an SDF/MOL file or a SMILES, not XYZ)")
    if int(resample) != resample or resample < 1:
        raise ValueError(f"resample must be an integer >= 1, got {resample}")
    if steps < 1:
        raise ValueError(f"need at least one step, got {steps}")
    rng = np.random.default_rng(seed)
    if initial_noise is not None and num_atoms is None and formula is None:
        raise ValueError("initial_noise needs fixed molecule sizes: pass num_atoms (or a formula)")
    plan = plan_conditioning(pipe, n, fragment, formula, num_atoms, rng)
    noise = None
    if initial_noise is not None:
        noise = _as_noise(initial_noise, int(plan.sizes.sum()), pipe.features.dim)
    device = pipe.device
    gen = torch.Generator(device=device)
    gen.manual_seed(int(rng.integers(2**62)))
    sampler_obj = make_sampler(sampler, pipe.schedule, time_power=time_power, noise_scale=noise_scale)
    conditioning = "+".join(name for name, given in (("fragment", fragment), ("formula", formula)) if given is not None)
    out = SampledArrays(
        [], [], [], np.full(n, -1), pipe.elements, steps, sampler, seed, time_power, noise_scale,
        extra={
            "conditioning": conditioning,
            "num_known_atoms": plan.num_known,
            "fragment_symbols": None if fragment is None else list(fragment.symbols),
            "formula": plan.formula,
            "resample": int(resample),
            "network_evaluations": steps * int(resample) + 1,
            "valence_guidance": float(valence_guidance) if fragment is not None else 0.0,
        },
    )  # fmt: skip
    pipe.denoiser.eval()
    atom_offsets = np.concatenate([[0], np.cumsum(plan.sizes)])
    for start in range(0, n, batch_size):
        chunk = plan.sizes[start : start + batch_size]
        chunk_noise = None
        if noise is not None:
            lo, hi = atom_offsets[start], atom_offsets[start + len(chunk)]
            chunk_noise = (noise[0][lo:hi], noise[1][lo:hi])
        tick = batch_ticker(on_step, start, len(chunk))
        out.add_batch(start, chunk, *_inpaint_batch(pipe, plan, chunk, steps, sampler_obj, int(resample), gen,
                                                    chunk_noise, tick, guidance=float(valence_guidance)))
        if progress is not None:
            progress(len(chunk))
    if formula is not None and fragment is None:  # every molecule clamped: say so
        out.extra.update(formula_route=["clamped"] * n, formula_draws_used=0)
    if fragment is not None:
        # Translation that puts each molecule's fragment atoms back on the input coordinates.
        k = plan.num_known
        centre = fragment.positions.mean(0)
        out.extra["fragment_offset"] = np.stack([centre - p[:k].mean(0) for p in out.positions])
    return out


def _valence_guide(pos, eps_pos, alpha, sigma, pairs, slots, num_known, strength):
    """Open-valence guidance (see :func:`inpaint_arrays`): the noise estimate after moving the
    free atoms' clean estimate down the gradient of ``sum_i (c_i - v_i)^2``.

    pos, eps_pos: ``(A, 3)`` state and noise estimate; alpha, sigma: ``(A, 1)`` per atom;
    pairs: ``(3, P)``: known atom's row, free atom's row (same molecule), and the known atom's
    index into ``slots``; slots: ``(num_known,)`` open valences ``v_i``.
    """
    work = torch.float64
    x0 = (pos.to(work) - sigma * eps_pos.to(work)) / alpha
    i, j, which = pairs
    for _ in range(GUIDANCE_ITERATIONS):
        diff = x0[j] - x0[i]
        d = diff.norm(dim=-1).clamp(min=1e-6)
        w = torch.sigmoid((NEIGHBOUR_CUTOFF - d) / NEIGHBOUR_WIDTH)
        counts = torch.zeros(num_known, dtype=work, device=pos.device).index_add_(0, which, w)
        excess = (counts - slots)[which]
        # dE/dx_j = sum_i 2 (c_i - v_i) dw_ij/dd (x_j - x_i)/d with dw/dd = -w (1 - w) / width,
        # taken through a wider kernel than the count's: the sharp one is flat at bond lengths
        # (no push on a surplus neighbour at 1.1 Å) and beyond ~2.2 Å (no pull on a missing one).
        wide = torch.sigmoid((NEIGHBOUR_CUTOFF - d) / GRADIENT_WIDTH)
        coeff = -2.0 * excess * (wide * (1.0 - wide) / GRADIENT_WIDTH) / d
        grad = torch.zeros_like(x0).index_add_(0, j, coeff.unsqueeze(-1) * diff)
        # A free atom moves at most GUIDANCE_MAX_MOVE times the largest count error it sees, so the
        # steps shrink as the counts approach their targets (the sharp count would make fixed-size
        # steps overshoot and cycle about the cutoff).
        seen = torch.zeros(len(x0), dtype=work, device=pos.device).scatter_reduce_(
            0, j, excess.abs() * (wide > 0.01), reduce="amax", include_self=True)
        limit = (GUIDANCE_MAX_MOVE * seen.clamp(max=1.0)).unsqueeze(-1)
        move = -strength * grad
        norm = move.norm(dim=-1, keepdim=True)
        move = move * torch.clamp(limit / norm.clamp(min=1e-12), max=1.0)
        x0 = x0 + move
    return ((pos.to(work) - alpha * x0) / sigma).to(eps_pos.dtype)


class Clamp(SamplingHook):
    """RePaint's replacement (see the module docstring): after every step the known parts of the
    state (the fragment's shape, known types) are a forward-process draw at the step's level; at
    the end they are set exactly (the fragment translated to the centroid the model gave it)."""

    def __init__(self, plan: _Plan, deterministic: bool):
        self.plan = plan
        #: a deterministic sampler keeps the known atoms on one noise draw (their initial noise),
        #: so the run is a function of the initial noise; stochastic samplers redraw it each step
        self.deterministic = deterministic

    def begin(self, ctx, state, t):
        plan, device, local, batch = self.plan, ctx.device, ctx.local, ctx.batch
        self.k = plan.num_known
        self.known_pos = local < self.k
        self.frag_idx = batch[self.known_pos]
        self.frag = torch.as_tensor(plan.frag_pos, dtype=torch.float64, device=device)[local[self.known_pos]]
        known_types = torch.full((ctx.num_atoms,), -1, dtype=torch.long, device=device)
        known_types[self.known_pos] = torch.as_tensor(plan.frag_types, device=device)[local[self.known_pos]]
        if plan.rest_types is not None:
            known_types[~self.known_pos] = torch.as_tensor(plan.rest_types, device=device)[local[~self.known_pos] - self.k]
        self.known_h = known_types >= 0
        self.cat = ctx.pipe.categorical
        if self.cat is None:
            numbers = torch.as_tensor(ctx.pipe.atomic_numbers, device=device)
            self.h_x = ctx.pipe.features.encode(known_types[self.known_h], numbers[known_types[self.known_h]],
                                                dtype=ctx.dtype)
        else:  # the known classes: elements, the fragment's charges, the bonds between fragment atoms
            self.known_classes = {"types": (self.known_h, known_types[self.known_h])}
            if plan.frag_charge_classes is not None and "charges" in state.classes:
                charges = torch.as_tensor(plan.frag_charge_classes, device=device)[local[self.known_pos]]
                self.known_classes["charges"] = (self.known_pos, charges)
            self.edge_rows = None
            if plan.frag_bonds is not None and "bonds" in state.classes:
                src, dst = ctx.edge_index
                self.edge_rows = self.known_pos[src] & self.known_pos[dst]
                orders = torch.as_tensor(plan.frag_bonds, device=device)
                self.edge_x = torch.zeros(src.shape[0], dtype=torch.long, device=device)
                self.edge_x[self.edge_rows] = orders[local[src[self.edge_rows]], local[dst[self.edge_rows]]]
                self.rev = reverse_edges(ctx.edge_index, ctx.num_atoms)
        self._impose(ctx, state, t)

    def _impose(self, ctx, state, time):
        """Replace the known parts of z at ``time`` (B,) by a forward-process draw."""
        alpha, sigma = ctx.pipe.schedule.alpha_sigma(time)
        if self.deterministic:
            e_pos, e_h = ctx.initial_noise
        else:
            e_pos = torch.randn(ctx.num_atoms, 3, generator=ctx.generator, dtype=ctx.dtype, device=ctx.device)
            e_h = torch.randn(ctx.num_atoms, ctx.pipe.features.dim, generator=ctx.generator, dtype=ctx.dtype,
                              device=ctx.device)
        if self.k > 0:
            rows, idx, num_graphs = self.known_pos, self.frag_idx, ctx.num_graphs
            e = e_pos[rows]
            e = e - scatter_mean(e, idx, num_graphs)[idx]  # the fragment's relative part only
            centroid = scatter_mean(state.pos[rows], idx, num_graphs)[idx]
            pos = state.pos.clone()
            pos[rows] = centroid + _column(alpha, idx, ctx.dtype) * self.frag.to(ctx.dtype) + _column(sigma, idx, ctx.dtype) * e
            state.pos = remove_mean(pos, ctx.batch, num_graphs)
        if self.cat is not None:
            self._impose_classes(ctx, state, time)
        elif self.known_h.any():
            rows = ctx.batch[self.known_h]
            h = state.h.clone()
            h[self.known_h] = _column(alpha, rows, ctx.dtype) * self.h_x + _column(sigma, rows, ctx.dtype) * e_h[self.known_h]
            state.h = h

    def _impose_classes(self, ctx, state, time, exact: bool = False):
        """Categorical models: the known classes replaced by draws of q(x_t | x_0) at ``time`` (B,),
        or set to the clean classes (``exact``); the network's one-hot inputs re-encoded."""
        gen, batch = ctx.generator, ctx.batch
        for name, (rows, x0) in self.known_classes.items():
            if not bool(rows.any()):
                continue
            new = state.classes[name].clone()
            new[rows] = x0 if exact else getattr(self.cat, name).sample_forward(x0, time[batch[rows]], gen)
            state.classes[name] = new
        if self.edge_rows is not None and bool(self.edge_rows.any()):
            x = self.edge_x if exact else self.cat.bonds.sample_forward_edges(
                self.edge_x, time[batch[ctx.edge_index[0]]], ctx.edge_index, self.rev, gen)
            state.classes["bonds"] = torch.where(self.edge_rows, x, state.classes["bonds"])
        features = ctx.pipe.features
        state.h = features.encode(state.classes["types"], state.classes.get("charges"), dtype=ctx.dtype)
        if "bonds" in state.classes:
            state.e = features.encode_bonds(state.classes["bonds"], dtype=ctx.dtype)

    def after_step(self, ctx, state, s, final=False):
        if not final:
            self._impose(ctx, state, s)

    def finish(self, ctx, state):
        if self.k > 0:  # the clean fragment (float64), translated to the centroid the model gave its atoms
            rows, idx = self.known_pos, self.frag_idx
            pos = state.pos.clone()
            pos[rows] = scatter_mean(pos[rows], idx, ctx.num_graphs)[idx] + self.frag
            state.pos = remove_mean(pos, ctx.batch, ctx.num_graphs)
        if self.cat is not None:
            self._impose_classes(ctx, state, None, exact=True)
        elif self.known_h.any():
            h = state.h.clone()
            h[self.known_h] = self.h_x
            state.h = h


class ValenceGuidance(SamplingHook):
    """Open-valence guidance (see :func:`inpaint_arrays` and :func:`_valence_guide`): each fragment
    atom is steered to as many new neighbours as it has open valences."""

    def __init__(self, plan: _Plan, strength: float):
        self.plan = plan
        self.strength = strength

    def begin(self, ctx, state, t):
        src, dst = ctx.edge_index
        known_pos = ctx.local < self.plan.num_known
        keep = known_pos[src] & ~known_pos[dst]
        known_rows = torch.nonzero(known_pos).squeeze(-1)
        row_of = torch.full((ctx.num_atoms,), -1, dtype=torch.long, device=ctx.device)
        row_of[known_rows] = torch.arange(len(known_rows), device=ctx.device)
        self.pairs = torch.stack([src[keep], dst[keep], row_of[src[keep]]])
        self.slots = torch.as_tensor(self.plan.frag_slots, dtype=torch.float64, device=ctx.device)[ctx.local[known_rows]]
        self.num_known_rows = len(known_rows)

    def guide(self, ctx, state, eps_pos, eps_h, t):
        alpha, sigma = ctx.pipe.schedule.alpha_sigma(t)
        a, sd = alpha[ctx.batch].unsqueeze(-1), sigma[ctx.batch].unsqueeze(-1)
        eps = _valence_guide(state.pos, eps_pos, a, sd, self.pairs, self.slots, self.num_known_rows, self.strength)
        return remove_mean(eps, ctx.batch, ctx.num_graphs), eps_h


def _column(x: torch.Tensor, rows: torch.Tensor, dtype) -> torch.Tensor:
    return x.to(dtype)[rows].unsqueeze(-1)


def _inpaint_batch(pipe, plan: _Plan, sizes, steps, sampler, resample, gen, noise, tick=None, guidance=0.0):
    """Reverse process for one batch of molecules with sizes ``sizes`` (B,); returns numpy
    ``(pos (A, 3) float64 Å, types (A,), charges (A,) or None, fault_step (B,))``."""
    deterministic = isinstance(sampler, DDIMSampler) and sampler.eta == 0.0 and resample == 1
    hooks = [Clamp(plan, deterministic)]
    if guidance > 0 and plan.num_known > 0 and plan.frag_slots is not None:
        hooks.insert(0, ValenceGuidance(plan, guidance))
    return denoise_batch(pipe, sizes, steps, sampler, gen, hooks=hooks, resample=resample, initial_noise=noise,
                         tick=tick)


# ---------------------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class FragmentReport:
    """How well one generated molecule carries the fragment.

    Attributes:
        retained: the fragment is a substructure of the molecule's RDKit graph (anywhere).
        retained_in_place: its atoms ``0..k-1`` (the fixed ones) themselves form the fragment's
            bond graph, with the same bond types.
        rmsd: RMSD (Å) of atoms ``0..k-1`` to the fragment after Kabsch superposition (proper
            rotations only); ``nan`` when the elements differ or coordinates are not finite.
        bonds: route that built the molecule: ``"rdDetermineBonds"``, ``"EDM table"``,
            ``"given"`` (passed in) or ``"none"``.
        reason: why the molecule could not be checked (else ``None``).
    """

    retained: bool
    retained_in_place: bool
    rmsd: float
    bonds: str
    reason: str | None = None


def fragment_report(fragment: Fragment, symbols: Sequence[object], positions: np.ndarray, *, mol=None, query=None) -> FragmentReport:
    """Fragment retention and RMSD of one generated molecule whose first k atoms are the fragment.

    Args:
        fragment: the conditioning fragment (k atoms).
        symbols: the molecule's N element symbols.
        positions: (N, 3) coordinates in Å.
        mol: the molecule's RDKit ``Mol`` if already built (atom i = sample atom i); by default
            it is made here (RDKit DetermineBonds, else the EDM table molecule).
        query: the fragment's substructure query, to reuse across molecules (``fragment.query()``).
    """
    k = fragment.num_atoms
    elements = to_symbols(list(symbols))
    pos = np.asarray(positions, dtype=np.float64)
    if len(elements) < k or pos.shape != (len(elements), 3):
        return FragmentReport(False, False, math.nan, "none", f"sample has {len(elements)} atoms, fragment {k}")
    if tuple(elements[:k]) == fragment.symbols:
        rmsd = chem_fragments.kabsch_rmsd(pos[:k], fragment.positions)
    else:
        rmsd = math.nan
    if not np.isfinite(pos).all():
        return FragmentReport(False, False, rmsd, "none", "non-finite coordinates")
    route, reason = "given", None
    if mol is None:
        mol, route, reason = chem_fragments.bonded_mol(elements, pos)
    query = fragment.query() if query is None else query
    return FragmentReport(
        chem_fragments.substructure_retained(query, mol),
        chem_fragments.retained_in_place(query, mol),
        rmsd,
        route,
        reason,
    )


def fragment_reports(fragment: Fragment, arrays: SampledArrays) -> list[FragmentReport]:
    """:func:`fragment_report` for every molecule of a sampling run (faulted ones are not checked)."""
    query = fragment.query()
    reports = []
    for j in range(len(arrays.positions)):
        if arrays.fault_step[j] >= 0:
            reports.append(FragmentReport(False, False, math.nan, "none", f"numerical fault at reverse step {arrays.fault_step[j]}"))
            continue
        reports.append(fragment_report(fragment, arrays.symbols(j), arrays.positions[j], query=query))
    return reports


def formula_honoured(symbols: Sequence[object], formula: str | Mapping[str, int]) -> bool:
    """Whether a molecule's element counts are exactly ``formula``'s."""
    return chem_fragments.element_counts(symbols) == chem_fragments.parse_formula(formula)
