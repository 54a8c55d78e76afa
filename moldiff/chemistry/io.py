"""Read and write molecule files: SDF and XYZ in, SDF / XYZ / CSV out (all writes atomic).

Reading never aborts on one bad record: it becomes a :class:`MoleculeRecord` with an ``error``.
Only whole-file problems (missing, unknown extension, empty, nothing parseable) raise
:class:`MoleculeFileError`. Writers go to a temporary file in the target directory and
``os.replace`` it into place, so a failed write leaves the old file untouched and no debris.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Union

import numpy as np
from rdkit import Chem, rdBase

from moldiff.files import atomic_write

from .elements import UnknownElementError, to_symbols
from .rdkit import build_mol

__all__ = [
    "MoleculeFileError",
    "MoleculeRecord",
    "read_molecules",
    "write_sdf",
    "write_xyz",
    "write_csv",
    "write_json",
    "write_bytes",
]


class MoleculeFileError(ValueError):
    """A molecule file that cannot be read at all (one-line message)."""


@dataclass
class MoleculeRecord:
    """One molecule read from a file.

    Attributes:
        symbols: n element symbols (empty when the record could not be parsed).
        positions: (n, 3) float64 coordinates in Å.
        name: record title (SDF first line, XYZ comment line).
        properties: SD tags (values as RDKit types them), empty for XYZ.
        error: why the record could not be read, else ``None``.
        bonds: the file's own bonds as ``(P, 3)`` int rows ``[i, j, order]`` (``i < j``, order 1-3;
            SDF records whose bonds are all single, double or triple), else ``None`` (XYZ, no bond
            block, or aromatic / other bond types).
        formal_charges: ``(n,)`` int formal charges of an SDF record, else ``None``.
    """

    symbols: tuple[str, ...]
    positions: np.ndarray
    name: str = ""
    properties: dict = field(default_factory=dict)
    error: str | None = None
    bonds: np.ndarray | None = None
    formal_charges: np.ndarray | None = None


MoleculeLike = Union[MoleculeRecord, Chem.Mol, tuple]


def _failed(name: str, error: str) -> MoleculeRecord:
    return MoleculeRecord((), np.zeros((0, 3)), name, {}, error)


# ---------------------------------------------------------------------------------------- reading


def _record_from_mol(mol: Chem.Mol) -> MoleculeRecord:
    symbols = tuple(atom.GetSymbol() for atom in mol.GetAtoms())
    if mol.GetNumConformers():
        positions = np.array(mol.GetConformer().GetPositions(), dtype=np.float64).reshape(-1, 3)
    else:  # only possible for an atom-less record
        positions = np.zeros((len(symbols), 3))
    name = mol.GetProp("_Name") if mol.HasProp("_Name") else ""
    rows = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx(), b.GetBondTypeAsDouble()) for b in mol.GetBonds()]
    bonds = None
    if rows and all(order in (1.0, 2.0, 3.0) for _, _, order in rows):
        bonds = np.array([(min(i, j), max(i, j), int(order)) for i, j, order in rows], dtype=np.int64)
    charges = np.array([atom.GetFormalCharge() for atom in mol.GetAtoms()], dtype=np.int64)
    return MoleculeRecord(symbols, positions, name, mol.GetPropsAsDict(includePrivate=False), bonds=bonds,
                          formal_charges=charges)


def _read_sdf(path: Path) -> list[MoleculeRecord]:
    # sanitize=False: we want the file's atoms and coordinates even when RDKit dislikes the
    # chemistry (generated molecules often are not sane); removeHs=False keeps every atom.
    supplier = Chem.SDMolSupplier(str(path), sanitize=False, removeHs=False)
    records = []
    with rdBase.BlockLogs():
        for i in range(len(supplier)):
            mol = supplier[i]
            if mol is None:
                title = supplier.GetItemText(i).split("\n", 1)[0].strip()
                records.append(_failed(title, f"SDF record {i + 1} ({title!r}) could not be parsed by RDKit"))
            else:
                records.append(_record_from_mol(mol))
    return records


def _parse_float(text: str) -> float:
    # float() already takes "0.", "-.5" and "1.2E-3"; add Fortran "1.2D-3" and Mathematica "1.2*^-3"
    # (the original QM9 .xyz files use the latter).
    return float(text.replace("*^", "e").replace("D", "e").replace("d", "e"))


def _parse_xyz_frame(lines: Sequence[str], n_atoms: int) -> tuple[tuple[str, ...], np.ndarray]:
    elements, coordinates = [], []
    for k, line in enumerate(lines):
        fields = line.split()
        if len(fields) < 4:
            raise ValueError(f"atom line {k + 1} has {len(fields)} fields, expected 'element x y z'")
        elements.append(fields[0])
        coordinates.append([_parse_float(v) for v in fields[1:4]])
    return to_symbols(elements), np.array(coordinates, dtype=np.float64).reshape(n_atoms, 3)


def _xyz_frame(lines: Sequence[str], start: int) -> tuple[MoleculeRecord, int | None]:
    """The frame whose atom-count line is ``lines[start]``, and where the next one starts.

    ``None`` as next start means the frame boundaries are lost (bad count, truncated frame).
    """
    fields = lines[start].split()
    n_atoms = int(fields[0]) if fields and fields[0].isdigit() else -1
    if n_atoms < 0:
        got = lines[start].strip()[:40]
        return _failed("", f"line {start + 1}: expected an atom count, got {got!r}"), None
    comment = lines[start + 1].strip() if start + 1 < len(lines) else ""
    body = lines[start + 2 : start + 2 + n_atoms]
    where = f"frame at line {start + 1}"
    if len(body) < n_atoms:
        return _failed(comment, f"{where}: {n_atoms} atoms announced, {len(body)} present"), None
    try:
        symbols, positions = _parse_xyz_frame(body, n_atoms)
    except (ValueError, UnknownElementError) as exc:
        return _failed(comment, f"{where}: {exc}"), start + 2 + n_atoms
    return MoleculeRecord(symbols, positions, comment), start + 2 + n_atoms


def _read_xyz(path: Path) -> list[MoleculeRecord]:
    lines = path.read_text().splitlines()
    records: list[MoleculeRecord] = []
    start: int | None = 0
    while start is not None and start < len(lines):
        if not lines[start].strip():  # blank lines between or after frames
            start += 1
            continue
        record, start = _xyz_frame(lines, start)
        records.append(record)
    return records


def _is_blank(path: Path, chunk_size: int = 1 << 16) -> bool:
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            if chunk.strip():
                return False
    return True


_READERS: dict[str, Callable[[Path], list[MoleculeRecord]]] = {".sdf": _read_sdf, ".xyz": _read_xyz}


def read_molecules(path: str | os.PathLike) -> list[MoleculeRecord]:
    """Read every molecule of an ``.sdf`` or (multi-frame) ``.xyz`` file.

    Args:
        path: file to read; the extension (case-insensitive) picks the format.

    Returns:
        One :class:`MoleculeRecord` per record, positions (n, 3) in Å. A record that cannot be
        parsed is kept, with empty symbols and an ``error``.

    Raises:
        MoleculeFileError: missing file, unknown extension, no records at all, or no record
            that could be parsed.
    """
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise MoleculeFileError(f"{path}: unknown extension {path.suffix!r}, expected .sdf or .xyz")
    if not path.is_file():
        raise MoleculeFileError(f"{path}: no such file")
    try:
        if _is_blank(path):  # checked first: RDKit reports an empty file as an I/O error
            raise MoleculeFileError(f"{path}: empty file, no molecule records")
        records = reader(path)
    except (OSError, UnicodeDecodeError, RuntimeError) as exc:
        raise MoleculeFileError(f"{path}: cannot read ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    if not records:
        raise MoleculeFileError(f"{path}: no molecule records found (not a {path.suffix} file?)")
    if all(r.error is not None for r in records):
        raise MoleculeFileError(f"{path}: no readable molecule records ({records[0].error})")
    return records


# ---------------------------------------------------------------------------------------- writing


def _atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False) -> None:
    atomic_write(path, write, binary=binary)


def _as_record(item: MoleculeLike) -> MoleculeRecord:
    if isinstance(item, MoleculeRecord):
        return item
    if isinstance(item, Chem.Mol):
        return _record_from_mol(item)
    symbols, positions = item
    return MoleculeRecord(to_symbols(symbols), np.asarray(positions, dtype=np.float64))


def _mol_for_sdf(item: MoleculeLike) -> Chem.Mol:
    if isinstance(item, Chem.Mol):
        return item
    record = _as_record(item)
    if record.error is not None:
        raise ValueError(f"cannot write record {record.name!r}: it failed to read ({record.error})")
    # Coordinates-only molecule: no bonds; its atoms are explicit (no implicit H in the block).
    mol = build_mol(record.symbols, record.positions)
    mol.SetProp("_Name", record.name)
    for key, value in record.properties.items():
        mol.SetProp(str(key), str(value))
    return mol


def write_sdf(path: str | os.PathLike, molecules: Iterable[MoleculeLike], kekulize: bool = True) -> None:
    """Write molecules to an SD file, atomically.

    Args:
        path: target ``.sdf`` file (replaced if it exists).
        molecules: RDKit ``Mol`` objects (bonds and props written as they are),
            :class:`MoleculeRecord` (``properties`` become SD tags; no bonds), or
            ``(symbols, positions)`` pairs with positions (n, 3) in Å.
        kekulize: write aromatic bonds as alternating single/double (RDKit's default; a
            molecule that cannot be kekulized fails the write); ``False`` writes V2000 bond
            type 4 (aromatic) instead.
    """

    def write(handle: IO[str]) -> None:
        writer = Chem.SDWriter(handle)
        writer.SetKekulize(kekulize)
        # Close the writer before the handle even on error: a writer left open flushes into the
        # closed handle when it is garbage-collected, raising somewhere unrelated.
        try:
            for item in molecules:
                mol = _mol_for_sdf(item)
                # Unsanitized molecules (e.g. over-bonded generated ones) still need valences cached.
                mol.UpdatePropertyCache(strict=False)
                writer.write(mol)
        finally:
            writer.close()

    _atomic_write(path, write)


def write_xyz(path: str | os.PathLike, molecules: Iterable[MoleculeLike]) -> None:
    """Write molecules as concatenated XYZ frames (coordinates in Å, 8 decimals), atomically.

    Args:
        path: target ``.xyz`` file (replaced if it exists).
        molecules: :class:`MoleculeRecord`, RDKit ``Mol`` (first conformer) or
            ``(symbols, positions)`` pairs with positions (n, 3) in Å. The record name is the
            comment line.
    """

    def write(handle: IO[str]) -> None:
        for item in molecules:
            record = _as_record(item)
            if record.error is not None or record.positions.shape != (len(record.symbols), 3):
                raise ValueError(f"cannot write record {record.name!r} as XYZ: {record.error or 'bad shape'}")
            handle.write(f"{len(record.symbols)}\n{' '.join(record.name.splitlines())}\n")
            for symbol, (x, y, z) in zip(record.symbols, record.positions.tolist()):
                handle.write(f"{symbol:<2s} {x:16.8f} {y:16.8f} {z:16.8f}\n")

    _atomic_write(path, write)


def write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Write dict rows to a CSV file, atomically.

    Args:
        path: target ``.csv`` file (replaced if it exists).
        rows: one dict per row; columns are all keys in first-seen order, missing cells empty.
    """
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def write(handle: IO[str]) -> None:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    _atomic_write(path, write)


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write ``obj`` as indented JSON, atomically (a failed write leaves the old file intact)."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    _atomic_write(path, lambda fh: fh.write(text))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (e.g. an encoded image)."""
    _atomic_write(path, lambda fh: fh.write(data), binary=True)
