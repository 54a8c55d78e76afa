"""QM9 (130,831 molecules, B3LYP/6-31G(2df,p) geometries) from the ``qm9pack`` wheel's CSVs.

The CSVs are read directly (``import qm9pack`` pulls in ``pkg_resources``, which recent setuptools
no longer ship). The first call parses them (about a minute on one core) and writes a versioned
``.npz`` cache; later calls load the cache in well under a second.

Data facts (Ramakrishnan et al., Sci. Data 1, 140022 (2014)): coordinates in Å; dipole ``mu`` in
Debye; isotropic polarizability ``alpha`` in bohr^3; ``homo``, ``lumo``, ``gap`` in hartree;
heat capacity ``cv`` in cal/(mol K). 3,054 of the 133,885 original molecules failed a consistency
check and are not in the data, leaving 130,831.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moldiff.chemistry.elements import QM9_ELEMENTS
from moldiff.files import atomic_write
from moldiff.chemistry.metrics import reference_smiles_set
from moldiff.data.statistics import reference_smiles_cached

__all__ = [
    "QM9",
    "QM9_NUM_MOLECULES",
    "QM9_PROPERTIES",
    "CACHE_VERSION",
    "default_cache_dir",
    "edm_split",
    "load_qm9",
    "qm9pack_csv_dir",
    "training_smiles",
]

QM9_NUM_MOLECULES = 130_831
CACHE_VERSION = 1

#: property name -> (qm9pack CSV column, unit)
QM9_PROPERTIES: dict[str, tuple[str, str]] = {
    "mu": ("Dipole_debye", "D"),
    "alpha": ("Polarizability_bohr3", "bohr^3"),
    "homo": ("HOMO_au", "Ha"),
    "lumo": ("LUMO_au", "Ha"),
    "gap": ("HOMO_LUMO_gap_au", "Ha"),
    "cv": ("Heatcapacity_Cv_cal_mol_K", "cal/(mol K)"),
    "r2": ("R2_bohr2", "bohr^2"),
    "zpve": ("ZPVE_au", "Ha"),
    "u0": ("InternalEnergy_0K_au", "Ha"),
}

_EDM_SPLIT_SIZES = (100_000, 17_748, 13_083)  # train, valid, test


@dataclass(frozen=True)
class QM9:
    """All of QM9 as flat arrays, molecules ordered by QM9 index.

    Attributes:
        index: ``(M,)`` int, the QM9 index (1..133885) of each molecule.
        ptr: ``(M + 1,)`` int64 offsets; atoms of molecule ``k`` are ``ptr[k]:ptr[k+1]``.
        atom_types: ``(A,)`` int8 indices into ``elements`` (QM9: H C N O F).
        positions: ``(A, 3)`` float64, Å, as in the DFT geometry (not centred).
        smiles: ``(M,)`` the dataset's SMILES strings (GDB-17 / relaxed-geometry SMILES).
        properties: name -> ``(M,)`` float64, units in ``QM9_PROPERTIES``.
    """

    index: np.ndarray
    ptr: np.ndarray
    atom_types: np.ndarray
    positions: np.ndarray
    smiles: np.ndarray
    properties: dict[str, np.ndarray]
    elements: tuple[str, ...] = QM9_ELEMENTS

    def __len__(self) -> int:
        return len(self.index)

    @property
    def num_atoms(self) -> np.ndarray:
        """``(M,)`` atoms per molecule."""
        return np.diff(self.ptr)

    def molecule(self, k: int) -> tuple[list[str], np.ndarray]:
        """``(symbols, positions (n, 3) Å)`` of molecule ``k`` (0-based position, not QM9 index)."""
        lo, hi = self.ptr[k], self.ptr[k + 1]
        return [self.elements[t] for t in self.atom_types[lo:hi]], self.positions[lo:hi]

    def molecules(self, which: np.ndarray | None = None):
        """Iterate ``(symbols, positions)`` over positions ``which`` (default: all)."""
        for k in range(len(self)) if which is None else which:
            yield self.molecule(int(k))


def edm_split(num_molecules: int = QM9_NUM_MOLECULES) -> dict[str, np.ndarray]:
    """The EDM / Cormorant split of QM9 as positions into the index-ordered molecule list.

    Facts from EDM's data preparation (Hoogeboom et al. 2022, inherited from Cormorant):
    ``np.random.seed(0)``, one ``np.random.permutation(130831)``; the first 100,000 entries are
    train, the next 17,748 valid, the last 13,083 test (test = int(0.1 * 130831)).
    """
    if num_molecules != QM9_NUM_MOLECULES:
        raise ValueError(f"the EDM split is defined for {QM9_NUM_MOLECULES} molecules, got {num_molecules}")
    perm = np.random.RandomState(0).permutation(num_molecules)  # same stream as np.random.seed(0)
    n_train, n_valid, _ = _EDM_SPLIT_SIZES
    return {
        "train": perm[:n_train],
        "valid": perm[n_train : n_train + n_valid],
        "test": perm[n_train + n_valid :],
    }


def qm9pack_csv_dir() -> Path:
    """Folder holding the qm9pack CSVs, found without importing the package."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("QM9 data not found: install it with `pip install qm9pack`")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not (folder / "qm9_part1.csv").is_file():
        raise FileNotFoundError(f"qm9pack is installed but its CSVs are missing in {folder}")
    return folder


