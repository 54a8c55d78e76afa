"""Bond orders from 3D coordinates: EDM's distance tables, and RDKit's DetermineBonds.

Two routes, for two purposes:

* :func:`edm_bond_order` / :func:`edm_bond_matrix` reproduce the EDM evaluation protocol
  (Hoogeboom et al. 2022, github.com/ehoogeboom/e3_diffusion_for_molecules, ``qm9/bond_analyze.py``,
  ``get_bond_order``), so our stability and validity numbers compare with published ones.
  Tabulated bond lengths are in pm; a pair at distance d (converted from Å to pm by ``* 100``) is
  bonded with order 1 if ``d < single + 10``; only then order 2 if the pair has a double length and
  ``d < double + 5``; only then order 3 if the pair has a triple length and ``d < triple + 3``.
* :func:`rdkit_bond_orders` is the chemist's route (RDKit ``rdDetermineBonds``: connectivity, bond
  orders and formal charges, xyz2mol-style). Use it to inspect molecules, not to score them.
* :func:`kekule_bond_matrix` turns the chemist's route into integer training labels (one Kekulé
  structure), falling back to the EDM table where RDKit finds no bond orders;
  :func:`kekule_bond_labels` also returns the formal charges RDKit assigned.

Deliberate difference from EDM: EDM's QM9 path raises ``KeyError`` for a pair missing from the
single-bond table (e.g. H-Al); here such a pair simply has bond order 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from rdkit import Chem, rdBase
from rdkit.Chem import rdDetermineBonds

from .elements import SYMBOL_TO_Z, to_symbols

__all__ = [
    "BOND_LENGTHS_PM",
    "BOND_MARGINS_PM",
    "edm_bond_order",
    "edm_bond_matrix",
    "pairwise_distances",
    "DeterminedBonds",
    "rdkit_bond_orders",
    "KEKULE_SOURCES",
    "kekule_bond_matrix",
    "kekule_bond_labels",
]


def _symmetric(pairs: dict[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for (a, b), length in pairs.items():
        table.setdefault(a, {})[b] = length
        table.setdefault(b, {})[a] = length
    return table


# EDM's single-bond lengths (pm). EDM cites wiredchemist.com and chemistry-reference.com tables.
# The table is symmetric in EDM, so each pair is listed once here.
_SINGLE = _symmetric({
    ("H", "H"): 74, ("H", "C"): 109, ("H", "N"): 101, ("H", "O"): 96, ("H", "F"): 92,
    ("H", "B"): 119, ("H", "Si"): 148, ("H", "P"): 144, ("H", "As"): 152, ("H", "S"): 134,
    ("H", "Cl"): 127, ("H", "Br"): 141, ("H", "I"): 161,
    ("C", "C"): 154, ("C", "N"): 147, ("C", "O"): 143, ("C", "F"): 135, ("C", "Si"): 185,
    ("C", "P"): 184, ("C", "S"): 182, ("C", "Cl"): 177, ("C", "Br"): 194, ("C", "I"): 214,
    ("N", "N"): 145, ("N", "O"): 140, ("N", "F"): 136, ("N", "Cl"): 175, ("N", "Br"): 214,
    ("N", "S"): 168, ("N", "I"): 222, ("N", "P"): 177,
    ("O", "O"): 148, ("O", "F"): 142, ("O", "Br"): 172, ("O", "S"): 151, ("O", "P"): 163,
    ("O", "Si"): 163, ("O", "Cl"): 164, ("O", "I"): 194,
    ("F", "F"): 142, ("F", "S"): 158, ("F", "Si"): 160, ("F", "Cl"): 166, ("F", "Br"): 178,
    ("F", "P"): 156, ("F", "I"): 187,
    ("B", "Cl"): 175,
    ("Si", "Si"): 233, ("Si", "S"): 200, ("Si", "Cl"): 202, ("Si", "Br"): 215, ("Si", "I"): 243,
    ("Cl", "Cl"): 199, ("Cl", "P"): 203, ("Cl", "S"): 207, ("Cl", "Br"): 214,
    ("S", "S"): 204, ("S", "Br"): 225, ("S", "P"): 210, ("S", "I"): 234,
    ("Br", "Br"): 228, ("Br", "P"): 222,
    ("P", "P"): 221,
    ("I", "I"): 266,
})  # fmt: skip

# EDM's double-bond table is NOT symmetric: it has C->S (160) but S has only P. Since EDM looks
# up table[atom1][atom2], a C-S pair can be double only when C is atom1; kept exactly as published.
_DOUBLE: dict[str, dict[str, int]] = {
    "C": {"C": 134, "N": 129, "O": 120, "S": 160},
    "N": {"C": 129, "N": 125, "O": 121},
    "O": {"C": 120, "N": 121, "O": 121, "P": 150},
    "P": {"O": 150, "S": 186},
    "S": {"P": 186},
}
_TRIPLE: dict[str, dict[str, int]] = {
    "C": {"C": 120, "N": 116, "O": 113},
    "N": {"C": 116, "N": 110},
    "O": {"C": 113},
}

#: Tabulated bond lengths in pm, ``BOND_LENGTHS_PM[order][atom1][atom2]`` for order 1, 2, 3.
BOND_LENGTHS_PM: dict[int, dict[str, dict[str, int]]] = {1: _SINGLE, 2: _DOUBLE, 3: _TRIPLE}
#: Margins in pm added to the tabulated lengths (EDM tuned them on QM9): single, double, triple.
BOND_MARGINS_PM: dict[int, int] = {1: 10, 2: 5, 3: 3}


def edm_bond_order(symbol1: str, symbol2: str, distance_angstrom: float) -> int:
    """EDM bond order (0-3) of one atom pair, decided exactly as EDM's ``get_bond_order``.

    The reference (scalar) implementation; :func:`edm_bond_matrix` is the fast one.

    Args:
        symbol1: element of the first atom (its order matters only for EDM's asymmetric C->S entry).
        symbol2: element of the second atom.
        distance_angstrom: interatomic distance in Å (compared in pm, i.e. ``* 100``).

    Returns:
        0 (no bond), 1, 2 or 3. Pairs missing from the single-bond table give 0.
    """
    distance_pm = 100.0 * distance_angstrom
    single = _SINGLE.get(symbol1, {}).get(symbol2)
    if single is None or not distance_pm < single + BOND_MARGINS_PM[1]:
        return 0
    double = _DOUBLE.get(symbol1, {}).get(symbol2)
    if double is None or not distance_pm < double + BOND_MARGINS_PM[2]:
        return 1
    triple = _TRIPLE.get(symbol1, {}).get(symbol2)
    if triple is None or not distance_pm < triple + BOND_MARGINS_PM[3]:
        return 2
    return 3


def _threshold_arrays() -> tuple[tuple[str, ...], np.ndarray]:
    """Per-element-pair thresholds (length + margin, pm) as a (3, E, E) array, -inf if untabulated.

    Elements are ordered by atomic number, so ``min``/``max`` of table indices sorts a pair by
    atomic number (what EDM's ``sorted(atom_types)`` does for its atomic-number-ordered decoders).
    """
    elements = tuple(sorted(_SINGLE, key=SYMBOL_TO_Z.__getitem__))
    index = {s: i for i, s in enumerate(elements)}
    # -inf makes `d < threshold` False for untabulated pairs, and NaN distances compare False too.
    thresholds = np.full((3, len(elements), len(elements)), -np.inf)
    for order, table in BOND_LENGTHS_PM.items():
        for a, row in table.items():
            for b, length in row.items():
                thresholds[order - 1, index[a], index[b]] = length + BOND_MARGINS_PM[order]
    return elements, thresholds


_TABLE_ELEMENTS, _THRESHOLDS_PM = _threshold_arrays()
_TABLE_INDEX = {s: i for i, s in enumerate(_TABLE_ELEMENTS)}
# Elements outside the tables get a sentinel index pointing at an all -inf row/column; stored as
# (E+1, E+1, 3) so one fancy-index gathers all three thresholds of every pair.
_UNTABULATED = len(_TABLE_ELEMENTS)
_THRESHOLDS_PADDED = np.pad(_THRESHOLDS_PM, ((0, 0), (0, 1), (0, 1)), constant_values=-np.inf)
_THRESHOLDS_PADDED = np.ascontiguousarray(np.moveaxis(_THRESHOLDS_PADDED, 0, -1))


def pairwise_distances(positions: np.ndarray) -> np.ndarray:
    """Euclidean distance matrix.

    Args:
        positions: (n, 3) coordinates in Å.

    Returns:
        (n, n) float64 distances in Å (NaN wherever a coordinate is NaN).
    """
    pos = np.asarray(positions, dtype=np.float64)
    diff = pos[:, None, :] - pos[None, :, :]
    return np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))


def _orders_from_thresholds(distance_pm: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    # Same nesting as EDM: double is only considered inside single, triple only inside double.
    thresholds = _THRESHOLDS_PADDED[first, second]
    t1, t2, t3 = thresholds[..., 0], thresholds[..., 1], thresholds[..., 2]
    return np.where(
        distance_pm < t1,
        np.where(distance_pm < t2, np.where(distance_pm < t3, 3, 2), 1),
        0,
    )


def edm_bond_matrix(
    symbols: Sequence[object],
    positions: np.ndarray,
    pair_order: Literal["index", "atomic_number"] = "index",
) -> np.ndarray:
    """EDM bond-order matrix of one molecule, vectorised (no Python loop over pairs).

    Args:
        symbols: n element symbols or atomic numbers.
        positions: (n, 3) coordinates in Å.
        pair_order: which atom of a pair is ``atom1`` in the table lookup. It only matters for
            EDM's asymmetric C->S double-bond entry, and EDM itself uses both:
            ``"index"`` (lower atom index first) is EDM's ``check_stability``;
            ``"atomic_number"`` (lighter element first) is EDM's ``build_xae_molecule`` (validity).

    Returns:
        (n, n) symmetric int64 matrix of bond orders 0-3 with a zero diagonal.
    """
    pos = np.asarray(positions, dtype=np.float64)
    idx = np.array([_TABLE_INDEX.get(s, _UNTABULATED) for s in to_symbols(symbols)], dtype=np.intp)
    if pos.shape != (len(idx), 3):
        raise ValueError(f"positions must have shape ({len(idx)}, 3), got {pos.shape}")
    first, second = idx[:, None], idx[None, :]
    if pair_order == "atomic_number":
        first, second = np.minimum(first, second), np.maximum(first, second)
    elif pair_order != "index":
        raise ValueError(f"pair_order must be 'index' or 'atomic_number', got {pair_order!r}")
    orders = _orders_from_thresholds(100.0 * pairwise_distances(pos), first, second)
    # Row i holds (atom_i, atom_j) lookups; keep i < j and mirror, as EDM visits each pair once.
    upper = np.triu(orders, k=1)
    return (upper + upper.T).astype(np.int64)


@dataclass(frozen=True)
class DeterminedBonds:
    """Result of :func:`rdkit_bond_orders`: a molecule, or ``None`` and the reason why not."""

    mol: Chem.Mol | None
    reason: str | None = None


def rdkit_bond_orders(
    symbols: Sequence[object],
    positions: np.ndarray,
    charge: int = 0,
    max_iterations: int = 100_000,
) -> DeterminedBonds:
    """Connectivity, bond orders and formal charges from RDKit's ``DetermineBonds``.

    Never raises: malformed input, impossible valences and RDKit errors become a ``reason``.
    ``max_iterations`` bounds RDKit's bond-order search, which can be very slow on odd geometries.

    Args:
        symbols: n element symbols or atomic numbers.
        positions: (n, 3) coordinates in Å.
        charge: total formal charge of the molecule.
        max_iterations: cap on RDKit's bond-order iterations (0 = unlimited).

    Returns:
        :class:`DeterminedBonds` with a sanitized ``Chem.Mol`` (explicit H atoms, 3D conformer).
    """
    # Imported here, not at the top: rdkit.py (the one builder of Mol objects) imports this module.
    from .rdkit import build_mol

    try:
        pos = np.asarray(positions, dtype=np.float64)
        if pos.ndim != 2 or pos.shape[1] != 3 or not np.isfinite(pos).all():
            return DeterminedBonds(None, "positions must be a finite (n, 3) array")
        mol = build_mol(symbols, pos)
        with rdBase.BlockLogs():
            rdDetermineBonds.DetermineBonds(
                mol, charge=int(charge), embedChiral=False, maxIterations=int(max_iterations)
            )
            # embedChiral=False skips RDKit's own sanitize (and 3D stereo perception): do it here.
            Chem.SanitizeMol(mol)
    except Exception as exc:  # noqa: BLE001 - contract: report, never raise
        return DeterminedBonds(None, f"DetermineBonds failed: {type(exc).__name__}: {exc}".strip())
    return DeterminedBonds(mol, None)


#: Source codes of :func:`kekule_bond_matrix`: 0 RDKit ``DetermineBonds``, 1 EDM-table fallback.
KEKULE_SOURCES: tuple[str, ...] = ("rdDetermineBonds", "EDM table")


def _kekule_orders(mol: Chem.Mol, positions: np.ndarray) -> np.ndarray | None:
    """Integer Kekulé bond orders of a determined ``mol``, or ``None`` if unusable as a label."""
    try:
        Chem.Kekulize(mol, clearAromaticFlags=True)
    except Exception:  # noqa: BLE001 - a failed Kekulé assignment means "use the fallback"
        return None
    # DetermineBonds only adds bonds to the atoms build_mol made, so atom i is input atom i; check it
    # anyway (same count, same coordinates) rather than silently mislabel a molecule.
    n = len(positions)
    if mol.GetNumAtoms() != n or (n and not np.allclose(mol.GetConformer().GetPositions(), positions)):
        return None
    # useBO=True fills each bonded pair with the bond's GetBondTypeAsDouble(); aromatic 1.5 cannot
    # occur after Kekulize(clearAromaticFlags=True), but rounding keeps the labels integral regardless.
    orders = np.rint(Chem.GetAdjacencyMatrix(mol, useBO=True, force=True)).astype(np.int64)
    if orders.shape != (n, n) or orders.min(initial=0) < 0 or orders.max(initial=0) > 3:
        return None
    return orders


def kekule_bond_labels(symbols: Sequence[object], positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Bond orders and formal charges of one molecule: a Kekulé structure from RDKit, or EDM's table
    (and no charges) if RDKit fails.

    RDKit's route is :func:`rdkit_bond_orders` with total charge 0, then
    ``Chem.Kekulize(mol, clearAromaticFlags=True)`` so aromatic rings become alternating single and
    double bonds; each bond's ``GetBondTypeAsDouble()`` is rounded to an integer, and each atom's
    ``GetFormalCharge()`` is its charge label (e.g. a nitro group's N+ and O-; they sum to 0). When
    RDKit finds no valid bond orders, the orders are :func:`edm_bond_matrix` with its default
    (``"index"``) pair order and every charge is 0.

    Never raises for finite ``(n, 3)`` positions of known elements (non-finite positions also fall
    back: the EDM table bonds no pair at a NaN distance).

    Args:
        symbols: n element symbols or atomic numbers.
        positions: (n, 3) coordinates in Å.

    Returns:
        ``(orders, charges, source)``: an (n, n) symmetric int64 matrix of bond orders 0-3 with a zero
        diagonal and atom order as given, ``(n,)`` int64 formal charges, and the source code (index
        into :data:`KEKULE_SOURCES`): 0 RDKit, 1 EDM-table fallback.
    """
    pos = np.asarray(positions, dtype=np.float64)
    determined = rdkit_bond_orders(symbols, pos, charge=0)
    if determined.mol is not None:
        orders = _kekule_orders(determined.mol, pos)
        if orders is not None:  # atom i of the molecule is input atom i (checked there)
            charges = np.array([a.GetFormalCharge() for a in determined.mol.GetAtoms()], dtype=np.int64)
            return orders, charges, 0
    return edm_bond_matrix(symbols, pos), np.zeros(len(pos), dtype=np.int64), 1


def kekule_bond_matrix(symbols: Sequence[object], positions: np.ndarray) -> tuple[np.ndarray, int]:
    """Bond-order labels of one molecule: :func:`kekule_bond_labels` without the formal charges.

    Returns:
        ``(orders, source)``: an (n, n) symmetric int64 matrix of bond orders 0-3 with a zero diagonal
        and atom order as given, and the source code (index into :data:`KEKULE_SOURCES`):
        0 RDKit, 1 EDM-table fallback.
    """
    orders, _, source = kekule_bond_labels(symbols, positions)
    return orders, source
