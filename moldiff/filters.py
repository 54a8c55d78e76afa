"""Sample until enough molecules pass: filters for pipelines (``moldiff sample --keep``).

A drug-discovery pipeline wants *n molecules that pass*, not n raw samples. :func:`sample_passing`
draws from a pipeline in rounds, judges every molecule against a :class:`Keep` specification
(EDM validity, EDM molecule stability, uniqueness, PoseBusters' molecule checks, a strain-energy
ceiling after force-field relaxation) and stops when ``n`` have passed or when the draw budget is
spent. Nothing is repaired: a molecule passes as generated or is rejected, and every rejection is
counted under the first criterion it failed. The raw draws stay available (the EDM metrics of the
model are computed on all of them, never on the filtered set).

Round sizes follow the pass rate seen so far (the first round draws ``n``), capped by the budget.
Round 0 uses the request's seed, so with a seed the first round's molecules are exactly those of
``pipe.sample(n, seed=seed)``; later rounds use seeds derived from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from moldiff.chemistry.plausibility import (
    ENERGY_CONFORMERS,
    FORCE_FIELDS,
    Plausibility,
    assess_plausibility,
    check_energy_conformers,
    require_posebusters,
)
from moldiff.molecules import GeneratedMolecule, interpret

if TYPE_CHECKING:
    from moldiff.pipeline import MolDiffPipeline
    from moldiff.sampling import SampledArrays

__all__ = ["KEEP_CRITERIA", "Keep", "FilterOutcome", "sample_passing", "DEFAULT_BUDGET_FACTOR"]

#: criteria of :class:`Keep`, in the order they are tested (the cheap ones first)
KEEP_CRITERIA = ("valid", "stable", "unique", "posebusters")
#: the default draw budget is this many times the number of molecules asked for
DEFAULT_BUDGET_FACTOR = 10
#: smallest pass rate used to size the next round (so a bad first round does not ask for millions)
_MIN_RATE = 0.02
#: smallest round after the first (each round has a fixed cost; the budget still caps it)
_MIN_ROUND = 8


@dataclass(frozen=True)
class Keep:
    """Which molecules pass.

    Attributes:
        criteria: a subset of :data:`KEEP_CRITERIA`: ``valid`` (EDM validity: RDKit sanitizes the
            table-bonded molecule), ``stable`` (EDM molecule stability), ``unique`` (a SMILES not
            kept before in this run), ``posebusters`` (every PoseBusters molecule check passes on the
            coordinates as generated).
        max_strain: strain-energy ceiling in kcal/mol (force-field energy as generated minus
            relaxed); ``None``: no ceiling. A molecule the force field cannot type or relax fails it.
        forcefield: ``"mmff"`` or ``"uff"``, for ``max_strain``.

    PoseBusters and the strain ceiling judge RDKit molecules, so they also reject invalid samples.
    """

    criteria: tuple[str, ...] = ("valid",)
    max_strain: float | None = None
    forcefield: str = "mmff"

    def __post_init__(self):
        unknown = [c for c in self.criteria if c not in KEEP_CRITERIA]
        if unknown:
            raise ValueError(f"keep: unknown criterion {unknown[0]!r}; choose from {', '.join(KEEP_CRITERIA)}")
        if self.max_strain is not None and not (math.isfinite(self.max_strain) and self.max_strain >= 0):
            raise ValueError(f"max_strain must be a finite number >= 0 kcal/mol, got {self.max_strain}")
        if self.forcefield not in FORCE_FIELDS:
            raise ValueError(f"forcefield must be {' or '.join(FORCE_FIELDS)}, got {self.forcefield!r}")
        if not self.criteria and self.max_strain is None:
            raise ValueError("keep: name at least one criterion or a max_strain")
        # canonical order, no repeats
        object.__setattr__(self, "criteria", tuple(c for c in KEEP_CRITERIA if c in self.criteria))

    @classmethod
    def parse(cls, text: str, max_strain: float | None = None, forcefield: str | None = None) -> "Keep":
        """From a comma list such as ``"valid,stable,posebusters"`` (empty: only ``max_strain``)."""
        criteria = tuple(c.strip() for c in text.split(",") if c.strip())
        return cls(criteria, max_strain, forcefield or "mmff")

    def describe(self) -> str:
        parts = list(self.criteria)
        if self.max_strain is not None:
            parts.append(f"strain <= {self.max_strain:g} kcal/mol ({FORCE_FIELDS[self.forcefield]})")
        return ", ".join(parts)


@dataclass
class FilterOutcome:
    """What :func:`sample_passing` drew and kept.

    Attributes:
        kept: the molecules that passed, in draw order (at most ``requested``).
        kept_indices: each kept molecule's draw index (its place in ``drawn``).
        drawn: every molecule drawn, passing or not, in draw order.
        plausibility: PoseBusters / relaxation results by draw index, for the molecules judged.
        arrays: the raw arrays of each round.
        requested, budget: what was asked for and the most molecules that could be drawn.
        rejected: molecules rejected, by the first criterion they failed (``"strain"`` for the
            ceiling), plus ``"surplus"`` for passing molecules beyond ``requested`` in the last round.
        rounds: how many rounds were drawn.
    """

    keep: Keep
    requested: int
    budget: int
    kept: list[GeneratedMolecule] = field(default_factory=list)
    kept_indices: list[int] = field(default_factory=list)
    drawn: list[GeneratedMolecule] = field(default_factory=list)
    plausibility: dict[int, Plausibility] = field(default_factory=dict)
    arrays: list["SampledArrays"] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    rounds: int = 0

    @property
    def reached(self) -> bool:
        """Whether ``requested`` molecules passed within the budget."""
        return len(self.kept) >= self.requested

    @property
    def passed(self) -> int:
        """Molecules that passed (the kept ones and any surplus of the last round)."""
        return len(self.kept) + self.rejected.get("surplus", 0)

    @property
    def pass_rate(self) -> float:
        """Fraction of drawn molecules that passed."""
        return self.passed / len(self.drawn) if self.drawn else 0.0

    def _rejected_in_order(self) -> dict[str, int]:
        order = [*KEEP_CRITERIA, "strain", "surplus"]
        return {k: self.rejected[k] for k in order if self.rejected.get(k)}

    def to_dict(self) -> dict:
        return {
            "keep": list(self.keep.criteria),
            "max_strain_kcal_mol": self.keep.max_strain,
            "forcefield": FORCE_FIELDS[self.keep.forcefield] if self.keep.max_strain is not None else None,
            "requested": self.requested,
            "kept": len(self.kept),
            "drawn": len(self.drawn),
            "budget": self.budget,
            "reached": self.reached,
            "pass_rate": self.pass_rate,
            "rounds": self.rounds,
            "rejected": self._rejected_in_order(),
        }

    def describe(self) -> str:
        """One line: kept, drawn, pass rate, budget, rejections."""
        why = ", ".join(f"{k} {v}" for k, v in self._rejected_in_order().items()) or "none"
        head = (f"kept {len(self.kept)} of {self.requested} requested ({self.keep.describe()}): drew {len(self.drawn)} "
                f"in {self.rounds} round{'s' * (self.rounds != 1)}, pass rate {100 * self.pass_rate:.1f}%; rejected: {why}")
        if not self.reached:
            head += f"; the budget of {self.budget} draws ran out before {self.requested} passed"
        return head


def _round_seed(seed: int | None, round_index: int) -> int | None:
    if seed is None or round_index == 0:
        return seed
    return int(np.random.SeedSequence([seed, round_index]).generate_state(1)[0] & 0x7FFFFFFF)


def _next_round_size(outcome: FilterOutcome) -> int:
    need = outcome.requested - len(outcome.kept)
    left = outcome.budget - len(outcome.drawn)
    if not outcome.drawn:
        return min(outcome.requested, left)
    rate = max(outcome.pass_rate, _MIN_RATE)
    # a margin over the expected need (the rate is noisy on few draws), and never tiny rounds
    return max(1, min(left, max(_MIN_ROUND, math.ceil(1.5 * need / rate))))


def _first_failure(m: GeneratedMolecule, keep: Keep, seen: set[str], judged: Plausibility | None) -> str | None:
    if "valid" in keep.criteria and not m.valid:
        return "valid"
    if "stable" in keep.criteria and not m.mol_stable:
        return "stable"
    if "unique" in keep.criteria and (m.smiles is None or m.smiles in seen):
        return "unique"
    if "posebusters" in keep.criteria and (judged is None or not judged.checks or not all(judged.checks.values())):
        return "posebusters"
    if keep.max_strain is not None:
        r = None if judged is None else judged.relaxation
        if r is None or r.strain is None or r.strain > keep.max_strain:
            return "strain"
    return None


def sample_passing(
    pipe: "MolDiffPipeline",
    n: int,
    keep: Keep | str,
    *,
    budget: int | None = None,
    workers: int = 1,
    checks: bool = False,
    relax: str | None = None,
    on_round: Callable[[FilterOutcome, int], None] | None = None,
    on_step: Callable[[float], None] | None = None,
    energy_conformers: int = ENERGY_CONFORMERS,
    **options,
) -> FilterOutcome:
    """Draw from ``pipe`` until ``n`` molecules pass ``keep`` or ``budget`` molecules were drawn.

    Args:
        pipe: a :class:`~moldiff.pipeline.MolDiffPipeline`.
        n: molecules wanted (> 0).
        keep: a :class:`Keep` or its comma-list form (``"valid,stable,posebusters"``).
        budget: most molecules drawn in all (default :data:`DEFAULT_BUDGET_FACTOR` times ``n``);
            at least ``n``.
        workers: processes for PoseBusters and relaxation.
        checks, relax: also run PoseBusters / relax with this force field on every molecule judged
            (those passing the cheap criteria), to report them even when ``keep`` does not ask.
        on_round: called after each round with the outcome so far and the round's size.
        on_step: passed to :meth:`~moldiff.pipeline.MolDiffPipeline.generate` (molecules done in the round).
        energy_conformers: PoseBusters' internal-energy ensemble size
            (:func:`~moldiff.chemistry.plausibility.posebusters_checks`; 0 leaves that check out).
        **options: the sampling options of :meth:`~moldiff.pipeline.MolDiffPipeline.sample`
            (``steps``, ``seed``, ``num_atoms`` as one int, ``formula``, ``fragment`` ...).

    Returns:
        :class:`FilterOutcome`; ``outcome.reached`` says whether ``n`` passed within the budget.

    Raises:
        ValueError: a one-line reason (bad ``n``/``budget``/criteria, a list of sizes, options the
            model refuses); :class:`~moldiff.chemistry.plausibility.MissingExtraError` when
            ``posebusters`` is asked for without the extra installed.
    """
    from moldiff.pipeline import SampleRequest

    if isinstance(keep, str):
        keep = Keep.parse(keep)
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    budget = DEFAULT_BUDGET_FACTOR * int(n) if budget is None else budget
    if not isinstance(budget, (int, np.integer)) or isinstance(budget, bool) or budget < n:
        raise ValueError(f"budget must be an integer >= n ({n}), got {budget!r}")
    if options.get("num_atoms") is not None and not isinstance(options["num_atoms"], (int, np.integer)):
        raise ValueError("num_atoms must be one integer (or None) when filtering: rounds differ in size")
    if keep.max_strain is not None and relax is not None and relax != keep.forcefield:
        raise ValueError(f"relax={relax!r} but the strain ceiling uses {keep.forcefield!r}: use one force field")
    run_checks = checks or "posebusters" in keep.criteria
    forcefield = keep.forcefield if keep.max_strain is not None else relax
    if forcefield is not None and forcefield not in FORCE_FIELDS:
        raise ValueError(f"relax must be {' or '.join(FORCE_FIELDS)}, got {forcefield!r}")
    check_energy_conformers(energy_conformers)
    if run_checks:
        require_posebusters()
    seed = options.pop("seed", 0)
    SampleRequest(n, seed=seed, **options).resolved(pipe)  # bad options fail before anything is drawn

    outcome = FilterOutcome(keep, int(n), int(budget))
    seen: set[str] = set()
    while not outcome.reached and len(outcome.drawn) < outcome.budget:
        size = _next_round_size(outcome)
        request = SampleRequest(size, seed=_round_seed(seed, outcome.rounds), **options)
        arrays = pipe.generate(request, on_step=on_step)
        molecules = interpret(arrays, fragment=request.fragment)
        start = len(outcome.drawn)
        outcome.drawn.extend(molecules)
        outcome.arrays.append(arrays)
        outcome.rounds += 1
        # The cheap criteria first; PoseBusters and relaxation only for molecules that pass them.
        cheap = Keep(tuple(c for c in keep.criteria if c != "posebusters"), forcefield=keep.forcefield) \
            if any(c != "posebusters" for c in keep.criteria) else None
        candidates = [start + k for k, m in enumerate(molecules)
                      if m.mol is not None and m.valid and (cheap is None or _first_failure(m, cheap, set(), None) is None)]
        if (run_checks or forcefield) and candidates:
            judged = assess_plausibility([(i, outcome.drawn[i].mol) for i in candidates], checks=run_checks,
                                         forcefield=forcefield, workers=workers, energy_conformers=energy_conformers)
            outcome.plausibility.update({r.index: r for r in judged})
        for k, m in enumerate(molecules):
            i = start + k
            why = _first_failure(m, keep, seen, outcome.plausibility.get(i))
            if why is None and outcome.reached:
                why = "surplus"
            if why is not None:
                outcome.rejected[why] = outcome.rejected.get(why, 0) + 1
                continue
            outcome.kept.append(m)
            outcome.kept_indices.append(i)
            if m.smiles is not None:
                seen.add(m.smiles)
        if on_round is not None:
            on_round(outcome, size)
    return outcome
