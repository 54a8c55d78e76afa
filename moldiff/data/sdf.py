"""Your own molecules as a training set: any 3D SD file with explicit hydrogens.

One SD record is one conformer. Records of the same molecule (same canonical SMILES with stereo, or
the same InChIKey) form one molecule, wherever they sit in the file. Records that cannot serve as
training data are skipped and counted, one reason each, checked in this order:

=======================  ==========================================================================
``unreadable``           RDKit cannot parse the record, or it has no atoms
``unsupported_element``  an element outside the allowed vocabulary
``too_large``            more atoms than ``max_atoms``
``not_3d``               no 3D conformer (a 2D or 0D record, or every z coordinate 0)
``implicit_hydrogens``   hydrogens not written as atoms (an atom has implicit or counted H)
``multiple_fragments``   more than one connected fragment (salts, mixtures, solvates)
``sanitization``         RDKit sanitization fails (impossible valence, aromaticity)
``unsupported_bond``     a bond that is not single, double, triple or aromatic after kekulization
``duplicate_conformer``  the geometry of an earlier kept conformer of the same molecule (every
                         interatomic distance within ``DUPLICATE_TOLERANCE`` Å, same atom order)
=======================  ==========================================================================

The kept conformers are stored like QM9 (:mod:`moldiff.data.qm9`): flat ``ptr``, ``atom_types``
(indices into the dataset's own element vocabulary, sorted by atomic number, only elements present)
and ``positions`` (Å, as in the file), plus every atom's formal charge, the bond orders of the
kekulized molecule (1, 2, 3) as a :class:`~moldiff.data.qm9_bonds.BondTable`, and each conformer's
molecule. The split (default 80/10/10, seed 0) is drawn over molecules, so all conformers of a
molecule land in one split; it depends on the set of molecule keys and the seed, not on the order
of the records.

The processed data are cached as ``<cache>/sdf/<name>_v{SDF_CACHE_VERSION}.npz`` (name: ``--name``
or the file's stem), written atomically and only once complete. The cache records a key, the hash
of the file's bytes with the options and RDKit's version: a different key rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rdkit import Chem, rdBase

from moldiff.chemistry.bonds import BOND_LENGTHS_PM
from moldiff.chemistry.elements import ALLOWED_VALENCE, SYMBOL_TO_Z, UnknownElementError, to_symbols
from moldiff.data.batching import MoleculeSet
from moldiff.data.qm9 import atomic_savez, default_cache_dir
from moldiff.data.qm9_bonds import BondTable
from moldiff.data.statistics import DatasetStatistics, compute_statistics

__all__ = [
    "DEFAULT_ELEMENTS",
    "DEFAULT_MAX_ATOMS",
    "DEFAULT_SPLIT",
    "DUPLICATE_TOLERANCE",
    "SDF_CACHE_VERSION",
    "SKIP_REASONS",
    "SPLITS",
    "SDFDataError",
    "SDFDataset",
    "SDFOptions",
    "SDFReport",
    "build_sdf_dataset",
    "is_sdf_spec",
    "load_sdf_dataset",
    "parse_elements",
    "parse_split",
    "sdf_cache_path",
]

#: Version of the cache layout and of the reading rules; bump it to rebuild every SDF cache.
SDF_CACHE_VERSION = 1
DEFAULT_MAX_ATOMS = 200
#: Bond pairs are stored as int16 local atom indices (the BondTable layout).
_MAX_ATOMS_LIMIT = 32767
DEFAULT_SPLIT = (0.8, 0.1, 0.1)
SPLITS = ("train", "valid", "test")
#: Two conformers of one molecule whose interatomic distances all agree to this (Å) are duplicates.
DUPLICATE_TOLERANCE = 1e-3
#: Elements EDM's tables cover with both an allowed valence and bond lengths (stability can be
#: scored), sorted by atomic number: H B C N O F Si P S Cl As Br I.
DEFAULT_ELEMENTS: tuple[str, ...] = tuple(
    sorted(set(ALLOWED_VALENCE) & set(BOND_LENGTHS_PM[1]), key=SYMBOL_TO_Z.__getitem__))

#: Why a record is skipped (report key -> description), in the order the checks run.
SKIP_REASONS: dict[str, str] = {
    "unreadable": "RDKit cannot parse the record, or it has no atoms",
    "unsupported_element": "an element outside the allowed vocabulary",
    "too_large": "more atoms than max_atoms",
    "not_3d": "no 3D coordinates (2D record, or every z is 0)",
    "implicit_hydrogens": "hydrogens not written as atoms",
    "multiple_fragments": "more than one fragment (salt, mixture)",
    "sanitization": "RDKit sanitization fails (valence, aromaticity)",
    "unsupported_bond": "a bond other than single/double/triple/aromatic",
    "duplicate_conformer": "same geometry as a kept conformer of the same molecule",
}

_EXAMPLES_PER_REASON = 3
_PROGRESS_EVERY = 10_000
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class SDFDataError(ValueError):
    """An SD file or option that gives no usable dataset (a one-line message)."""


# ---------------------------------------------------------------------------------------- options
def parse_elements(text: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"H,C,N,Cl"`` (or a sequence of symbols) -> symbols sorted by atomic number; ``None`` stays
    ``None`` (the default vocabulary). Raises :class:`SDFDataError` for something not an element."""
    if text is None:
        return None
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else [str(s).strip() for s in text]
    items = [s for s in items if s]
    if not items:
        raise SDFDataError("--elements lists no element")
    try:
        symbols = to_symbols(items)
    except UnknownElementError as exc:
        raise SDFDataError(f"--elements: {exc}") from None
    return tuple(sorted(set(symbols), key=SYMBOL_TO_Z.__getitem__))


