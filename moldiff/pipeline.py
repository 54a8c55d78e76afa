"""MolDiffPipeline: a trained denoiser + its noise schedule + dataset statistics, and the sampling loop.

The loop is written out in :meth:`MolDiffPipeline.sample_arrays` (diffusers style): draw sizes,
draw zero-CoM noise, then for each time pair ``(t, s)`` ask the network for the noise and let
the sampler take one step. Checkpoint directories hold ``config.json`` (everything needed to
rebuild the objects, no code defaults involved) and ``model.pt`` (a plain state dict that loads
with ``torch.load(weights_only=True)``).

:meth:`MolDiffPipeline.sample` is the user-facing call: it returns one :class:`GeneratedMolecule`
per sample (RDKit molecule, SMILES, EDM-protocol flags, and why a sample is invalid), handing all
RDKit work to :mod:`moldiff.chemistry`. :func:`load_pretrained` finds and loads a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import torch

from moldiff.chemistry.elements import QM9_ELEMENTS
from moldiff.chemistry.metrics import MetricsReport, MoleculeResult, evaluate_molecule, summarize
from moldiff.chemistry.report import assess_sample
from moldiff.data.statistics import DatasetStatistics
from moldiff.diffusion import AtomFeatures, BondFeatures, NoiseSchedule, centred_noise, make_sampler, symmetric_edge_noise
from moldiff.diffusion.likelihood import NLLTerms, estimate_nll
from moldiff.geometry import fully_connected_edges, num_nodes_per_graph, remove_mean, reverse_edges
from moldiff.inpainting import fragment_report, inpaint_arrays
from moldiff.sampling import (DEFAULT_NOISE_SCALE, DEFAULT_TIME_POWER, SampledArrays, batch_ticker, network_inputs,
                              record_faults)
from moldiff.models import DenoiserConfig, EGNNDenoiser

if TYPE_CHECKING:  # RDKit types only; all RDKit work happens in moldiff.chemistry
    from rdkit import Chem

__all__ = [
    "MolDiffPipeline",
    "SampledArrays",
    "GeneratedMolecule",
    "CheckpointError",
    "FORMAT_VERSION",
    "PRETRAINED_DIR",
    "PRETRAINED_ROOT",
    "shipped_models",
    "load_pretrained",
    "resolve_checkpoint",
    "DEFAULT_STEPS",
    "DEFAULT_SAMPLER",
    "DEFAULT_TIME_POWER",
    "DEFAULT_NOISE_SCALE",
    "COMPOSITIONS",
    "molecules_from_arrays",
    "evaluate_molecules",
]

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.pt"
#: Where the package's own models live, one folder per model; a folder's name is the model's name.
PRETRAINED_ROOT = Path(__file__).resolve().parent / "pretrained"
#: The default shipped checkpoint; ``load_pretrained()`` with no path loads it.
PRETRAINED_DIR = PRETRAINED_ROOT / "qm9"
#: The shipped model ``moldiff sample --formula`` uses when no checkpoint is named: trained with every
#: molecule's elements given, it places a formula's atoms in one pass. On 60 QM9 test formulas x 5
#: (50 steps) it gave 70.3% valid / 41.3% stable molecules in 133 s, the default joint model (drawing,
#: then RePaint clamping) 51.7% / 34.7% in 1,353 s (docs/experiments.md, session 11).
FORMULA_MODEL = "qm9-given"
#: Defaults of :meth:`MolDiffPipeline.sample` and ``moldiff sample``.
DEFAULT_STEPS = 50
DEFAULT_SAMPLER = "ancestral"
#: molecules denoised together by default: one batch of 1,000 (QM9 sizes: ~330k edges, a few hundred MB
#: in bf16) was the fastest setting measured (docs/benchmarks.md, scripts/bench_sample*.py)
DEFAULT_BATCH_SIZE = 1000
#: Where each sampled molecule's elements come from: ``"model"`` (generated with the geometry, as
#: EDM) or ``"data"`` (a composition of the training data, the geometry generated for it).
COMPOSITIONS = ("model", "data")


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or corrupt."""


