"""The one place that builds RDKit ``Mol`` objects from elements, coordinates, bonds and charges.

Every atom, hydrogens included, is an explicit graph node. Two flavours:

* :func:`build_mol` (default ``implicit_hydrogens=False``): atoms are marked ``NoImplicit``, so
  RDKit never invents hydrogens; an under-bonded atom stays under-bonded (a radical once sanitized).
* :func:`edm_mol`: EDM's ``build_molecule`` (github.com/ehoogeboom/e3_diffusion_for_molecules,
  ``qm9/rdkit_functions.py``) makes plain ``Chem.Atom(symbol)`` atoms, which RDKit may fill up with
  implicit hydrogens during sanitization. That changes both validity SMILES and novelty, so the
  EDM flavour keeps it, on purpose.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rdkit import Chem
from rdkit.Geometry import Point3D

from .bonds import edm_bond_matrix
from .elements import to_symbols

__all__ = ["BOND_TYPES", "build_mol", "edm_mol", "sanitize_error", "mol_to_smiles_edm"]

#: Integer bond order -> RDKit bond type (EDM's ``bond_dict``; 4 is aromatic).
BOND_TYPES: dict[int, Chem.BondType] = {
    1: Chem.BondType.SINGLE,
    2: Chem.BondType.DOUBLE,
    3: Chem.BondType.TRIPLE,
    4: Chem.BondType.AROMATIC,
}


def _add_atoms(
    mol: Chem.RWMol, symbols: Sequence[str], charges: Sequence[int] | None, implicit: bool
) -> None:
    for i, symbol in enumerate(symbols):
        atom = Chem.Atom(symbol)
        atom.SetNoImplicit(not implicit)
        if charges is not None:
            atom.SetFormalCharge(int(charges[i]))
        mol.AddAtom(atom)


def _add_bonds(mol: Chem.RWMol, bond_matrix: np.ndarray) -> None:
    n = mol.GetNumAtoms()
    orders = np.asarray(bond_matrix)
    if orders.shape != (n, n):
        raise ValueError(f"bond_matrix must have shape ({n}, {n}), got {orders.shape}")
    # Lower triangle in row-major order, bond (i, j) with i > j: the order EDM adds its bonds in,
    # so bond indices (and anything that depends on them) match EDM's molecules.
    rows, cols = np.nonzero(np.tril(orders, k=-1))
    for i, j in zip(rows.tolist(), cols.tolist()):
        order = int(orders[i, j])
        if order not in BOND_TYPES:
            raise ValueError(f"bond order {orders[i, j]!r} between atoms {i} and {j} is not 1-4")
        mol.AddBond(i, j, BOND_TYPES[order])


def _add_conformer(mol: Chem.RWMol, positions: np.ndarray) -> None:
    conformer = Chem.Conformer(mol.GetNumAtoms())
    for i, (x, y, z) in enumerate(positions.tolist()):
        conformer.SetAtomPosition(i, Point3D(x, y, z))
    conformer.Set3D(True)
    mol.AddConformer(conformer, assignId=True)


def build_mol(
    symbols: Sequence[object],
    positions: np.ndarray | None,
    bond_matrix: np.ndarray | None = None,
    formal_charges: Sequence[int] | None = None,
    sanitize: bool = False,
    implicit_hydrogens: bool = False,
) -> Chem.Mol:
    """Build an RDKit molecule with explicit atoms and (optionally) a 3D conformer.

    Args:
        symbols: n element symbols or atomic numbers.
        positions: (n, 3) coordinates in Å, stored as a 3D conformer; ``None`` for no conformer.
        bond_matrix: (n, n) symmetric integer bond orders (0 none, 1-3, 4 aromatic); ``None``
            for a molecule without bonds (coordinates only).
        formal_charges: n integer formal charges (default all 0).
        sanitize: run ``Chem.SanitizeMol`` (raises RDKit's ``MolSanitizeException`` on failure).
        implicit_hydrogens: let RDKit add implicit hydrogens to under-bonded atoms (EDM's
            behaviour). By default every hydrogen must be an explicit atom.

    Returns:
        A ``Chem.Mol`` with n atoms, in the given order.

    Raises:
        UnknownElementError: an element is not H..Rn.
        ValueError: shapes disagree, or a bond order is not 0-4.
    """
    elements = to_symbols(symbols)
    if formal_charges is not None and len(formal_charges) != len(elements):
        raise ValueError(f"{len(elements)} elements but {len(formal_charges)} formal charges")
    mol = Chem.RWMol()
    _add_atoms(mol, elements, formal_charges, implicit_hydrogens)
    if bond_matrix is not None:
        _add_bonds(mol, bond_matrix)
    if positions is not None:
        pos = np.asarray(positions, dtype=np.float64)
        if pos.shape != (len(elements), 3):
            raise ValueError(f"positions must have shape ({len(elements)}, 3), got {pos.shape}")
        _add_conformer(mol, pos)
    result = mol.GetMol()
    if sanitize:
        Chem.SanitizeMol(result)
    return result


def edm_mol(symbols: Sequence[object], positions: np.ndarray, conformer: bool = True) -> Chem.Mol:
    """The table-bonded molecule exactly as EDM's ``build_molecule`` makes it (not sanitized).

    Bond orders from :func:`~moldiff.chemistry.bonds.edm_bond_matrix` with EDM's pair order
    (lighter element first), as SINGLE/DOUBLE/TRIPLE bonds; atoms may take implicit hydrogens.

    Args:
        symbols: n element symbols or atomic numbers.
        positions: (n, 3) coordinates in Å.
        conformer: also store ``positions`` as a 3D conformer (EDM's molecule has none; SMILES
            and sanitization do not depend on it).

    Returns:
        An unsanitized ``Chem.Mol``.
    """
    bonds = edm_bond_matrix(symbols, positions, pair_order="atomic_number")
    return build_mol(
        symbols,
        positions if conformer else None,
        bond_matrix=bonds,
        implicit_hydrogens=True,
    )


def sanitize_error(mol: Chem.Mol) -> str | None:
    """Sanitize ``mol`` in place; return RDKit's error message, or ``None`` on success.

    Only sanitization failures (``ValueError`` subclasses, as EDM catches) become a message.
    """
    try:
        Chem.SanitizeMol(mol)
    except ValueError as exc:
        return str(exc).strip() or type(exc).__name__
    return None


def mol_to_smiles_edm(mol: Chem.Mol) -> str | None:
    """EDM's ``mol2smiles``: sanitize ``mol`` in place, then its canonical SMILES (None on failure).

    Hydrogens that are graph atoms stay in the SMILES (e.g. ``[H]O[H]``), as in EDM.
    """
    if sanitize_error(mol) is not None:
        return None
    return Chem.MolToSmiles(mol)