def parse_split(text: str | Sequence[float] | None) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` -> fractions of molecules in train / valid / test (summing to 1)."""
    if text is None:
        return DEFAULT_SPLIT
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = tuple(float(x) for x in items)
    except ValueError:
        raise SDFDataError(f"--split must be three numbers like 0.8,0.1,0.1, got {text!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values):
        raise SDFDataError(f"--split must be three non-negative fractions (train,valid,test), got {text!r}")
    if abs(sum(values) - 1.0) > 1e-6 or values[0] <= 0:
        raise SDFDataError(f"--split fractions must add up to 1 with a non-empty train part, got {text!r}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class SDFOptions:
    """How an SD file becomes a dataset (all part of the cache key).

    ``elements``: allowed vocabulary (``None``: :data:`DEFAULT_ELEMENTS`); ``split``: fractions of
    molecules in train / valid / test; ``seed``: of the split; ``group_by``: ``"smiles"`` (canonical
    SMILES with stereo from the 3D geometry) or ``"inchikey"``."""

    max_atoms: int = DEFAULT_MAX_ATOMS
    elements: tuple[str, ...] | None = None
    split: tuple[float, float, float] = DEFAULT_SPLIT
    seed: int = 0
    group_by: str = "smiles"

    def __post_init__(self):
        if not 1 <= int(self.max_atoms) <= _MAX_ATOMS_LIMIT:
            raise SDFDataError(f"--max-atoms must be in 1..{_MAX_ATOMS_LIMIT}, got {self.max_atoms}")
        if self.group_by not in ("smiles", "inchikey"):
            raise SDFDataError(f"group_by must be smiles or inchikey, got {self.group_by!r}")
        object.__setattr__(self, "elements", parse_elements(self.elements))
        object.__setattr__(self, "split", parse_split(self.split))

    @property
    def allowed(self) -> tuple[str, ...]:
        return self.elements if self.elements is not None else DEFAULT_ELEMENTS

    def to_dict(self) -> dict:
        return {"max_atoms": int(self.max_atoms), "elements": None if self.elements is None else list(self.elements),
                "split": list(self.split), "seed": int(self.seed), "group_by": self.group_by}

    @classmethod
    def from_dict(cls, d: dict) -> "SDFOptions":
        return cls(int(d["max_atoms"]), d.get("elements"), tuple(d["split"]), int(d["seed"]), d.get("group_by", "smiles"))


# ---------------------------------------------------------------------------------------- report
@dataclass
class SDFReport:
    """What reading an SD file kept and skipped (printed by ``moldiff data sdf``)."""

    source: str
    records: int = 0
    kept: int = 0
    molecules: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {k: 0 for k in SKIP_REASONS})
    #: up to three ``"record K ('title'): detail"`` lines per skip reason
    examples: dict[str, list[str]] = field(default_factory=dict)
    elements: list[str] = field(default_factory=list)
    element_counts: list[int] = field(default_factory=list)
    #: atoms per conformer: min, median, mean, max (and the same for conformers per molecule)
    atoms: dict[str, float] = field(default_factory=dict)
    conformers_per_molecule: dict[str, float] = field(default_factory=dict)
    charged_atoms: int = 0
    #: split name -> [molecules, conformers]
    split: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0

    def skip(self, reason: str, record: int, title: str, detail: str) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < _EXAMPLES_PER_REASON:
            shown.append(f"record {record} ({title!r}): {detail}" if title else f"record {record}: {detail}")

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def lines(self) -> list[str]:
        out = [f"{self.source}: {self.records} records, kept {self.kept} conformers of {self.molecules} molecules, "
               f"skipped {self.num_skipped}"]
        for reason, count in self.skipped.items():
            if count:
                out.append(f"  skipped {reason}: {count} ({SKIP_REASONS[reason]})")
                out.extend(f"    e.g. {e}" for e in self.examples.get(reason, []))
        if self.kept:
            total = sum(self.element_counts)
            out.append("elements: " + ", ".join(f"{e} {c} ({100 * c / total:.2f}%)"
                                                for e, c in zip(self.elements, self.element_counts)))
            a, c = self.atoms, self.conformers_per_molecule
            out.append(f"atoms per conformer: min {a['min']:g}, median {a['median']:g}, mean {a['mean']:.1f}, "
                       f"max {a['max']:g}; conformers per molecule: min {c['min']:g}, median {c['median']:g}, "
                       f"max {c['max']:g}; charged atoms {self.charged_atoms}")
            out.append("split by molecule: " + ", ".join(f"{k} {m} molecules / {n} conformers"
                                                         for k, (m, n) in self.split.items()))
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SDFReport":
        report = cls(d["source"])
        for key, value in d.items():
            setattr(report, key, value)
        report.skipped = {k: int(d["skipped"].get(k, 0)) for k in SKIP_REASONS}
        return report


def _summary(values: np.ndarray) -> dict[str, float]:
    values = np.asarray(values)
    return {"min": float(values.min()), "median": float(np.median(values)), "mean": float(values.mean()),
            "max": float(values.max())}


# ---------------------------------------------------------------------------------------- dataset
@dataclass(frozen=True)
class SDFDataset:
    """The kept conformers of an SD file as flat arrays (the layout of :class:`~moldiff.data.qm9.QM9`).

    Attributes:
        name: the cache name; source: the SD file it was read from; key: the cache key.
        elements: the vocabulary, symbols sorted by atomic number (only elements present).
        ptr: ``(C + 1,)`` int64 atom offsets of the C conformers.
        atom_types: ``(A,)`` int8 indices into ``elements``.
        positions: ``(A, 3)`` float32 coordinates in Å, as in the file.
        bonds: bond orders 1-3 of the kekulized molecules (``source`` all 0) with every atom's formal
            charge (``bonds.charges``, ``(A,)`` int8).
        molecule: ``(C,)`` int64 molecule of each conformer (into ``keys``).
        keys: ``(M,)`` molecule keys (canonical SMILES or InChIKey), in order of first appearance.
        titles: ``(C,)`` record titles (first line of each record).
        molecule_split: ``(M,)`` int8 split of each molecule (0 train, 1 valid, 2 test).
        order: ``(M,)`` int64 the seeded order of the molecules the split was cut from.
        options: the :class:`SDFOptions` used; report: the :class:`SDFReport` of the build.
    """

    name: str
    source: str
    key: str
    elements: tuple[str, ...]
    ptr: np.ndarray
    atom_types: np.ndarray
    positions: np.ndarray
    bonds: BondTable
    molecule: np.ndarray
    keys: np.ndarray
    titles: np.ndarray
    molecule_split: np.ndarray
    order: np.ndarray
    options: SDFOptions
    report: SDFReport
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.molecule)

    @property
    def num_atoms(self) -> np.ndarray:
        """``(C,)`` atoms per conformer."""
        return np.diff(self.ptr)

    @property
    def num_molecules(self) -> int:
        return len(self.keys)

    @property
    def formal_charges(self) -> np.ndarray:
        """``(A,)`` int8 formal charge of every atom."""
        return self.bonds.charges

    @property
    def atomic_numbers(self) -> list[int]:
        """Atomic number of each type index (the ``charges`` feature of :class:`MoleculeSet`)."""
        return [SYMBOL_TO_Z[e] for e in self.elements]

    def molecule_at(self, k: int) -> tuple[list[str], np.ndarray]:
        """``(symbols, positions (n, 3) Å)`` of conformer ``k``."""
        lo, hi = self.ptr[k], self.ptr[k + 1]
        return [self.elements[t] for t in self.atom_types[lo:hi]], self.positions[lo:hi].astype(np.float64)

    def molecules(self, which=None):
        """Iterate ``(symbols, positions)`` over conformers ``which`` (default: all)."""
        for k in range(len(self)) if which is None else which:
            yield self.molecule_at(int(k))

    def split_indices(self, split: str) -> np.ndarray:
        """Conformer positions of ``split`` ("train", "valid", "test"), molecule after molecule in the
        split's seeded order (conformers of one molecule in file order)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        rank = np.empty(len(self.order), dtype=np.int64)
        rank[self.order] = np.arange(len(self.order))
        conformer_rank = rank[self.molecule]
        by_rank = np.argsort(conformer_rank, kind="stable")
        keep = self.molecule_split[self.molecule[by_rank]] == SPLITS.index(split)
        return by_rank[keep]

    def training_sets(self, max_train: int | None = None, max_valid: int | None = None,
                      labels: bool = False) -> tuple[MoleculeSet, MoleculeSet, DatasetStatistics]:
        """The train and valid splits as :class:`MoleculeSet` (first ``max_*`` conformers each) and the
        training split's statistics; ``labels``: batches carry bond orders and formal charges, and the
        statistics count them."""
        train_idx = self.split_indices("train")[:max_train]
        valid_idx = self.split_indices("valid")[:max_valid]
        bonds = self.bonds if labels else None
        z = self.atomic_numbers
        train = MoleculeSet(self.ptr, self.atom_types, self.positions, z, train_idx, bonds=bonds)
        valid = MoleculeSet(self.ptr, self.atom_types, self.positions, z, valid_idx, bonds=bonds)
        atoms = _gather_rows(self.ptr, train_idx)
        formal = orders = None
        if labels:
            formal = self.bonds.charges[atoms]
            orders = self.bonds.orders[_gather_rows(self.bonds.ptr, train_idx)]
        stats = compute_statistics(self.elements, train.num_atoms, self.atom_types[atoms], formal, orders)
        return train, valid, stats

    def as_pyg(self):
        """The conformers as a torch-geometric ``InMemoryDataset`` of ``Data`` objects
        (:class:`moldiff.data.pyg.MoleculeGraphs`; ``pos``, ``z``, ``types``, ``formal_charge``,
        ``edge_index``/``edge_attr`` both directions, ``mol_id``)."""
        from moldiff.data.pyg import MoleculeGraphs

        return MoleculeGraphs(self.ptr, self.atom_types, self.positions, self.atomic_numbers, bonds=self.bonds,
                              molecule=self.molecule)


def _gather_rows(ptr: np.ndarray, which: np.ndarray) -> np.ndarray:
    """Row indices ``ptr[k]:ptr[k+1]`` of every ``k`` in ``which``, concatenated."""
    which = np.asarray(which, dtype=np.int64)
    starts, counts = ptr[which], ptr[which + 1] - ptr[which]
    first = np.cumsum(counts) - counts
    return np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(starts - first, counts)


# ---------------------------------------------------------------------------------------- reading
def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_key(content_hash: str, options: SDFOptions) -> str:
    material = {"version": SDF_CACHE_VERSION, "content": content_hash, "options": options.to_dict(),
                "rdkit": rdBase.rdkitVersion}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _check_file(path: Path) -> None:
    if not path.exists():
        raise SDFDataError(f"{path}: no such file")
    if not path.is_file():
        raise SDFDataError(f"{path}: not a file")
    if path.suffix.lower() != ".sdf":
        raise SDFDataError(f"{path}: expected an .sdf file")
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 16):
            if chunk.strip():
                return
    raise SDFDataError(f"{path}: empty file, no molecule records")


class _Reader:
    """Applies the checks of :data:`SKIP_REASONS` record by record and collects the kept ones."""

    def __init__(self, options: SDFOptions, report: SDFReport):
        self.options, self.report = options, report
        self.allowed = frozenset(options.allowed)
        self.symbols: list[list[str]] = []
        self.positions: list[np.ndarray] = []
        self.charges: list[np.ndarray] = []
        self.pairs: list[np.ndarray] = []
        self.orders: list[np.ndarray] = []
        self.molecule: list[int] = []
        self.titles: list[str] = []
        self.key_index: dict[str, int] = {}
        self.keys: list[str] = []
        #: molecule -> (sums of the kept conformers' distances, their distance vectors)
        self.geometries: dict[int, tuple[list[float], list[np.ndarray]]] = {}
        self._pairs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, number: int, title: str, mol) -> None:
        skip = lambda reason, detail: self.report.skip(reason, number, title, detail)  # noqa: E731
        if mol is None:
            return skip("unreadable", "RDKit cannot parse it")
        n = mol.GetNumAtoms()
        if n == 0:
            return skip("unreadable", "no atoms")
        atoms = [mol.GetAtomWithIdx(i) for i in range(n)]  # (GetAtoms() iterates through a slow Python wrapper)
        symbols = [a.GetSymbol() for a in atoms]
        outside = sorted({s for s in symbols if s not in self.allowed}, key=lambda s: SYMBOL_TO_Z.get(s, 0))
        if outside:
            return skip("unsupported_element", f"{', '.join(outside)} not in the vocabulary")
        if n > self.options.max_atoms:
            return skip("too_large", f"{n} atoms > max_atoms {self.options.max_atoms}")
        if mol.GetNumConformers() == 0:
            return skip("not_3d", "no coordinates")
        conf = mol.GetConformer()
        pos = np.asarray(conf.GetPositions(), dtype=np.float64).reshape(n, 3)
        if not conf.Is3D() or not np.any(pos[:, 2]):
            return skip("not_3d", "2D coordinates" if not conf.Is3D() else "every z coordinate is 0")
        if not np.isfinite(pos).all():
            return skip("not_3d", "non-finite coordinates")
        mol.UpdatePropertyCache(strict=False)
        hidden = sum(a.GetTotalNumHs() for a in atoms)  # implicit + counted, not H atoms
        if hidden:
            return skip("implicit_hydrogens", f"{hidden} hydrogens not written as atoms")
        fragments = len(Chem.GetMolFrags(mol))
        if fragments > 1:
            return skip("multiple_fragments", f"{fragments} fragments")
        clean = Chem.Mol(mol)
        try:
            Chem.SanitizeMol(clean)
        except Exception as exc:  # noqa: BLE001 - RDKit raises several types; the record is skipped
            return skip("sanitization", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        Chem.AssignStereochemistryFrom3D(clean)
        key = self._key(clean)
        try:
            Chem.Kekulize(clean, clearAromaticFlags=True)
        except Exception as exc:  # noqa: BLE001
            return skip("sanitization", f"cannot kekulize ({str(exc).strip().splitlines()[0] if str(exc).strip() else exc})")
        rows = []
        for bond in (clean.GetBondWithIdx(b) for b in range(clean.GetNumBonds())):
            order = bond.GetBondTypeAsDouble()
            if order not in (1.0, 2.0, 3.0):
                return skip("unsupported_bond", f"bond {bond.GetIdx() + 1} is {bond.GetBondType()}")
            i, j = sorted((bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()))
            rows.append((i, j, int(order)))
        mol_id = self.key_index.get(key)
        distances = self._distances(pos)
        if mol_id is not None and self._is_duplicate(mol_id, distances):
            return skip("duplicate_conformer", f"same geometry as a kept conformer of {key}")
        if mol_id is None:
            mol_id = self.key_index[key] = len(self.keys)
            self.keys.append(key)
        sums, vectors = self.geometries.setdefault(mol_id, ([], []))
        sums.append(float(distances.sum()))
        vectors.append(distances.astype(np.float32))
        rows.sort()
        table = np.array(rows, dtype=np.int64).reshape(-1, 3)
        self.symbols.append(symbols)
        self.positions.append(pos)
        self.charges.append(np.array([clean.GetAtomWithIdx(i).GetFormalCharge() for i in range(n)], dtype=np.int64))
        self.pairs.append(table[:, :2])
        self.orders.append(table[:, 2])
        self.molecule.append(mol_id)
        self.titles.append(title)

    def _key(self, mol) -> str:
        if self.options.group_by == "inchikey":
            key = Chem.MolToInchiKey(mol)
            if key:
                return key
        return Chem.MolToSmiles(Chem.RemoveHs(mol, sanitize=False))

    def _distances(self, pos: np.ndarray) -> np.ndarray:
        """``(n (n - 1) / 2,)`` interatomic distances, pairs ``i < j`` row by row."""
        n = len(pos)
        pairs = self._pairs.get(n)
        if pairs is None:
            pairs = self._pairs[n] = np.triu_indices(n, k=1)
        diff = pos[pairs[0]] - pos[pairs[1]]
        return np.sqrt(np.einsum("ij,ij->i", diff, diff))

    def _is_duplicate(self, mol_id: int, distances: np.ndarray) -> bool:
        sums, vectors = self.geometries[mol_id]
        total = float(distances.sum())
        # Candidates first: the distance sums of a duplicate differ by at most tolerance x pairs.
        near = np.flatnonzero(np.abs(np.asarray(sums) - total) <= DUPLICATE_TOLERANCE * max(1, distances.size))
        return any(vectors[k].shape == distances.shape
                   and float(np.abs(vectors[k] - distances).max(initial=0.0)) <= DUPLICATE_TOLERANCE for k in near)


def _split_molecules(keys: Sequence[str], fractions: tuple[float, float, float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(molecule_split (M,) int8, order (M,))``: molecules sorted by key, permuted with ``seed``, then
    cut into train / valid / test. A non-zero valid or test fraction gets at least one molecule when
    there are enough molecules to leave one for training."""
    m = len(keys)
    by_key = np.argsort(np.asarray(keys, dtype=object).astype(str), kind="stable")
    order = by_key[np.random.default_rng(seed).permutation(m)].astype(np.int64)
    sizes = [int(round(f * m)) for f in fractions[1:]]
    for k, f in enumerate(fractions[1:]):
        if f > 0 and sizes[k] == 0 and m - sum(sizes) > 1:
            sizes[k] = 1
    while sum(sizes) >= m and any(sizes):  # leave at least one training molecule
        sizes[int(np.argmax(sizes))] -= 1
    n_valid, n_test = sizes
    n_train = m - n_valid - n_test
    split = np.zeros(m, dtype=np.int8)
    split[order[n_train : n_train + n_valid]] = 1
    split[order[n_train + n_valid :]] = 2
    return split, order


def _read(path: Path, options: SDFOptions, progress: bool) -> tuple[_Reader, SDFReport]:
    report = SDFReport(str(path))
    reader = _Reader(options, report)
    start = time.perf_counter()
    with rdBase.BlockLogs():
        try:
            supplier = Chem.SDMolSupplier(str(path), sanitize=False, removeHs=False)
            total = len(supplier)
        except (OSError, RuntimeError, UnicodeDecodeError) as exc:
            raise SDFDataError(f"{path}: cannot read ({type(exc).__name__}: {exc})".splitlines()[0]) from None
        for i in range(total):
            try:
                mol = supplier[i]
            except Exception:  # noqa: BLE001 - a record RDKit chokes on is one unreadable record
                mol = None
            if mol is not None and mol.HasProp("_Name"):
                title = mol.GetProp("_Name").strip()
            else:
                try:
                    title = supplier.GetItemText(i).split("\n", 1)[0].strip()
                except Exception:  # noqa: BLE001
                    title = ""
            reader.add(i + 1, title, mol)
            if progress and total >= _PROGRESS_EVERY and ((i + 1) % _PROGRESS_EVERY == 0 or i + 1 == total):
                print(f"{path.name}: {i + 1}/{total} records, kept {len(reader.molecule)}, "
                      f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    report.records = total
    return reader, report


def _assemble(reader: _Reader, report: SDFReport, options: SDFOptions, *, name: str, source: str,
              key: str) -> SDFDataset:
    present = {s for symbols in reader.symbols for s in symbols}
    elements = tuple(sorted(present, key=SYMBOL_TO_Z.__getitem__))
    index = {s: i for i, s in enumerate(elements)}
    counts = np.array([len(s) for s in reader.symbols], dtype=np.int64)
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    bond_counts = np.array([len(o) for o in reader.orders], dtype=np.int64)
    bonds = BondTable(
        ptr=np.concatenate([[0], np.cumsum(bond_counts)]).astype(np.int64),
        pairs=np.concatenate(reader.pairs).astype(np.int16),
        orders=np.concatenate(reader.orders).astype(np.int8),
        source=np.zeros(len(counts), dtype=np.int8),
        charges=np.concatenate(reader.charges).astype(np.int8),
    )
    bonds.validate(counts)
    molecule = np.array(reader.molecule, dtype=np.int64)
    split, order = _split_molecules(reader.keys, options.split, options.seed)
    atom_types = np.fromiter((index[s] for symbols in reader.symbols for s in symbols), dtype=np.int8,
                             count=int(ptr[-1]))
    report.kept, report.molecules = len(counts), len(reader.keys)
    report.elements = list(elements)
    report.element_counts = np.bincount(atom_types, minlength=len(elements)).tolist()
    report.atoms = _summary(counts)
    report.conformers_per_molecule = _summary(np.bincount(molecule))
    report.charged_atoms = int(np.count_nonzero(bonds.charges))
    report.split = {s: [int((split == k).sum()), int((split[molecule] == k).sum())] for k, s in enumerate(SPLITS)}
    return SDFDataset(
        name=name, source=source, key=key, elements=elements, ptr=ptr, atom_types=atom_types,
        positions=np.concatenate(reader.positions).astype(np.float32), bonds=bonds, molecule=molecule,
        keys=np.array(reader.keys, dtype=str), titles=np.array(reader.titles, dtype=str),
        molecule_split=split, order=order, options=options, report=report,
    )


# ---------------------------------------------------------------------------------------- cache
def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name.lower() == "qm9":
        raise SDFDataError(f"dataset name {name!r}: use letters, digits, '.', '_' or '-' (and not qm9)")
    return name


def sdf_cache_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the dataset ``name`` is cached: ``<cache>/sdf/<name>_v{SDF_CACHE_VERSION}.npz``."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / "sdf" / f"{_check_name(name)}_v{SDF_CACHE_VERSION}.npz"


def _save(data: SDFDataset, content_hash: str, path: Path) -> None:
    meta = {"name": data.name, "source": data.source, "key": data.key, "content_hash": content_hash,
            "options": data.options.to_dict(), "report": data.report.to_dict(), "rdkit": rdBase.rdkitVersion}
    atomic_savez(
        path,
        version=np.array(SDF_CACHE_VERSION),
        meta=np.array(json.dumps(meta)),
        elements=np.array(data.elements, dtype=str),
        ptr=data.ptr,
        atom_types=data.atom_types,
        positions=data.positions,
        formal_charges=data.bonds.charges,
        bond_ptr=data.bonds.ptr,
        bond_pairs=data.bonds.pairs,
        bond_orders=data.bonds.orders,
        molecule=data.molecule,
        keys=data.keys,
        titles=data.titles,
        molecule_split=data.molecule_split,
        order=data.order,
    )


def _load(path: Path) -> tuple[SDFDataset, dict] | None:
    """The cached dataset and its metadata, or ``None`` when the file is unreadable or stale."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != SDF_CACHE_VERSION:
                return None
            meta = json.loads(str(z["meta"]))
            ptr = z["ptr"].astype(np.int64)
            bonds = BondTable(ptr=z["bond_ptr"].astype(np.int64), pairs=z["bond_pairs"].astype(np.int16),
                              orders=z["bond_orders"].astype(np.int8), source=np.zeros(len(ptr) - 1, dtype=np.int8),
                              charges=z["formal_charges"].astype(np.int8))
            bonds.validate(np.diff(ptr))
            data = SDFDataset(
                name=meta["name"], source=meta["source"], key=meta["key"],
                elements=tuple(str(e) for e in z["elements"]), ptr=ptr, atom_types=z["atom_types"].astype(np.int8),
                positions=z["positions"].astype(np.float32), bonds=bonds, molecule=z["molecule"].astype(np.int64),
                keys=z["keys"], titles=z["titles"], molecule_split=z["molecule_split"].astype(np.int8),
                order=z["order"].astype(np.int64), options=SDFOptions.from_dict(meta["options"]),
                report=SDFReport.from_dict(meta["report"]), from_cache=True,
            )
        return data, meta
    except (OSError, KeyError, ValueError, TypeError, EOFError):
        return None


def build_sdf_dataset(path: str | os.PathLike, *, name: str | None = None, cache_dir: str | os.PathLike | None = None,
                      options: SDFOptions | None = None, progress: bool = False) -> SDFDataset:
    """Read the SD file ``path`` into a dataset, or load it from the cache when the file and the
    options are unchanged; the cache is written atomically once the dataset is complete.

    Args:
        path: a ``.sdf`` file, 3D, hydrogens as atoms.
        name: cache name (default: the file's stem).
        cache_dir: cache folder (default ``default_cache_dir()``); the dataset goes to ``sdf/`` in it.
        options: :class:`SDFOptions` (default: max 200 atoms, EDM's elements, 80/10/10, seed 0).
        progress: print reading progress to stderr every 10,000 records.

    Raises:
        SDFDataError: missing, empty or unreadable file, or no usable record (the message counts the
            skip reasons).
    """
    path = Path(path).expanduser()
    options = options or SDFOptions()
    _check_file(path)
    name = _check_name(name if name is not None else path.stem)
    cache = sdf_cache_path(name, cache_dir)
    content_hash = _file_hash(path)
    key = _cache_key(content_hash, options)
    if cache.is_file():
        loaded = _load(cache)
        if loaded is not None and loaded[0].key == key:
            return loaded[0]
    t0 = time.perf_counter()
    reader, report = _read(path, options, progress)
    if not reader.molecule:
        reasons = ", ".join(f"{k} {v}" for k, v in report.skipped.items() if v) or "no records"
        raise SDFDataError(f"{path}: no usable molecules in {report.records} records (skipped: {reasons})")
    data = _assemble(reader, report, options, name=name, source=str(path.resolve()), key=key)
    report.seconds = round(time.perf_counter() - t0, 3)
    _save(data, content_hash, cache)
    return data


def is_sdf_spec(spec: str) -> bool:
    """Whether a ``data.dataset`` value names an SD file (rather than QM9 or a dataset name)."""
    return spec.strip().lower().endswith(".sdf")


def load_sdf_dataset(spec: str, cache_dir: str | os.PathLike | None = None, *, progress: bool = False) -> SDFDataset:
    """The dataset ``spec`` names: an SD file (cached under its stem; built with default options the
    first time, and rebuilt with the cached options when the file changed) or the name of a dataset
    built by ``moldiff data sdf`` (rebuilt from its source file if that file changed since).

    Raises:
        SDFDataError: no such file or dataset, or a file without usable molecules.
    """
    if is_sdf_spec(spec):
        path = Path(spec).expanduser()
        _check_file(path)
        cache = sdf_cache_path(path.stem, cache_dir)
        loaded = _load(cache) if cache.is_file() else None
        if loaded is not None and loaded[1].get("content_hash") == _file_hash(path):
            return loaded[0]
        options = loaded[0].options if loaded is not None else None
        return build_sdf_dataset(path, name=path.stem, cache_dir=cache_dir, options=options, progress=progress)
    cache = sdf_cache_path(spec, cache_dir)
    loaded = _load(cache) if cache.is_file() else None
    if loaded is None:
        where = cache.parent
        raise SDFDataError(f"unknown dataset {spec!r}: not qm9, not an .sdf file, and no dataset of that name in "
                           f"{where} (build it with `moldiff data sdf FILE --name {spec}`)")
    data, meta = loaded
    source = Path(data.source)
    if source.is_file() and meta.get("content_hash") != _file_hash(source):
        print(f"{source} changed since dataset {spec!r} was built: rebuilding it", file=sys.stderr, flush=True)
        return build_sdf_dataset(source, name=spec, cache_dir=cache_dir, options=data.options, progress=progress)
    return data
