"""Sparse graphs for large molecules (``model.graph``, docs/drug_sized.md): the neighbour search in
``moldiff.geometry`` against a brute-force reference, its invariances, and denoisers that run on
radius and k-nearest-neighbour graphs (E(3) x permutation equivariance in float64, refusals, one
training and sampling round trip)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moldiff import geometry
from moldiff.equivariance import assert_equivariant, random_transform
from moldiff.geometry import (
    fully_connected_edges,
    graph_edges,
    knn_edges,
    parse_graph,
    radius_edges,
    remove_mean,
)
from moldiff.models import DenoiserConfig, EGNNDenoiser, build_denoiser
from moldiff.models.egnn import EquivariantUpdate

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_tiny.yaml"
SIZES = [1, 2, 5, 9, 23]  # a lone atom (no edges), a pair, and molecules larger than K + 1


def cloud(sizes=SIZES, seed: int = 0, spread: float = 1.5):
    """Random float64 positions ``(n, 3)`` and the sorted batch vector ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    pos = spread * torch.randn(batch.numel(), 3, generator=g, dtype=torch.float64) + 2.0
    return pos, batch


def reference_edges(pos, batch, keep) -> set[tuple[int, int]]:
    """Brute force: ``keep(i, j, distances_of_i)`` over every ordered pair of one molecule."""
    out = set()
    for m in batch.unique().tolist():
        atoms = (batch == m).nonzero().flatten().tolist()
        for i in atoms:
            others = [j for j in atoms if j != i]
            d = {j: float((pos[i] - pos[j]).norm()) for j in others}
            out |= {(i, j) for j in others if keep(i, j, d)}
    return out


def as_set(edge_index) -> set[tuple[int, int]]:
    return set(map(tuple, edge_index.t().tolist()))


def check_layout(edge_index, batch):
    """Sorted by source then target, no self loops, no cross-molecule edges, symmetric."""
    row, col = edge_index
    key = row * batch.numel() + col
    assert torch.equal(key, torch.sort(key).values) and key.unique().numel() == key.numel()
    assert bool((row != col).all()) and torch.equal(batch[row], batch[col])
    assert as_set(edge_index) == {(j, i) for i, j in as_set(edge_index)}


# ----------------------------------------------------------------------------- parsing
def test_parse_graph_reads_the_three_kinds_and_refuses_anything_else():
    assert parse_graph("full") == ("full", None)
    assert parse_graph("radius:5") == ("radius", 5.0) and parse_graph("radius:2.5") == ("radius", 2.5)
    assert parse_graph("knn:16") == ("knn", 16)
    for bad in ["", "Full", "radius", "radius:", "radius:0", "radius:-1", "radius:inf", "radius:nan", "knn:0",
                "knn:2.5", "knn:x", "cutoff:5", "radius:5:1"]:
        with pytest.raises(ValueError, match="graph must be"):
            parse_graph(bad)


# ----------------------------------------------------------------------------- neighbour search
@pytest.mark.parametrize("radius", [1.0, 2.5, 4.0])
def test_radius_edges_match_brute_force_with_each_atoms_nearest_atom(radius):
    pos, batch = cloud()
    got = radius_edges(pos, batch, radius)
    check_layout(got, batch)
    nearest = reference_edges(pos, batch, lambda i, j, d: j == min(d, key=d.get))
    within = reference_edges(pos, batch, lambda i, j, d: d[j] < radius)
    assert as_set(got) == within | nearest | {(j, i) for i, j in nearest}
    assert as_set(radius_edges(pos, batch, radius, nearest=False)) == within


@pytest.mark.parametrize("k", [1, 3, 8])
def test_knn_edges_match_brute_force_made_symmetric(k):
    pos, batch = cloud(seed=1)
    got = knn_edges(pos, batch, k)
    check_layout(got, batch)
    directed = reference_edges(pos, batch, lambda i, j, d: j in sorted(d, key=d.get)[:k])
    assert as_set(got) == directed | {(j, i) for i, j in directed}
    degree = torch.bincount(got[0], minlength=batch.numel())
    size = torch.bincount(batch)[batch]
    assert bool((degree >= torch.clamp(size - 1, max=k)).all())