@dataclass(eq=False, repr=False)
class GeneratedMolecule:
    """One sampled molecule, as :meth:`MolDiffPipeline.sample` returns it.

    Every sample is returned; nothing is dropped or repaired. Atom ``i`` of ``mol`` is atom ``i``
    of ``symbols``/``positions``.

    Attributes:
        symbols: N element symbols.
        positions: ``(N, 3)`` float64 coordinates in Å (zero centroid); non-finite after a
            numerical fault, left as they came out.
        charges: ``(N,)`` integer charge channel as sampled (EDM's channel encodes the nuclear
            charge, not a formal charge), or ``None`` for a model without one. Formal charges,
            where RDKit could assign them, are on ``mol``'s atoms.
        mol: RDKit molecule with a 3D conformer, every sampled hydrogen an explicit atom, or
            ``None`` after a numerical fault. Bonds from RDKit's ``rdDetermineBonds`` when it
            succeeds (bond orders and formal charges a viewer shows sensibly); else the EDM
            table-bonded molecule if it sanitizes (under-bonded atoms then carry implicit
            hydrogens, EDM's convention); else coordinates only, no bonds (``bonds`` says which).
        smiles: EDM validity SMILES (largest fragment of the table-bonded molecule, hydrogens
            written as ``[H]`` atoms), ``None`` when invalid.
        valid: EDM validity (RDKit sanitizes the table-bonded molecule).
        mol_stable: EDM molecule stability (every atom's bond-order sum is an allowed valence).
        n_stable_atoms: number of EDM-stable atoms.
        reason: why the sample is invalid and/or unstable, or ``"numerical fault at reverse
            step k"``; ``None`` for a valid, stable molecule.
        rdkit_smiles: heavy-atom SMILES of the ``rdDetermineBonds`` molecule, ``None`` if that
            route failed.
        bonds: ``"rdDetermineBonds"``, ``"EDM table"`` or ``"none"`` (origin of ``mol``'s bonds).
        fault_step: reverse step at which the sample first became non-finite, -1 if never
            (``steps`` means the final decode).
        generated_bonds: for models that generate bonds, ``(P, 3)`` rows ``[i, j, order]`` the
            network generated with the atoms (the EDM metrics above still use the distance table).
    """

    symbols: list[str]
    positions: np.ndarray
    charges: np.ndarray | None
    mol: "Chem.Mol | None"
    smiles: str | None
    valid: bool
    mol_stable: bool
    n_stable_atoms: int
    reason: str | None = None
    rdkit_smiles: str | None = None
    bonds: str = "none"
    fault_step: int = -1
    fragment_retained: bool | None = None
    fragment_rmsd: float | None = None
    generated_bonds: np.ndarray | None = None

    @property
    def num_atoms(self) -> int:
        return len(self.symbols)

    @property
    def fault(self) -> bool:
        """Whether the sample hit a numerical fault (NaN/inf) during sampling."""
        return self.fault_step >= 0

    @property
    def formula(self) -> str:
        """Hill formula of the sampled atoms, e.g. ``C3H7NO``."""
        counts: dict[str, int] = {}
        for s in self.symbols:
            counts[s] = counts.get(s, 0) + 1
        if "C" in counts:  # Hill order: C, H, then alphabetical; alphabetical without carbon
            order = ["C", "H"] + sorted(e for e in counts if e not in ("C", "H"))
        else:
            order = sorted(counts)
        return "".join(f"{e}{counts[e] if counts[e] > 1 else ''}" for e in order if e in counts)

    @property
    def result(self) -> MoleculeResult:
        """The EDM-protocol verdict, as :func:`moldiff.chemistry.metrics.summarize` takes it."""
        return MoleculeResult(self.smiles, self.valid, self.mol_stable, self.n_stable_atoms, self.num_atoms, self.reason)

    def __repr__(self) -> str:
        shown = self.rdkit_smiles or self.smiles
        return (
            f"GeneratedMolecule({self.formula}, valid={self.valid}, mol_stable={self.mol_stable}"
            + (f", smiles={shown!r}" if shown else "")
            + (f", reason={self.reason!r}" if self.reason and not self.valid else "")
            + ")"
        )


def _fault_reason(step: int, steps: int) -> str:
    where = " (final decode)" if step >= steps else ""
    return f"numerical fault at reverse step {step}{where}"


def molecules_from_arrays(
    arrays: SampledArrays, progress: Callable[[int], None] | None = None
) -> list[GeneratedMolecule]:
    """Turn raw samples into :class:`GeneratedMolecule` objects (bonds, RDKit molecule, EDM flags).

    ``progress(1)`` is called after each molecule. Samples with a numerical fault are not
    interpreted: invalid, unstable, ``mol=None``, the fault as ``reason``.
    """
    out = []
    for k in range(len(arrays.positions)):
        symbols = arrays.symbols(k)
        positions = np.asarray(arrays.positions[k], dtype=np.float64)
        step = int(arrays.fault_step[k])
        chem = assess_sample(symbols, positions, fault=_fault_reason(step, arrays.steps) if step >= 0 else None)
        r = chem.result
        charges = arrays.charges[k]
        out.append(
            GeneratedMolecule(
                symbols=symbols,
                positions=positions,
                charges=None if charges is None else np.asarray(charges),
                mol=chem.mol,
                smiles=r.smiles,
                valid=r.valid,
                mol_stable=r.mol_stable,
                n_stable_atoms=r.n_stable_atoms,
                reason=r.reason,
                rdkit_smiles=chem.rdkit_smiles,
                bonds=chem.bonds,
                fault_step=step,
                generated_bonds=arrays.bonds[k] if arrays.bonds else None,
            )
        )
        if progress is not None:
            progress(1)
    return out


