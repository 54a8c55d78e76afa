"""Pairing training noise with data: optimal rotation (and permutation) per molecule.

A diffusion model is trained on pairs (x, eps) drawn independently. Equivariant flow-matching
work (Klein et al., NeurIPS 2023, "Equivariant flow matching"; Song et al., NeurIPS 2023,
"Equivariant Flow Matching with Hybrid Probability Transport") pairs them instead by the rotation
and atom permutation that bring the noise closest to the molecule, which shortens and straightens
the paths the network has to learn. Here the noise is moved, not the molecule: ``eps`` is rotated
(proper rotations only, so chirality is never touched) and, optionally, its points are reassigned
to atoms by an optimal assignment. Both keep the noise's zero centre of mass and the set of its
norms, so the prior at t = 1 is unchanged for rotation-invariant data; the intermediate marginals
are not EDM's any more, which is the point, and is why this is an experiment, not the default.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from moldiff.geometry import optimal_rotations, scatter_sum  # noqa: F401 - optimal_rotations is re-exported

__all__ = ["PAIRINGS", "optimal_rotations", "pair_noise"]

PAIRINGS = ("none", "rotation", "permutation")


def _rotate(eps: torch.Tensor, rot: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nij,nj->ni", rot[batch], eps)


def pair_noise(eps: torch.Tensor, pos: torch.Tensor, batch: torch.Tensor, num_graphs: int, mode: str = "rotation") -> torch.Tensor:
    """Noise ``eps`` ``(n, 3)`` moved as close as possible to the centred positions ``pos`` ``(n, 3)``.

    ``mode``: ``"none"`` (returned as is), ``"rotation"`` (one optimal rotation per molecule) or
    ``"permutation"`` (rotation, then the optimal assignment of noise points to atoms, then the
    optimal rotation again). ``batch`` must be sorted, as everywhere in moldiff.
    """
    if mode == "none":
        return eps
    if mode not in PAIRINGS:
        raise ValueError(f"unknown noise pairing {mode!r} (choose from {', '.join(PAIRINGS)})")
    eps = _rotate(eps, optimal_rotations(eps, pos, batch, num_graphs), batch)
    if mode == "permutation":
        counts = torch.bincount(batch, minlength=num_graphs).tolist()
        e_np, p_np = eps.detach().double().cpu().numpy(), pos.detach().double().cpu().numpy()
        order = np.empty(len(e_np), dtype=np.int64)
        start = 0
        for c in counts:
            # maximise sum <eps_perm(i), x_i>, i.e. minimise the squared distance of the assignment
            _, cols = linear_sum_assignment(-(p_np[start:start + c] @ e_np[start:start + c].T))
            order[start:start + c] = start + cols
            start += c
        eps = eps[torch.from_numpy(order).to(eps.device)]
        eps = _rotate(eps, optimal_rotations(eps, pos, batch, num_graphs), batch)
    return eps
