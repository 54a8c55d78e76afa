"""Geometry on flat batches of point clouds (the leaf of the package).

A batch of molecules is one flat tensor of atom positions ``pos`` of shape ``(n_atoms, 3)`` (Å)
plus a ``batch`` vector of shape ``(n_atoms,)`` giving each atom's molecule index, as in PyG.
Everything here is plain torch; no other moldiff module is imported.
"""

from __future__ import annotations

import torch

__all__ = [
    "scatter_sum",
    "scatter_mean",
    "remove_mean",
    "num_nodes_per_graph",
    "fully_connected_edges",
    "reverse_edges",
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
