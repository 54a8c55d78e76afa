"""MolDiffPipeline: a trained denoiser + its noise schedule + dataset statistics, and what to sample.

The reverse loop itself is :func:`moldiff.sampling.denoise_batch`, written once; the pipeline
decides what it runs: :meth:`MolDiffPipeline.generate` takes a :class:`SampleRequest` (every option
checked and given its default in one place, :meth:`SampleRequest.resolved`) and routes it: plain
sampling (the network's compositions or the data's), a fragment (RePaint,
:mod:`moldiff.inpainting`), or a formula (kept draws, given types, or RePaint). Checkpoint
directories hold ``config.json`` (everything needed to rebuild the objects, no code defaults
involved) and ``model.pt`` (a plain state dict that loads with ``torch.load(weights_only=True)``).

:meth:`MolDiffPipeline.sample` is the user-facing call: it returns one
:class:`~moldiff.molecules.GeneratedMolecule` per sample (RDKit molecule, SMILES, EDM-protocol
flags, and why a sample is invalid). :func:`load_pretrained` finds and loads a checkpoint.
"""

from __future__ import annotations

import json
import os
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from moldiff.data.properties import CONDITION_UNITS, PropertyConditioning
from moldiff.data.statistics import DatasetStatistics
from moldiff.diffusion import AtomFeatures, BondFeatures, NoiseSchedule, make_sampler
from moldiff.diffusion.categorical import CategoricalDiffusion, CategoricalFeatures
from moldiff.diffusion.likelihood import NLLTerms, estimate_nll, estimate_nll_categorical
from moldiff.files import atomic_directory
from moldiff.geometry import edge_bond_orders, fully_connected_edges, num_nodes_per_graph, remove_mean, reverse_edges
from moldiff.chemistry import fragments as chem_fragments
from moldiff.inpainting import DEFAULT_INPAINT_NOISE_SCALE, DEFAULT_INPAINT_TIME_POWER, inpaint_arrays, plan_conditioning
from moldiff.molecules import GeneratedMolecule, evaluate_molecules, interpret, molecules_from_arrays
from moldiff.sampling import (DEFAULT_LATE_RESAMPLE, DEFAULT_NOISE_SCALE, DEFAULT_RESAMPLE_BELOW, DEFAULT_TIME_POWER,
                              EvenValence, GivenTypes, SampledArrays, batch_ticker, denoise_batch, network_evaluations)
from moldiff.models import DenoiserConfig, DenoiserOutput, build_denoiser
from moldiff.models.valence import valence_inputs, valence_table
from moldiff.runtime import choose_arithmetic, resolve_device

__all__ = [
    "MolDiffPipeline",
    "SampledArrays",
    "GeneratedMolecule",
    "CheckpointError",
    "FORMAT_VERSION",
    "DEFAULT_MODEL",
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
    "SampleRequest",
    "interpret",
    "molecules_from_arrays",
    "evaluate_molecules",
]

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.pt"
#: Where the package's own models live, one folder per model; a folder's name is the model's name.
PRETRAINED_ROOT = Path(__file__).resolve().parent / "pretrained"
#: The default shipped model, by name: ``load_pretrained()`` with no path and ``moldiff sample`` with
#: no ``--checkpoint`` use it. ``qm9-bonds`` generates elements, formal charges and bond orders with
#: the coordinates; with the default sampler at 50 steps 84.7% of its molecules are stable on EDM's
#: table (88.4% on its own bonds) against 61.0% for the Gaussian-element ``qm9`` (docs/model_card.md).
DEFAULT_MODEL = "qm9-bonds"
#: The default shipped checkpoint's folder.
PRETRAINED_DIR = PRETRAINED_ROOT / DEFAULT_MODEL
#: The shipped model ``moldiff sample --formula`` uses when no checkpoint is named: trained with every
#: molecule's elements given, it places a formula's atoms in one pass. On 60 QM9 test formulas x 5
#: (50 steps) it gave 70.3% valid / 41.3% stable molecules in 133 s, the default joint model (drawing,
#: then RePaint clamping) 51.7% / 34.7% in 1,353 s (docs/experiments.md, session 11).
FORMULA_MODEL = "qm9-given"
#: The shipped model ``moldiff sample --condition`` uses when no checkpoint is named: one network
#: conditioned on EDM's six QM9 properties (docs/properties.md).
CONDITIONAL_MODEL = "qm9-cond"
#: Classifier-free guidance scale of conditioned sampling when none is asked for. On ``qm9-cond``
#: (step 74,430; 300 molecules per property and scale, 50 steps, scored by ``qm9-props``) w = 2
#: against the plain conditional model (w = 1) lowers the MAE of all six properties by 15-25% (gap
#: 1027 -> 775 meV, alpha 3.38 -> 2.58 Bohr^3) for 2.5 points of molecule stability (mean of six
#: 76.1% -> 73.6%) and twice the work per network call; w = 4 helps four of the six a little more and
#: costs more stability (docs/model_card.md, "The fourth model").
DEFAULT_GUIDANCE = 2.0
#: The shipped model ``moldiff nll`` bounds when no checkpoint is named: its bound is EDM's
#: ``-log p(x, h, N)``, comparable with the papers' (the default model's also scores bonds and charges).
NLL_MODEL = "qm9"
#: The shipped model ``moldiff sample --even-valence`` uses when no checkpoint is named: the rule
#: steers Gaussian element features, which the default (categorical) model does not have.
EVEN_VALENCE_MODEL = "qm9"
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


