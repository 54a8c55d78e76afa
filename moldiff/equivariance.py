"""E(3) x permutation equivariance checks, shipped in the package (in the spirit of e3nn's
``assert_equivariant``) so that every layer, the full denoiser and each sampler step is tested
the same way, and users can test their own networks.
"""

from __future__ import annotations

from typing import Callable

import torch

from moldiff.geometry import random_orthogonal

__all__ = ["random_transform", "assert_equivariant", "assert_bond_equivariant"]

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def random_transform(batch: torch.Tensor, *, generator: torch.Generator | None = None, dtype=torch.float64):
    """A random orthogonal matrix (rotation or reflection, 50/50), translation and within-molecule
    permutation for a sorted ``batch`` vector of shape ``(n,)``.

    Returns ``(Q (3, 3), shift (3,), perm (n,))``; ``perm`` keeps atoms inside their molecule so the
    permuted batch vector is unchanged.
    """
    q = random_orthogonal(generator=generator, dtype=dtype)
    shift = 3.0 * torch.randn(3, generator=generator, dtype=dtype)
    keys = batch.to(dtype) + torch.rand(batch.shape[0], generator=generator, dtype=dtype)
    perm = torch.argsort(keys)  # sorts by molecule first, random order inside each molecule
    return q, shift, perm


def assert_equivariant(
    fn: Fn,
    pos: torch.Tensor,
    h: torch.Tensor,
    batch: torch.Tensor,
    *,
    pos_output: str = "vector",
    trials: int = 3,
    atol: float = 1e-9,
    rtol: float = 1e-7,
    generator: torch.Generator | None = None,
) -> float:
    """Check ``fn(pos, h, batch) -> (pos_out, h_out)`` under random E(3) transforms and permutations.

    ``pos_output``: ``"vector"`` (a displacement: rotates, ignores translation), ``"point"``
    (a position: rotates and translates), or ``"centred"`` (a zero-CoM position: rotates, ignores
    translation). ``h_out`` must be invariant. Run it in float64. Returns the largest deviation
    seen and raises ``AssertionError`` if any exceeds the tolerance.
    """
    if pos_output not in ("vector", "point", "centred"):
        raise ValueError(f"pos_output must be 'vector', 'point' or 'centred', got {pos_output!r}")
    pos_ref, h_ref = fn(pos, h, batch)
    worst = 0.0
    for _ in range(trials):
        q, shift, perm = random_transform(batch, generator=generator, dtype=pos.dtype)
        pos_in = (pos @ q.T + shift)[perm]
        pos_out, h_out = fn(pos_in, h[perm], batch)
        expected_pos = pos_ref @ q.T + (shift if pos_output == "point" else 0.0)
        for name, got, want in (("pos", pos_out, expected_pos[perm]), ("h", h_out, h_ref[perm])):
            err = (got - want).abs().max().item() if got.numel() else 0.0
            worst = max(worst, err)
            scale = want.abs().max().item() if want.numel() else 0.0
            if not err <= atol + rtol * scale:
                raise AssertionError(f"{name} output not equivariant: max deviation {err:.3e} (scale {scale:.3e})")
    return worst


def assert_bond_equivariant(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    pos: torch.Tensor,
    h: torch.Tensor,
    e: torch.Tensor,
    batch: torch.Tensor,
    edge_index: torch.Tensor,
    *,
    trials: int = 3,
    atol: float = 1e-9,
    generator: torch.Generator | None = None,
) -> None:
    """:func:`assert_equivariant` for a network with per-edge inputs and outputs (bond models):
    ``fn(pos, h, e) -> (eps_pos, h_out, e_out)`` on the fixed graph ``edge_index`` ``(2, E)`` of the
    sorted ``batch``, ``e`` ``(E, K)``. Under a random rotation or reflection, translation and
    within-molecule permutation, ``eps_pos`` must rotate (a displacement), ``h_out`` follow the atoms
    and ``e_out`` follow the edges (the edge ``(perm[a], perm[b])`` takes the place of ``(a, b)``).
    Raises ``AssertionError`` (``torch.testing``'s message) on a deviation above ``atol``."""
    eps, h_ref, e_ref = fn(pos, h, e)
    key = {(int(a), int(b)): k for k, (a, b) in enumerate(edge_index.T.tolist())}
    for _ in range(trials):
        q, shift, perm = random_transform(batch, generator=generator, dtype=pos.dtype)
        moved = torch.tensor([key[(int(perm[a]), int(perm[b]))] for a, b in edge_index.T.tolist()])
        eps2, h2, e2 = fn((pos @ q.T + shift)[perm], h[perm], e[moved])
        torch.testing.assert_close(eps2, (eps @ q.T)[perm], atol=atol, rtol=0)
        torch.testing.assert_close(h2, h_ref[perm], atol=atol, rtol=0)
        torch.testing.assert_close(e2, e_ref[moved], atol=atol, rtol=0)
