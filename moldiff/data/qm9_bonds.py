"""Per-molecule bond-order and formal-charge labels for QM9 (training targets for models that
generate bonds, or categorical formal charges).

Each molecule's labels are :func:`~moldiff.chemistry.bonds.kekule_bond_labels`: RDKit's
``DetermineBonds`` (total charge 0) as one Kekulé structure with the formal charges it assigns, or
EDM's distance table (charges 0) where RDKit finds no bond orders. Bonds are stored sparsely, bonds
only, in one flat table indexed like the QM9 store, charges one per atom of the store, and cached
as ``qm9_bonds_v{BONDS_CACHE_VERSION}.npz`` next to the QM9 cache (about
half a minute to a minute on one core the first time).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from moldiff.chemistry.bonds import kekule_bond_labels
from moldiff.chemistry.elements import QM9_ELEMENTS
from moldiff.data.qm9 import CACHE_VERSION, atomic_savez, default_cache_dir

__all__ = ["BONDS_CACHE_VERSION", "BondTable", "bond_table", "load_qm9_bonds"]

#: Version of the bond-label cache format and labelling rule; bump it to invalidate old caches.
#: 2: per-atom formal charges added.
BONDS_CACHE_VERSION = 2

_PROGRESS_EVERY = 10_000


@dataclass(frozen=True)
class BondTable:
    """Bond-order labels of M molecules as flat arrays (bonds of molecule ``k``: ``ptr[k]:ptr[k+1]``).

    Attributes:
        ptr: ``(M + 1,)`` int64 offsets into ``pairs`` / ``orders``.
        pairs: ``(B, 2)`` int16 atom indices local to their molecule, ``i < j``, rows sorted.
        orders: ``(B,)`` int8 bond orders 1, 2 or 3.
        source: ``(M,)`` int8 label source: 0 RDKit ``DetermineBonds``, 1 EDM-table fallback.
        charges: ``(A,)`` int8 formal charge of every atom of the store (atoms of all M molecules,
            in store order: molecule ``k``'s atoms are its ``num_atoms[k]`` consecutive entries),
            or ``None`` (a table built without charges).
    """

    ptr: np.ndarray
    pairs: np.ndarray
    orders: np.ndarray
    source: np.ndarray
    charges: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.source)

    def molecule(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(pairs (b, 2) local indices, orders (b,))`` of molecule ``k``."""
        lo, hi = self.ptr[k], self.ptr[k + 1]
        return self.pairs[lo:hi], self.orders[lo:hi]

    def validate(self, num_atoms: np.ndarray | None = None) -> None:
        """Raise ``ValueError`` unless the arrays are consistent (and fit ``num_atoms`` per molecule)."""
        m = len(self.source)
        if self.ptr.shape != (m + 1,) or self.source.ndim != 1:
            raise ValueError(f"ptr must have shape ({m + 1},), got {self.ptr.shape}")
        b = len(self.orders)
        if self.pairs.shape != (b, 2) or self.orders.shape != (b,):
            raise ValueError(f"pairs {self.pairs.shape} and orders {self.orders.shape} disagree")
        if self.ptr[0] != 0 or self.ptr[-1] != b or np.any(np.diff(self.ptr) < 0):
            raise ValueError("ptr must rise from 0 to the number of bonds")
        if b and (self.orders.min() < 1 or self.orders.max() > 3):
            raise ValueError("bond orders must be 1, 2 or 3")
        if m and (self.source.min() < 0 or self.source.max() > 1):
            raise ValueError("source codes must be 0 or 1")
        if b and (self.pairs[:, 0].min() < 0 or np.any(self.pairs[:, 0] >= self.pairs[:, 1])):
            raise ValueError("pairs must be non-negative with i < j")
        if num_atoms is not None:
            num_atoms = np.asarray(num_atoms)
            if num_atoms.shape != (m,):
                raise ValueError(f"{m} molecules in the table, {len(num_atoms)} in the data")
            per_bond = np.repeat(num_atoms, np.diff(self.ptr))
            if np.any(self.pairs[:, 1] >= per_bond):
                raise ValueError("a bond points past the last atom of its molecule")
            if self.charges is not None and self.charges.shape != (int(num_atoms.sum()),):
                raise ValueError(f"{len(self.charges)} formal charges for {int(num_atoms.sum())} atoms")


def bond_table(
    ptr: np.ndarray,
    atom_types: np.ndarray,
    positions: np.ndarray,
    elements: Sequence[str],
    progress: bool = False,
) -> BondTable:
    """Bond-order labels of every molecule of a flat store (the layout of :class:`~moldiff.data.qm9.QM9`).

    Args:
        ptr: ``(M + 1,)`` atom offsets; atoms of molecule ``k`` are ``ptr[k]:ptr[k+1]``.
        atom_types: ``(A,)`` int indices into ``elements``.
        positions: ``(A, 3)`` coordinates in Å.
        elements: element symbol of each type index.
        progress: print a progress line to stderr every 10,000 molecules.

    Returns:
        The :class:`BondTable` of the M molecules, in store order, with formal charges.
    """
    ptr = np.asarray(ptr, dtype=np.int64)
    types = np.asarray(atom_types, dtype=np.int64)
    pos = np.asarray(positions, dtype=np.float64)
    table = np.asarray(list(elements), dtype=object)
    m = len(ptr) - 1
    counts = np.zeros(m, dtype=np.int64)
    source = np.zeros(m, dtype=np.int8)
    pairs: list[np.ndarray] = []
    orders: list[np.ndarray] = []
    charges = np.zeros(len(types), dtype=np.int8)
    start = time.perf_counter()
    for k in range(m):
        lo, hi = ptr[k], ptr[k + 1]
        matrix, charges[lo:hi], source[k] = kekule_bond_labels(table[types[lo:hi]].tolist(), pos[lo:hi])
        i, j = np.nonzero(np.triu(matrix, k=1))  # row-major: sorted by (i, j)
        counts[k] = len(i)
        pairs.append(np.stack([i, j], axis=1))
        orders.append(matrix[i, j])
        if progress and ((k + 1) % _PROGRESS_EVERY == 0 or k + 1 == m):
            elapsed = time.perf_counter() - start
            print(
                f"bond labels: {k + 1}/{m} molecules, {elapsed:.0f} s, "
                f"{int(source[: k + 1].sum())} EDM-table fallbacks",
                file=sys.stderr,
                flush=True,
            )
    result = BondTable(
        ptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        pairs=np.concatenate(pairs).astype(np.int16) if pairs else np.zeros((0, 2), dtype=np.int16),
        orders=np.concatenate(orders).astype(np.int8) if orders else np.zeros(0, dtype=np.int8),
        source=source,
        charges=charges,
    )
    result.validate(np.diff(ptr))
    return result


class _FlatStore(Protocol):
    ptr: np.ndarray
    atom_types: np.ndarray
    positions: np.ndarray

    def __len__(self) -> int: ...


def _bonds_cache_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / f"qm9_bonds_v{BONDS_CACHE_VERSION}.npz"


def _save_bonds(table: BondTable, num_atoms: np.ndarray, path: Path) -> None:
    atomic_savez(
        path,
        version=np.array(BONDS_CACHE_VERSION),
        qm9_cache_version=np.array(CACHE_VERSION),
        num_atoms=np.asarray(num_atoms, dtype=np.int64),
        ptr=table.ptr,
        pairs=table.pairs,
        orders=table.orders,
        source=table.source,
        charges=table.charges,
    )


def _load_bonds(path: Path, num_atoms: np.ndarray) -> BondTable | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != BONDS_CACHE_VERSION or int(z["qm9_cache_version"]) != CACHE_VERSION:
                return None
            if not np.array_equal(z["num_atoms"], num_atoms):
                return None  # labels of other molecules
            table = BondTable(
                ptr=z["ptr"].astype(np.int64, copy=False),
                pairs=z["pairs"].astype(np.int16, copy=False),
                orders=z["orders"].astype(np.int8, copy=False),
                source=z["source"].astype(np.int8, copy=False),
                charges=z["charges"].astype(np.int8, copy=False),
            )
        table.validate(num_atoms)
        return table
    except (OSError, KeyError, ValueError, EOFError):
        return None  # unreadable, stale or inconsistent cache: rebuild


def load_qm9_bonds(
    qm9: _FlatStore, cache_dir: str | os.PathLike | None = None, *, progress: bool = False
) -> BondTable:
    """Bond-order labels of every molecule of ``qm9``, from the cache (built on first use).

    Args:
        qm9: a :class:`~moldiff.data.qm9.QM9` (or any object with ``ptr``, ``atom_types``,
            ``positions``, ``len()`` and optionally ``elements``).
        cache_dir: folder of ``qm9_bonds_v{BONDS_CACHE_VERSION}.npz`` (default ``default_cache_dir()``).
        progress: print labelling progress to stderr when the cache has to be built.

    Returns:
        The :class:`BondTable`, indexed like ``qm9``. A cache that is unreadable, of another
        version, or does not fit ``qm9`` (molecule count, atoms per molecule) is rebuilt.
    """
    path = _bonds_cache_path(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    num_atoms = np.diff(np.asarray(qm9.ptr, dtype=np.int64))
    if len(num_atoms) != len(qm9):
        raise ValueError(f"ptr describes {len(num_atoms)} molecules but the data has {len(qm9)}")
    if path.is_file():
        table = _load_bonds(path, num_atoms)
        if table is not None:
            return table
    elements = getattr(qm9, "elements", QM9_ELEMENTS)
    table = bond_table(qm9.ptr, qm9.atom_types, qm9.positions, elements, progress=progress)
    _save_bonds(table, num_atoms, path)
    return table