def default_cache_dir() -> Path:
    """``~/.cache/moldiff``; callers (the CLI honours ``$MOLDIFF_CACHE``) may pass their own."""
    return Path.home() / ".cache" / "moldiff"


def _parse_floats(text: str) -> list[float]:
    # "[[0.,1.2E-3,...],[...]]": drop brackets, split on commas; float() accepts "0." and E-notation.
    return [float(tok) for tok in text.replace("[", " ").replace("]", " ").split(",")]


def _parse_symbols(text: str) -> list[str]:
    return [tok.strip().strip("'\"") for tok in text.strip("[]").split(",")]


def _parse_csvs(folder: Path, progress: bool) -> QM9:
    sym_to_type = {s: i for i, s in enumerate(QM9_ELEMENTS)}
    rows = []
    parts = sorted(folder.glob("qm9_part*.csv"))
    if not parts:
        raise FileNotFoundError(f"no qm9_part*.csv in {folder}")
    csv.field_size_limit(sys.maxsize)
    for part in parts:
        if progress:
            print(f"parsing {part.name} ...", file=sys.stderr, flush=True)
        with open(part, newline="") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                symbols = _parse_symbols(row["Elements"])
                coords = _parse_floats(row["XYZ_Ang"])
                n = int(row["N_atoms"])
                if len(symbols) != n or len(coords) != 3 * n:
                    raise ValueError(f"QM9 index {row['Index']}: {n} atoms but {len(symbols)} symbols, {len(coords)} coordinates")
                rows.append(
                    (
                        int(row["Index"]),
                        [sym_to_type[s] for s in symbols],
                        coords,
                        row["SMILES"],
                        [float(row[col]) for col, _ in QM9_PROPERTIES.values()],
                    )
                )
    rows.sort(key=lambda r: r[0])
    counts = np.array([len(r[1]) for r in rows], dtype=np.int64)
    ptr = np.concatenate([[0], np.cumsum(counts)])
    props = np.array([r[4] for r in rows], dtype=np.float64)
    data = QM9(
        index=np.array([r[0] for r in rows], dtype=np.int64),
        ptr=ptr,
        atom_types=np.fromiter((t for r in rows for t in r[1]), dtype=np.int8, count=int(ptr[-1])),
        positions=np.fromiter((c for r in rows for c in r[2]), dtype=np.float64, count=3 * int(ptr[-1])).reshape(-1, 3),
        smiles=np.array([r[3] for r in rows]),
        properties={name: props[:, j] for j, name in enumerate(QM9_PROPERTIES)},
    )
    if len(data) != QM9_NUM_MOLECULES or len(np.unique(data.index)) != len(data):
        raise ValueError(f"expected {QM9_NUM_MOLECULES} distinct molecules in qm9pack, found {len(data)}")
    return data


def _cache_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / f"qm9_v{CACHE_VERSION}.npz"