@dataclass
class SampleRequest:
    """What to sample: the options of :meth:`MolDiffPipeline.sample`, checked and given their
    defaults in one place, :meth:`resolved`. ``None`` means the default of the route taken.

    Attributes:
        n: number of molecules (> 0).
        steps: reverse steps (> 0); the model was trained on continuous t, so any number works.
        sampler: ``"ancestral"`` (DDPM), ``"ddim"`` (deterministic) or ``"ddim:<eta>"``.
        seed: same seed, same molecules (same device, torch version and ``batch_size``); ``None``
            for fresh randomness.
        num_atoms: ``None`` draws sizes from the training p(N); an int fixes every size; a list
            gives one size per molecule (2 .. ``statistics.max_atoms``).
        batch_size: molecules denoised together (memory vs speed).
        composition: ``"model"`` (the network generates the elements, EDM) or ``"data"`` (each
            molecule gets the composition of a training molecule of its size, the network places
            the atoms; models trained with ``diffusion.known_types_prob > 0``); ``None``: the
            model's :attr:`~MolDiffPipeline.default_composition`. Not with a fragment or formula.
        fragment: a :class:`moldiff.inpainting.Fragment` every molecule contains at its geometry
            (its atoms come first). See docs/inpainting.md.
        formula: the composition of every molecule, e.g. ``"C7H8O"`` (isomer generation).
        resample: resampling rounds per step (RePaint's: after each step, push the state back up
            by the forward process and take the step again, ``resample - 1`` times). ``None``:
            ``moldiff.inpainting.DEFAULT_RESAMPLE`` with a fragment or formula; in plain sampling
            :data:`~moldiff.sampling.DEFAULT_LATE_RESAMPLE` on the late steps (``resample_below``),
            1 with ``type_lag``.
        resample_below: only the steps that start at ``t <= resample_below`` are resampled (1: every
            step). ``None``: 1 with a fragment or formula, :data:`~moldiff.sampling.DEFAULT_RESAMPLE_BELOW`
            in plain sampling.
        time_power: the time grid ``t_k = (k / steps) ** time_power`` (> 0; 1: EDM's uniform grid).
            ``None``: :data:`DEFAULT_TIME_POWER` for plain sampling, drawing and given types,
            ``moldiff.inpainting.DEFAULT_INPAINT_TIME_POWER`` for RePaint.
        noise_scale: factor in [0, 1] on each reverse step's fresh noise (1: EDM's ancestral
            sampler). ``None``: :data:`DEFAULT_NOISE_SCALE`, or the RePaint default.
        valence_guidance: open-valence guidance strength around a fragment (``None``: on for a
            fragment with bonds, ``moldiff.inpainting.DEFAULT_VALENCE_GUIDANCE``).
        formula_draws: with a formula alone, unconditional draws per requested molecule kept when
            they match it exactly (``None``: ``moldiff.inpainting.DEFAULT_FORMULA_DRAWS``; 0: none;
            always 0 for a model that never generates elements).
        type_lag: ``d`` in [0, 1]: the elements run ``d`` behind the coordinates in noise time and are
            decided at the end from the nearly final geometry (``type_time`` models; plain sampling;
            :func:`moldiff.sampling.denoise_batch`). 0: one time for both.
        type_steps: with ``type_lag``, the steps the elements take alone at the end (``None``:
            ``round(steps * type_lag)``, at least 1).
        condition: property-conditional models (trained with ``model.properties``): the properties
            every molecule should have, name -> value, e.g. ``{"gap": 6.0, "mu": 1.5}``. Values in
            :data:`moldiff.data.properties.CONDITION_UNITS` (alpha Bohr^3; gap, homo, lumo eV; mu D;
            cv the molecule's heat capacity, cal/(mol K)), or strings with a unit (``"6000meV"``,
            ``"0.22Ha"``). Each must lie in the range seen in training. Properties left out are
            dropped, as in training. A value may also be a sequence of ``n``, one per molecule (e.g.
            values drawn from the data, with ``num_atoms`` drawn with them). Plain sampling only;
            ``None``: no condition (a conditional model then samples as its unconditional mode,
            every property dropped).
        guidance_scale: classifier-free guidance ``w >= 0`` with a condition:
            ``eps_uncond + w (eps_cond - eps_uncond)``; 0 is the unconditional model, 1 the plain
            conditional one, above 1 pushes harder toward the condition; ``None``:
            :data:`DEFAULT_GUIDANCE` (2).
        even_valence: a time in [0, 1]: from it down, every molecule's element estimate is kept to an
            even valence sum by moving its cheapest atom to an element of the other parity
            (:class:`moldiff.sampling.EvenValence`); 0 steers the final decode only. Plain sampling
            of a model with Gaussian element features; ``None``: off (EDM's sampler).
    """

    n: int
    steps: int = DEFAULT_STEPS
    sampler: str = DEFAULT_SAMPLER
    seed: int | None = 0
    num_atoms: int | Sequence[int] | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    composition: str | None = None
    fragment: object = None
    formula: str | Mapping[str, int] | None = None
    resample: int | None = None
    resample_below: float | None = None
    time_power: float | None = None
    noise_scale: float | None = None
    valence_guidance: float | None = None
    formula_draws: int | None = None
    type_lag: float = 0.0
    type_steps: int | None = None
    condition: Mapping[str, float | str] | None = None
    guidance_scale: float | None = None
    even_valence: float | None = None
    #: the time grid and noise of plain sampling within a formula's route (drawing, given types)
    plain_time_power: float = field(default=DEFAULT_TIME_POWER, repr=False)
    plain_noise_scale: float = field(default=DEFAULT_NOISE_SCALE, repr=False)

    @property
    def route(self) -> str:
        """``"fragment"``, ``"formula"`` (a formula alone) or ``"plain"``."""
        return "fragment" if self.fragment is not None else "formula" if self.formula is not None else "plain"

    def resolved(self, pipe: "MolDiffPipeline") -> "SampleRequest":
        """A copy with every ``None`` replaced by the default of the route for ``pipe``, after checking
        the options against each other and the model (one-line ``ValueError`` otherwise)."""
        from moldiff.inpainting import DEFAULT_FORMULA_DRAWS, DEFAULT_RESAMPLE, default_valence_guidance

        r = replace(self)
        for name in ("n", "steps", "batch_size"):
            value = getattr(r, name)
            if int(value) != value or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if r.time_power is not None and not (math.isfinite(r.time_power) and r.time_power > 0):
            raise ValueError(f"time_power must be a positive number, got {r.time_power}")
        if r.noise_scale is not None and not (math.isfinite(r.noise_scale) and 0.0 <= r.noise_scale <= 1.0):
            raise ValueError(f"noise_scale must be in [0, 1], got {r.noise_scale}")
        if r.resample is not None and (isinstance(r.resample, bool) or int(r.resample) != r.resample or r.resample < 1):
            raise ValueError(f"resample must be an integer >= 1, got {r.resample}")
        if r.resample_below is not None and not (math.isfinite(r.resample_below) and 0.0 <= r.resample_below <= 1.0):
            raise ValueError(f"resample_below must be a time in [0, 1], got {r.resample_below}")
        if r.formula_draws is not None and (int(r.formula_draws) != r.formula_draws or r.formula_draws < 0):
            raise ValueError(f"formula_draws must be an integer >= 0, got {r.formula_draws}")
        if not (math.isfinite(r.type_lag) and 0.0 <= r.type_lag <= 1.0):
            raise ValueError(f"type_lag must be in [0, 1], got {r.type_lag}")
        if r.type_steps is not None and (int(r.type_steps) != r.type_steps or r.type_steps < 1):
            raise ValueError(f"type_steps must be a positive integer, got {r.type_steps}")
        if r.guidance_scale is not None:
            if isinstance(r.guidance_scale, bool) or not isinstance(r.guidance_scale, (int, float, np.number)) \
                    or not (math.isfinite(r.guidance_scale) and r.guidance_scale >= 0):
                raise ValueError(f"guidance_scale must be a number >= 0, got {r.guidance_scale}")
            if r.condition is None:
                raise ValueError("guidance_scale goes with a condition (the properties to steer toward)")
            r.guidance_scale = float(r.guidance_scale)
        if r.condition is not None:
            conditioning = pipe.conditioning
            if conditioning is None:
                raise ValueError("condition: this model was not trained with property conditioning (model.properties); "
                                 "it cannot condition on " + ", ".join(str(k) for k in dict(r.condition)))
            if not isinstance(r.condition, Mapping):
                raise ValueError(f"condition must map property names to values, got {type(r.condition).__name__}")
            r.condition = conditioning.check(r.condition, int(r.n))
            if r.route != "plain" or r.composition == "data" or r.type_lag > 0:
                raise ValueError("condition is for plain sampling (no fragment, formula, composition='data' or type_lag)")
            r.guidance_scale = DEFAULT_GUIDANCE if r.guidance_scale is None else r.guidance_scale
        if r.even_valence is not None:
            if isinstance(r.even_valence, bool) or not isinstance(r.even_valence, (int, float, np.number)) \
                    or not (math.isfinite(r.even_valence) and 0.0 <= r.even_valence <= 1.0):
                raise ValueError(f"even_valence must be a time in [0, 1], got {r.even_valence}")
            if r.route != "plain" or r.composition == "data" or r.type_lag > 0:
                raise ValueError("even_valence steers the model's own elements in plain sampling "
                                 "(no fragment, formula, composition='data' or type_lag)")
            pipe.require_gaussian_types("even_valence")
            pipe.require_type_generation("even_valence")
            EvenValence(pipe, r.even_valence)  # the model's elements must have valences of both parities
            r.even_valence = float(r.even_valence)
        if r.type_lag > 0:
            if r.route != "plain" or r.composition == "data":
                raise ValueError("type_lag is for plain sampling (no fragment, formula or composition='data')")
            if not getattr(pipe.denoiser.config, "type_time", False):
                raise ValueError("type_lag needs a model trained with the elements' own noise time "
                                 "(model.type_time, diffusion.type_lag_prob > 0)")
            r.type_steps = max(1, round(r.steps * r.type_lag)) if r.type_steps is None else int(r.type_steps)
        elif r.type_steps is not None:
            raise ValueError("type_steps goes with type_lag > 0")
        if r.route != "plain" and r.composition not in (None, "model"):
            raise ValueError(f"composition={r.composition!r} draws each molecule's composition; "
                             "it does not combine with a fragment or formula")
        if r.route == "plain":
            r.composition = pipe.default_composition if r.composition is None else r.composition
        r.plain_time_power = DEFAULT_TIME_POWER if r.time_power is None else r.time_power
        r.plain_noise_scale = DEFAULT_NOISE_SCALE if r.noise_scale is None else r.noise_scale
        if r.route == "plain":
            r.time_power, r.noise_scale = r.plain_time_power, r.plain_noise_scale
            if r.type_lag > 0:
                if r.resample not in (None, 1):
                    raise ValueError("type_lag does not combine with resampling (resample=1)")
                r.resample, r.resample_below = 1, 1.0
            r.resample = DEFAULT_LATE_RESAMPLE if r.resample is None else int(r.resample)
            r.resample_below = DEFAULT_RESAMPLE_BELOW if r.resample_below is None else float(r.resample_below)
            return r
        r.resample_below = 1.0 if r.resample_below is None else float(r.resample_below)
        r.resample = DEFAULT_RESAMPLE if r.resample is None else r.resample
        r.time_power = DEFAULT_INPAINT_TIME_POWER if r.time_power is None else r.time_power
        r.noise_scale = DEFAULT_INPAINT_NOISE_SCALE if r.noise_scale is None else r.noise_scale
        if r.route == "fragment":
            r.valence_guidance = default_valence_guidance(r.fragment) if r.valence_guidance is None else r.valence_guidance
            return r
        r.valence_guidance = 0.0
        if pipe.categorical is None:  # categorical models: bonds and charges are drawn with the atoms
            pipe.require_no_bonds("formula-conditioned sampling")
        if r.formula_draws is None:
            r.formula_draws = DEFAULT_FORMULA_DRAWS
        if pipe.known_types_prob >= 1.0:
            r.formula_draws = 0  # the model does not generate elements: nothing to draw
        return r


