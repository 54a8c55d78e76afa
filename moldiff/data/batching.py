"""Flat-graph batches of molecules (PyG layout: concatenated atoms plus a ``batch`` vector).

Batches are gathered straight from the dataset's flat arrays with index arithmetic, which is
much cheaper than building one ``torch_geometric.data.Data`` object per molecule and collating.
Epoch order is a pure function of ``(seed, epoch)``, so a run resumed from a checkpoint that
recorded ``(epoch, position)`` continues with exactly the batches it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from moldiff.geometry import remove_mean

if TYPE_CHECKING:
    from moldiff.data.qm9_bonds import BondTable

__all__ = ["MoleculeBatch", "MoleculeSet", "epoch_order"]


@dataclass
class MoleculeBatch:
    """A batch: ``pos`` ``(n, 3)`` Å centred per molecule, ``types`` ``(n,)`` element indices,
    ``charges`` ``(n,)`` atomic numbers, ``batch`` ``(n,)`` sorted molecule indices, ``num_graphs``,
    and optionally ``bonds`` ``(P, 3)`` int64 rows ``[i, j, order]``: one per bond, ``i < j`` indices
    into the batch's atoms (the rows of ``pos``), order 1-3; ``None`` when the set has no bond labels;
    and optionally ``formal_charges`` ``(n,)`` int64 (RDKit's, from the same labels; ``None`` without);
    and optionally ``targets`` ``(B, P)`` float64 per-molecule property targets (EDM's,
    :func:`moldiff.data.properties.edm_targets`; ``None`` when the set has none)."""

    pos: torch.Tensor
    types: torch.Tensor
    charges: torch.Tensor
    batch: torch.Tensor
    num_graphs: int
    bonds: torch.Tensor | None = None
    formal_charges: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    def to(self, device) -> "MoleculeBatch":
        return MoleculeBatch(
            self.pos.to(device),
            self.types.to(device),
            self.charges.to(device),
            self.batch.to(device),
            self.num_graphs,
            None if self.bonds is None else self.bonds.to(device),
            None if self.formal_charges is None else self.formal_charges.to(device),
            None if self.targets is None else self.targets.to(device),
        )


class MoleculeSet:
    """A subset of a flat molecule store (e.g. the QM9 training split) that yields batches.

    Args:
        ptr: ``(M + 1,)`` atom offsets; atom_types ``(A,)``; positions ``(A, 3)`` Å;
        atomic_numbers: ``(num_types,)`` atomic number of each type index (the "charge" feature);
        indices: which molecules (positions into ``ptr``) belong to this set;
        bonds: optional bond-order labels of the whole store (indexed like ``ptr``, not like
        ``indices``); when given, every batch carries them as ``MoleculeBatch.bonds`` (and the
        table's formal charges, if it has them, as ``MoleculeBatch.formal_charges``);
        targets: optional ``(M, P)`` per-molecule property targets of the whole store (indexed like
        ``ptr``); when given, every batch carries its molecules' rows as ``MoleculeBatch.targets``.
    """

    def __init__(self, ptr, atom_types, positions, atomic_numbers, indices, *, bonds: BondTable | None = None,
                 targets: np.ndarray | None = None):
        self.ptr = np.asarray(ptr, dtype=np.int64)
        self.atom_types = np.asarray(atom_types, dtype=np.int64)
        self.positions = np.asarray(positions, dtype=np.float32)
        self.atomic_numbers = np.asarray(atomic_numbers, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        self._bond_ptr = self._bond_pairs = self._bond_orders = self._formal_charges = None
        self.targets = None if targets is None else np.asarray(targets, dtype=np.float64)
        if self.targets is not None and (self.targets.ndim != 2 or len(self.targets) != len(self.ptr) - 1):
            raise ValueError(f"targets must have one row per molecule of the store ({len(self.ptr) - 1}), "
                             f"got shape {self.targets.shape}")
        if bonds is not None:
            if len(bonds.ptr) != len(self.ptr):
                raise ValueError(f"bond table has {len(bonds.ptr) - 1} molecules, the store {len(self.ptr) - 1}")
            # Shared, not copied (the compact int16/int8 store); batch() widens only the rows it gathers.
            self._bond_ptr = np.asarray(bonds.ptr, dtype=np.int64)
            self._bond_pairs, self._bond_orders = bonds.pairs, bonds.orders
            if bonds.charges is not None:
                if len(bonds.charges) != len(self.atom_types):
                    raise ValueError(f"{len(bonds.charges)} formal charges for a store of {len(self.atom_types)} atoms")
                self._formal_charges = bonds.charges

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def num_atoms(self) -> np.ndarray:
        """``(len(self),)`` atoms per molecule in this set."""
        return self.ptr[self.indices + 1] - self.ptr[self.indices]

    def batch(self, which: np.ndarray) -> MoleculeBatch:
        """Batch of the set's molecules at positions ``which`` (into this set, not the store)."""
        mols = self.indices[np.asarray(which, dtype=np.int64)]
        starts, ends = self.ptr[mols], self.ptr[mols + 1]
        counts = ends - starts
        offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        atoms = np.arange(counts.sum()) + offsets
        batch = torch.from_numpy(np.repeat(np.arange(len(mols)), counts))
        types = torch.from_numpy(self.atom_types[atoms])
        pos = remove_mean(torch.from_numpy(self.positions[atoms]), batch, len(mols))
        charges = torch.from_numpy(self.atomic_numbers[self.atom_types[atoms]])
        bonds = None if self._bond_ptr is None else torch.from_numpy(self._gather_bonds(mols, counts))
        formal = None
        if self._formal_charges is not None:
            formal = torch.from_numpy(self._formal_charges[atoms].astype(np.int64))
        targets = None if self.targets is None else torch.from_numpy(self.targets[mols])
        return MoleculeBatch(pos, types, charges, batch, len(mols), bonds, formal, targets)

    def _gather_bonds(self, mols: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """``(P, 3)`` int64 ``[i, j, order]`` of molecules ``mols`` (store positions) with ``counts``
        atoms each, local atom indices shifted to the molecule's first row in the batch."""
        lo, hi = self._bond_ptr[mols], self._bond_ptr[mols + 1]
        n_bonds = hi - lo
        first_bond = np.cumsum(n_bonds) - n_bonds  # each molecule's first row in the output
        rows = np.arange(n_bonds.sum()) + np.repeat(lo - first_bond, n_bonds)
        first_atom = np.repeat(np.cumsum(counts) - counts, n_bonds)
        out = np.empty((len(rows), 3), dtype=np.int64)
        out[:, :2] = self._bond_pairs[rows] + first_atom[:, None]
        out[:, 2] = self._bond_orders[rows]
        return out

    def batches(self, batch_size: int, seed: int, epoch: int, start: int = 0, drop_last: bool = True):
        """Yield ``(position_in_epoch, MoleculeBatch)`` for one shuffled epoch, from batch ``start``."""
        order = epoch_order(len(self), seed, epoch)
        n_batches = len(order) // batch_size if drop_last else -(-len(order) // batch_size)
        for b in range(start, n_batches):
            yield b, self.batch(order[b * batch_size : (b + 1) * batch_size])


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of ``n`` items in ``epoch`` for run ``seed`` (deterministic)."""
    return np.random.default_rng([seed, epoch]).permutation(n)