def atomic_savez(path: Path, **arrays) -> None:
    """``np.savez`` to ``path`` atomically (:func:`moldiff.files.atomic_write`): a reader never sees
    half a file, and a failed write leaves the old file in place."""
    atomic_write(path, lambda handle: np.savez(handle, **arrays), binary=True)


def _save(data: QM9, path: Path) -> None:
    atomic_savez(
        path,
        version=np.array(CACHE_VERSION),
        index=data.index,
        ptr=data.ptr,
        atom_types=data.atom_types,
        positions=data.positions,
        smiles=data.smiles,
        **{f"prop_{k}": v for k, v in data.properties.items()},
    )


def _load(path: Path) -> QM9 | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != CACHE_VERSION:
                return None
            return QM9(
                index=z["index"],
                ptr=z["ptr"],
                atom_types=z["atom_types"],
                positions=z["positions"],
                smiles=z["smiles"],
                properties={k[5:]: z[k] for k in z.files if k.startswith("prop_")},
            )
    except (OSError, KeyError, ValueError):
        return None  # unreadable or stale cache: rebuild


def load_qm9(cache_dir: str | os.PathLike | None = None, *, progress: bool = False) -> QM9:
    """All 130,831 QM9 molecules, from the processed cache (built on first use).

    Args:
        cache_dir: where the ``qm9_v{CACHE_VERSION}.npz`` cache lives (default ``default_cache_dir()``).
        progress: print parsing progress to stderr when the cache has to be built.
    """
    path = _cache_path(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    if path.is_file():
        data = _load(path)
        if data is not None:
            return data
    data = _parse_csvs(qm9pack_csv_dir(), progress)
    _save(data, path)
    return data


#: The novelty reference shipped in the package (``scripts/build_novelty_reference.py``): the
#: training SMILES of :func:`training_smiles`, with the RDKit version that canonicalised them.
SHIPPED_REFERENCE = Path(__file__).with_name("qm9_train_smiles.json.gz")


def shipped_training_smiles(path: str | os.PathLike | None = None) -> set[str] | None:
    """The shipped novelty reference, or ``None`` when it is missing, unreadable, or was written by
    another RDKit version or cache version (canonical SMILES can change between RDKit releases, so
    only an exact match is trusted; otherwise the reference is rebuilt from QM9)."""
    from rdkit import rdBase

    try:
        with gzip.open(path or SHIPPED_REFERENCE, "rt", encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError, EOFError):
        return None
    if not isinstance(doc, dict) or doc.get("rdkit") != rdBase.rdkitVersion or doc.get("cache_version") != CACHE_VERSION:
        return None
    return set(doc["smiles"])


def write_shipped_training_smiles(smiles, path: str | os.PathLike) -> None:
    """Write ``smiles`` as a reference :func:`shipped_training_smiles` accepts (byte-reproducible)."""
    from rdkit import rdBase

    doc = {"cache_version": CACHE_VERSION, "rdkit": rdBase.rdkitVersion, "split": "EDM train",
           "count": len(smiles), "smiles": sorted(smiles)}
    def write(raw):
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as fh:
            fh.write(json.dumps(doc, separators=(",", ":")).encode("utf-8"))

    atomic_write(path, write, binary=True)


def training_smiles(cache_dir: str | os.PathLike | None = None, *, workers: int = 1, data: QM9 | None = None,
                    use_shipped: bool = True, on_build=None) -> set[str]:
    """SMILES of the EDM training split built as EDM builds its novelty reference.

    Read from ``qm9_train_smiles_v{CACHE_VERSION}.json`` in the cache folder when present; else,
    with ``use_shipped``, from the reference shipped in the package when it was written by the
    installed RDKit version (:func:`shipped_training_smiles`); else built and cached: 100,000
    table-bonded molecules sanitized, about a minute per core (``on_build()`` is called first).
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = folder / f"qm9_train_smiles_v{CACHE_VERSION}.json"
    if use_shipped and data is None and not cached.is_file():
        shipped = shipped_training_smiles()
        if shipped is not None:
            return shipped

    def build():
        if on_build is not None:
            on_build()
        qm9 = data if data is not None else load_qm9(folder)
        return reference_smiles_set(qm9.molecules(edm_split(len(qm9))["train"]), workers=workers)

    return reference_smiles_cached(cached, build)
