"""EDM's evaluation protocol: atom/molecule stability, validity, uniqueness and novelty.

Facts from EDM's published code (Hoogeboom et al. 2022,
github.com/ehoogeboom/e3_diffusion_for_molecules: ``qm9/analyze.py`` ``check_stability``,
``qm9/rdkit_functions.py`` ``BasicMolecularMetrics`` / ``compute_qm9_smiles``):

* Bond orders come from distance tables (:mod:`moldiff.chemistry.bonds`). An atom is stable iff its
  bond-order sum equals its allowed valence (or is one of them); a molecule iff all atoms are.
  Atom stability is pooled: stable atoms / all atoms over the whole set.
* Validity: RDKit sanitization of the table-bonded molecule (atoms may take implicit hydrogens)
  succeeds; its SMILES is that of the largest fragment (first one on ties).
* Uniqueness = unique valid SMILES / valid; novelty = unique valid SMILES absent from the
  reference SMILES / unique valid. Reference SMILES (the training split) are built the same way
  but from the whole molecule, not its largest fragment, and failures are skipped.

Beside EDM's rule, not replacing it, a charge-aware stability (:func:`charged_stability`,
:func:`evaluate_charged_stability`): an atom is stable when its bond-order sum is allowed for its
(element, formal charge) in :data:`~moldiff.chemistry.elements.CHARGED_VALENCE` (after MiDi's
table); for neutral atoms that is EDM's rule, so neutral molecules get EDM's verdict.

Deliberate differences from EDM, for malformed input only: a molecule with 0 or 1 atom, non-finite
coordinates or an unknown element is counted invalid and unstable with a ``reason`` (EDM would
call a lone atom, or a NaN molecule whose atoms are all unbonded, "valid").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
from rdkit import Chem, rdBase

from .bonds import edm_bond_matrix
from .elements import (
    ALLOWED_VALENCE,
    CHARGED_VALENCE,
    SYMBOL_TO_Z,
    UnknownElementError,
    allowed_valences,
    to_symbols,
)
from .rdkit import build_mol, edm_mol, mol_to_smiles_edm, sanitize_error

__all__ = [
    "OwnBondsResult",
    "own_bonds_result",
    "StabilityResult",
    "MoleculeResult",
    "MetricsReport",
    "check_stability",
    "bond_rows_stability",
    "own_bonds_mol_stable",
    "charged_stability",
    "check_charged_stability",
    "ChargedStabilityReport",
    "evaluate_charged_stability",
    "validity_smiles",
    "reference_smiles",
    "reference_smiles_set",
    "evaluate_molecule",
    "summarize",
    "evaluate_molecules",
    "format_table",
]

Molecule = tuple[Sequence[object], np.ndarray]


@dataclass(frozen=True)
class StabilityResult:
    """EDM stability of one molecule."""

    mol_stable: bool
    n_stable_atoms: int
    n_atoms: int


@dataclass(frozen=True)
class MoleculeResult:
    """Everything the protocol says about one molecule.

    ``smiles`` is the validity SMILES (largest fragment) when ``valid``; ``reason`` says why the
    molecule is invalid and/or unstable (``None`` when it is valid and stable).
    """

    smiles: str | None
    valid: bool
    mol_stable: bool
    n_stable_atoms: int
    n_atoms: int
    reason: str | None = None


@dataclass(frozen=True)
class MetricsReport:
    """Protocol metrics over a set of molecules; fractions in [0, 1].

    ``novelty`` (and ``n_novel``) is ``None`` when no reference SMILES were given. Following EDM,
    uniqueness and novelty are 0.0 when nothing is valid.
    """

    n: int
    atom_stable: float
    mol_stable: float
    validity: float
    uniqueness: float
    valid_and_unique: float
    novelty: float | None
    n_valid: int
    n_unique: int
    n_novel: int | None
    per_molecule: list[MoleculeResult] = field(repr=False)

    def to_dict(self, per_molecule: bool = True) -> dict:
        """JSON-ready dict (``per_molecule=False`` leaves out the per-molecule records)."""
        out = asdict(self)
        if not per_molecule:
            out.pop("per_molecule")
        return out


# Allowed-valence lookup by atomic number: row z, column v is True iff valence v is allowed for z.
# The last column collects every valence too large for any element (clipped there, never allowed).
_MAX_VALENCE = 8


def _allowed_table() -> np.ndarray:
    table = np.zeros((max(SYMBOL_TO_Z.values()) + 1, _MAX_VALENCE + 1), dtype=bool)
    for symbol in ALLOWED_VALENCE:
        for valence in allowed_valences(symbol):
            table[SYMBOL_TO_Z[symbol], valence] = True
    return table


_ALLOWED = _allowed_table()


def _stability(elements: tuple[str, ...], bond_matrix: np.ndarray) -> tuple[StabilityResult, np.ndarray]:
    valence = bond_matrix.sum(axis=1)
    z = np.fromiter((SYMBOL_TO_Z[s] for s in elements), dtype=np.intp, count=len(elements))
    stable = _ALLOWED[z, np.minimum(valence, _MAX_VALENCE)]
    n_stable = int(stable.sum())
    result = StabilityResult(n_stable == len(elements), n_stable, len(elements))
    return result, valence


def check_stability(symbols: Sequence[object], positions: np.ndarray) -> StabilityResult:
    """EDM atom and molecule stability (``check_stability`` in EDM's ``qm9/analyze.py``).

    Bond orders use EDM's pair order for stability (lower atom index first). Non-finite
    coordinates give no bonds, as in EDM, so their atoms are unstable.

    Args:
        symbols: n element symbols or atomic numbers.
        positions: (n, 3) coordinates in Å.

    Returns:
        :class:`StabilityResult` (molecule stable, number of stable atoms, n).
    """
    elements = to_symbols(symbols)
    return _stability(elements, edm_bond_matrix(elements, positions, pair_order="index"))[0]


def bond_rows_stability(symbols: Sequence[object], bonds: np.ndarray) -> StabilityResult:
    """Atom and molecule stability, EDM's valence rule, under given bonds instead of EDM's distance
    table: ``bonds`` ``(P, 3)`` rows ``[i, j, order]`` (e.g. bonds a model generated with the atoms)."""
    elements = to_symbols(symbols)
    return _stability(elements, _rows_to_matrix(len(elements), bonds))[0]


def own_bonds_mol_stable(symbols_per_molecule: Sequence[Sequence[object]], bonds: Sequence[np.ndarray],
                         fault_step: Sequence[int] | None = None) -> float | None:
    """Fraction of molecules stable under their own generated ``bonds`` (one ``(P_k, 3)`` row array
    per molecule, :func:`bond_rows_stability`); molecules with ``fault_step >= 0`` (a numerical fault
    while sampling) count as unstable. ``None`` when there are no bonds (a model that does not
    generate them)."""
    if not len(bonds):
        return None
    if len(bonds) != len(symbols_per_molecule):
        raise ValueError(f"{len(bonds)} bond arrays for {len(symbols_per_molecule)} molecules")
    faults = np.full(len(bonds), -1) if fault_step is None else np.asarray(fault_step)
    stable = sum(bond_rows_stability(symbols, rows).mol_stable
                 for symbols, rows, fault in zip(symbols_per_molecule, bonds, faults) if fault < 0)
    return stable / len(bonds)


def _rows_to_matrix(n: int, bonds: np.ndarray) -> np.ndarray:
    """Symmetric (n, n) bond-order matrix of ``(P, 3)`` rows ``[i, j, order]`` (orders add up)."""
    matrix = np.zeros((n, n), dtype=np.int64)
    rows = np.asarray(bonds, dtype=np.int64).reshape(-1, 3)
    if len(rows) and (rows[:, :2].min() < 0 or rows[:, :2].max() >= n or (rows[:, 0] == rows[:, 1]).any()):
        raise ValueError(f"bond rows must join two different atoms among {n}")
    np.add.at(matrix, (rows[:, 0], rows[:, 1]), rows[:, 2])
    np.add.at(matrix, (rows[:, 1], rows[:, 0]), rows[:, 2])
    return matrix


# ------------------------------------------------------------------------ charge-aware stability

# Charge-aware lookup: [z, charge + _MAX_CHARGE, valence] is True iff that valence is allowed for
# that (element, charge) in CHARGED_VALENCE. Charges beyond +-_MAX_CHARGE allow nothing.
_MAX_CHARGE = 3


def _charged_allowed_table() -> np.ndarray:
    table = np.zeros((max(SYMBOL_TO_Z.values()) + 1, 2 * _MAX_CHARGE + 1, _MAX_VALENCE + 1), dtype=bool)
    for symbol, rows in CHARGED_VALENCE.items():
        for charge, valences in rows.items():
            if abs(charge) <= _MAX_CHARGE:
                for valence in valences:
                    table[SYMBOL_TO_Z[symbol], charge + _MAX_CHARGE, valence] = True
    return table


_CHARGED_ALLOWED = _charged_allowed_table()


def _as_charges(formal_charges: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray:
    """Formal charges as an (n,) int64 array (``None`` = all neutral); raises on bad input."""
    if formal_charges is None:
        return np.zeros(n, dtype=np.int64)
    try:
        charges = np.asarray(formal_charges, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"formal charges are not numbers ({exc})") from None
    if charges.shape != (n,):
        raise ValueError(f"formal charges must hold one charge per atom: expected shape ({n},), got {charges.shape}")
    if not np.isfinite(charges).all() or (charges != np.round(charges)).any():
        raise ValueError("formal charges must be whole numbers")
    return charges.astype(np.int64)


def _charged_stable_atoms(elements: tuple[str, ...], bond_matrix: np.ndarray, charges: np.ndarray) -> np.ndarray:
    """(n,) bool: atom i's bond-order sum is allowed for its (element, formal charge)."""
    valence = np.asarray(bond_matrix).sum(axis=1)
    whole = valence == np.round(valence)  # e.g. aromatic 1.5 orders summing to a fraction: unstable
    valence = np.clip(np.round(valence), 0, _MAX_VALENCE).astype(np.intp)
    z = np.fromiter((SYMBOL_TO_Z[s] for s in elements), dtype=np.intp, count=len(elements))
    in_range = np.abs(charges) <= _MAX_CHARGE
    column = np.clip(charges, -_MAX_CHARGE, _MAX_CHARGE).astype(np.intp) + _MAX_CHARGE
    return _CHARGED_ALLOWED[z, column, valence] & in_range & whole


def _charged_result(elements: tuple[str, ...], bond_matrix: np.ndarray, charges: np.ndarray) -> StabilityResult:
    stable = _charged_stable_atoms(elements, bond_matrix, charges)
    n_stable = int(stable.sum())
    return StabilityResult(n_stable == len(elements), n_stable, len(elements))


def charged_stability(
    symbols: Sequence[object],
    bond_matrix: np.ndarray,
    formal_charges: Sequence[int] | np.ndarray | None = None,
) -> StabilityResult:
    """Charge-aware atom and molecule stability under given bonds.

    An atom is stable when its bond-order sum is one of the valences
    :data:`~moldiff.chemistry.elements.CHARGED_VALENCE` allows for its (element, formal charge); a
    molecule when all its atoms are. For a neutral molecule this is EDM's rule on the same bonds.

    Args:
        symbols: n element symbols or atomic numbers.
        bond_matrix: (n, n) symmetric bond orders (0 = no bond); an atom whose orders do not sum
            to a whole number (aromatic 1.5s) is unstable.
        formal_charges: (n,) whole-number formal charges; ``None`` means all atoms neutral.

    Returns:
        :class:`StabilityResult`.

    Raises:
        ValueError: a bond matrix or charges of the wrong shape, or charges that are not whole.
    """
    elements = to_symbols(symbols)
    n = len(elements)
    matrix = np.asarray(bond_matrix, dtype=np.float64)
    if matrix.shape != (n, n):
        raise ValueError(f"bond_matrix must have shape ({n}, {n}), got {matrix.shape}")
    if not np.isfinite(matrix).all() or (matrix < 0).any():
        raise ValueError("bond orders must be finite and non-negative")
    return _charged_result(elements, matrix, _as_charges(formal_charges, n))


def check_charged_stability(
    symbols: Sequence[object],
    positions: np.ndarray,
    formal_charges: Sequence[int] | np.ndarray | None = None,
) -> StabilityResult:
    """Charge-aware stability (:func:`charged_stability`) on the bonds EDM's distance tables derive
    from ``positions`` (the bonds :func:`check_stability` uses), so it differs from EDM's verdict
    only where ``formal_charges`` are non-zero.

    Args:
        symbols: n element symbols or atomic numbers.
        positions: (n, 3) coordinates in Å.
        formal_charges: (n,) whole-number formal charges; ``None`` means all atoms neutral.
    """
    elements = to_symbols(symbols)
    matrix = edm_bond_matrix(elements, positions, pair_order="index")
    return _charged_result(elements, matrix, _as_charges(formal_charges, len(elements)))


@dataclass(frozen=True)
class ChargedStabilityReport:
    """Charge-aware stability over a set of molecules (fractions in [0, 1]), reported beside EDM's.

    ``bonds`` says which bonds were judged: ``"EDM table"`` (from the coordinates, as EDM's
    stability) or ``"own"`` (bonds that came with each molecule). ``n_charged``: molecules with at
    least one non-zero formal charge; ``n_failed``: molecules that could not be judged (malformed,
    no own bonds, bad charges), counted as unstable.
    """

    n: int
    atom_stable: float
    mol_stable: float
    n_charged: int
    n_failed: int
    bonds: str
    per_molecule: list[StabilityResult] = field(repr=False)

    def to_dict(self, per_molecule: bool = False) -> dict:
        """JSON-ready dict (per-molecule records only with ``per_molecule=True``)."""
        out = asdict(self)
        if not per_molecule:
            out.pop("per_molecule")
        return out


def _charged_parts(molecule) -> tuple[object, object, object, object]:
    """(symbols, positions, formal charges or None, own bond rows or None) of one molecule."""
    if hasattr(molecule, "symbols") and hasattr(molecule, "positions"):
        if getattr(molecule, "error", None) is not None:  # an unreadable file record
            raise ValueError(str(molecule.error))
        bonds = getattr(molecule, "generated_bonds", None)  # a sampled molecule's own bonds
        if bonds is None and not isinstance(getattr(molecule, "bonds", None), str):
            bonds = getattr(molecule, "bonds", None)  # a file record's bond block
        return molecule.symbols, molecule.positions, getattr(molecule, "formal_charges", None), bonds
    if len(molecule) == 3:
        symbols, positions, charges = molecule
        return symbols, positions, charges, None
    symbols, positions = molecule
    return symbols, positions, None, None


def _charged_one(molecule, own_bonds: bool = False) -> tuple[StabilityResult, bool, bool]:
    """(verdict, carries a non-zero charge, could be judged) of one molecule; never raises."""
    try:
        symbols, positions, charges, bonds = _charged_parts(molecule)
    except (TypeError, ValueError):
        return StabilityResult(False, 0, 0), False, False
    elements, pos, reason = _malformed(symbols, positions)
    n = len(elements) or _count_atoms(symbols)
    if reason is not None or pos is None or (own_bonds and bonds is None):
        return StabilityResult(False, 0, n), False, False
    try:
        q = _as_charges(charges, n)
        matrix = _rows_to_matrix(n, bonds) if own_bonds else edm_bond_matrix(elements, pos, pair_order="index")
        return _charged_result(elements, matrix, q), bool(q.any()), True
    except Exception:  # noqa: BLE001 - one odd molecule must not stop a 10k evaluation
        return StabilityResult(False, 0, n), False, False


def evaluate_charged_stability(
    molecules: Iterable[object],
    *,
    own_bonds: bool = False,
    workers: int = 1,
) -> ChargedStabilityReport:
    """Charge-aware stability (:func:`charged_stability`) over a set, pooled as EDM's.

    Args:
        molecules: ``(symbols, positions)`` pairs (all atoms neutral), ``(symbols, positions,
            formal_charges)`` triples, or objects with ``symbols``, ``positions`` and
            ``formal_charges`` attributes: records read from an SDF
            (:class:`~moldiff.chemistry.io.MoleculeRecord`, charges from the file) or sampled
            molecules (``moldiff.molecules.GeneratedMolecule``, charges the model generated;
            ``None`` = neutral). Malformed entries count as unstable, never raised.
        own_bonds: judge each molecule's own bonds (a record's ``bonds``, a sample's
            ``generated_bonds``) instead of EDM's distance-table bonds; a molecule without them
            counts as unstable (and in ``n_failed``).
        workers: processes to use (1 = this process).

    Returns:
        :class:`ChargedStabilityReport`.
    """
    from functools import partial

    outcomes = _map(partial(_charged_one, own_bonds=own_bonds), molecules, workers)
    if not outcomes:
        raise ValueError("no molecules to evaluate")
    results = [r for r, _, _ in outcomes]
    n = len(results)
    return ChargedStabilityReport(
        n=n,
        atom_stable=_fraction(sum(r.n_stable_atoms for r in results), sum(r.n_atoms for r in results)),
        mol_stable=_fraction(sum(r.mol_stable for r in results), n),
        n_charged=sum(charged for _, charged, _ in outcomes),
        n_failed=sum(not judged for _, _, judged in outcomes),
        bonds="own" if own_bonds else "EDM table",
        per_molecule=results,
    )


def _largest_fragment_smiles(mol: Chem.Mol) -> str | None:
    """SMILES of the largest fragment of an already sanitized molecule (EDM's validity step)."""
    fragments = Chem.GetMolFrags(mol)
    if len(fragments) == 1:
        # EDM re-sanitizes a copy of the single fragment; for one fragment that is the same
        # molecule, so its SMILES is the whole molecule's (checked in the tests).
        return Chem.MolToSmiles(mol)
    fragment_mols = Chem.GetMolFrags(mol, asMols=True)
    largest = max(fragment_mols, key=lambda m: m.GetNumAtoms())  # first of the largest, as EDM
    return mol_to_smiles_edm(largest)


def _validity(elements: tuple[str, ...], positions: np.ndarray) -> tuple[str | None, str | None]:
    """(validity SMILES, sanitization error) of the EDM table-bonded molecule."""
    mol = edm_mol(elements, positions, conformer=False)
    with rdBase.BlockLogs():  # RDKit would print every failure to stderr
        error = sanitize_error(mol)
        if error is not None:
            return None, error
        return _largest_fragment_smiles(mol), None


def validity_smiles(symbols: Sequence[object], positions: np.ndarray) -> str | None:
    """EDM validity: SMILES of the largest fragment of the sanitized table-bonded molecule.

    Args:
        symbols: n element symbols or atomic numbers.
        positions: (n, 3) coordinates in Å.

    Returns:
        Canonical SMILES (explicit hydrogens appear as ``[H]``), or ``None`` if RDKit
        sanitization fails.
    """
    return _validity(to_symbols(symbols), np.asarray(positions, dtype=np.float64))[0]


def reference_smiles(symbols: Sequence[object], positions: np.ndarray) -> str | None:
    """SMILES of a reference (training) molecule as EDM builds them for novelty.

    EDM's ``compute_qm9_smiles``: sanitize the table-bonded molecule and take the SMILES of the
    whole molecule (no largest-fragment step).

    Args:
        symbols: n element symbols or atomic numbers.
        positions: (n, 3) coordinates in Å.

    Returns:
        Canonical SMILES, or ``None`` if sanitization fails (EDM skips those).
    """
    mol = edm_mol(symbols, positions, conformer=False)
    with rdBase.BlockLogs():
        return mol_to_smiles_edm(mol)


def _malformed(
    symbols: Sequence[object], positions: object
) -> tuple[tuple[str, ...], np.ndarray | None, str | None]:
    """Elements, float64 (n, 3) positions and a reason when the input cannot be a molecule."""
    try:
        elements = to_symbols(symbols)
    except (UnknownElementError, TypeError) as exc:
        return (), None, f"malformed: {exc}"
    try:
        pos = np.asarray(positions, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        return elements, None, f"malformed: positions are not numeric ({exc})"
    if len(elements) < 2:
        return elements, None, f"malformed: {len(elements)} atom(s), a molecule needs at least 2"
    if pos.shape != (len(elements), 3):
        return elements, None, f"malformed: positions have shape {pos.shape}, expected ({len(elements)}, 3)"
    if not np.isfinite(pos).all():
        return elements, None, "malformed: non-finite coordinates (NaN or inf)"
    return elements, pos, None


def _count_atoms(symbols: object) -> int:
    try:
        return len(symbols)  # type: ignore[arg-type]
    except TypeError:
        return 0


def _unstable_reason(elements: tuple[str, ...], valence: np.ndarray, limit: int = 5) -> str:
    bad = [i for i, s in enumerate(elements) if int(valence[i]) not in allowed_valences(s)]
    parts = [
        f"{elements[i]}{i} (bond-order sum {int(valence[i])}, allowed "
        f"{'/'.join(map(str, sorted(allowed_valences(elements[i])))) or 'none'})"
        for i in bad[:limit]
    ]
    more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
    return f"unstable atoms: {', '.join(parts)}{more}"


def evaluate_molecule(symbols: Sequence[object], positions: np.ndarray) -> MoleculeResult:
    """Stability and validity of one molecule; never raises on bad input.

    Args:
        symbols: n element symbols or atomic numbers.
        positions: (n, 3) coordinates in Å.

    Returns:
        :class:`MoleculeResult`. Malformed input (unknown element, wrong shape, fewer than 2
        atoms, NaN/inf coordinates) is invalid and unstable, with the reason.
    """
    elements, pos, reason = _malformed(symbols, positions)
    if reason is not None or pos is None:
        return MoleculeResult(None, False, False, 0, len(elements) or _count_atoms(symbols), reason)
    try:
        stability, valence = _stability(elements, edm_bond_matrix(elements, pos, pair_order="index"))
        smiles, error = _validity(elements, pos)
    except Exception as exc:  # noqa: BLE001 - one odd molecule must not stop a 10k evaluation
        return MoleculeResult(None, False, False, 0, len(elements), f"error: {type(exc).__name__}: {exc}")
    reasons = []
    if error is not None:
        reasons.append(f"invalid: {error}")
    if not stability.mol_stable:
        reasons.append(_unstable_reason(elements, valence))
    return MoleculeResult(
        smiles=smiles,
        valid=smiles is not None,
        mol_stable=stability.mol_stable,
        n_stable_atoms=stability.n_stable_atoms,
        n_atoms=stability.n_atoms,
        reason="; ".join(reasons) or None,
    )


def _as_pair(molecule):
    """``(symbols, positions)`` of a pair, or of an object carrying both as attributes (such as
    ``moldiff.pipeline.GeneratedMolecule``); raises ``TypeError``/``ValueError`` for anything else."""
    if hasattr(molecule, "symbols") and hasattr(molecule, "positions"):
        return molecule.symbols, molecule.positions
    symbols, positions = molecule
    return symbols, positions


def _evaluate_pair(molecule: Molecule) -> MoleculeResult:
    try:
        symbols, positions = _as_pair(molecule)
    except (TypeError, ValueError):
        return MoleculeResult(None, False, False, 0, 0, "malformed: expected a (symbols, positions) pair")
    return evaluate_molecule(symbols, positions)


def _reference_pair(molecule: Molecule) -> str | None:
    symbols, positions = _as_pair(molecule)
    return reference_smiles(symbols, positions)


def _map(function, molecules: Iterable[Molecule], workers: int) -> list:
    if workers <= 1:
        return [function(m) for m in molecules]
    items = list(molecules)
    chunksize = max(1, min(512, len(items) // (4 * workers)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(function, items, chunksize=chunksize))


def reference_smiles_set(molecules: Iterable[Molecule], workers: int = 1) -> frozenset[str]:
    """The reference SMILES for novelty (e.g. of the training split), built as EDM does.

    Args:
        molecules: iterable of ``(symbols, positions)``, positions (n, 3) in Å.
        workers: processes to use (1 = this process).

    Returns:
        The set of :func:`reference_smiles` that are not ``None``.
    """
    return frozenset(s for s in _map(_reference_pair, molecules, workers) if s is not None)


def _fraction(count: int, total: int) -> float:
    return count / total if total else 0.0


def summarize(results: Sequence[MoleculeResult], reference: Iterable[str] | None = None) -> MetricsReport:
    """Aggregate per-molecule results into protocol metrics.

    Args:
        results: one :class:`MoleculeResult` per evaluated molecule (at least one).
        reference: reference SMILES for novelty (see :func:`reference_smiles_set`), or ``None``.

    Returns:
        :class:`MetricsReport`.
    """
    if not results:
        raise ValueError("no molecules to evaluate")
    n = len(results)
    valid = [r.smiles for r in results if r.valid]
    unique = set(valid)
    n_novel = None
    if isinstance(reference, str):
        raise TypeError("reference must be a collection of SMILES, not one string")
    if reference is not None:
        reference_set = reference if isinstance(reference, (set, frozenset)) else set(reference)
        n_novel = len(unique - reference_set)
    return MetricsReport(
        n=n,
        atom_stable=_fraction(sum(r.n_stable_atoms for r in results), sum(r.n_atoms for r in results)),
        mol_stable=_fraction(sum(r.mol_stable for r in results), n),
        validity=_fraction(len(valid), n),
        uniqueness=_fraction(len(unique), len(valid)),
        valid_and_unique=_fraction(len(unique), n),
        novelty=None if n_novel is None else _fraction(n_novel, len(unique)),
        n_valid=len(valid),
        n_unique=len(unique),
        n_novel=n_novel,
        per_molecule=list(results),
    )


def evaluate_molecules(
    molecules: Iterable[Molecule],
    reference: Iterable[str] | None = None,
    workers: int = 1,
) -> MetricsReport:
    """Run the EDM protocol over a set of molecules (EDM reports it on 10,000 samples).

    Args:
        molecules: iterable of ``(symbols, positions)``: n element symbols or atomic numbers and
            (n, 3) float coordinates in Å, or objects with ``symbols`` and ``positions``
            attributes (e.g. sampled molecules). Malformed entries are counted, never raised.
        reference: reference SMILES for novelty, built with :func:`reference_smiles`
            (e.g. :func:`reference_smiles_set` of the training split); ``None`` skips novelty.
        workers: processes to use (1 = this process).

    Returns:
        :class:`MetricsReport` with per-molecule records in input order.
    """
    return summarize(_map(_evaluate_pair, molecules, workers), reference)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def format_table(report: MetricsReport, charged: ChargedStabilityReport | None = None) -> str:
    """Plain-text table of a report, fractions as percentages with 2 decimals; with ``charged``
    (:func:`evaluate_charged_stability`) two more rows follow EDM's stability rows."""
    rows = [
        ("molecules", str(report.n)),
        ("atom stable", _percent(report.atom_stable)),
        ("molecule stable", _percent(report.mol_stable)),
    ]
    if charged is not None:
        rows += [
            ("atom stable (charges allowed)", _percent(charged.atom_stable)),
            ("molecule stable (charges allowed)", _percent(charged.mol_stable)),
        ]
    rows += [
        ("validity", _percent(report.validity)),
        ("uniqueness (of valid)", _percent(report.uniqueness)),
        ("valid and unique", _percent(report.valid_and_unique)),
        ("novelty (of unique valid)", _percent(report.novelty)),
    ]
    width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    rule = "-" * (width + 2 + value_width)
    lines = [f"{'metric':<{width}}  {'value':>{value_width}}", rule]
    lines += [f"{name:<{width}}  {value:>{value_width}}" for name, value in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class OwnBondsResult:
    """A molecule judged on bonds its model generated (not EDM's distance table): ``mol`` (RDKit,
    explicit atoms, the generated bond orders and formal charges, conformer from the coordinates;
    sanitized when ``valid``), ``valid`` (RDKit sanitizes it), ``smiles`` (largest fragment, as
    EDM's validity, ``None`` when invalid) and ``mol_stable`` (EDM's valence rule on these bonds;
    like EDM's rule it reads neutral valences, so a charged atom counts as unstable);
    ``mol_stable_charged``: the charge-aware rule (:func:`charged_stability`) on these bonds and
    charges (no charges: all neutral, the same as ``mol_stable``); ``reason``: why the molecule is
    invalid and/or unstable on these bonds, worded as :class:`MoleculeResult`'s (``None`` when it
    is valid and stable)."""

    mol: Chem.Mol
    valid: bool
    smiles: str | None
    mol_stable: bool
    mol_stable_charged: bool | None = None
    reason: str | None = None


def own_bonds_result(symbols: Sequence[object], positions: np.ndarray, bonds: np.ndarray,
                     formal_charges: Sequence[int] | None = None) -> OwnBondsResult:
    """Judge a molecule on its generated ``bonds`` ``(P, 3)`` rows ``[i, j, order]`` (see
    :class:`OwnBondsResult`). Never raises for known elements and in-range rows."""
    elements = to_symbols(symbols)
    n = len(elements)
    rows = np.asarray(bonds, dtype=np.int64).reshape(-1, 3)
    orders = _rows_to_matrix(n, rows)
    stability, valence = _stability(elements, orders)
    stable = stability.mol_stable
    try:
        charged = _charged_result(elements, orders, _as_charges(formal_charges, n)).mol_stable
    except ValueError:  # charges of the wrong length or not whole numbers
        charged = False
    matrix = np.zeros((n, n), dtype=np.int64)
    matrix[rows[:, 0], rows[:, 1]] = rows[:, 2]
    matrix[rows[:, 1], rows[:, 0]] = rows[:, 2]
    pos = np.asarray(positions, dtype=np.float64)
    mol = build_mol(elements, pos if np.isfinite(pos).all() else None, matrix,
                    None if formal_charges is None else [int(c) for c in formal_charges])
    unstable = None if stable else _unstable_reason(elements, valence)
    try:
        with rdBase.BlockLogs():  # a verdict, not a message: RDKit would print every rejection to stderr
            Chem.SanitizeMol(mol)
    except Exception as exc:  # noqa: BLE001 - RDKit raises several exception types for chemistry it rejects
        reason = "; ".join(r for r in (f"invalid: {str(exc).strip() or type(exc).__name__}", unstable) if r)
        return OwnBondsResult(mol, False, None, bool(stable), bool(charged), reason)
    return OwnBondsResult(mol, True, _largest_fragment_smiles(mol), bool(stable), bool(charged), unstable)
