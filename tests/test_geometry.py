"""Flat-batch geometry: centring, fully connected edges, random orthogonal maps, Kabsch alignment."""

from __future__ import annotations

import pytest
import torch

from moldiff.geometry import (
    fully_connected_edges,
    kabsch_align,
    num_nodes_per_graph,
    random_orthogonal,
    random_rotation,
    remove_mean,
    scatter_mean,
    scatter_sum,
)


def sorted_batch(sizes: list[int]) -> torch.Tensor:
    """Batch vector ``(sum(sizes),)`` with ``sizes[k]`` atoms in molecule ``k`` (zero allowed)."""
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))


def brute_force_edges(batch: torch.Tensor) -> set[tuple[int, int]]:
    n = batch.shape[0]
    return {(i, j) for i in range(n) for j in range(n) if i != j and batch[i] == batch[j]}


def test_scatter_sum_and_mean_match_loops():
    g = torch.Generator().manual_seed(0)
    batch = sorted_batch([3, 1, 4])
    x = torch.randn(8, 2, generator=g, dtype=torch.float64)
    total = scatter_sum(x, batch, 4)  # molecule 3 has no atoms
    mean = scatter_mean(x, batch, 4)
    for k in range(3):
        assert torch.allclose(total[k], x[batch == k].sum(0), atol=1e-14)
        assert torch.allclose(mean[k], x[batch == k].mean(0), atol=1e-14)
    assert torch.equal(total[3], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(mean[3], torch.zeros(2, dtype=torch.float64))
    assert num_nodes_per_graph(batch).tolist() == [3, 1, 4]
    assert num_nodes_per_graph(batch, 5).tolist() == [3, 1, 4, 0, 0]


@pytest.mark.parametrize("sizes", [[5], [1, 4, 2, 1, 9], [3, 3, 3]])
def test_remove_mean_gives_zero_centroid_per_molecule(sizes):
    g = torch.Generator().manual_seed(1)
    batch = sorted_batch(sizes)
    pos = 10.0 * torch.randn(batch.shape[0], 3, generator=g, dtype=torch.float64) + 4.0
    out = remove_mean(pos, batch)
    for k in range(len(sizes)):
        member = batch == k
        assert out[member].mean(0).abs().max() < 1e-13
        # Within a molecule only a common shift was removed.
        assert torch.allclose(out[member] - pos[member], (out[member] - pos[member])[:1].expand(sizes[k], 3), atol=1e-12)
    # Projection: applying it twice changes nothing.
    assert torch.allclose(remove_mean(out, batch), out, atol=1e-13)
    # A molecule of one atom is moved to the origin.
    for k, n in enumerate(sizes):
        if n == 1:
            assert out[batch == k].abs().max() < 1e-13


def test_remove_mean_with_explicit_num_graphs_and_empty_trailing_molecules():
    batch = sorted_batch([2, 3])
    pos = torch.arange(15, dtype=torch.float64).view(5, 3)
    assert torch.allclose(remove_mean(pos, batch, num_graphs=4), remove_mean(pos, batch), atol=0)


@pytest.mark.parametrize("seed", range(6))
def test_fully_connected_edges_equal_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    num_mols = int(torch.randint(1, 7, (1,), generator=g))
    sizes = torch.randint(1, 7, (num_mols,), generator=g).tolist()
    if seed == 0:
        sizes = [1, 1, 1]  # only single atoms: no edges at all
    if seed == 1:
        sizes = [1] + sizes + [1]
    batch = sorted_batch(sizes)
    edges = fully_connected_edges(batch)
    assert edges.dtype == torch.long and edges.shape[0] == 2
    pairs = [tuple(e) for e in edges.T.tolist()]
    assert len(pairs) == len(set(pairs)), "duplicate edges"
    assert set(pairs) == brute_force_edges(batch)
    assert edges.shape[1] == sum(n * (n - 1) for n in sizes)


def test_fully_connected_edges_skip_molecule_indices_without_atoms():
    batch = torch.tensor([0, 0, 2, 2, 2])  # molecule 1 is empty
    pairs = {tuple(e) for e in fully_connected_edges(batch).T.tolist()}
    assert pairs == brute_force_edges(batch)


@pytest.mark.parametrize("reflect", [False, True])
def test_random_orthogonal_is_orthogonal_with_requested_determinant(reflect):
    g = torch.Generator().manual_seed(2)
    q = random_orthogonal(64, generator=g, reflect=reflect)
    assert q.shape == (64, 3, 3) and q.dtype == torch.float64
    eye = torch.eye(3, dtype=torch.float64).expand(64, 3, 3)
    assert torch.allclose(q.transpose(1, 2) @ q, eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(q), torch.full((64,), -1.0 if reflect else 1.0, dtype=torch.float64), atol=1e-12)
    single = random_orthogonal(generator=g, reflect=reflect)
    assert single.shape == (3, 3)
    assert torch.linalg.det(single).item() == pytest.approx(-1.0 if reflect else 1.0, abs=1e-12)


def test_random_orthogonal_default_draws_both_signs_and_rotation_is_proper():
    g = torch.Generator().manual_seed(3)
    dets = torch.linalg.det(random_orthogonal(400, generator=g))
    assert torch.allclose(dets.abs(), torch.ones_like(dets), atol=1e-12)
    frac_reflections = (dets < 0).double().mean().item()
    assert 0.4 < frac_reflections < 0.6  # 400 fair coin flips: 5 standard deviations is +-0.125
    r = random_rotation(50, generator=g)
    assert torch.allclose(torch.linalg.det(r), torch.ones(50, dtype=torch.float64), atol=1e-12)
    # Haar measure has E[Q] = 0; a biased construction (e.g. no QR sign fix) shows up here.
    assert r.mean(0).abs().max() < 0.35


def test_kabsch_align_recovers_a_known_rotation():
    g = torch.Generator().manual_seed(4)
    target = 2.0 * torch.randn(12, 3, generator=g, dtype=torch.float64)
    rot = random_rotation(generator=g)
    shift = torch.tensor([1.5, -3.0, 0.25], dtype=torch.float64)
    mobile = target @ rot.T + shift
    aligned, rmsd = kabsch_align(mobile, target)
    assert rmsd.item() < 1e-10
    assert torch.allclose(aligned, target, atol=1e-10)
    # The rotation that maps mobile's centred frame onto target's is rot^T: solve for it and compare.
    a = mobile - mobile.mean(0)
    b = aligned - aligned.mean(0)
    fitted = torch.linalg.lstsq(a, b).solution.T  # b = a @ fitted.T
    assert torch.allclose(fitted, rot.T, atol=1e-10)


def test_kabsch_align_handles_reflections_only_when_allowed():
    g = torch.Generator().manual_seed(5)
    target = torch.randn(10, 3, generator=g, dtype=torch.float64)
    mirror = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    mobile = target @ (random_rotation(generator=g) @ mirror).T
    _, rmsd_proper = kabsch_align(mobile, target)
    _, rmsd_improper = kabsch_align(mobile, target, allow_reflection=True)
    assert rmsd_improper.item() < 1e-10
    assert rmsd_proper.item() > 0.1  # a chiral random cloud cannot be rotated onto its mirror image
    # RMSD of an independent noisy copy is the usual root-mean-square of the residuals.
    noisy = target + 0.01 * torch.randn(10, 3, generator=g, dtype=torch.float64)
    _, rmsd = kabsch_align(noisy, target)
    assert 0.0 < rmsd.item() < 0.02
