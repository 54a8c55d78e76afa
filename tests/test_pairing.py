"""Noise pairing (moldiff.diffusion.pairing): optimal, norm- and CoM-preserving, equivariant."""

import pytest
import torch

from moldiff.diffusion import PAIRINGS, centred_noise, optimal_rotations, pair_noise
from moldiff.geometry import random_orthogonal, random_rotation, remove_mean


def _batch(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    pos = remove_mean(torch.randn(len(batch), 3, generator=g, dtype=torch.float64) * 1.5, batch, len(sizes))
    eps = centred_noise(batch, len(sizes), generator=g, dtype=torch.float64)
    return pos, eps, batch, len(sizes)


def _cost(a, b, batch, num_graphs):
    return torch.zeros(num_graphs, dtype=a.dtype).index_add_(0, batch, ((a - b) ** 2).sum(-1))


def test_optimal_rotation_recovers_a_known_rotation():
    pos, _, batch, ng = _batch([5, 9, 4])
    rots = random_rotation(ng, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mobile = torch.einsum("nji,nj->ni", rots[batch], pos)  # R^T pos
    found = optimal_rotations(mobile, pos, batch, ng)
    torch.testing.assert_close(found, rots, atol=1e-9, rtol=0)
    assert torch.allclose(torch.linalg.det(found), torch.ones(ng, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["rotation", "permutation"])
def test_pairing_lowers_the_transport_cost_and_keeps_the_noise_a_noise(mode):
    pos, eps, batch, ng = _batch([3, 7, 12, 19, 25], seed=2)
    paired = pair_noise(eps, pos, batch, ng, mode)
    before, after = _cost(eps, pos, batch, ng), _cost(paired, pos, batch, ng)
    assert (after <= before + 1e-9).all() and (after < before - 1e-3).any()
    # zero centre of mass per molecule, same multiset of norms per molecule
    torch.testing.assert_close(remove_mean(paired, batch, ng), paired, atol=1e-12, rtol=0)
    for b in range(ng):
        m = batch == b
        torch.testing.assert_close(paired[m].norm(dim=-1).sort().values, eps[m].norm(dim=-1).sort().values)
    if mode == "rotation":  # a rigid rotation: all pairwise distances kept in place
        for b in range(ng):
            m = batch == b
            torch.testing.assert_close(torch.cdist(paired[m], paired[m]), torch.cdist(eps[m], eps[m]))


def test_permutation_pairing_is_at_least_as_good_as_rotation():
    pos, eps, batch, ng = _batch([6, 11, 17, 23], seed=3)
    rot = _cost(pair_noise(eps, pos, batch, ng, "rotation"), pos, batch, ng)
    perm = _cost(pair_noise(eps, pos, batch, ng, "permutation"), pos, batch, ng)
    assert (perm <= rot + 1e-9).all() and perm.sum() < 0.9 * rot.sum()


@pytest.mark.parametrize("mode", ["rotation", "permutation"])
def test_pairing_is_equivariant_to_rotations_and_reflections_of_the_molecule(mode):
    """Paired noise for Q x is Q times the paired noise for x (a reflection Q reflects it too)."""
    pos, eps, batch, ng = _batch([8, 13], seed=4)
    q = random_orthogonal(generator=torch.Generator().manual_seed(5), dtype=torch.float64, reflect=False)
    # pairing uses proper rotations only, so under an improper Q (here -q) the noise must be
    # reflected as well (point inversion: -eps) for the pair to be the mirror image
    for qq, e2 in [(q, eps), (-q, -eps)]:
        out = pair_noise(e2, pos @ qq.T, batch, ng, mode)
        ref = pair_noise(eps, pos, batch, ng, mode) @ qq.T
        torch.testing.assert_close(out, ref, atol=1e-9, rtol=0)


def test_none_is_identity_and_unknown_mode_is_refused():
    pos, eps, batch, ng = _batch([4, 4])
    assert pair_noise(eps, pos, batch, ng, "none") is eps
    assert PAIRINGS == ("none", "rotation", "permutation")
    with pytest.raises(ValueError, match="unknown noise pairing"):
        pair_noise(eps, pos, batch, ng, "ot")