def test_large_radius_and_k_give_the_full_graph_exactly():
    pos, batch = cloud(seed=2)
    full = fully_connected_edges(batch)
    assert torch.equal(radius_edges(pos, batch, 1e4), full)
    assert torch.equal(knn_edges(pos, batch, max(SIZES) - 1), full)
    assert torch.equal(graph_edges("full", pos, batch), full)
    assert torch.equal(graph_edges("knn:3", pos, batch), knn_edges(pos, batch, 3))
    assert torch.equal(graph_edges("radius:2", pos, batch), radius_edges(pos, batch, 2.0))


def test_a_far_atom_keeps_one_edge_to_its_nearest_atom():
    pos = torch.tensor([[0.0, 0, 0], [1.2, 0, 0], [0, 1.3, 0], [30.0, 0, 0], [0, 0, 0]], dtype=torch.float64)
    batch = torch.tensor([0, 0, 0, 0, 1])
    got = as_set(radius_edges(pos, batch, 2.0))
    assert {e for e in got if 3 in e} == {(3, 1), (1, 3)}  # the stray atom joins its nearest, both ways
    assert {(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)} <= got
    assert not any(4 in e for e in got)  # a one-atom molecule has no edges
    assert as_set(radius_edges(pos, batch, 2.0, nearest=False)) == {(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)}


def test_graphs_depend_on_distances_only_and_follow_a_permutation():
    pos, batch = cloud(seed=3)
    g = torch.Generator().manual_seed(4)
    for spec in ("radius:2.5", "knn:4"):
        ref = as_set(graph_edges(spec, pos, batch))
        for _ in range(3):
            q, shift, perm = random_transform(batch, generator=g)
            moved = graph_edges(spec, (pos @ q.T + shift)[perm], batch)
            assert {(int(perm[i]), int(perm[j])) for i, j in as_set(moved)} == ref


def test_blocks_of_molecules_give_the_same_edges(monkeypatch):
    """A small block budget splits the batch into many padded blocks: same edges, same order."""
    pos, batch = cloud(sizes=[3, 40, 1, 7, 12, 2, 30], seed=5)
    want = {spec: graph_edges(spec, pos, batch) for spec in ("radius:2", "knn:5")}
    monkeypatch.setattr(geometry, "_PAIRS_PER_BLOCK", 100)
    for spec, edges in want.items():
        assert torch.equal(graph_edges(spec, pos, batch), edges)


def test_low_precision_and_non_finite_positions():
    pos, batch = cloud(seed=6)
    # bf16 positions are searched in fp32
    assert torch.equal(knn_edges(pos.bfloat16(), batch, 3), knn_edges(pos.bfloat16().float(), batch, 3))
    bad = pos.clone()
    bad[3] = float("nan")  # an atom of the 5-atom molecule
    for edges in (radius_edges(bad, batch, 3.0), knn_edges(bad, batch, 2)):
        check_layout(edges, batch)
        assert not bool((edges == 3).any())
    assert radius_edges(pos[:0], batch[:0], 2.0).shape == (2, 0)


