"""Dataset statistics the model samples from: the size distribution p(N), element frequencies, the
compositions (formulas) of the training molecules, and (for categorical diffusion) the frequencies
of formal charges and of bond classes over all atom pairs.

The training split's reference SMILES for novelty live here too (built once, cached on disk).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moldiff.files import atomic_write

__all__ = ["DatasetStatistics", "compute_statistics", "reference_smiles_cached"]


@dataclass
class DatasetStatistics:
    """``size_counts[N]`` = number of training molecules with N atoms; ``element_counts`` per type;
    ``formula_counts``: one row per distinct composition, the number of atoms of each element
    (in ``elements`` order) followed by the number of training molecules with that composition
    (empty for statistics saved before compositions were recorded).

    Optional, recorded when the training data had the labels (empty otherwise, and in statistics
    saved before they were recorded): ``charge_counts``, rows ``[formal charge, number of training
    atoms with it]`` for every charge seen, ascending; ``bond_counts[k]``, the number of unordered
    atom pairs ``i < j`` of the training molecules with bond order ``k`` (0: no bond, 1-3)."""

    elements: tuple[str, ...]
    size_counts: list[int]
    element_counts: list[int]
    formula_counts: list[list[int]] = field(default_factory=list)
    charge_counts: list[list[int]] = field(default_factory=list)
    bond_counts: list[int] = field(default_factory=list)

    @property
    def max_atoms(self) -> int:
        return max(i for i, c in enumerate(self.size_counts) if c > 0)

    def size_distribution(self) -> np.ndarray:
        """p(N) as a float64 array indexed by N."""
        c = np.asarray(self.size_counts, dtype=np.float64)
        return c / c.sum()

    def element_frequencies(self) -> dict[str, float]:
        c = np.asarray(self.element_counts, dtype=np.float64)
        return {e: float(f) for e, f in zip(self.elements, c / c.sum())}

    def type_marginals(self) -> np.ndarray:
        """``(len(elements),)`` float64 fraction of training atoms of each element."""
        c = np.asarray(self.element_counts, dtype=np.float64)
        return c / c.sum()

    def charge_marginals(self, values) -> np.ndarray:
        """``(len(values),)`` float64 fraction of training atoms with each formal charge in ``values``.
        Raises ``ValueError`` when no charges are recorded or the data has a charge not in ``values``."""
        if not self.charge_counts:
            raise ValueError("these dataset statistics hold no formal charges (train with charge labels)")
        counts = {int(q): int(c) for q, c in self.charge_counts}
        other = sorted(q for q, c in counts.items() if c and q not in values)
        if other:
            raise ValueError(f"the training data has formal charges {other} outside the classes {list(values)}")
        c = np.array([counts.get(int(q), 0) for q in values], dtype=np.float64)
        return c / c.sum()

    def bond_marginals(self, num_classes: int) -> np.ndarray:
        """``(num_classes,)`` float64 fraction of the training molecules' atom pairs in each bond class
        (0: no bond). Raises ``ValueError`` when no bond counts are recorded or some bond's order is
        ``num_classes`` or more."""
        if not self.bond_counts:
            raise ValueError("these dataset statistics hold no bond counts (train with bond labels)")
        if any(self.bond_counts[num_classes:]):
            raise ValueError(f"the training data has bond orders of {num_classes} or more")
        c = np.zeros(num_classes, dtype=np.float64)
        c[: len(self.bond_counts)] = self.bond_counts[:num_classes]
        return c / c.sum()

    def sample_sizes(self, n: int, rng: np.random.Generator, min_atoms: int = 1) -> np.ndarray:
        """Draw ``n`` molecule sizes from p(N | N >= min_atoms); raises if that set is empty."""
        p = self.size_distribution().copy()
        p[:min_atoms] = 0.0
        if p.sum() == 0:
            raise ValueError(f"the training data has no molecules with at least {min_atoms} atoms")
        return rng.choice(len(p), size=n, p=p / p.sum())

    def sample_compositions(self, sizes: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """One composition per requested size, drawn from the training molecules of that size:
        ``(len(elements),)`` int arrays of atoms per element. Raises ``ValueError`` when no
        compositions are recorded or no training molecule has one of the sizes."""
        if not self.formula_counts:
            raise ValueError("these dataset statistics hold no compositions (saved by an older moldiff)")
        table = np.asarray(self.formula_counts, dtype=np.int64)
        comp, weight = table[:, :-1], table[:, -1].astype(np.float64)
        total = comp.sum(1)
        out = []
        for n in np.asarray(sizes, dtype=np.int64):
            rows = np.flatnonzero(total == n)
            if rows.size == 0:
                raise ValueError(f"no training molecule has {int(n)} atoms, so there is no composition to draw")
            out.append(comp[rng.choice(rows, p=weight[rows] / weight[rows].sum())].copy())
        return out

    def to_dict(self) -> dict:
        d = {"elements": list(self.elements), "size_counts": list(self.size_counts), "element_counts": list(self.element_counts),
             "formula_counts": [list(r) for r in self.formula_counts]}
        if self.charge_counts:  # only when recorded, so older statistics save as they did
            d["charge_counts"] = [list(r) for r in self.charge_counts]
        if self.bond_counts:
            d["bond_counts"] = list(self.bond_counts)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetStatistics":
        return cls(tuple(d["elements"]), [int(x) for x in d["size_counts"]], [int(x) for x in d["element_counts"]],
                   [[int(x) for x in r] for r in d.get("formula_counts", [])],
                   [[int(x) for x in r] for r in d.get("charge_counts", [])],
                   [int(x) for x in d.get("bond_counts", [])])


def compute_statistics(elements, num_atoms: np.ndarray, atom_types: np.ndarray, formal_charges: np.ndarray | None = None,
                       bond_orders: np.ndarray | None = None) -> DatasetStatistics:
    """From per-molecule atom counts ``(M,)`` and all atom type indices ``(A,)`` of the training
    split (molecule after molecule, as ``num_atoms`` orders them); optionally every atom's formal
    charge ``(A,)`` and the orders (1-3) of all bonds of those molecules ``(P,)`` (each bond once):
    the pairs without a bond are the other ``N (N - 1) / 2 - bonds`` pairs of each molecule."""
    num_atoms = np.asarray(num_atoms, dtype=np.int64)
    atom_types = np.asarray(atom_types, dtype=np.int64)
    if int(num_atoms.sum()) != len(atom_types):
        raise ValueError(f"{len(atom_types)} atom types for molecules of {int(num_atoms.sum())} atoms in all")
    sizes = np.bincount(num_atoms, minlength=1)
    counts = np.bincount(atom_types, minlength=len(elements))
    mol = np.repeat(np.arange(len(num_atoms)), num_atoms)
    per_mol = np.zeros((len(num_atoms), len(elements)), dtype=np.int64)
    np.add.at(per_mol, (mol, atom_types), 1)
    comps, freq = np.unique(per_mol, axis=0, return_counts=True)
    formulas = [[*map(int, c), int(f)] for c, f in zip(comps, freq)]
    charge_counts: list[list[int]] = []
    if formal_charges is not None:
        formal_charges = np.asarray(formal_charges, dtype=np.int64)
        if formal_charges.shape != atom_types.shape:
            raise ValueError(f"{len(formal_charges)} formal charges for {len(atom_types)} atoms")
        values, freq = np.unique(formal_charges, return_counts=True)
        charge_counts = [[int(v), int(f)] for v, f in zip(values, freq)]
    bond_counts: list[int] = []
    if bond_orders is not None:
        bond_orders = np.asarray(bond_orders, dtype=np.int64)
        if bond_orders.size and bond_orders.min() < 1:
            raise ValueError("bond orders must be 1 or more (pairs without a bond are counted here)")
        pairs = int((num_atoms * (num_atoms - 1) // 2).sum())
        if bond_orders.size > pairs:
            raise ValueError(f"{bond_orders.size} bonds in molecules with {pairs} atom pairs")
        bond_counts = np.bincount(bond_orders, minlength=4).tolist()
        bond_counts[0] = pairs - int(bond_orders.size)
    return DatasetStatistics(tuple(elements), sizes.tolist(), counts.tolist(), formulas, charge_counts, bond_counts)


def coordinate_spread(ptr: np.ndarray, positions: np.ndarray, indices: np.ndarray | None = None) -> float:
    """Per-coordinate standard deviation (Å) of the molecules' positions about each molecule's
    centroid, pooled over atoms, for molecules ``indices`` (all when ``None``) of a flat store
    (``ptr`` offsets, ``positions`` ``(A, 3)``): the ``model.pos_skip_std`` of a model trained on them."""
    ptr = np.asarray(ptr, dtype=np.int64)
    sizes = np.diff(ptr)
    which = np.arange(len(sizes)) if indices is None else np.asarray(indices, dtype=np.int64)
    if not len(which):
        raise ValueError("no molecules to measure the coordinate spread of")
    mol = np.repeat(which, sizes[which])
    rows = np.concatenate([np.arange(ptr[m], ptr[m + 1]) for m in which])
    pos = np.asarray(positions, dtype=np.float64)[rows]
    sums = np.zeros((len(sizes), 3))
    np.add.at(sums, mol, pos)
    centred = pos - (sums / np.maximum(sizes, 1)[:, None])[mol]
    return float(np.sqrt(np.mean(centred**2)))


def reference_smiles_cached(path: Path, build) -> set[str]:
    """Load a cached SMILES set from ``path`` (JSON list) or build it with ``build()`` and cache it."""
    path = Path(path)
    if path.is_file():
        try:
            return set(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass  # corrupt cache: rebuild
    smiles = sorted(build())
    atomic_write(path, lambda handle: json.dump(smiles, handle))
    return set(smiles)
