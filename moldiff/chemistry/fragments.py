"""Fragments and formulas for conditioned sampling (inpainting): the RDKit side.

* :func:`fragment_from_smiles` embeds a SMILES in 3D (RDKit ETKDGv3 with explicit hydrogens and a
  fixed seed, then an MMFF94 relaxation) and by default keeps the heavy atoms only, so that the
  hydrogens of the SMILES' implicit H positions stay free for substituents.
* :func:`fragment_from_file` reads a fragment with 3D coordinates from ``.sdf`` / ``.mol`` (bonds
  from the file) or ``.xyz`` (bonds from RDKit ``DetermineBonds`` when it succeeds).
* :func:`parse_formula` turns ``"C7H8O"`` into element counts; :func:`formula_problem` says why a
  formula cannot be a neutral closed-shell molecule.
* :func:`substructure_retained` / :func:`retained_in_place` check a fragment against a generated
  RDKit molecule; :func:`kabsch_rmsd` is the fragment RMSD after optimal superposition (numpy).
* :func:`murcko_scaffold_atoms` / :func:`cut_fragment` cut benchmark fragments from real molecules.

Coordinates are in Å throughout. Every loader raises a one-line ``ValueError``
(:class:`~moldiff.chemistry.io.MoleculeFileError` for files, :class:`FormulaError` for formulas).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from rdkit import Chem, rdBase
from rdkit.Chem import AllChem, rdDetermineBonds

from .bonds import rdkit_bond_orders
from .elements import SYMBOL_TO_Z, allowed_valences, to_symbols
from .io import MoleculeFileError, read_molecules
from .rdkit import edm_mol, sanitize_error

__all__ = [
    "LoadedFragment",
    "FormulaError",
    "fragment_from_smiles",
    "fragment_from_file",
    "fragment_query",
    "open_valences",
    "parse_formula",
    "format_formula",
    "element_counts",
    "formula_problem",
    "kabsch_rmsd",
    "bonded_mol",
    "substructure_retained",
    "retained_in_place",
    "murcko_scaffold_atoms",
    "cut_fragment",
    "fragment_smiles",
]


class LoadedFragment(NamedTuple):
    """A fragment as loaded: ``symbols`` (k,), ``positions`` (k, 3) float64 Å, RDKit ``mol`` whose
    atom i is fragment atom i (with bonds and a conformer; ``None`` when bonds are unknown)."""

    symbols: tuple[str, ...]
    positions: np.ndarray
    mol: Chem.Mol | None


class FormulaError(ValueError):
    """A molecular formula that cannot be parsed (one-line message)."""


# ---------------------------------------------------------------------------------------- loading


def _loaded(mol: Chem.Mol) -> LoadedFragment:
    symbols = tuple(atom.GetSymbol() for atom in mol.GetAtoms())
    positions = np.array(mol.GetConformer().GetPositions(), dtype=np.float64).reshape(-1, 3)
    return LoadedFragment(symbols, positions, mol)


def fragment_from_smiles(
    smiles: str, seed: int = 0, *, keep_hydrogens: bool = False, optimize: bool = True
) -> LoadedFragment:
    """Embed a SMILES in 3D and return it as a fragment.

    The molecule gets explicit hydrogens, ETKDGv3 coordinates with ``randomSeed=seed`` (the same
    seed gives the same coordinates) and, if ``optimize`` and MMFF94 knows every atom, an MMFF94
    relaxation (closer to the DFT bond lengths the model was trained on).

    Args:
        smiles: the fragment, e.g. ``"c1ccccc1"``.
        seed: embedding seed.
        keep_hydrogens: keep the hydrogens as fragment atoms. By default they are dropped, so that
            every implicit-H position of the SMILES is free for the model to fill (benzene as a
            fragment then means "a benzene ring", not "benzene with its six H").
        optimize: relax the embedded geometry with MMFF94.

    Returns:
        :class:`LoadedFragment`; atoms in SMILES order (then hydrogens, if kept).

    Raises:
        ValueError: the SMILES does not parse, or RDKit cannot embed it.
    """
    text = str(smiles).strip()
    if not text:
        raise ValueError("empty fragment SMILES")
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(text)
    if mol is None:
        raise ValueError(f"cannot parse fragment SMILES {text!r}")
    mol = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed)
    with rdBase.BlockLogs():
        status = AllChem.EmbedMolecule(mol, params)
        if status != 0:  # ETKDG's distance-geometry start can fail for strained systems
            params.useRandomCoords = True
            status = AllChem.EmbedMolecule(mol, params)
        if status != 0:
            raise ValueError(f"RDKit could not embed fragment SMILES {text!r} in 3D")
        if optimize and AllChem.MMFFHasAllMoleculeParams(mol):
            AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)
    if not keep_hydrogens:
        mol = Chem.RemoveHs(mol)  # the conformer keeps the heavy atoms' coordinates
    return _loaded(mol)


def _read_mol_block_file(path: Path, index: int) -> Chem.Mol:
    if path.suffix.lower() == ".mol":
        if index != 0:
            raise MoleculeFileError(f"{path}: a .mol file holds one molecule, asked for record {index}")
        with rdBase.BlockLogs():
            mol = Chem.MolFromMolFile(str(path), sanitize=True, removeHs=False)
            if mol is None:  # keep the atoms even when RDKit dislikes the chemistry
                mol = Chem.MolFromMolFile(str(path), sanitize=False, removeHs=False)
        if mol is None:
            raise MoleculeFileError(f"{path}: RDKit cannot parse this MOL file")
        return mol
    with rdBase.BlockLogs():
        supplier = Chem.SDMolSupplier(str(path), sanitize=True, removeHs=False)
        count = len(supplier)
        if count == 0:
            raise MoleculeFileError(f"{path}: no molecule records found")
        if not 0 <= index < count:
            raise MoleculeFileError(f"{path}: asked for record {index}, the file has {count}")
        mol = supplier[index]
        if mol is None:
            raw = Chem.SDMolSupplier(str(path), sanitize=False, removeHs=False)
            mol = raw[index]
    if mol is None:
        raise MoleculeFileError(f"{path}: SDF record {index + 1} could not be parsed by RDKit")
    return mol


def fragment_from_file(
    path: str | os.PathLike, *, index: int = 0, keep_hydrogens: bool = True
) -> LoadedFragment:
    """Read a fragment with 3D coordinates from ``.sdf``, ``.mol`` or ``.xyz``.

    Args:
        path: the file; its extension (case-insensitive) picks the reader.
        index: which record of a multi-record SDF / XYZ file (0-based).
        keep_hydrogens: keep the file's hydrogen atoms (default). ``False`` drops them, freeing
            their positions for the model.

    Returns:
        :class:`LoadedFragment`, atoms in file order. ``mol`` carries the file's bonds (SDF/MOL;
        sanitized when RDKit accepts it) or RDKit ``DetermineBonds``' (XYZ, ``None`` if that fails).

    Raises:
        MoleculeFileError: missing/empty/unparsable file, unknown extension, record out of range,
            or 2D coordinates (a depiction, not a geometry).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".sdf", ".mol", ".xyz"):
        raise MoleculeFileError(f"{path}: unknown fragment file extension {path.suffix!r}, expected .sdf, .mol or .xyz")
    if not path.is_file():
        raise MoleculeFileError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise MoleculeFileError(f"{path}: empty file, no molecule records")
    if suffix == ".xyz":
        records = read_molecules(path)
        if not 0 <= index < len(records):
            raise MoleculeFileError(f"{path}: asked for record {index}, the file has {len(records)}")
        record = records[index]
        if record.error is not None:
            raise MoleculeFileError(f"{path}: {record.error}")
        determined = rdkit_bond_orders(record.symbols, record.positions)
        fragment = LoadedFragment(tuple(record.symbols), record.positions.copy(), determined.mol)
    else:
        try:
            mol = _read_mol_block_file(path, index)
        except (OSError, RuntimeError) as exc:
            raise MoleculeFileError(f"{path}: cannot read ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
        if mol.GetNumAtoms() == 0:
            raise MoleculeFileError(f"{path}: record {index} has no atoms")
        if mol.GetNumConformers() == 0 or not mol.GetConformer().Is3D():
            raise MoleculeFileError(f"{path}: record {index} has 2D coordinates; a fragment needs a 3D geometry (or use a SMILES)")
        mol.UpdatePropertyCache(strict=False)
        fragment = _loaded(mol)
    if not np.isfinite(fragment.positions).all():
        raise MoleculeFileError(f"{path}: record {index} has non-finite coordinates")
    if not keep_hydrogens:
        fragment = _drop_hydrogens(fragment)
    return fragment


def _drop_hydrogens(fragment: LoadedFragment) -> LoadedFragment:
    keep = [i for i, s in enumerate(fragment.symbols) if s != "H"]
    if not keep:
        raise ValueError("the fragment has no heavy atoms left once its hydrogens are dropped")
    mol = None if fragment.mol is None else cut_fragment(fragment.mol, keep)
    return LoadedFragment(tuple(fragment.symbols[i] for i in keep), fragment.positions[keep].copy(), mol)


def open_valences(mol: Chem.Mol) -> np.ndarray:
    """``(k,)`` hydrogen count of each atom as RDKit sees it (implicit hydrogens, explicit-H
    counts; hydrogens present as atoms are not counted): the neighbours a fragment atom still
    takes when the fragment is grown into a molecule."""
    mol = Chem.Mol(mol)
    mol.UpdatePropertyCache(strict=False)
    return np.array([atom.GetTotalNumHs() for atom in mol.GetAtoms()], dtype=np.int64)


def kekule_orders(mol: Chem.Mol) -> np.ndarray | None:
    """``(k, k)`` bond orders 0-3 between the atoms of ``mol``, aromatic bonds in a Kekulé form;
    ``None`` when RDKit cannot kekulize it (the bonds are then left to the model)."""
    work = Chem.RWMol(mol)
    try:
        Chem.Kekulize(work, clearAromaticFlags=True)
    except Exception:  # RDKit raises KekulizeException (and others) for impossible forms
        return None
    orders = np.zeros((work.GetNumAtoms(), work.GetNumAtoms()), dtype=np.int64)
    for bond in work.GetBonds():
        order = int(round(bond.GetBondTypeAsDouble()))
        if not 1 <= order <= 3:
            return None
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        orders[i, j] = orders[j, i] = order
    return orders


def formal_charges(mol: Chem.Mol) -> np.ndarray:
    """``(k,)`` formal charge of each atom of ``mol``."""
    return np.array([atom.GetFormalCharge() for atom in mol.GetAtoms()], dtype=np.int64)


def fragment_query(symbols: Sequence[object], positions: np.ndarray) -> Chem.Mol:
    """A substructure query for a fragment known only by coordinates: connectivity from covalent
    radii (RDKit ``DetermineConnectivity``), every bond generic (matches any bond order)."""
    from .rdkit import build_mol

    mol = build_mol(symbols, np.asarray(positions, dtype=np.float64))
    with rdBase.BlockLogs():
        rdDetermineBonds.DetermineConnectivity(mol)
    params = Chem.AdjustQueryParameters.NoAdjustments()
    params.makeBondsGeneric = True
    return Chem.AdjustQueryProperties(mol, params)


# ---------------------------------------------------------------------------------------- formulas

_FORMULA_TOKEN = re.compile(r"([A-Z][a-z]?)(\d*)")


def parse_formula(formula: str | Mapping[str, int]) -> dict[str, int]:
    """Element counts of a molecular formula.

    Args:
        formula: a string such as ``"C7H8O"`` or ``"CH3CH2OH"`` (repeated elements add up;
            no parentheses, charges or isotopes), or a mapping element -> count.

    Returns:
        ``{symbol: count}`` in order of first appearance, counts >= 1.

    Raises:
        FormulaError: empty formula, unknown element, stray characters, or a count of 0.
    """
    if isinstance(formula, Mapping):
        counts: dict[str, int] = {}
        for symbol, count in formula.items():
            if str(symbol) not in SYMBOL_TO_Z:
                raise FormulaError(f"unknown element {symbol!r} in formula")
            if int(count) != count or int(count) < 0:
                raise FormulaError(f"element count for {symbol} must be a non-negative integer, got {count!r}")
            if int(count):
                counts[str(symbol)] = counts.get(str(symbol), 0) + int(count)
        if not counts:
            raise FormulaError("empty formula")
        return counts
    text = str(formula).strip()
    if not text:
        raise FormulaError("empty formula")
    counts = {}
    position = 0
    for match in _FORMULA_TOKEN.finditer(text):
        if match.start() != position:
            break
        symbol, digits = match.group(1), match.group(2)
        if symbol not in SYMBOL_TO_Z:
            raise FormulaError(f"unknown element {symbol!r} in formula {text!r}")
        count = int(digits) if digits else 1
        if count == 0:
            raise FormulaError(f"element count 0 for {symbol} in formula {text!r}")
        counts[symbol] = counts.get(symbol, 0) + count
        position = match.end()
    if position != len(text):
        raise FormulaError(f"cannot parse formula {text!r} at {text[position:]!r} (expected e.g. C7H8O)")
    return counts


def format_formula(counts: Mapping[str, int]) -> str:
    """Hill-order formula string (C, H, then alphabetical; alphabetical without carbon)."""
    items = {s: int(c) for s, c in counts.items() if int(c) > 0}
    if "C" in items:
        order = ["C"] + (["H"] if "H" in items else []) + sorted(s for s in items if s not in ("C", "H"))
    else:
        order = sorted(items)
    return "".join(f"{s}{items[s] if items[s] > 1 else ''}" for s in order)


def element_counts(symbols: Iterable[object]) -> dict[str, int]:
    """``{symbol: count}`` of a list of element symbols or atomic numbers (first-appearance order)."""
    return dict(Counter(to_symbols(list(symbols))))


def formula_problem(counts: Mapping[str, int]) -> str | None:
    """Why no neutral, closed-shell, connected molecule has this composition, or ``None``.

    With one valence per element (H1 C4 N3 O2 F1, EDM's table) a molecule of N atoms has
    ``sum(valence) / 2`` bond orders in total, so ``sum(valence)`` must be even (no radical) and
    at least ``2 (N - 1)`` (enough bonds to connect N atoms): the degree of unsaturation
    ``(sum(valence) - 2 (N - 1)) / 2`` must be a non-negative integer. Elements with several
    allowed valences (or none listed) skip the test.
    """
    total_atoms = sum(int(c) for c in counts.values())
    valence_sum = 0
    for symbol, count in counts.items():
        allowed = allowed_valences(symbol)
        if len(allowed) != 1:
            return None
        valence_sum += next(iter(allowed)) * int(count)
    unsaturation = (valence_sum - 2 * (total_atoms - 1)) / 2
    if valence_sum % 2:
        return f"odd total valence {valence_sum} (a radical; degree of unsaturation {unsaturation:g})"
    if unsaturation < 0:
        return f"too few bonds to connect {total_atoms} atoms (degree of unsaturation {unsaturation:g})"
    return None


# ---------------------------------------------------------------------------------------- scoring


def kabsch_rmsd(positions: np.ndarray, reference: np.ndarray) -> float:
    """RMSD (Å) between two (k, 3) point sets after the best proper rigid superposition (Kabsch).

    Atom i of ``positions`` is paired with atom i of ``reference``; reflections are not allowed
    (a mirror image is a different geometry). Non-finite input gives ``nan``.
    """
    a = np.asarray(positions, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"need two (k, 3) arrays of the same shape, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    a = a - a.mean(0)
    b = b - b.mean(0)
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    rotation = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    diff = a @ rotation.T - b
    return float(np.sqrt((diff**2).sum(-1).mean()))


def bonded_mol(symbols: Sequence[object], positions: np.ndarray) -> tuple[Chem.Mol | None, str, str | None]:
    """The molecule a generated sample makes, for substructure checks; never raises.

    RDKit ``DetermineBonds`` first (a chemist's bond orders, aromaticity perceived); if that
    fails, EDM's table-bonded molecule when it sanitizes. Atom i is sample atom i.

    Returns:
        ``(mol or None, route, reason)``: route is ``"rdDetermineBonds"``, ``"EDM table"`` or
        ``"none"``; reason says why no molecule could be made (else ``None``).
    """
    determined = rdkit_bond_orders(symbols, positions)
    if determined.mol is not None:
        return determined.mol, "rdDetermineBonds", None
    try:
        table = edm_mol(symbols, np.asarray(positions, dtype=np.float64), conformer=True)
        with rdBase.BlockLogs():
            error = sanitize_error(table)
    except Exception as exc:  # noqa: BLE001 - malformed samples are reported, not raised
        return None, "none", f"{determined.reason}; EDM table: {type(exc).__name__}: {exc}"
    if error is None:
        return table, "EDM table", None
    return None, "none", f"{determined.reason}; EDM table molecule does not sanitize: {error}"


def _ensure_rings(mol: Chem.Mol) -> None:
    """Ring membership for an unsanitized molecule (sanitized ones have it already)."""
    try:
        mol.GetRingInfo().NumRings()
    except RuntimeError:
        Chem.FastFindRings(mol)


def _ready_query(query: Chem.Mol) -> Chem.Mol:
    query = Chem.Mol(query)
    query.UpdatePropertyCache(strict=False)
    _ensure_rings(query)
    return query


def substructure_retained(query: Chem.Mol, target: Chem.Mol | None) -> bool:
    """Whether ``query`` (the fragment) occurs anywhere in ``target`` as a substructure (RDKit
    ``HasSubstructMatch``: elements, bond orders/aromaticity, formal charges where the query sets
    them; hydrogens only where the query has them as atoms)."""
    if target is None:
        return False
    return bool(target.HasSubstructMatch(_ready_query(query)))


def retained_in_place(query: Chem.Mol, target: Chem.Mol | None) -> bool:
    """Whether atoms ``0..k-1`` of ``target`` themselves form the fragment ``query`` (k atoms):
    same elements (and formal charges where the query sets them), and every fragment bond present
    between the same atoms with the same bond type (any type for a generic query bond)."""
    if target is None or target.GetNumAtoms() < query.GetNumAtoms():
        return False
    for atom in query.GetAtoms():
        other = target.GetAtomWithIdx(atom.GetIdx())
        if other.GetAtomicNum() != atom.GetAtomicNum():
            return False
        if atom.GetFormalCharge() and atom.GetFormalCharge() != other.GetFormalCharge():
            return False
    for bond in query.GetBonds():
        other = target.GetBondBetweenAtoms(bond.GetBeginAtomIdx(), bond.GetEndAtomIdx())
        if other is None:
            return False
        generic = bond.HasQuery() and bond.GetSmarts() == "~"
        if not generic and other.GetBondType() != bond.GetBondType():
            return False
    return True


# ---------------------------------------------------------------------------------------- cutting


def murcko_scaffold_atoms(mol: Chem.Mol) -> list[int]:
    """Sorted heavy-atom indices of the Bemis-Murcko framework of ``mol``: its ring systems and
    the linkers between them, found by stripping terminal acyclic heavy atoms until none is left
    (so an exocyclic ``=O`` goes too). Empty for an acyclic molecule.
    """
    _ensure_rings(mol)
    ring_info = mol.GetRingInfo()
    keep = {a.GetIdx() for a in mol.GetAtoms() if a.GetAtomicNum() != 1}
    if not any(ring_info.NumAtomRings(i) for i in keep):
        return []
    changed = True
    while changed:
        changed = False
        for index in sorted(keep):
            if ring_info.NumAtomRings(index):
                continue
            degree = sum(n.GetIdx() in keep for n in mol.GetAtomWithIdx(index).GetNeighbors())
            if degree <= 1:
                keep.discard(index)
                changed = True
    return sorted(keep)


def cut_fragment(mol: Chem.Mol, atoms: Sequence[int]) -> Chem.Mol:
    """The sub-molecule on ``atoms`` (in that order), keeping their bonds (with aromatic flags),
    formal charges and conformer coordinates; not re-sanitized (a cut aromatic system need not
    kekulize on its own) but ready for substructure matching."""
    atoms = [int(i) for i in atoms]
    if len(set(atoms)) != len(atoms) or not all(0 <= i < mol.GetNumAtoms() for i in atoms):
        raise ValueError(f"atom indices must be distinct and in [0, {mol.GetNumAtoms()}), got {atoms}")
    # Renumber first so the kept atoms become 0..k-1 in the requested order, then delete the rest.
    rest = [i for i in range(mol.GetNumAtoms()) if i not in set(atoms)]
    ordered = Chem.RenumberAtoms(mol, atoms + rest)
    editable = Chem.RWMol(ordered)
    for index in range(mol.GetNumAtoms() - 1, len(atoms) - 1, -1):
        editable.RemoveAtom(index)
    result = editable.GetMol()
    for atom in result.GetAtoms():
        atom.SetNoImplicit(False)  # a cut bond becomes an open valence, not a radical
    result.UpdatePropertyCache(strict=False)
    Chem.FastFindRings(result)
    return result


def fragment_smiles(mol: Chem.Mol | None) -> str | None:
    """A SMILES label for a fragment molecule (also an unsanitized cut); ``None`` if RDKit refuses."""
    if mol is None:
        return None
    try:
        with rdBase.BlockLogs():
            return Chem.MolToSmiles(mol)
    except Exception:  # noqa: BLE001 - a label is optional
        return None