# ----------------------------------------------------------------------------- denoisers
def tiny(graph: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_denoiser(DenoiserConfig(num_features=6, hidden=16, n_layers=3, graph=graph, **kw)).double().eval()
    if isinstance(net, EGNNDenoiser):  # coordinate heads start at gain 0.001: make them visible
        g = torch.Generator().manual_seed(seed)
        for m in net.modules():
            if isinstance(m, EquivariantUpdate):
                with torch.no_grad():
                    m.out.weight.copy_(0.3 * torch.randn(m.out.weight.shape, generator=g, dtype=m.out.weight.dtype))
    return net


def inputs(seed: int = 0):
    pos, batch = cloud(seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    h = torch.randn(batch.numel(), 6, generator=g, dtype=torch.float64)
    t = torch.rand(len(SIZES), generator=g, dtype=torch.float64)
    return pos, h, t, batch


def test_default_graph_is_full_and_old_configs_load_as_full():
    assert DenoiserConfig().graph == "full"
    d = DenoiserConfig(hidden=32).to_dict()
    assert d["graph"] == "full"
    d.pop("graph")
    assert DenoiserConfig.from_dict(d).graph == "full"
    assert DenoiserConfig.from_dict({**d, "graph": "knn:8"}).graph == "knn:8"


@pytest.mark.parametrize("graph", ["radius:2.5", "knn:3"])
def test_sparse_denoiser_is_e3_and_permutation_equivariant(graph):
    net = tiny(graph)
    pos, h, t, batch = inputs()
    assert graph_edges(graph, pos, batch).shape[1] < fully_connected_edges(batch).shape[1]  # really sparse
    worst = assert_equivariant(lambda p, x, b: tuple(net(p, x, t, b)), pos, h, batch, pos_output="vector", trials=4,
                               generator=torch.Generator().manual_seed(7))
    assert worst < 1e-9
    out = net(pos, h, t, batch)
    assert out.pos[batch > 0].abs().max() > 1e-2  # a visible displacement was checked


def test_sparse_self_conditioned_denoiser_is_equivariant():
    net = tiny("knn:3", seed=2, self_condition=True)
    pos, h, t, batch = inputs(seed=2)
    pos_hat, _ = cloud(seed=9)
    h_hat = torch.randn_like(h)
    ref = net(pos, h, t, batch, cond=(pos_hat, h_hat))
    q, shift, perm = random_transform(batch, generator=torch.Generator().manual_seed(3))
    out = net((pos @ q.T + shift)[perm], h[perm], t, batch, cond=((pos_hat @ q.T - shift)[perm], h_hat[perm]))
    torch.testing.assert_close(out.pos, (ref.pos @ q.T)[perm], atol=1e-9, rtol=0)
    torch.testing.assert_close(out.h, ref.h[perm], atol=1e-9, rtol=0)


def test_full_graph_is_unchanged_and_a_huge_radius_computes_the_same_function():
    pos, h, t, batch = inputs(seed=4)
    full, wide = tiny("full", seed=4), tiny("radius:1000", seed=4, centre_skip=False)
    wide.load_state_dict(full.state_dict())
    a, b = full(pos, h, t, batch), wide(pos, h, t, batch)
    assert torch.equal(a.pos, b.pos) and torch.equal(a.h, b.h)
    c = full(pos, h, t, batch, edge_index=fully_connected_edges(batch))
    assert torch.equal(a.pos, c.pos) and torch.equal(a.h, c.h)


def test_sparse_egnn_can_return_its_input_as_the_noise_as_t_1_asks():
    """Near t = 1 the noise to predict is the input itself. Local messages cannot produce it; the
    centre skip can: with every coordinate update off, its output is c (x_i - centroid) exactly."""
    assert DenoiserConfig(graph="knn:3").centre_skip is True
    assert DenoiserConfig().centre_skip is False and "centre_skip" not in DenoiserConfig().to_dict()
    assert DenoiserConfig(graph="knn:3", arch="e3nn").centre_skip is False
    with pytest.raises(ValueError, match="centre_skip"):
        DenoiserConfig(centre_skip=True)
    saved = DenoiserConfig(graph="knn:3").to_dict()
    assert DenoiserConfig.from_dict(saved).centre_skip is True
    saved.pop("centre_skip")  # a sparse model saved before the option: loads as it was built
    assert DenoiserConfig.from_dict(saved).centre_skip is False
    net = tiny("knn:3", seed=8)
    pos, h, t, batch = inputs(seed=8)
    shifted = pos + torch.tensor([0.5, -1.0, 2.0], dtype=pos.dtype)  # not centred: the skip centres it
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, EquivariantUpdate):
                m.out.weight.zero_()
        net.centre_skip.weight.zero_()
        net.centre_skip.bias.fill_(1.0)
    out = net(shifted, h, t, batch)
    torch.testing.assert_close(out.pos, remove_mean(pos, batch, len(SIZES)), atol=1e-12, rtol=0)


def test_sparse_denoiser_builds_its_own_edges_from_the_input_positions():
    net = tiny("knn:2", seed=5)
    pos, h, t, batch = inputs(seed=5)
    own = net(pos, h, t, batch)
    passed = net(pos, h, t, batch, edge_index=fully_connected_edges(batch))  # ignored
    assert torch.equal(own.pos, passed.pos) and torch.equal(own.h, passed.h)
    assert (own.h - tiny("full", seed=5)(pos, h, t, batch).h).abs().max() > 1e-6  # a different function
    # molecules stay independent, gradients reach the positions through the network
    member = batch == 4
    alone = net(pos[member], h[member], t[4:], torch.zeros(int(member.sum()), dtype=torch.long))
    torch.testing.assert_close(alone.pos, own.pos[member], atol=1e-12, rtol=0)
    p = pos.clone().requires_grad_(True)
    net(p, h, t, batch).pos.square().sum().backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0


def test_refusals_are_one_line_value_errors():
    with pytest.raises(ValueError, match="graph must be"):
        DenoiserConfig(graph="radius:-2")
    with pytest.raises(ValueError, match=r"bond_types=4.*need graph 'full'"):
        DenoiserConfig(graph="knn:8", bond_types=4)
    DenoiserConfig(graph="full", bond_types=4)  # bond models keep the full graph


def test_e3nn_denoiser_runs_on_a_sparse_graph_equivariantly():
    pytest.importorskip("e3nn")
    net = tiny("knn:3", seed=6, arch="e3nn", e3nn_radial_basis=4)
    with torch.no_grad():  # a visible coordinate output
        for p in net.pos_out.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    pos, h, t, batch = inputs(seed=6)
    worst = assert_equivariant(lambda p, x, b: tuple(net(p, x, t, b)), pos, h, batch, pos_output="vector", trials=2,
                               generator=torch.Generator().manual_seed(8))
    assert worst < 1e-9
    assert net(pos, h, t, batch).pos.abs().max() > 1e-3
    own, passed = net(pos, h, t, batch), net(pos, h, t, batch, edge_index=fully_connected_edges(batch))
    assert torch.equal(own.pos, passed.pos)


def test_training_and_sampling_run_with_a_knn_graph(tmp_path):
    """`--set model.graph=knn:4`: a few training steps, the graph saved with the model, sampling."""
    from moldiff.pipeline import SampleRequest, load_pretrained
    from moldiff.training.config import load_config
    from moldiff.training.loop import Trainer

    cfg = load_config(DEBUG, ["train.max_steps=2", "train.val_every=0", "train.log_every=1", "model.graph=knn:4",
                              "data.max_train_molecules=32", "data.max_valid_molecules=8", "train.device=cpu"])
    assert cfg.model.graph == "knn:4"
    Trainer(cfg, tmp_path, log=lambda _m: None).train()
    pipe = load_pretrained(tmp_path)
    assert pipe.denoiser.config.graph == "knn:4"
    out = pipe.generate(SampleRequest(2, steps=3, seed=0))
    assert len(out.positions) == 2 and all(p.shape[1] == 3 for p in out.positions)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_edges_equal_cpu_edges():
    pos, batch = cloud(sizes=[3, 150, 40, 1, 90], seed=11)
    for spec in ("radius:3", "knn:16"):
        cpu = graph_edges(spec, pos, batch)
        gpu = graph_edges(spec, pos.cuda(), batch.cuda())
        assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
