"""Geometry on flat batches of point clouds (the leaf of the package).

A batch of molecules is one flat tensor of atom positions ``pos`` of shape ``(n_atoms, 3)`` (Å)
plus a ``batch`` vector of shape ``(n_atoms,)`` giving each atom's molecule index, as in PyG.
Everything here is plain torch; no other moldiff module is imported.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "edge_bond_orders",
    "scatter_sum",
    "scatter_mean",
    "remove_mean",
    "num_nodes_per_graph",
    "fully_connected_edges",
    "reverse_edges",
    "parse_graph",
    "radius_edges",
    "knn_edges",
    "graph_edges",
    "random_rotation",
    "random_orthogonal",
    "kabsch_align",
    "optimal_rotations",
]


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Sum rows of ``src`` (shape ``(n, *f)``) into ``dim_size`` groups given by ``index`` (shape ``(n,)``)."""
    out = src.new_zeros((dim_size, *src.shape[1:]))
    return out.index_add_(0, index, src)


def num_nodes_per_graph(batch: torch.Tensor, num_graphs: int | None = None) -> torch.Tensor:
    """Atoms per molecule, shape ``(num_graphs,)``, from a batch vector of shape ``(n,)``."""
    if num_graphs is None:
        num_graphs = int(batch.max()) + 1 if batch.numel() else 0
    return torch.bincount(batch, minlength=num_graphs)