class MolDiffPipeline(torch.nn.Module):
    """Everything needed to sample: ``denoiser``, ``schedule``, atom ``features`` and ``statistics``."""

    def __init__(
        self,
        denoiser: EGNNDenoiser,
        schedule: NoiseSchedule,
        features: AtomFeatures,
        statistics: DatasetStatistics,
        atomic_numbers: Sequence[int],
        parametrization: str = "eps",
        metadata: dict | None = None,
    ):
        super().__init__()
        if parametrization != "eps":
            raise ValueError(f"unknown parametrization {parametrization!r}")
        if denoiser.config.num_features != features.dim:
            raise ValueError(f"denoiser expects {denoiser.config.num_features} features, encoding has {features.dim}")
        self.denoiser = denoiser
        self.schedule = schedule
        self.features = features
        self.statistics = statistics
        self.atomic_numbers = list(atomic_numbers)
        self.parametrization = parametrization
        self.metadata = dict(metadata or {})

    # ------------------------------------------------------------------ model calls
    @property
    def elements(self) -> tuple[str, ...]:
        return self.statistics.elements

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def configure_inference(self, precision: str = "fp32", compile: bool = False,
                            compile_backend: str = "inductor") -> "MolDiffPipeline":
        """How :meth:`predict_noise` runs the network when sampling.

        ``precision="bf16"`` runs the network's matrix products under bf16 autocast (fast on CPUs with
        AMX / AVX512-BF16 and on GPUs); sampler arithmetic stays in the state's dtype. ``"auto"``:
        bf16 on CPUs with native bf16 arithmetic, fp32 elsewhere (see :func:`auto_precision`).
        ``compile=True`` compiles each equivariant block with ``torch.compile(dynamic=True)`` (the
        blocks hold nearly all the work; the rest stays eager): seconds to tens of seconds once,
        then faster steps. Compiling blocks rather than the whole network compiles one small graph
        that all blocks share, about half the compilation time of the whole network with a cold
        PyTorch cache and a quarter with a warm one (``scripts/bench_compile.py``).
        ``compile_backend`` is passed to ``torch.compile``. Training is unaffected. Returns ``self``.
        """
        if precision == "auto":
            precision = auto_precision(self.device)
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")
        blocks = None
        if compile:
            blocks = [torch.compile(b, dynamic=True, backend=compile_backend) for b in self.denoiser.blocks]
        # Plain attributes (not submodules), so state_dict() and saving are unchanged.
        object.__setattr__(self, "_precision", precision)
        object.__setattr__(self, "_compiled_blocks", blocks)
        return self

    @property
    def inference_precision(self) -> str:
        """``"fp32"`` or ``"bf16"``: how :meth:`predict_noise` runs the network (:meth:`configure_inference`)."""
        return getattr(self, "_precision", "fp32")

    @property
    def bond_types(self) -> int:
        """Bond classes the network generates with the atoms (0: none, EDM's model)."""
        return int(getattr(self.denoiser.config, "bond_types", 0))

    @property
    def bond_features(self) -> BondFeatures | None:
        """Encoding of generated bonds (``None`` for models without bond features)."""
        return BondFeatures(self.bond_types) if self.bond_types else None

    @property
    def bond_output(self) -> str:
        """What the bond head predicts: ``"eps"`` (noise) or ``"logits"`` (clean bond class)."""
        return getattr(self.denoiser.config, "bond_output", "eps")

    def require_no_bonds(self, what: str) -> None:
        """Raise a one-line ``ValueError`` where ``what`` is not available for bond-generating models."""
        if self.bond_types:
            raise ValueError(f"{what} is not available for models that generate bonds (bond_types={self.bond_types})")

    @property
    def known_types_prob(self) -> float:
        """Fraction of training molecules shown with clean atom types (``diffusion.known_types_prob``);
        above 0 the network also models p(positions | types), so :meth:`sample_arrays` can take
        ``composition="data"``. 0 for EDM-style models."""
        return float(self.metadata.get("known_types_prob", 0.0))

    @property
    def default_composition(self) -> str:
        """``"data"`` for a model trained with every molecule's types given (``known_types_prob = 1``:
        it never learned to generate elements), else ``"model"``."""
        return "data" if self.known_types_prob >= 1.0 else "model"

    def require_type_generation(self, what: str) -> None:
        """Raise a one-line ``ValueError`` where ``what`` needs a network that generates atom types."""
        if self.known_types_prob >= 1.0:
            raise ValueError(f"{what} needs a model that generates atom types; this one was trained with every "
                             f"molecule's types given (known_types_prob = 1): use composition='data' "
                             f"(--composition data) or a formula")

    def require_known_types(self, what: str) -> None:
        """Raise a one-line ``ValueError`` where ``what`` needs a model trained with given atom types."""
        if self.known_types_prob <= 0:
            raise ValueError(f"{what} needs a model trained with diffusion.known_types_prob > 0; this one was not "
                             f"(run name {self.metadata.get('run_name', '?')!r})")
        self.require_no_bonds(what)
        if self.self_condition:
            raise ValueError(f"{what} is not available for self-conditioned models")

    @property
    def self_condition(self) -> bool:
        """Whether the network takes its previous clean-molecule estimate as input (self-conditioning)."""
        return bool(getattr(self.denoiser.config, "self_condition", False))

    def predict_noise(self, pos_t, h_t, t, batch, context=None, edge_index=None, cond=None, e_t=None, raw_bonds=False):
        """Noise prediction ``(eps_pos (n, 3), eps_h (n, F))`` at times ``t`` ``(B,)``, in ``pos_t``'s dtype.

        ``cond``: for self-conditioned models, the previous clean estimate ``(pos_hat, h_hat)`` (or None).
        ``e_t``: for bond-generating models, the noisy bond features ``(E, K)`` of ``edge_index``'s
        edges; the prediction is then ``(eps_pos, eps_h, eps_e (E, K))``. A model whose bond head
        predicts clean-bond logits (``bond_output="logits"``) returns the noise its expected clean
        one-hot implies, ``(e_t - alpha_t E[e_0]) / sigma_t``, or the logits with ``raw_bonds``.
        """
        blocks = getattr(self, "_compiled_blocks", None)
        bf16 = getattr(self, "_precision", "fp32") == "bf16"
        with torch.autocast(pos_t.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = self.denoiser(pos_t, h_t, t, batch, context=context, edge_index=edge_index, cond=cond, blocks=blocks,
                                e_t=e_t)
        if self.bond_types:
            out, eps_e = out
            eps_e = eps_e.to(e_t.dtype)
            if self.denoiser.config.bond_output == "logits" and not raw_bonds:
                edge_t = t.to(torch.float64)[batch[edge_index[0]]]
                alpha, sigma = (x.to(e_t.dtype).unsqueeze(-1) for x in self.schedule.alpha_sigma(edge_t))
                e0 = eps_e.softmax(-1) * self.bond_features.scale
                eps_e = (e_t - alpha * e0) / sigma
            return out.pos.to(pos_t.dtype), out.h.to(h_t.dtype), eps_e
        return out.pos.to(pos_t.dtype), out.h.to(h_t.dtype)

    # ------------------------------------------------------------------ likelihood
    @torch.no_grad()
    def nll_terms(self, pos, types, charges, batch, num_graphs: int, *, generator=None, steps: int = 1000) -> NLLTerms:
        """One-sample estimate of the bound on ``-log p(x, h, N)`` (nats) per molecule, as EDM reports
        it on QM9 (see :mod:`moldiff.diffusion.likelihood`). ``pos`` ``(n, 3)`` Å, ``types`` ``(n,)``
        indices into :attr:`elements`, ``charges`` ``(n,)`` atomic numbers, sorted ``batch`` ``(n,)``."""
        self.require_no_bonds("the likelihood bound")
        self.require_type_generation("the likelihood bound on p(x, h, N)")
        self.denoiser.eval()
        sizes = num_nodes_per_graph(batch, num_graphs).cpu().numpy()
        p_size = self.statistics.size_distribution()
        with np.errstate(divide="ignore"):  # a size the training data never had: p(N) = 0, NLL = inf
            log_p = np.log(np.where(sizes < len(p_size), p_size[np.minimum(sizes, len(p_size) - 1)], 0.0))
        log_p_size = torch.as_tensor(log_p, dtype=torch.float64, device=pos.device)
        pos = remove_mean(pos.to(next(self.denoiser.parameters()).dtype), batch, num_graphs)
        return estimate_nll(lambda p, h, t, b: self.predict_noise(p, h, t, b), self.schedule, self.features,
                            pos, types, charges, batch, num_graphs, log_p_size, steps=steps, generator=generator)

    # ------------------------------------------------------------------ sampling
    def check_sizes(self, num_atoms: Sequence[int]) -> None:
        """Raise ``ValueError`` for sizes the model was not trained on (0, or above the data maximum)."""
        hi = self.statistics.max_atoms
        bad = [int(n) for n in num_atoms if not 2 <= int(n) <= hi]
        if bad:
            raise ValueError(f"num_atoms must be between 2 and {hi} (the largest training molecule), got {bad[0]}")

    @torch.no_grad()
    def sample_arrays(
        self,
        n: int,
        *,
        steps: int = 100,
        sampler: str = "ancestral",
        seed: int | None = 0,
        num_atoms: int | Sequence[int] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: Callable[[int], None] | None = None,
        time_power: float = DEFAULT_TIME_POWER,
        on_step: Callable[[float], None] | None = None,
        noise_scale: float = DEFAULT_NOISE_SCALE,
        composition: str | None = None,
        types: Sequence[np.ndarray] | None = None,
    ) -> SampledArrays:
        """Sample ``n`` molecules; returns raw arrays (see :class:`SampledArrays`).

        ``num_atoms``: ``None`` draws sizes from the training p(N); an int fixes every size; a list
        gives one size per molecule. ``progress(k)`` is called after each batch with molecules done.
        ``on_step(done)`` is called after every network evaluation with the molecules done so far,
        the batch in progress counted by the fraction of its evaluations made (for progress bars).
        ``time_power``: the time grid ``t_k = (k / steps) ** time_power`` (1: EDM's uniform grid).
        ``noise_scale``: factor in [0, 1] on each step's fresh noise (1: EDM's ancestral sampler).
        ``composition``: ``None`` (the model's :attr:`default_composition`), ``"model"`` (EDM: the
        network generates the elements with the geometry) or
        ``"data"``: each molecule's composition is drawn from the training molecules of its size and
        the network places atoms of those elements (models trained with ``known_types_prob > 0``;
        the sizes and starting noise are those of ``"model"`` with the same seed).
        ``types``: each molecule's elements given (``(N_k,)`` indices into :attr:`elements`; sizes
        follow from them), placed by the network as with ``composition="data"``.
        Same ``seed``, same output (on the same device and torch version).
        """
        if composition is None:
            composition = self.default_composition if types is None else "model"
        if composition not in COMPOSITIONS:
            raise ValueError(f"composition must be one of {', '.join(COMPOSITIONS)}, got {composition!r}")
        if composition == "data":
            self.require_known_types("composition='data'")
        elif types is None:
            self.require_type_generation("composition='model'")
        if n <= 0:
            raise ValueError(f"number of molecules must be positive, got {n}")
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if types is not None:
            self.require_known_types("sampling with given atom types")
            if composition != "model" or num_atoms is not None:
                raise ValueError("give the atom types, or a composition='data' / num_atoms, not both")
            types = [np.asarray(t, dtype=np.int64) for t in types]
            if len(types) != n:
                raise ValueError(f"got atom types for {len(types)} molecules, asked for {n}")
            if any(t.ndim != 1 or (t.size and (t.min() < 0 or t.max() >= len(self.elements))) for t in types):
                raise ValueError(f"atom types must be 1-D element indices in [0, {len(self.elements)})")
            num_atoms = [len(t) for t in types]
        rng = np.random.default_rng(seed)
        if num_atoms is None:
            sizes = self.statistics.sample_sizes(n, rng, min_atoms=2)
        elif isinstance(num_atoms, (int, np.integer)):
            sizes = np.full(n, int(num_atoms))
        else:
            sizes = np.asarray(list(num_atoms), dtype=np.int64)
            if len(sizes) != n:
                raise ValueError(f"got {len(sizes)} sizes for {n} molecules")
        self.check_sizes(sizes)
        device = self.device
        gen = torch.Generator(device=device)
        gen.manual_seed(int(rng.integers(2**62)))
        flat = None  # given types: every atom's element, molecule after molecule
        if composition == "data":
            comps = self.statistics.sample_compositions(sizes, rng)
            flat = np.concatenate([np.repeat(np.arange(len(c)), c) for c in comps])
        elif types is not None:
            flat = np.concatenate(types)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        sampler_obj = make_sampler(sampler, self.schedule, time_power=time_power, noise_scale=noise_scale)
        out = SampledArrays([], [], [], np.full(n, -1), self.elements, steps, sampler, seed, time_power, noise_scale)
        out.extra["composition"] = "given" if types is not None else composition
        self.denoiser.eval()
        for start in range(0, n, batch_size):
            chunk = sizes[start : start + batch_size]
            tick = batch_ticker(on_step, start, len(chunk))
            known = None if flat is None else flat[offsets[start] : offsets[start + len(chunk)]]
            *arrays, bonds = self._sample_batch(chunk, steps, sampler_obj, gen, device, tick, known_types=known)
            out.add_batch(start, chunk, *arrays)
            if bonds is not None:
                out.bonds.extend(bonds)
            if progress is not None:
                progress(len(chunk))
        return out

    def sample(
        self,
        n: int,
        *,
        steps: int = DEFAULT_STEPS,
        sampler: str = DEFAULT_SAMPLER,
        seed: int | None = 0,
        num_atoms: int | Sequence[int] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: Callable[[int], None] | None = None,
        fragment=None,
        formula=None,
        resample: int | None = None,
        time_power: float | None = None,
        noise_scale: float | None = None,
        valence_guidance: float | None = None,
        formula_draws: int | None = None,
        composition: str | None = None,
    ) -> list[GeneratedMolecule]:
        """Sample ``n`` molecules and interpret them chemically.

        Args:
            n: number of molecules (> 0).
            steps: reverse steps (> 0); the model was trained on continuous t, so any number works.
            sampler: ``"ancestral"`` (DDPM), ``"ddim"`` (deterministic) or ``"ddim:<eta>"``.
            seed: same seed, same molecules (same device and torch version); ``None`` for fresh
                randomness.
            num_atoms: ``None`` draws sizes from the training p(N); an int fixes every size; a
                list gives one size per molecule. Sizes must be 2..``statistics.max_atoms``.
            batch_size: molecules denoised together (memory vs speed). The random stream is
                consumed batch by batch, so reproducing a run needs the same ``batch_size``.
            progress: ``progress(k)`` after each batch of ``k`` molecules is denoised (the RDKit
                pass afterwards is not reported; use :meth:`sample_arrays` and
                :func:`molecules_from_arrays` to follow both).
            fragment: a :class:`moldiff.inpainting.Fragment` every molecule must contain at its
                geometry (its atoms come first); ``fragment_retained`` / ``fragment_rmsd`` report
                on it per molecule. See docs/inpainting.md.
            formula: the composition of every molecule, e.g. ``"C7H8O"`` (isomer generation).
            resample: RePaint resampling rounds per step when ``fragment`` or ``formula`` is given
                (``None``: ``moldiff.inpainting.DEFAULT_RESAMPLE``, 10).
            time_power: the time grid ``t_k = (k / steps) ** time_power`` (> 0; 1: EDM's uniform
                grid). ``None``: :data:`DEFAULT_TIME_POWER` (2, more steps at low noise) for plain
                sampling, ``moldiff.inpainting.DEFAULT_INPAINT_TIME_POWER`` (1) with ``fragment`` or
                ``formula`` (each measured best for its task, docs/experiments.md).
            noise_scale: factor in [0, 1] on the fresh noise of each reverse step (1: EDM's
                ancestral sampler; lower is lower-temperature sampling). ``None``:
                :data:`DEFAULT_NOISE_SCALE` for plain sampling,
                ``moldiff.inpainting.DEFAULT_INPAINT_NOISE_SCALE`` (also 0.5) with ``fragment`` or ``formula``.
            valence_guidance: strength of open-valence guidance with a ``fragment`` (each fragment
                atom steered to as many new neighbours as it has open valences; ``None``:
                ``moldiff.inpainting.DEFAULT_VALENCE_GUIDANCE``; see
                :func:`moldiff.inpainting.inpaint_arrays`).
            formula_draws: with ``formula`` alone, unconditional draws per requested molecule kept
                when they match the formula exactly, before the rest are made by clamping types, or
                with the types given to a model trained for it (``diffusion.known_types_prob > 0``)
                (``None``: ``moldiff.inpainting.DEFAULT_FORMULA_DRAWS``; 0: no drawing).
            composition: ``None`` (the model's :attr:`default_composition`), ``"model"`` (the network
                generates the elements, EDM) or ``"data"``
                (each molecule gets a composition of a training molecule of its size and the network
                places its atoms; needs a model trained with ``diffusion.known_types_prob > 0``; not
                with ``fragment`` or ``formula``).

        Returns:
            ``n`` :class:`GeneratedMolecule` in sampling order, invalid and faulty ones included
            and flagged (``valid``, ``mol_stable``, ``reason``).

        Raises:
            ValueError: ``n``, ``steps`` or ``batch_size`` not positive, sizes out of range,
                unknown sampler.
        """
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        if fragment is None and formula is None:
            arrays = self.sample_arrays(
                n, steps=steps, sampler=sampler, seed=seed, num_atoms=num_atoms, batch_size=batch_size, progress=progress,
                time_power=DEFAULT_TIME_POWER if time_power is None else time_power,
                noise_scale=DEFAULT_NOISE_SCALE if noise_scale is None else noise_scale,
                composition=composition,
            )
            return molecules_from_arrays(arrays)
        if composition not in (None, "model"):
            raise ValueError(f"composition={composition!r} draws each molecule's composition; it does not combine with a fragment or formula")
        arrays = inpaint_arrays(self, n, fragment=fragment, formula=formula, num_atoms=num_atoms, steps=steps,
                                sampler=sampler, resample=resample, seed=seed, batch_size=batch_size, progress=progress,
                                time_power=time_power, noise_scale=noise_scale, valence_guidance=valence_guidance,
                                formula_draws=formula_draws)
        molecules = molecules_from_arrays(arrays)
        if fragment is not None:
            for m in molecules:
                rep = fragment_report(fragment, m.symbols, m.positions, mol=m.mol)
                m.fragment_retained, m.fragment_rmsd = rep.retained, rep.rmsd
        return molecules

    def _sample_batch(self, sizes, steps, sampler, gen, device, tick=None, known_types=None):
        """Denoise one batch. ``known_types`` ``(n,)``: every atom's element index, given: the network
        sees those clean features at every step in place of noisy ones (``composition="data"``)."""
        num_graphs = len(sizes)
        batch = torch.repeat_interleave(torch.arange(num_graphs, device=device), torch.as_tensor(sizes, device=device))
        edge_index = fully_connected_edges(batch)
        dtype = next(self.denoiser.parameters()).dtype
        pos = centred_noise(batch, num_graphs, generator=gen, dtype=dtype)
        h = torch.randn(batch.shape[0], self.features.dim, generator=gen, dtype=dtype, device=device)
        h_known = None
        if known_types is not None:
            kt = torch.as_tensor(np.asarray(known_types), dtype=torch.long, device=device)
            h_known = self.features.encode(kt, torch.as_tensor(self.atomic_numbers, device=device)[kt], dtype=dtype)
            h = h_known.clone()
        fault = torch.full((num_graphs,), -1, dtype=torch.long, device=device)
        times = sampler.timesteps(steps, device=device)
        cond = None  # self-conditioning: the previous step's clean estimate
        sc = (lambda c: {"cond": c}) if self.self_condition else (lambda c: {})  # noqa: E731
        e = None
        if self.bond_types:  # bond features of every directed edge, equal on i -> j and j -> i
            edge_batch, rev = batch[edge_index[0]], reverse_edges(edge_index, batch.shape[0])
            e = symmetric_edge_noise(rev, self.bond_types, generator=gen, dtype=dtype)
        bonded = (lambda: {"e_t": network_inputs(fault, edge_batch, e)[0]}) if self.bond_types else (lambda: {})  # noqa: E731
        for i in range(steps):
            t = times[i].expand(num_graphs)
            s = times[i + 1].expand(num_graphs)
            net_pos, net_h = network_inputs(fault, batch, pos, h)  # a faulted molecule's NaNs stay out of the network
            eps_pos, eps_h, *eps_e = self.predict_noise(net_pos, net_h, t, batch, edge_index=edge_index, **sc(cond), **bonded())
            if self.self_condition:
                cond = sampler.clean_estimate(pos, h, eps_pos, eps_h, t, batch)
            step = sampler.step(eps_pos, eps_h, t, s, pos, h, batch, generator=gen)
            if self.bond_types:
                e, _ = sampler.edge_step(eps_e[0], e, t, s, edge_batch, rev, generator=gen)
                bad_edge = ~torch.isfinite(e).all(-1)
                if bad_edge.any():  # counted as a fault of the molecule, like a bad atom
                    bad_mol = num_nodes_per_graph(edge_batch[bad_edge], num_graphs) > 0
                    fault[bad_mol & (fault < 0)] = i
            pos, h = step.pos, (step.h if h_known is None else h_known.clone())
            record_faults(fault, pos, h, batch, num_graphs, i)
            if tick is not None:
                tick(i + 1, steps + 1)
        # Final decode at t = 0: x = (z_0 - sigma_0 eps_hat) / alpha_0 (mean of p(x | z_0), EDM eq. 9-10).
        t0 = times[-1].expand(num_graphs)
        net_pos, net_h = network_inputs(fault, batch, pos, h)
        eps_pos, eps_h, *eps_e = self.predict_noise(net_pos, net_h, t0, batch, edge_index=edge_index, **sc(cond), **bonded())
        bonds = None
        if self.bond_types:
            alpha0, sigma0 = (x.to(dtype)[edge_batch].unsqueeze(-1) for x in self.schedule.alpha_sigma(t0))
            bonds = self._split_bonds((e - sigma0 * eps_e[0]) / alpha0, edge_index, batch, num_graphs)
        pos, h = sampler.clean_estimate(pos, h, eps_pos, eps_h, t0, batch)
        if h_known is not None:
            h = h_known.clone()
        record_faults(fault, pos, h, batch, num_graphs, steps)
        if tick is not None:
            tick(steps + 1, steps + 1)
        types, charges = self.features.decode(h.nan_to_num(0.0))  # decode only; faulty molecules stay flagged
        if h_known is not None:  # given types stay what they were, faulted molecules included
            types = kt
            charges = None if charges is None else torch.as_tensor(self.atomic_numbers, device=device)[kt]
        return (
            pos.double().cpu().numpy(),
            types.cpu().numpy(),
            None if charges is None else charges.cpu().numpy(),
            fault.cpu().numpy(),
            bonds,
        )

    def _split_bonds(self, e0, edge_index, batch, num_graphs) -> list[np.ndarray]:
        """Per molecule ``(P_k, 3)`` rows ``[i, j, order]`` (local ``i < j``, order > 0) from the clean
        bond estimate ``e0`` ``(E, K)`` by argmax (non-finite estimates decode as no bond)."""
        orders = self.bond_features.decode(e0.nan_to_num(0.0).float())
        row, col = edge_index
        keep = (row < col) & (orders > 0)
        starts = torch.cumsum(torch.bincount(batch, minlength=num_graphs), 0)
        starts = torch.cat([starts.new_zeros(1), starts[:-1]])
        mol = batch[row[keep]]
        local = torch.stack([row[keep] - starts[mol], col[keep] - starts[mol], orders[keep]], -1).cpu().numpy()
        mol = mol.cpu().numpy()
        return [local[mol == k] for k in range(num_graphs)]

    # ------------------------------------------------------------------ persistence
    def config_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "denoiser": self.denoiser.config.to_dict(),
            "schedule": self.schedule.config,
            "features": {
                "num_types": self.features.num_types,
                "include_charges": self.features.include_charges,
                "type_scale": self.features.type_scale,
                "charge_scale": self.features.charge_scale,
            },
            "statistics": self.statistics.to_dict(),
            "atomic_numbers": self.atomic_numbers,
            "parametrization": self.parametrization,
            "metadata": self.metadata,
        }

    @classmethod
    def from_config(cls, cfg: dict) -> "MolDiffPipeline":
        if cfg.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"unsupported checkpoint format {cfg.get('format_version')!r} (expected {FORMAT_VERSION})")
        sched = dict(cfg["schedule"])
        return cls(
            EGNNDenoiser(DenoiserConfig.from_dict(cfg["denoiser"])),
            NoiseSchedule(sched.pop("kind"), sched.pop("grid"), **sched),
            AtomFeatures(**cfg["features"]),
            DatasetStatistics.from_dict(cfg["statistics"]),
            cfg["atomic_numbers"],
            cfg.get("parametrization", "eps"),
            cfg.get("metadata"),
        )

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.pt`` (denoiser weights) into ``directory`` atomically:
        files go to a temporary sibling folder that replaces the target only when complete."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp"))
        try:
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2))
            state = {k: v.detach().cpu().contiguous() for k, v in self.denoiser.state_dict().items()}
            torch.save(state, tmp / WEIGHTS_NAME)
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                directory.rename(old)
                tmp.rename(directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "MolDiffPipeline":
        """Load a directory written by :meth:`save_pretrained` (or a training checkpoint export)."""
        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not directory.is_dir():
            names = ", ".join(shipped_models()) or "none"
            raise CheckpointError(f"checkpoint directory not found: {directory} (models shipped by name: {names})")
        if not cfg_path.is_file() or not w_path.is_file():
            raise CheckpointError(f"{directory} is not a moldiff checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        try:
            cfg = json.loads(cfg_path.read_text())
            pipe = cls.from_config(cfg)
            state = torch.load(w_path, map_location="cpu", weights_only=True)
            pipe.denoiser.load_state_dict(state)
        except CheckpointError:
            raise
        except Exception as exc:  # corrupt JSON, truncated weights, shape mismatch
            raise CheckpointError(f"cannot load checkpoint {directory}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        return pipe.to(device)


# ---------------------------------------------------------------------------- loading and scoring
def auto_precision(device: str | torch.device = "cpu") -> str:
    """``"bf16"`` on a CPU with native bf16 arithmetic (AMX or AVX512-BF16), else ``"fp32"``.

    GPUs get fp32 (TF32 where enabled): sampling there is fast already and fp32 is the reference.
    """
    if torch.device(device).type != "cpu":
        return "fp32"
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return "bf16" if any(c is not None and c() for c in checks) else "fp32"
    except RuntimeError:  # a torch build without these probes
        return "fp32"


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is available (torch.cuda.is_available() is False)")
    return dev


def shipped_models() -> list[str]:
    """Names of the models shipped inside the package (folders of :data:`PRETRAINED_ROOT`), sorted."""
    if not PRETRAINED_ROOT.is_dir():
        return []
    return sorted(d.name for d in PRETRAINED_ROOT.iterdir() if (d / CONFIG_NAME).is_file())


def resolve_checkpoint(path: str | os.PathLike | None = None) -> Path:
    """The checkpoint directory ``path`` refers to.

    ``None`` is the default shipped model (:data:`PRETRAINED_DIR`); the name of a shipped model
    (:func:`shipped_models`, e.g. ``"qm9"``) is that model, unless a folder of that name exists
    here; a training run directory (holding ``pipeline/``) resolves to its ``pipeline/`` folder;
    anything else is taken as it is.

    Raises:
        CheckpointError: ``None`` but no model is shipped with this installation.
    """
    if path is None:
        if not (PRETRAINED_DIR / CONFIG_NAME).is_file():
            raise CheckpointError(
                f"no pretrained model is shipped in {PRETRAINED_DIR} yet; "
                "pass a checkpoint directory (e.g. RUN_DIR/pipeline from `moldiff train`)"
            )
        return PRETRAINED_DIR
    directory = Path(path).expanduser()
    if not directory.exists() and isinstance(path, str) and path in shipped_models():
        return PRETRAINED_ROOT / path
    if not (directory / CONFIG_NAME).is_file() and (directory / "pipeline" / CONFIG_NAME).is_file():
        return directory / "pipeline"
    return directory


def load_pretrained(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> MolDiffPipeline:
    """Load a sampling pipeline.

    Args:
        path: ``None`` for the QM9 model shipped in the package (``moldiff/pretrained/qm9``), the
            name of a shipped model (:func:`shipped_models`: ``"qm9"``, ``"qm9-given"``), a
            checkpoint directory (``config.json`` + ``model.pt``, from ``save_pretrained``), or a
            training run directory (its ``pipeline/`` is used).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns:
        :class:`MolDiffPipeline` on ``device``; call :meth:`~MolDiffPipeline.sample`.

    Raises:
        CheckpointError: missing, incomplete or corrupt checkpoint (one-line message).
        ValueError: unknown device, or CUDA asked for without a GPU.
    """
    dev = _check_device(device)
    return MolDiffPipeline.from_pretrained(resolve_checkpoint(path), dev)


def evaluate_molecules(
    molecules: Iterable[GeneratedMolecule | tuple],
    reference: Iterable[str] | None = None,
    workers: int = 1,
) -> MetricsReport:
    """EDM-protocol metrics (atom/molecule stability, validity, uniqueness, novelty) of a set.

    Args:
        molecules: :class:`GeneratedMolecule` objects (their stored verdicts are used, numerical
            faults counting as invalid and unstable) and/or ``(symbols, positions)`` pairs with
            positions ``(N, 3)`` in Å.
        reference: SMILES of the training set for novelty (e.g.
            ``moldiff.data.qm9.training_smiles()``), or ``None`` to skip novelty.
        workers: processes for the RDKit work on plain pairs.

    Returns:
        :class:`~moldiff.chemistry.metrics.MetricsReport` (``format_table`` prints it).
    """
    from moldiff.chemistry.metrics import evaluate_molecules as _evaluate_pairs

    items = list(molecules)
    if not any(isinstance(m, GeneratedMolecule) for m in items):
        return _evaluate_pairs(items, reference=reference, workers=workers)
    results = [m.result if isinstance(m, GeneratedMolecule) else evaluate_molecule(*m) for m in items]
    return summarize(results, reference)
