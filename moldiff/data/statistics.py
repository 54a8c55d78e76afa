"""Dataset statistics the model samples from: the size distribution p(N) and element frequencies.

The training split's reference SMILES for novelty live here too (built once, cached on disk).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DatasetStatistics", "compute_statistics", "reference_smiles_cached"]


@dataclass
class DatasetStatistics:
    """``size_counts[N]`` = number of training molecules with N atoms; ``element_counts`` per type."""

    elements: tuple[str, ...]
    size_counts: list[int]
    element_counts: list[int]

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

    def to_dict(self) -> dict:
        return {"elements": list(self.elements), "size_counts": list(self.size_counts), "element_counts": list(self.element_counts)}

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetStatistics":
        return cls(tuple(d["elements"]), [int(x) for x in d["size_counts"]], [int(x) for x in d["element_counts"]])


def compute_statistics(elements, num_atoms: np.ndarray, atom_types: np.ndarray) -> DatasetStatistics:
    """From per-molecule atom counts ``(M,)`` and all atom type indices ``(A,)`` of the training split."""
    sizes = np.bincount(np.asarray(num_atoms), minlength=1)
    counts = np.bincount(np.asarray(atom_types, dtype=np.int64), minlength=len(elements))
    return DatasetStatistics(tuple(elements), sizes.tolist(), counts.tolist())


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