def scatter_mean(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Mean of rows of ``src`` per group; groups without members give 0."""
    total = scatter_sum(src, index, dim_size)
    count = torch.bincount(index, minlength=dim_size).clamp(min=1).to(src.dtype)
    return total / count.view(-1, *([1] * (src.dim() - 1)))


def remove_mean(pos: torch.Tensor, batch: torch.Tensor, num_graphs: int | None = None) -> torch.Tensor:
    """Project positions ``(n, 3)`` onto the zero centre-of-mass subspace of each molecule.

    "Centre of mass" follows EDM: the unweighted centroid of the atoms.
    """
    if num_graphs is None:
        num_graphs = int(batch.max()) + 1 if batch.numel() else 0
    return pos - scatter_mean(pos, batch, num_graphs)[batch]


def fully_connected_edges(batch: torch.Tensor) -> torch.Tensor:
    """All ordered pairs ``(i, j)``, ``i != j``, within each molecule of a batch.

    ``batch`` must be sorted (atoms of one molecule contiguous), as PyG batches are.
    Returns ``edge_index`` of shape ``(2, sum_k n_k (n_k - 1))``; no edges cross molecules.
    """
    device = batch.device
    counts = torch.bincount(batch)
    starts = torch.cumsum(counts, 0) - counts
    # For each molecule build its n x n grid without materialising a global n_atoms^2 mask.
    sizes = counts.repeat_interleave(counts)  # per atom: size of its molecule
    src = torch.arange(batch.numel(), device=device).repeat_interleave(sizes)
    # offsets 0..n_k-1 for every (atom, partner) slot
    first = starts.repeat_interleave(counts).repeat_interleave(sizes)
    slot = torch.arange(src.numel(), device=device) - torch.repeat_interleave(
        torch.cumsum(sizes, 0) - sizes, sizes
    )
    dst = first + slot
    keep = src != dst
    return torch.stack([src[keep], dst[keep]])


def reverse_edges(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``(E,)`` index of the reverse edge ``j -> i`` of every edge ``i -> j``.

    Every edge's reverse must be present (as in :func:`fully_connected_edges`); raises otherwise.
    """
    row, col = edge_index
    key = row * num_nodes + col
    order = torch.argsort(key)
    pos = torch.searchsorted(key[order], col * num_nodes + row).clamp(max=max(key.numel() - 1, 0))
    rev = order[pos]
    if key.numel() and not bool((key[rev] == col * num_nodes + row).all()):
        raise ValueError("edge_index is not symmetric: some edge has no reverse")
    return rev


def edge_bond_orders(bonds: torch.Tensor, edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``(E,)`` bond order of every directed edge of ``fully_connected_edges`` (sorted by source,
    then target), from a batch's bond rows ``[i, j, order]`` ``(P, 3)``; 0 where there is no bond."""
    row, col = edge_index
    key = row * num_nodes + col
    labels = torch.zeros_like(row)
    if bonds.numel():
        i, j, order = bonds.to(row.device).long().unbind(-1)
        for a, b in ((i, j), (j, i)):
            at = torch.searchsorted(key, a * num_nodes + b)
            if bool((at >= key.numel()).any()) or not bool((key[at] == a * num_nodes + b).all()):
                raise ValueError("a bond joins atoms of different molecules or an atom to itself")
            labels[at] = order
    return labels


def random_orthogonal(
    num: int | None = None,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    reflect: bool | None = None,
) -> torch.Tensor:
    """Haar-random 3x3 orthogonal matrices, shape ``(3, 3)`` or ``(num, 3, 3)``.

    ``reflect=None`` draws proper and improper matrices with equal probability; ``True`` forces
    det = -1, ``False`` forces det = +1.
    """
    shape = (1 if num is None else num, 3, 3)
    a = torch.randn(shape, generator=generator, dtype=dtype)
    q, r = torch.linalg.qr(a)
    # Fix the sign ambiguity of QR so that q is Haar-distributed.
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    det = torch.linalg.det(q)
    if reflect is None:
        flip = torch.rand(shape[0], generator=generator, dtype=dtype) < 0.5
        want = torch.where(flip, -1.0, 1.0).to(dtype)
    else:
        want = torch.full((shape[0],), -1.0 if reflect else 1.0, dtype=dtype)
    q[:, :, 0] = q[:, :, 0] * (want * det).unsqueeze(-1)
    return q[0] if num is None else q


def random_rotation(
    num: int | None = None, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Haar-random proper rotations (det = +1), shape ``(3, 3)`` or ``(num, 3, 3)``."""
    return random_orthogonal(num, generator=generator, dtype=dtype, reflect=False)


def optimal_rotations(mobile: torch.Tensor, target: torch.Tensor, batch: torch.Tensor, num_graphs: int,
                      allow_reflection: bool = False) -> torch.Tensor:
    """Kabsch, per molecule: the rotation ``R`` ``(B, 3, 3)`` minimising ``sum_i |R mobile_i - target_i|^2``
    (proper unless ``allow_reflection``). Both point sets ``(n, 3)`` must already be centred per
    molecule. The one implementation in torch; :func:`moldiff.chemistry.fragments.kabsch_rmsd` is
    its numpy twin for the torch-free chemistry layer."""
    cov = scatter_sum(mobile.unsqueeze(-1) * target.unsqueeze(-2), batch, num_graphs)  # (B, 3, 3) = sum m t^T
    u, _, vt = torch.linalg.svd(cov.double())
    d = torch.ones(u.shape[:-1], dtype=u.dtype, device=u.device)
    if not allow_reflection:
        sign = torch.sign(torch.linalg.det(vt.transpose(-1, -2) @ u.transpose(-1, -2)))
        d[..., 2] = torch.where(sign == 0, torch.ones_like(sign), sign)
    rot = vt.transpose(-1, -2) @ torch.diag_embed(d) @ u.transpose(-1, -2)
    return rot.to(mobile.dtype)


def kabsch_align(mobile: torch.Tensor, target: torch.Tensor, allow_reflection: bool = False):
    """Best rigid superposition of ``mobile`` onto ``target`` (both ``(n, 3)``, Å).

    Returns ``(aligned, rmsd)``: ``mobile`` rotated and translated onto ``target`` and the RMSD (Å).
    """
    mc, tc = mobile.mean(0), target.mean(0)
    a = mobile - mc
    one = torch.zeros(len(a), dtype=torch.long, device=a.device)
    rot = optimal_rotations(a, target - tc, one, 1, allow_reflection)[0]
    aligned = a @ rot.T + tc
    rmsd = torch.sqrt(((aligned - target) ** 2).sum(-1).mean())
    return aligned, rmsd


# ----------------------------------------------------------------------------- sparse graphs
#: at most this many padded atom pairs per block of molecules in the neighbour search (a block holds
#: three such arrays of squared coordinate differences and one of squared distances)
_PAIRS_PER_BLOCK = 1 << 22


def parse_graph(spec: str) -> tuple[str, float | int | None]:
    """Read a graph specification: ``"full"`` -> ``("full", None)``, ``"radius:R"`` -> ``("radius", R)``
    (R in Å, > 0), ``"knn:K"`` -> ``("knn", K)`` (K >= 1). Anything else raises a one-line ``ValueError``."""
    if spec == "full":
        return "full", None
    kind, sep, value = str(spec).partition(":")
    try:
        if sep and kind == "radius" and math.isfinite(float(value)) and float(value) > 0:
            return "radius", float(value)
        if sep and kind == "knn" and int(value) >= 1:
            return "knn", int(value)
    except ValueError:
        pass
    raise ValueError(f"graph must be 'full', 'radius:R' (R > 0, in Å) or 'knn:K' (K >= 1), got {spec!r}")


def _select_pairs(pos: torch.Tensor, batch: torch.Tensor, select) -> torch.Tensor:
    """Edges chosen per molecule from its matrix of squared distances.

    Consecutive molecules are padded into blocks of shape ``(b, m, m)`` (``m``: the block's largest
    molecule; blocks stay under ``_PAIRS_PER_BLOCK`` pairs, so one large molecule never pads a whole
    batch). ``select(d2)`` gets the squared distances with ``inf`` on the diagonal, on padding and
    for non-finite positions, and returns a boolean ``(b, m, m)`` mask; only finite pairs are kept.
    Returns ``edge_index`` ``(2, E)`` sorted by source, then target, as :func:`fully_connected_edges`.
    """
    device = batch.device
    if batch.numel() == 0:
        return torch.zeros(2, 0, dtype=torch.long, device=device)
    x = pos.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    counts = torch.bincount(batch)
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(batch.numel(), device=device) - starts[batch]
    sizes = counts.tolist()
    rows, cols = [], []
    with torch.autocast(device.type, enabled=False):
        first = 0
        while first < len(sizes):
            last, m = first + 1, sizes[first]
            while last < len(sizes) and (last + 1 - first) * max(m, sizes[last]) ** 2 <= _PAIRS_PER_BLOCK:
                m = max(m, sizes[last])
                last += 1
            lo = int(starts[first])
            hi = lo + sum(sizes[first:last])
            mol, slot = batch[lo:hi] - first, local[lo:hi]
            dense = x.new_zeros(last - first, m, 3)
            dense[mol, slot] = x[lo:hi]
            valid = torch.zeros(last - first, m, dtype=torch.bool, device=device)
            valid[mol, slot] = True
            diff = dense.unsqueeze(2) - dense.unsqueeze(1)
            d2 = (diff * diff).sum(-1)  # exactly symmetric: (a - b)^2 == (b - a)^2
            ok = valid.unsqueeze(2) & valid.unsqueeze(1) & ~torch.eye(m, dtype=torch.bool, device=device)
            ok &= torch.isfinite(d2)
            d2 = d2.masked_fill(~ok, math.inf)
            which, i, j = (select(d2) & ok).nonzero(as_tuple=True)
            base = starts[first:last][which]
            rows.append(base + i)
            cols.append(base + j)
            first = last
    return torch.stack([torch.cat(rows), torch.cat(cols)])


def _nearest(d2: torch.Tensor) -> torch.Tensor:
    """Boolean ``(b, m, m)``: each atom's nearest other atom, both ways (symmetric)."""
    near = d2.argmin(-1, keepdim=True)
    one = torch.zeros_like(d2, dtype=torch.bool).scatter_(-1, near, torch.isfinite(d2.gather(-1, near)))
    return one | one.transpose(1, 2)


def radius_edges(pos: torch.Tensor, batch: torch.Tensor, radius: float, *, nearest: bool = True) -> torch.Tensor:
    """Ordered pairs ``(i, j)``, ``i != j``, of atoms of the same molecule closer than ``radius`` Å
    (``|x_i - x_j|^2 < radius^2``).

    With ``nearest`` (the default) every atom is also joined to its nearest atom of the molecule, in
    both directions, so no atom of a molecule with two or more atoms is left without edges; groups of
    atoms further than ``radius`` from each other still form separate components. The graph is
    symmetric and depends on distances only (E(3)-invariant; permuting atoms permutes it, up to exact
    ties of the nearest-atom choice). ``pos`` ``(n, 3)``, sorted ``batch`` ``(n,)``; no gradient flows
    through the choice. Returns ``edge_index`` ``(2, E)`` sorted by source, then target.
    """
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    limit = float(radius) ** 2

    def select(d2):
        chosen = d2 < limit
        return chosen | _nearest(d2) if nearest else chosen

    return _select_pairs(pos, batch, select)


def knn_edges(pos: torch.Tensor, batch: torch.Tensor, k: int) -> torch.Tensor:
    """Each atom's ``k`` nearest atoms of its molecule, made symmetric: ``(i, j)`` is an edge when
    ``j`` is among ``i``'s ``k`` nearest or ``i`` among ``j``'s, so atoms have ``k`` or more edges
    (all other atoms of molecules of ``k + 1`` atoms or fewer). Depends on distances only; exact ties
    at the ``k``-th place are broken by atom order. Returns ``edge_index`` ``(2, E)`` sorted by source,
    then target."""
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")

    def select(d2):
        kk = min(int(k), d2.shape[-1] - 1)
        if kk < 1:
            return torch.zeros_like(d2, dtype=torch.bool)
        dist, idx = d2.topk(kk, -1, largest=False)
        one = torch.zeros_like(d2, dtype=torch.bool).scatter_(-1, idx, torch.isfinite(dist))
        return one | one.transpose(1, 2)

    return _select_pairs(pos, batch, select)


def graph_edges(spec: str, pos: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """``edge_index`` of the graph ``spec`` names (:func:`parse_graph`) for positions ``pos`` ``(n, 3)``
    and a sorted ``batch`` ``(n,)``: :func:`fully_connected_edges`, :func:`radius_edges` or
    :func:`knn_edges`."""
    kind, value = parse_graph(spec)
    if kind == "radius":
        return radius_edges(pos, batch, value)
    if kind == "knn":
        return knn_edges(pos, batch, value)
    return fully_connected_edges(batch)