def _joined(kept, made, drawn: int, formula_text: str) -> SampledArrays:
    """One :class:`SampledArrays`: the drawn molecules, then the rest (clamped, or sampled with the
    formula's types given to a model trained for it), if any."""
    first = kept[0][0] if kept else made
    out = SampledArrays([a.positions[j] for a, j in kept], [a.types[j] for a, j in kept], [a.charges[j] for a, j in kept],
                        np.array([a.fault_step[j] for a, j in kept], dtype=np.int64), first.elements, first.steps,
                        first.sampler, first.seed, first.time_power, first.noise_scale)
    out.extra = {"resample": 1, "network_evaluations": first.steps + 1} if made is None else dict(made.extra)
    # bond and categorical models: the model's own bonds and formal charges travel with each molecule
    out.bonds = [a.bonds[j] for a, j in kept if a.bonds]
    out.formal_charges = [a.formal_charges[j] for a, j in kept if a.formal_charges]
    route = ["drawn"] * len(kept)
    if made is not None:
        out.positions += made.positions
        out.types += made.types
        out.charges += made.charges
        out.bonds += made.bonds
        out.formal_charges += made.formal_charges
        out.fault_step = np.concatenate([out.fault_step, made.fault_step])
        route += list(made.extra.get("formula_route", ["clamped"] * len(made.positions)))
    out.extra.update(_formula_extra(formula_text, route, drawn))
    return out


