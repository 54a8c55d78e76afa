"""Geometry diagnostics that move before stability does (for comparing training recipes).

All inputs are ``(symbols, positions)`` pairs, positions ``(n, 3)`` in Å. numpy + RDKit-free.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from .bonds import edm_bond_matrix, pairwise_distances
from .elements import to_symbols, valence_sum_parity

__all__ = ["geometry_diagnostics", "bond_lengths", "has_planar_six_ring", "CLOSE_CONTACT_ANGSTROM", "RING_PLANARITY_ANGSTROM"]

CLOSE_CONTACT_ANGSTROM = 0.9  #: no two atoms of a real QM9 molecule are closer than ~0.96 Å (O-H)
RING_PLANARITY_ANGSTROM = 0.1  #: RMS distance from the best plane below which a six-ring counts as flat

#: bond types (element pair, EDM-table order) whose lengths are compared with the data
TRACKED_BONDS = (("C", "H", 1), ("C", "C", 1), ("C", "C", 2), ("C", "N", 1), ("C", "O", 1), ("C", "O", 2), ("N", "H", 1), ("O", "H", 1))


def _key(a: str, b: str, order: int) -> tuple[str, str, int]:
    return (*sorted((a, b)), order)


def bond_lengths(molecules: Iterable[tuple[Sequence[object], np.ndarray]]) -> dict[tuple[str, str, int], np.ndarray]:
    """Lengths (Å) of every table-bonded pair, grouped by (sorted element pair, bond order)."""
    out: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for symbols, pos in molecules:
        pos = np.asarray(pos, dtype=np.float64)
        if len(pos) < 2 or not np.isfinite(pos).all():
            continue
        sym = to_symbols(symbols)
        orders = edm_bond_matrix(sym, pos)
        d = pairwise_distances(pos)
        i, j = np.nonzero(np.triu(orders))
        for a, b in zip(i, j):
            out[_key(sym[a], sym[b], int(orders[a, b]))].append(float(d[a, b]))
    return {k: np.asarray(v) for k, v in out.items()}


def _six_cycles(adj: list[set[int]], nodes: set[int]):
    """Every simple 6-cycle within ``nodes`` of the graph ``adj``, each once (smallest atom first)."""
    for start in sorted(nodes):
        stack = [(start, [start])]
        while stack:
            atom, path = stack.pop()
            for nxt in adj[atom]:
                if nxt not in nodes or nxt < start:
                    continue
                if len(path) == 6:
                    if nxt == start and path[1] < path[-1]:  # each ring once, not in both directions
                        yield path
                    continue
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))


def has_planar_six_ring(symbols: Sequence[object], positions: np.ndarray, orders: np.ndarray | None = None) -> bool:
    """Whether the molecule holds an aromatic-like ring, judged from geometry alone: six C/N atoms
    bonded in a cycle (EDM distance table), each C bonded to exactly three atoms and each N to two
    or three, lying within :data:`RING_PLANARITY_ANGSTROM` (RMS) of their best plane. Benzene,
    pyridine and pyrimidine rings qualify; cyclohexane (puckered, four-coordinated carbons) does not.

    Why it is tracked: EDM's table reads 1.39-1.40 Å ring bonds as single bonds, so molecules with such
    rings score far lower stability (QM9's own: ``scripts/aromatic_rings.py``), and a sampler can
    raise the stability numbers by not making them.
    """
    sym = to_symbols(symbols)
    pos = np.asarray(positions, dtype=np.float64)
    if orders is None:
        orders = edm_bond_matrix(sym, pos)
    bonded = np.asarray(orders) > 0
    degree = bonded.sum(axis=1)
    nodes = {i for i, s in enumerate(sym) if (s == "C" and degree[i] == 3) or (s == "N" and degree[i] in (2, 3))}
    if len(nodes) < 6:
        return False
    adj = [set(np.nonzero(row)[0].tolist()) for row in bonded]
    for ring in _six_cycles(adj, nodes):
        p = pos[ring] - pos[ring].mean(axis=0)
        if np.linalg.svd(p, compute_uv=False)[-1] / np.sqrt(6) < RING_PLANARITY_ANGSTROM:
            return True
    return False


def geometry_diagnostics(molecules: Sequence[tuple[Sequence[object], np.ndarray]], reference: Sequence[tuple[Sequence[object], np.ndarray]] | None = None) -> dict:
    """Fractions of molecules in one piece, with close contacts, and whose composition has an odd
    valence sum (``odd_valence``: no geometry can make them stable, see
    :func:`~moldiff.chemistry.elements.valence_sum_parity`) and with a flat, aromatic-like six-ring
    (``planar_six_ring``, :func:`has_planar_six_ring`; 3.3% of QM9's training molecules); with a ``reference`` set (e.g.
    500 training molecules): per bond type the sample's mean and std of lengths next to the data's,
    and the total-variation distance between element frequencies.
    """
    one_piece = close = n_fragments = counted = odd = rings = 0
    elements: Counter[str] = Counter()
    for symbols, pos in molecules:
        pos = np.asarray(pos, dtype=np.float64)
        counted += 1
        if len(pos) < 2 or not np.isfinite(pos).all():
            continue
        sym = to_symbols(symbols)
        elements.update(sym)
        odd += valence_sum_parity(sym) == 1
        d = pairwise_distances(pos)
        np.fill_diagonal(d, np.inf)
        close += bool((d < CLOSE_CONTACT_ANGSTROM).any())
        orders = edm_bond_matrix(sym, pos)
        rings += has_planar_six_ring(sym, pos, orders)
        adj = csr_matrix(orders > 0)
        k, _ = connected_components(adj, directed=False)
        n_fragments += k
        one_piece += k == 1
    out = {
        "n": counted,
        "one_piece": one_piece / max(1, counted),
        "mean_fragments": n_fragments / max(1, counted),
        "close_contact": close / max(1, counted),
        "odd_valence": odd / max(1, counted),
        "planar_six_ring": rings / max(1, counted),
    }
    if reference is not None:
        ref_elements: Counter[str] = Counter()
        for symbols, _ in reference:
            ref_elements.update(to_symbols(symbols))
        keys = sorted(set(elements) | set(ref_elements))
        p = np.array([elements[k] for k in keys], dtype=float)
        q = np.array([ref_elements[k] for k in keys], dtype=float)
        out["element_tv"] = 0.5 * float(np.abs(p / max(p.sum(), 1) - q / max(q.sum(), 1)).sum())
        got, want = bond_lengths(molecules), bond_lengths(reference)
        for a, b, order in TRACKED_BONDS:
            k = _key(a, b, order)
            name = f"{k[0]}{'-=#'[order - 1]}{k[1]}"
            if k in got and len(got[k]) and k in want:
                out[f"bond_{name}_mean_err"] = float(got[k].mean() - want[k].mean())
                out[f"bond_{name}_std"] = float(got[k].std())
                out[f"bond_{name}_std_data"] = float(want[k].std())
    return out
