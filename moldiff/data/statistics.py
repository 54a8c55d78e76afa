"""Dataset statistics the model samples from: the size distribution p(N), element frequencies and
the compositions (formulas) of the training molecules.

The training split's reference SMILES for novelty live here too (built once, cached on disk).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["DatasetStatistics", "compute_statistics", "reference_smiles_cached"]


@dataclass
class DatasetStatistics:
    """``size_counts[N]`` = number of training molecules with N atoms; ``element_counts`` per type;
    ``formula_counts``: one row per distinct composition, the number of atoms of each element
    (in ``elements`` order) followed by the number of training molecules with that composition
    (empty for statistics saved before compositions were recorded)."""

    elements: tuple[str, ...]
    size_counts: list[int]
    element_counts: list[int]
    formula_counts: list[list[int]] = field(default_factory=list)

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
        return {"elements": list(self.elements), "size_counts": list(self.size_counts), "element_counts": list(self.element_counts),
                "formula_counts": [list(r) for r in self.formula_counts]}

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetStatistics":
        return cls(tuple(d["elements"]), [int(x) for x in d["size_counts"]], [int(x) for x in d["element_counts"]],
                   [[int(x) for x in r] for r in d.get("formula_counts", [])])


def compute_statistics(elements, num_atoms: np.ndarray, atom_types: np.ndarray) -> DatasetStatistics:
    """From per-molecule atom counts ``(M,)`` and all atom type indices ``(A,)`` of the training
    split (molecule after molecule, as ``num_atoms`` orders them)."""
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
    return DatasetStatistics(tuple(elements), sizes.tolist(), counts.tolist(), formulas)


def reference_smiles_cached(path: Path, build) -> set[str]:
    """Load a cached SMILES set from ``path`` (JSON list) or build it with ``build()`` and cache it."""
    path = Path(path)
    if path.is_file():
        try:
            return set(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass  # corrupt cache: rebuild
    smiles = sorted(build())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(smiles, fh)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return set(smiles)