def _formula_extra(formula_text: str, route: list[str], drawn: int) -> dict:
    """``extra`` entries of formula-conditioned output."""
    return {"conditioning": "formula", "num_known_atoms": 0, "fragment_symbols": None, "formula": formula_text,
            "valence_guidance": 0.0, "formula_route": route, "formula_draws_used": drawn}


def _skip_coefficients(schedule: NoiseSchedule, t: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``c_skip, c_out`` of the Gaussian skip at times ``t`` ``(B,)`` for data variance ``var`` (a
    scalar: ``(B, 1)`` results; ``(F,)`` per channel: ``(B, F)``), in float64."""
    alpha, sigma = (x.unsqueeze(-1) for x in schedule.alpha_sigma(t.to(torch.float64)))
    total = alpha.square() * var + sigma.square()
    return sigma / total, alpha * torch.sqrt(var / total)


class MolDiffPipeline(torch.nn.Module):
    """Everything needed to sample: ``denoiser``, ``schedule``, atom ``features`` and ``statistics``."""

    def __init__(
        self,
        denoiser: torch.nn.Module,
        schedule: NoiseSchedule,
        features: AtomFeatures | CategoricalFeatures,
        statistics: DatasetStatistics,
        atomic_numbers: Sequence[int],
        parametrization: str = "eps",
        metadata: dict | None = None,
    ):
        """``features``: EDM's Gaussian :class:`AtomFeatures`, or :class:`CategoricalFeatures` for a
        model whose elements (charges, bonds) are diffused as classes (see :attr:`categorical`)."""
        super().__init__()
        if parametrization != "eps":
            raise ValueError(f"unknown parametrization {parametrization!r}")
        if denoiser.config.num_features != features.dim:
            raise ValueError(f"denoiser expects {denoiser.config.num_features} features, encoding has {features.dim}")
        if isinstance(features, CategoricalFeatures):
            bonds = int(getattr(denoiser.config, "bond_types", 0))
            if features.bond_types != bonds:
                raise ValueError(f"the categorical features have {features.bond_types} bond classes, the denoiser {bonds}")
            if bonds and denoiser.config.bond_output != "logits":
                raise ValueError("a categorical bond model's bond head gives clean-bond logits: bond_output must be 'logits'")
            if getattr(denoiser.config, "h_skip", False):
                raise ValueError("model.h_skip is for EDM's Gaussian element features, not categorical ones")
        elif getattr(denoiser.config, "valence_features", False):
            raise ValueError("model.valence_features reads the noisy classes of a categorical model (diffusion.categorical)")
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
        bf16 on CPUs and CUDA GPUs with native bf16 arithmetic, fp32 elsewhere (see
        :func:`auto_precision`). TF32 for fp32 products on a GPU is global torch state, left to the
        caller: :func:`moldiff.runtime.allow_tf32` (the ``moldiff`` command calls it for CUDA).
        ``compile=True`` compiles each equivariant block with ``torch.compile(dynamic=True)``, and the
        bond head of a bond model (together nearly all the work; the rest stays eager; what the
        compiled head saves: ``scripts/bench_bond_head.py``): seconds to tens of seconds once,
        then faster steps. Compiling blocks rather than the whole network compiles one small graph
        that all blocks share, about half the compilation time of the whole network with a cold
        PyTorch cache and a quarter with a warm one (``scripts/bench_compile.py``).
        ``compile_backend`` is passed to ``torch.compile``. Training is unaffected. Returns ``self``.
        """
        if precision == "auto":
            precision = auto_precision(self.device)
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")
        blocks = head = None
        if compile:
            blocks = [torch.compile(b, dynamic=True, backend=compile_backend) for b in self.denoiser.blocks]
            if getattr(self.denoiser, "bond_head", None) is not None:
                head = torch.compile(self.denoiser.bond_head, dynamic=True, backend=compile_backend)
        # Plain attributes (not submodules), so state_dict() and saving are unchanged.
        object.__setattr__(self, "_precision", precision)
        object.__setattr__(self, "_compiled_blocks", blocks)
        object.__setattr__(self, "_compiled_head", head)
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
    def categorical(self) -> CategoricalDiffusion | None:
        """For a categorical-mode model (``features`` is :class:`CategoricalFeatures`; ``diffusion.categorical``
        in training) the discrete diffusions of its atom types, charges and bonds
        (:class:`~moldiff.diffusion.categorical.CategoricalDiffusion`: ``types``, ``charges`` or None,
        ``bonds`` or None, each a ``MarginalTransition``); ``None`` for EDM's Gaussian features."""
        if not isinstance(self.features, CategoricalFeatures):
            return None
        return CategoricalDiffusion.from_features(self.features, self.schedule)

    def require_gaussian_types(self, what: str) -> None:
        """Raise a one-line ``ValueError`` where ``what`` assumes EDM's Gaussian atom features."""
        if isinstance(self.features, CategoricalFeatures):
            raise ValueError(f"{what} is not available for models with categorical atom types (diffusion.categorical)")

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
    def conditioning(self) -> PropertyConditioning | None:
        """For a property-conditional model (trained with ``model.properties``), what it was trained
        with: the property names, EDM's normalisation, the training range of each property and the
        training molecules' values and sizes (:class:`~moldiff.data.properties.PropertyConditioning`);
        ``None`` for other models."""
        saved = self.metadata.get("conditioning")
        if saved is None:
            return None
        cached = getattr(self, "_conditioning", None)
        if cached is None or cached[0] is not saved:
            cached = (saved, PropertyConditioning.from_dict(saved))
            object.__setattr__(self, "_conditioning", cached)
        return cached[1]

    @property
    def self_condition(self) -> bool:
        """Whether the network takes its previous clean-molecule estimate as input (self-conditioning)."""
        return bool(getattr(self.denoiser.config, "self_condition", False))

    def predict_noise(self, pos_t, h_t, t, batch, context=None, edge_index=None, cond=None, e_t=None, raw_bonds=False,
                      t_h=None):
        """Noise prediction ``(eps_pos (n, 3), eps_h (n, F))`` at times ``t`` ``(B,)``, in ``pos_t``'s dtype.

        ``cond``: for self-conditioned models, the previous clean estimate ``(pos_hat, h_hat)`` (or None).
        ``e_t``: for bond-generating models, the noisy bond features ``(E, K)`` of ``edge_index``'s
        edges; the prediction is then ``(eps_pos, eps_h, eps_e (E, K))``. A model whose bond head
        predicts clean-bond logits (``bond_output="logits"``) returns the noise its expected clean
        one-hot implies, ``(e_t - alpha_t E[e_0]) / sigma_t``, or the logits with ``raw_bonds``.

        Categorical models (:attr:`categorical`): ``h_t`` is ``features.encode`` of the noisy classes,
        ``e_t`` the one-hot noisy bond classes, and the outputs are ``(eps_pos, clean-class logits
        (n, F) (split with ``features.split``), clean-bond logits (E, K))``: always logits.

        ``t_h``: ``(B,)`` noise time of the element features when it differs from the coordinates'
        (``type_time`` models; ``None``: ``t``).

        ``context``: ``(B, context_dim)`` conditioning of a property-conditional model; ``None`` gives
        such a model an all-zero context, every property dropped (its unconditional mode).
        """
        blocks = getattr(self, "_compiled_blocks", None)
        head = getattr(self, "_compiled_head", None)
        if context is None and self.denoiser.config.context_dim:
            context = torch.zeros(t.shape[0], self.denoiser.config.context_dim, dtype=pos_t.dtype, device=pos_t.device)
        bf16 = getattr(self, "_precision", "fp32") == "bf16"
        extra = {} if t_h is None else {"t_h": t_h}
        if head is not None:
            extra["bond_head"] = head
        if getattr(self.denoiser.config, "valence_features", False):
            if edge_index is None:
                edge_index = fully_connected_edges(batch)
            extra["valence"] = self.valence_inputs(h_t, e_t, edge_index, batch, t.shape[0])
        with torch.autocast(pos_t.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = self.denoiser(pos_t, h_t, t, batch, context=context, edge_index=edge_index, cond=cond, blocks=blocks,
                                e_t=e_t, **extra)
        if self.bond_types:
            out, eps_e = out
        out = self._with_skips(out, pos_t, h_t, t, batch, t_h)
        if self.bond_types:
            eps_e = eps_e.to(e_t.dtype)
            as_noise = not raw_bonds and not isinstance(self.features, CategoricalFeatures)  # categorical: logits
            if self.denoiser.config.bond_output == "logits" and as_noise:
                edge_t = t.to(torch.float64)[batch[edge_index[0]]]
                alpha, sigma = (x.to(e_t.dtype).unsqueeze(-1) for x in self.schedule.alpha_sigma(edge_t))
                e0 = eps_e.softmax(-1) * self.bond_features.scale
                eps_e = (e_t - alpha * e0) / sigma
            return out.pos.to(pos_t.dtype), out.h.to(h_t.dtype), eps_e
        return out.pos.to(pos_t.dtype), out.h.to(h_t.dtype)

    def valence_inputs(self, h_t: torch.Tensor, e_t: torch.Tensor, edge_index: torch.Tensor, batch: torch.Tensor,
                       num_graphs: int) -> torch.Tensor:
        """The valence input columns (:func:`moldiff.models.valence.valence_inputs`) of the noisy classes
        encoded in ``h_t`` (one-hot elements and charge classes) and ``e_t`` (one-hot bond orders)."""
        table = getattr(self, "_valence_table", None)
        if table is None:
            table = self._valence_table = valence_table(self.elements, self.features.charge_values)
        types, charges = self.features.split(h_t)
        return valence_inputs(types.argmax(-1), None if charges is None else charges.argmax(-1), e_t.argmax(-1),
                              edge_index, batch, num_graphs, table).to(h_t.dtype)

    def _with_skips(self, out: DenoiserOutput, pos_t, h_t, t, batch, t_h=None) -> DenoiserOutput:
        """``out`` with the Gaussian skips of ``model.pos_skip_std`` (coordinates) and ``model.h_skip``
        (element features; at ``t_h`` when given) applied; unchanged when both are off.
        The skip of data with mean m and variance v: ``c_skip (x_t - alpha m) + c_out F`` with
        ``c_skip = sigma / (alpha^2 v + sigma^2)`` and ``c_out = alpha sqrt(v / (alpha^2 v + sigma^2))``
        (:class:`~moldiff.models.DenoiserConfig`); the coordinates' mean is the centroid."""
        cfg = self.denoiser.config
        s = float(getattr(cfg, "pos_skip_std", 0.0))
        if s:
            c_skip, c_out = _skip_coefficients(self.schedule, t, torch.tensor(s * s, dtype=torch.float64, device=t.device))
            centred = remove_mean(pos_t, batch, t.shape[0])
            pos = c_skip.to(pos_t.dtype)[batch] * centred + c_out.to(pos_t.dtype)[batch] * out.pos.to(pos_t.dtype)
            out = out._replace(pos=pos)
        if getattr(cfg, "h_skip", False):
            mean, var = (torch.tensor(x, dtype=torch.float64, device=t.device) for x in self.feature_moments())
            times = t if t_h is None else t_h
            c_skip, c_out = _skip_coefficients(self.schedule, times, var)  # (B, F)
            alpha = self.schedule.alpha_sigma(times.to(torch.float64))[0].unsqueeze(-1)
            offset = (alpha * mean).to(h_t.dtype)[batch]
            h = c_skip.to(h_t.dtype)[batch] * (h_t - offset) + c_out.to(h_t.dtype)[batch] * out.h.to(h_t.dtype)
            out = out._replace(h=h)
        return out

    def feature_moments(self) -> tuple[list[float], list[float]]:
        """Mean and variance of each channel of the encoded training atoms (EDM's Gaussian features),
        from the statistics' element counts: one-hots ``scale p_k`` and ``scale^2 p_k (1 - p_k)``, the
        atomic-number channel from the elements' atomic numbers. Computed once per pipeline (every
        network call of an ``h_skip`` model reads them)."""
        cached = self.__dict__.get("_feature_moments")
        if cached is None:
            cached = self.__dict__["_feature_moments"] = self._compute_feature_moments()
        return cached

    def _compute_feature_moments(self) -> tuple[list[float], list[float]]:
        f = self.features
        counts = np.asarray(self.statistics.element_counts, dtype=np.float64)
        p = counts / counts.sum()
        mean = list(f.type_scale * p)
        var = list(f.type_scale**2 * p * (1 - p))
        if f.include_charges:
            z = f.charge_scale * np.asarray(self.atomic_numbers, dtype=np.float64)
            m = float(p @ z)
            mean.append(m)
            var.append(float(p @ (z - m) ** 2))
        return [float(x) for x in mean], [float(x) for x in var]

    # ------------------------------------------------------------------ likelihood
    @torch.no_grad()
    def nll_terms(self, pos, types, charges, batch, num_graphs: int, *, formal_charges=None, bonds=None, generator=None,
                  steps: int = 1000) -> NLLTerms:
        """One-sample estimate of the bound on ``-log p(x, h, N)`` (nats) per molecule, as EDM reports
        it on QM9 (see :mod:`moldiff.diffusion.likelihood`). ``pos`` ``(n, 3)`` Å, ``types`` ``(n,)``
        indices into :attr:`elements`, ``charges`` ``(n,)`` atomic numbers, sorted ``batch`` ``(n,)``.

        Categorical models bound ``-log p(x, elements, charges, bonds, N)`` instead
        (:func:`~moldiff.diffusion.likelihood.estimate_nll_categorical`): they also need each atom's
        ``formal_charges`` ``(n,)`` (models with charge classes) and, for bond models, the ``bonds``
        rows ``[i, j, order]`` ``(P, 3)`` of a :class:`~moldiff.data.batching.MoleculeBatch`
        (atom indices of the whole batch); ``charges`` is then unused. A property-conditional model
        is scored in its unconditional mode (every property hidden)."""
        self.require_type_generation("the likelihood bound on p(x, h, N)")
        self.denoiser.eval()
        sizes = num_nodes_per_graph(batch, num_graphs).cpu().numpy()
        p_size = self.statistics.size_distribution()
        with np.errstate(divide="ignore"):  # a size the training data never had: p(N) = 0, NLL = inf
            log_p = np.log(np.where(sizes < len(p_size), p_size[np.minimum(sizes, len(p_size) - 1)], 0.0))
        log_p_size = torch.as_tensor(log_p, dtype=torch.float64, device=pos.device)
        pos = remove_mean(pos.to(next(self.denoiser.parameters()).dtype), batch, num_graphs)
        cat = self.categorical
        if cat is None:
            self.require_no_bonds("the likelihood bound")
            return estimate_nll(lambda p, h, t, b: self.predict_noise(p, h, t, b), self.schedule, self.features,
                                pos, types, charges, batch, num_graphs, log_p_size, steps=steps, generator=generator)
        feats: CategoricalFeatures = self.features
        charge_classes = edge_index = rev = edge_bonds = None
        if cat.charges is not None:
            if formal_charges is None:
                raise ValueError("this model diffuses formal charges: the likelihood needs each atom's formal charge")
            charge_classes = feats.charge_classes(torch.as_tensor(formal_charges, device=pos.device))
        if cat.bonds is not None:
            if bonds is None:
                raise ValueError("this model generates bonds: the likelihood needs each molecule's bond orders")
            edge_index = fully_connected_edges(batch)
            rev = reverse_edges(edge_index, batch.shape[0])
            edge_bonds = edge_bond_orders(torch.as_tensor(bonds, device=pos.device), edge_index, batch.shape[0])
            if edge_bonds.numel() and int(edge_bonds.max()) >= self.bond_types:
                raise ValueError(f"bond orders above {self.bond_types - 1} are not among this model's bond classes")

        def predict(pos_t, h_t, e_t, t):
            out = self.predict_noise(pos_t, h_t, t, batch, edge_index=edge_index, e_t=e_t, raw_bonds=True)
            return out[0], out[1], (out[2] if e_t is not None else None)

        return estimate_nll_categorical(predict, self.schedule, feats, cat, pos, types.long(), charge_classes,
                                        edge_bonds, edge_index, rev, batch, num_graphs, log_p_size, steps=steps,
                                        generator=generator)

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
        type_lag: float = 0.0,
        type_steps: int = 0,
        condition: Mapping[str, float] | None = None,
        guidance_scale: float | None = None,
        even_valence: float | None = None,
        resample: int = 1,
        resample_below: float = 1.0,
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
        ``type_lag`` / ``type_steps``: the elements behind the coordinates, decided at the end
        (:class:`SampleRequest`; ``type_time`` models).
        ``condition`` / ``guidance_scale``: property-conditional models (:class:`SampleRequest`; the
        condition as :meth:`~moldiff.data.properties.PropertyConditioning.check` returns it). Without
        ``num_atoms`` the sizes are drawn from the training molecules nearest to the condition
        (:meth:`~moldiff.data.properties.PropertyConditioning.draw_sizes`); ``extra["condition"]``
        records the condition, ``extra["guidance_scale"]`` the scale.
        ``even_valence``: from this time down, keep each molecule's element estimate to an even valence
        sum (:class:`~moldiff.sampling.EvenValence`; ``None``: off); ``extra["even_valence_steered"]``
        counts, per molecule, the network calls at which it was changed.
        ``resample`` / ``resample_below``: each step starting at ``t <= resample_below`` is taken
        ``resample`` times (:class:`SampleRequest`; here 1 by default: EDM's plain loop, which
        :meth:`sample` and ``moldiff sample`` extend with :data:`~moldiff.sampling.DEFAULT_LATE_RESAMPLE`);
        ``extra`` records both and the network evaluations per molecule.
        Same ``seed``, same output (on the same device and torch version).
        """
        if even_valence is not None:
            EvenValence(self, even_valence)  # refuses a bad time or model before any work
            if types is not None or composition == "data" or type_lag > 0:
                raise ValueError("even valence sums steer the model's own elements: not with given ones or type_lag")
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
        conditioning = None
        if condition is not None:
            conditioning = self.conditioning
            if conditioning is None:
                raise ValueError("condition: this model was not trained with property conditioning (model.properties)")
            condition = conditioning.check(condition, n)
        elif guidance_scale is not None:
            raise ValueError("guidance_scale goes with a condition")
        if condition is not None and guidance_scale is None:
            guidance_scale = DEFAULT_GUIDANCE
        rng = np.random.default_rng(seed)
        if num_atoms is None and condition is not None:
            sizes = conditioning.draw_sizes(condition, n, rng)
        elif num_atoms is None:
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
        out.extra.update(resample=int(resample), resample_below=float(resample_below),
                         network_evaluations=network_evaluations(sampler_obj.timesteps(steps), resample, resample_below))
        if type_lag > 0:
            out.extra.update(type_lag=type_lag, type_steps=type_steps, network_evaluations=steps + type_steps + 1)
        context = None
        if condition is not None:
            values, present = conditioning.values(condition, n)
            context = torch.as_tensor(conditioning.context(conditioning.targets(values, sizes), present), device=device)
            scale = float(guidance_scale)
            out.extra.update(condition={k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in condition.items()},
                             condition_units={k: CONDITION_UNITS[k] for k in condition}, guidance_scale=scale)
        self.denoiser.eval()
        steered = []
        for start in range(0, n, batch_size):
            chunk = sizes[start : start + batch_size]
            tick = batch_ticker(on_step, start, len(chunk))
            hooks = []
            if flat is not None:
                known = torch.as_tensor(flat[offsets[start] : offsets[start + len(chunk)]], dtype=torch.long, device=device)
                hooks.append(GivenTypes(known))
            if even_valence is not None:
                hooks.append(EvenValence(self, even_valence))
            result = denoise_batch(self, chunk, steps, sampler_obj, gen, hooks=hooks, tick=tick, type_lag=type_lag,
                                   resample=resample, resample_below=resample_below,
                                   type_steps=type_steps, guidance_scale=guidance_scale,
                                   context=None if context is None else context[start : start + len(chunk)])
            out.add_batch(start, chunk, *result)
            if even_valence is not None:
                steered.append(hooks[-1].steered.cpu().numpy())
            if progress is not None:
                progress(len(chunk))
        if even_valence is not None:
            out.extra.update(even_valence=float(even_valence), even_valence_steered=np.concatenate(steered))
        return out

    def generate(self, request: "SampleRequest", *, on_step: Callable[[float], None] | None = None,
                 progress: Callable[[int], None] | None = None) -> SampledArrays:
        """Raw samples for a :class:`SampleRequest`, by the route it asks for: plain sampling (the
        network's own compositions, or the data's), a fragment (RePaint, :mod:`moldiff.inpainting`),
        or a formula alone (kept draws of the model's own molecules, then the elements given to a
        model trained for it, else RePaint). Every route runs :func:`moldiff.sampling.denoise_batch`.

        ``on_step(done)`` after every network evaluation with the molecules done so far (the batch in
        progress counted by its fraction of evaluations); ``progress(k)`` after each batch of ``k``.
        ``extra`` of the result records the route, e.g. ``formula_route`` per molecule.
        """
        req = request.resolved(self)
        if req.fragment is not None:
            return inpaint_arrays(self, req.n, fragment=req.fragment, formula=req.formula, num_atoms=req.num_atoms,
                                  steps=req.steps, sampler=req.sampler, resample=req.resample, seed=req.seed,
                                  batch_size=req.batch_size, progress=progress, on_step=on_step,
                                  time_power=req.time_power, noise_scale=req.noise_scale,
                                  valence_guidance=req.valence_guidance)
        if req.formula is not None:
            return self._formula_arrays(req, on_step, progress)
        return self.sample_arrays(req.n, steps=req.steps, sampler=req.sampler, seed=req.seed, num_atoms=req.num_atoms,
                                  batch_size=req.batch_size, progress=progress, on_step=on_step,
                                  time_power=req.time_power, noise_scale=req.noise_scale, composition=req.composition,
                                  type_lag=req.type_lag, type_steps=req.type_steps or 0, condition=req.condition,
                                  guidance_scale=req.guidance_scale, even_valence=req.even_valence,
                                  resample=req.resample, resample_below=req.resample_below)

    def _formula_arrays(self, req: "SampleRequest", on_step, progress) -> SampledArrays:
        """A formula alone: draw unconditional molecules of its size and keep exact matches (the model's
        own conditional distribution), then make the rest with the elements given (a model trained
        with ``known_types_prob > 0``) or by RePaint clamping."""
        counts = chem_fragments.parse_formula(req.formula)
        text = chem_fragments.format_formula(counts)
        plan_conditioning(self, req.n, None, req.formula, req.num_atoms, np.random.default_rng(0))  # one-line errors first
        kept, drawn = [], 0
        if req.formula_draws > 0:
            kept, drawn = self._draw_formula(req, counts, on_step)
            if progress is not None and kept:
                progress(len(kept))
        rest = req.n - len(kept)
        if rest == 0:
            return _joined(kept, None, drawn, text)
        seed = req.seed if req.formula_draws == 0 or req.seed is None else req.seed + 1
        offset = None if on_step is None else (lambda done, found=len(kept): on_step(found + done))
        if self.known_types_prob > 0 and not self.self_condition:
            # p(x | types) is the model's own: one pass with the formula's elements as the network's input
            types = np.array([self.elements.index(e) for e, c in counts.items() for _ in range(c)], dtype=np.int64)
            made = self.sample_arrays(rest, steps=req.steps, sampler=req.sampler, seed=seed, batch_size=req.batch_size,
                                      progress=progress, on_step=offset, types=[types] * rest,
                                      time_power=req.plain_time_power, noise_scale=req.plain_noise_scale)
            made.extra.update({"resample": 1, "network_evaluations": req.steps + 1,
                               **_formula_extra(text, ["given"] * rest, 0)})
        else:
            made = inpaint_arrays(self, rest, formula=req.formula, steps=req.steps, sampler=req.sampler,
                                  resample=req.resample, seed=seed, batch_size=req.batch_size, progress=progress,
                                  on_step=offset, time_power=req.time_power, noise_scale=req.noise_scale,
                                  valence_guidance=0.0)
        if req.formula_draws == 0:
            made.extra["formula_draws_used"] = 0
            return made
        return _joined(kept, made, drawn, text)

    def _draw_formula(self, req: "SampleRequest", counts: dict, on_step=None):
        """Unconditional molecules of the formula's size with exactly its composition: ``(kept, drawn)``,
        ``kept`` a list of at most ``n`` ``(SampledArrays, index)``. ``on_step(k)`` after every drawn
        batch with the ``k`` molecules kept so far (how many draws that takes is not known in advance)."""
        total = sum(counts.values())
        rng = np.random.default_rng(req.seed)
        kept, drawn, budget = [], 0, req.formula_draws * req.n
        while len(kept) < req.n and drawn < budget:
            m = min(req.batch_size, budget - drawn)
            arrays = self.sample_arrays(m, num_atoms=total, steps=req.steps, sampler=req.sampler,
                                        seed=int(rng.integers(2**31)), batch_size=req.batch_size,
                                        time_power=req.plain_time_power, noise_scale=req.plain_noise_scale)
            drawn += m
            kept += [(arrays, j) for j in range(m)
                     if arrays.fault_step[j] < 0 and chem_fragments.element_counts(arrays.symbols(j)) == counts]
            if on_step is not None:
                on_step(min(len(kept), req.n))
        return kept[: req.n], drawn

    def sample(self, n: int, *, on_step: Callable[[float], None] | None = None,
               progress: Callable[[int], None] | None = None, **options) -> list[GeneratedMolecule]:
        """Sample ``n`` molecules and interpret them chemically.

        ``options`` are the fields of :class:`SampleRequest` (``steps``, ``sampler``, ``seed``,
        ``num_atoms``, ``batch_size``, ``composition``, ``fragment``, ``formula``, ``resample``, ``resample_below``,
        ``time_power``, ``noise_scale``, ``valence_guidance``, ``formula_draws``, ``type_lag``,
        ``type_steps``, ``condition``, ``guidance_scale``, ``even_valence``), documented there;
        ``None`` means the default of the route taken. ``on_step(done)`` is called after every network
        evaluation with the molecules denoised so far (progress bars), ``progress(k)`` after each batch.

        Returns:
            ``n`` :class:`GeneratedMolecule` in sampling order, invalid and faulty ones included
            and flagged (``valid``, ``mol_stable``, ``reason``); with a fragment, each says whether it
            kept the fragment (``fragment_retained``, ``fragment_rmsd``).

        Raises:
            ValueError: a one-line reason (bad numbers, sizes out of range, unknown sampler,
                conditioning the model cannot do).
        """
        try:
            request = SampleRequest(n, **options)
        except TypeError as exc:
            raise TypeError(f"sample(): {exc}") from None
        arrays = self.generate(request, on_step=on_step, progress=progress)
        return interpret(arrays, fragment=request.fragment)

    # ------------------------------------------------------------------ persistence
    def config_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "denoiser": self.denoiser.config.to_dict(),
            "schedule": self.schedule.config,
            "features": self.features.to_dict() if isinstance(self.features, CategoricalFeatures) else {
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
            build_denoiser(DenoiserConfig.from_dict(cfg["denoiser"])),
            NoiseSchedule(sched.pop("kind"), sched.pop("grid"), **sched),
            (CategoricalFeatures.from_dict(cfg["features"]) if cfg["features"].get("kind") == CategoricalFeatures.kind
             else AtomFeatures(**cfg["features"])),
            DatasetStatistics.from_dict(cfg["statistics"]),
            cfg["atomic_numbers"],
            cfg.get("parametrization", "eps"),
            cfg.get("metadata"),
        )

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.pt`` (denoiser weights) into ``directory`` atomically:
        files go to a temporary sibling folder that replaces the target only when complete."""
        def fill(folder: Path) -> None:
            (folder / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2))
            state = {k: v.detach().cpu().contiguous() for k, v in self.denoiser.state_dict().items()}
            torch.save(state, folder / WEIGHTS_NAME)

        return atomic_directory(directory, fill)

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
    """``"bf16"`` on CPUs with AMX or AVX512-BF16, else ``"fp32"``: AVX2-only CPUs (where bf16 is
    emulated and several times slower) and GPUs (where bf16 autocast measured slower than fp32 for
    these launch-bound networks on an H200) get fp32. The decision is
    :func:`moldiff.runtime.choose_arithmetic`'s, the same one training's ``train.precision: auto`` uses.
    """
    return choose_arithmetic(device, "auto", False).precision


def _check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; ``"auto"`` is a CUDA GPU when there is one, else the CPU."""
    try:
        if isinstance(device, str) and device == "auto":
            device = resolve_device("auto")
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
        path: ``None`` for the default shipped model (:data:`DEFAULT_MODEL`, ``qm9-bonds``), the
            name of a shipped model (:func:`shipped_models`: ``"qm9"``, ``"qm9-bonds"``, ``"qm9-given"``,
            ``"qm9-cond"``), a
            checkpoint directory (``config.json`` + ``model.pt``, from ``save_pretrained``), or a
            training run directory (its ``pipeline/`` is used).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (a CUDA GPU if there is one, else the CPU).

    Returns:
        :class:`MolDiffPipeline` on ``device``; call :meth:`~MolDiffPipeline.sample`.

    Raises:
        CheckpointError: missing, incomplete or corrupt checkpoint (one-line message).
        ValueError: unknown device, or CUDA asked for without a GPU.
    """
    dev = _check_device(device)
    return MolDiffPipeline.from_pretrained(resolve_checkpoint(path), dev)
