"""Flat-graph batches of molecules (PyG layout: concatenated atoms plus a ``batch`` vector).

Batches are gathered straight from the dataset's flat arrays with index arithmetic, which is
much cheaper than building one ``torch_geometric.data.Data`` object per molecule and collating.
Epoch order is a pure function of ``(seed, epoch)``, so a run resumed from a checkpoint that
recorded ``(epoch, position)`` continues with exactly the batches it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moldiff.geometry import remove_mean

__all__ = ["MoleculeBatch", "MoleculeSet", "epoch_order"]


@dataclass
class MoleculeBatch:
    """A batch: ``pos`` ``(n, 3)`` Å centred per molecule, ``types`` ``(n,)`` element indices,
    ``charges`` ``(n,)`` atomic numbers, ``batch`` ``(n,)`` sorted molecule indices, ``num_graphs``."""

    pos: torch.Tensor
    types: torch.Tensor
    charges: torch.Tensor
    batch: torch.Tensor
    num_graphs: int

    def to(self, device) -> "MoleculeBatch":
        return MoleculeBatch(
            self.pos.to(device), self.types.to(device), self.charges.to(device), self.batch.to(device), self.num_graphs
        )


class MoleculeSet:
    """A subset of a flat molecule store (e.g. the QM9 training split) that yields batches.

    Args:
        ptr: ``(M + 1,)`` atom offsets; atom_types ``(A,)``; positions ``(A, 3)`` Å;
        atomic_numbers: ``(num_types,)`` atomic number of each type index (the "charge" feature);
        indices: which molecules (positions into ``ptr``) belong to this set.
    """

    def __init__(self, ptr, atom_types, positions, atomic_numbers, indices):
        self.ptr = np.asarray(ptr, dtype=np.int64)
        self.atom_types = np.asarray(atom_types, dtype=np.int64)
        self.positions = np.asarray(positions, dtype=np.float32)
        self.atomic_numbers = np.asarray(atomic_numbers, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)

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
        return MoleculeBatch(pos, types, torch.from_numpy(self.atomic_numbers[self.atom_types[atoms]]), batch, len(mols))

    def batches(self, batch_size: int, seed: int, epoch: int, start: int = 0, drop_last: bool = True):
        """Yield ``(position_in_epoch, MoleculeBatch)`` for one shuffled epoch, from batch ``start``."""
        order = epoch_order(len(self), seed, epoch)
        n_batches = len(order) // batch_size if drop_last else -(-len(order) // batch_size)
        for b in range(start, n_batches):
            yield b, self.batch(order[b * batch_size : (b + 1) * batch_size])


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of ``n`` items in ``epoch`` for run ``seed`` (deterministic)."""
    return np.random.default_rng([seed, epoch]).permutation(n)
