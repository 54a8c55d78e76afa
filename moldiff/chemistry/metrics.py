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
from .elements import ALLOWED_VALENCE, SYMBOL_TO_Z, UnknownElementError, allowed_valences, to_symbols
from .rdkit import build_mol, edm_mol, mol_to_smiles_edm, sanitize_error

__all__ = [
    "OwnBondsResult",
    "own_bonds_result",
    "StabilityResult",
    "MoleculeResult",
    "MetricsReport",
    "check_stability",
    "bond_rows_stability",
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
    n = len(elements)
    matrix = np.zeros((n, n), dtype=np.int64)
    rows = np.asarray(bonds, dtype=np.int64).reshape(-1, 3)
    if len(rows) and (rows[:, :2].min() < 0 or rows[:, :2].max() >= n or (rows[:, 0] == rows[:, 1]).any()):
        raise ValueError(f"bond rows must join two different atoms among {n}")
    np.add.at(matrix, (rows[:, 0], rows[:, 1]), rows[:, 2])
    np.add.at(matrix, (rows[:, 1], rows[:, 0]), rows[:, 2])
    return _stability(elements, matrix)[0]


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


def format_table(report: MetricsReport) -> str:
    """Plain-text table of a report, fractions as percentages with 2 decimals."""
    rows = [
        ("molecules", str(report.n)),
        ("atom stable", _percent(report.atom_stable)),
        ("molecule stable", _percent(report.mol_stable)),
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
    like EDM's rule it reads neutral valences, so a charged atom counts as unstable)."""

    mol: Chem.Mol
    valid: bool
    smiles: str | None
    mol_stable: bool


def own_bonds_result(symbols: Sequence[object], positions: np.ndarray, bonds: np.ndarray,
                     formal_charges: Sequence[int] | None = None) -> OwnBondsResult:
    """Judge a molecule on its generated ``bonds`` ``(P, 3)`` rows ``[i, j, order]`` (see
    :class:`OwnBondsResult`). Never raises for known elements and in-range rows."""
    elements = to_symbols(symbols)
    n = len(elements)
    rows = np.asarray(bonds, dtype=np.int64).reshape(-1, 3)
    stable = bond_rows_stability(elements, rows).mol_stable
    matrix = np.zeros((n, n), dtype=np.int64)
    matrix[rows[:, 0], rows[:, 1]] = rows[:, 2]
    matrix[rows[:, 1], rows[:, 0]] = rows[:, 2]
    pos = np.asarray(positions, dtype=np.float64)
    mol = build_mol(elements, pos if np.isfinite(pos).all() else None, matrix,
                    None if formal_charges is None else [int(c) for c in formal_charges])
    try:
        Chem.SanitizeMol(mol)
    except Exception:  # noqa: BLE001 - RDKit raises several exception types for chemistry it rejects
        return OwnBondsResult(mol, False, None, bool(stable))
    return OwnBondsResult(mol, True, _largest_fragment_smiles(mol), bool(stable))
