"""A flat molecule store (QM9, an SDF dataset) seen as a torch-geometric ``InMemoryDataset``.

PyG keeps an in-memory dataset as one collated ``Data`` plus per-attribute slice offsets, which is
exactly the layout of moldiff's flat stores (``ptr`` offsets into concatenated atoms), so the view is
built from the arrays without copying molecule by molecule and without a second processed file: the
store's own versioned ``.npz`` cache is the processed cache. ``dataset[k]`` is a ``Data`` of molecule
(conformer) ``k``; ``torch_geometric.loader.DataLoader`` or ``Batch.from_data_list`` batch them.

Training does not go through this view: gathering a batch straight from the flat arrays
(:meth:`moldiff.data.batching.MoleculeSet.batch`) is faster; ``scripts/bench_batching.py`` measures
by how much (docs/own_data.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch_geometric.data import Data, InMemoryDataset

if TYPE_CHECKING:
    from moldiff.data.qm9_bonds import BondTable

__all__ = ["MoleculeGraphs"]


class MoleculeGraphs(InMemoryDataset):
    """Molecules of a flat store as PyG ``Data`` objects.

    Args:
        ptr: ``(M + 1,)`` atom offsets; atom_types: ``(A,)`` element indices; positions: ``(A, 3)`` Å;
        atomic_numbers: ``(num_types,)`` atomic number of each element index;
        bonds: optional :class:`~moldiff.data.qm9_bonds.BondTable` indexed like ``ptr``: adds
            ``edge_index`` ``(2, 2b)`` (each bond in both directions, local atom indices) and
            ``edge_attr`` ``(2b,)`` bond orders 1-3, and with charges ``formal_charge`` ``(n,)``;
        molecule: optional ``(M,)`` id of the molecule each entry is a conformer of (``mol_id``).

    Each ``Data`` holds ``pos`` ``(n, 3)`` float32 (as stored, not centred), ``types`` ``(n,)`` element
    indices and ``z`` ``(n,)`` atomic numbers, plus the optional attributes above.
    """

    def __init__(self, ptr, atom_types, positions, atomic_numbers, *, bonds: BondTable | None = None,
                 molecule=None, transform=None):
        super().__init__(None, transform)
        ptr = torch.from_numpy(np.asarray(ptr, dtype=np.int64))
        types = torch.from_numpy(np.asarray(atom_types, dtype=np.int64))
        z = torch.as_tensor(np.asarray(atomic_numbers, dtype=np.int64))[types]
        data = Data(pos=torch.from_numpy(np.ascontiguousarray(positions, dtype=np.float32)), types=types, z=z)
        slices = {"pos": ptr, "types": ptr, "z": ptr}
        if bonds is not None:
            pairs = np.asarray(bonds.pairs, dtype=np.int64)
            # bond r -> edges 2r (i -> j) and 2r + 1 (j -> i): a molecule's edges stay contiguous
            edges = np.stack([pairs, pairs[:, ::-1]], axis=1).reshape(-1, 2)
            data.edge_index = torch.from_numpy(np.ascontiguousarray(edges.T))
            data.edge_attr = torch.from_numpy(np.repeat(np.asarray(bonds.orders, dtype=np.int64), 2))
            edge_ptr = torch.from_numpy(2 * np.asarray(bonds.ptr, dtype=np.int64))
            slices["edge_index"] = slices["edge_attr"] = edge_ptr
            if bonds.charges is not None:
                data.formal_charge = torch.from_numpy(np.asarray(bonds.charges, dtype=np.int64))
                slices["formal_charge"] = ptr
        if molecule is not None:
            data.mol_id = torch.from_numpy(np.asarray(molecule, dtype=np.int64))
            slices["mol_id"] = torch.arange(len(ptr), dtype=torch.int64)
        self._data, self.slices = data, slices

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)})"
