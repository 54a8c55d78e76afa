"""Bond orders generated jointly as edge features: the network's edge input and output (symmetry,
E(3) invariance, permutation equivariance), the symmetric edge noise, the reverse step on edges,
training labels from a batch's bonds, and sampling end to end with a small bond model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moldiff.data.statistics import compute_statistics
from moldiff.diffusion import AtomFeatures, BondFeatures, NoiseSchedule, make_sampler, symmetric_edge_noise
from moldiff.diffusion.losses import bond_epsilon_loss
from moldiff.equivariance import random_transform
from moldiff.geometry import fully_connected_edges, reverse_edges
from moldiff.models import DenoiserConfig, EGNNDenoiser
from moldiff.models.egnn import EquivariantUpdate
from moldiff.pipeline import MolDiffPipeline
from moldiff.geometry import edge_bond_orders

SIZES = [1, 2, 5, 7]
K = 4


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bond_denoiser(seed: int = 0) -> EGNNDenoiser:
    torch.manual_seed(seed)
    net = EGNNDenoiser(DenoiserConfig(num_features=6, hidden=16, n_layers=3, bond_types=K)).double().eval()
    g = gen(seed)
    with torch.no_grad():  # O(1) coordinate updates, so an equivariance error could not hide
        for m in net.modules():
            if isinstance(m, EquivariantUpdate):
                m.out.weight.copy_(0.3 * torch.randn(m.out.weight.shape, generator=g, dtype=torch.float64))
    return net


def state(seed: int = 0):
    g = gen(seed)
    batch = torch.repeat_interleave(torch.arange(len(SIZES)), torch.tensor(SIZES))
    pos = 1.5 * torch.randn(batch.shape[0], 3, generator=g, dtype=torch.float64)
    h = torch.randn(batch.shape[0], 6, generator=g, dtype=torch.float64)
    edge_index = fully_connected_edges(batch)
    rev = reverse_edges(edge_index, batch.shape[0])
    e = symmetric_edge_noise(rev, K, generator=g, dtype=torch.float64)
    return pos, h, batch, edge_index, rev, e


def test_reverse_edges_maps_every_edge_to_its_reverse_and_refuses_one_way_edges():
    _, _, batch, edge_index, rev, _ = state()
    row, col = edge_index
    assert torch.equal(row[rev], col) and torch.equal(col[rev], row)
    assert torch.equal(rev[rev], torch.arange(rev.shape[0]))
    with pytest.raises(ValueError, match="symmetric"):
        reverse_edges(torch.tensor([[0, 1], [1, 2]]), 3)


def test_symmetric_edge_noise_is_equal_on_both_directions_and_standard_normal():
    _, _, batch, edge_index, rev, _ = state()
    big = torch.repeat_interleave(torch.arange(40), torch.full((40,), 12))
    ei = fully_connected_edges(big)
    r = reverse_edges(ei, big.shape[0])
    noise = symmetric_edge_noise(r, K, generator=gen(3), dtype=torch.float64)
    assert torch.equal(noise, noise[r])
    assert abs(noise.mean().item()) < 0.03 and abs(noise.std().item() - 1.0) < 0.03  # 21,120 values


def test_bond_denoiser_edge_output_is_symmetric_invariant_and_permutation_equivariant():
    net = bond_denoiser(seed=1)
    pos, h, batch, edge_index, rev, e = state(seed=1)
    t = torch.tensor([0.2, 0.4, 0.6, 0.9], dtype=torch.float64)
    out, eps_e = net(pos, h, t, batch, edge_index=edge_index, e_t=e)
    assert eps_e.shape == (edge_index.shape[1], K)
    torch.testing.assert_close(eps_e, eps_e[rev], atol=1e-12, rtol=0)
    n = batch.shape[0]
    key = {(int(a), int(b)): k for k, (a, b) in enumerate(edge_index.T.tolist())}
    g = gen(2)
    for _ in range(4):  # rotations, reflections, translations and a permutation within molecules
        q, shift, perm = random_transform(batch, generator=g)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(n)
        # edge (a, b) of the permuted molecule is edge (perm[a], perm[b]) of the original
        moved = torch.tensor([key[(int(perm[a]), int(perm[b]))] for a, b in edge_index.T.tolist()])
        out2, eps2 = net((pos @ q.T + shift)[perm], h[perm], t, batch, edge_index=edge_index, e_t=e[moved])
        torch.testing.assert_close(eps2, eps_e[moved], atol=1e-9, rtol=0)
        torch.testing.assert_close(out2.pos, (out.pos @ q.T)[perm], atol=1e-9, rtol=0)
        torch.testing.assert_close(out2.h, out.h[perm], atol=1e-9, rtol=0)
    # the bond input is used by every output
    out3, eps3 = net(pos, h, t, batch, edge_index=edge_index, e_t=e + 0.5)
    assert (eps3 - eps_e).abs().max() > 1e-4 and (out3.pos - out.pos).abs().max() > 1e-6
    with pytest.raises(ValueError, match="e_t"):
        net(pos, h, t, batch)
    plain = EGNNDenoiser(DenoiserConfig(num_features=6, hidden=16, n_layers=2)).double()
    with pytest.raises(ValueError, match="bond_types"):
        plain(pos, h, t, batch, e_t=e)


def test_edge_labels_follow_the_bond_rows_in_both_directions():
    batch = torch.repeat_interleave(torch.arange(2), torch.tensor([3, 4]))
    edge_index = fully_connected_edges(batch)
    bonds = torch.tensor([[0, 1, 2], [1, 2, 1], [3, 6, 3]])
    labels = edge_bond_orders(bonds, edge_index, 7)
    got = {(int(a), int(b)): int(o) for (a, b), o in zip(edge_index.T.tolist(), labels.tolist()) if o}
    assert got == {(0, 1): 2, (1, 0): 2, (1, 2): 1, (2, 1): 1, (3, 6): 3, (6, 3): 3}
    with pytest.raises(ValueError, match="different molecules"):
        edge_bond_orders(torch.tensor([[2, 3, 1]]), edge_index, 7)


def test_bond_features_round_trip_and_range():
    f = BondFeatures()
    orders = torch.tensor([0, 1, 2, 3, 1])
    e = f.encode(orders)
    assert e.shape == (5, 4) and float(e.max()) == 0.25
    assert torch.equal(f.decode(e), orders)
    with pytest.raises(ValueError, match="bond orders"):
        f.encode(torch.tensor([4]))


def test_bond_loss_is_per_dimension_and_zero_for_a_single_atom():
    edge_batch = torch.tensor([1, 1, 1, 1, 1, 1])  # molecule 0: a lone atom (no edges); molecule 1: 3 atoms
    eps = torch.zeros(6, 4)
    pred = torch.full((6, 4), 2.0)
    per_mol = bond_epsilon_loss(pred, eps, edge_batch, 2)
    torch.testing.assert_close(per_mol, torch.tensor([0.0, 4.0]))


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "ddim:0.5"])
def test_edge_step_matches_the_atom_step_on_the_same_numbers(sampler):
    """The reverse step on bond features is the features' step: same numbers in, same numbers out
    (deterministic part; the fresh noise is symmetric)."""
    schedule = NoiseSchedule.polynomial()
    s_obj = make_sampler(sampler, schedule, noise_scale=0.0)
    g = gen(4)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 4, generator=g, dtype=torch.float64)
    owner = torch.zeros(6, dtype=torch.long)
    t, s = torch.tensor([0.6], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    rev = torch.tensor([1, 0, 3, 2, 5, 4])
    e_s, e0 = s_obj.edge_step(eps, x, t, s, owner, rev)
    pos = torch.zeros(1, 3, dtype=torch.float64)
    step = s_obj.step(torch.zeros(1, 3, dtype=torch.float64), eps[:1], t, s, pos, x[:1], torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(e_s[:1], step.h, atol=1e-12, rtol=0)
    torch.testing.assert_close(e0[:1], step.h0, atol=1e-12, rtol=0)


def bond_pipeline(seed: int = 0, bond_output: str = "eps") -> MolDiffPipeline:
    torch.manual_seed(seed)
    stats = compute_statistics(("H", "C", "N", "O", "F"), np.array([3, 4, 5, 6]), np.array([0, 1, 2, 3, 4, 1] * 3))
    net = EGNNDenoiser(DenoiserConfig(num_features=6, hidden=16, n_layers=2, bond_types=K, bond_output=bond_output))
    return MolDiffPipeline(net, NoiseSchedule.polynomial(), AtomFeatures(5), stats, [1, 6, 7, 8, 9])


def test_logit_bond_head_implies_the_noise_of_its_expected_clean_bonds():
    """bond_output="logits": predict_noise returns eps_e such that (e_t - sigma eps_e) / alpha is
    exactly softmax(logits) x scale, the expected clean one-hot; raw_bonds gives the logits."""
    pipe = bond_pipeline(bond_output="logits").double()
    pos, h, batch, edge_index, rev, e = state(seed=5)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    _, _, logits = pipe.predict_noise(pos, h, t, batch, edge_index=edge_index, e_t=e, raw_bonds=True)
    _, _, eps_e = pipe.predict_noise(pos, h, t, batch, edge_index=edge_index, e_t=e)
    alpha, sigma = (x[batch[edge_index[0]]].unsqueeze(-1) for x in pipe.schedule.alpha_sigma(t))
    torch.testing.assert_close((e - sigma * eps_e) / alpha, logits.softmax(-1) * 0.25, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="bond_output"):
        DenoiserConfig(bond_types=K, bond_output="x0")


@pytest.mark.parametrize("bond_output", ["eps", "logits"])
def test_bond_model_samples_end_to_end_with_generated_bonds(tmp_path, bond_output):
    pipe = bond_pipeline(bond_output=bond_output)
    mols = pipe.sample(6, steps=5, seed=0, batch_size=4)
    assert len(mols) == 6
    for m in mols:
        b = m.generated_bonds
        assert b is not None and b.ndim == 2 and b.shape[1] == 3
        assert ((b[:, 0] < b[:, 1]) & (b[:, 1] < m.num_atoms)).all() and set(b[:, 2].tolist()) <= {1, 2, 3}
    again = pipe.sample(6, steps=5, seed=0, batch_size=4)
    assert all(np.array_equal(a.generated_bonds, b.generated_bonds) for a, b in zip(mols, again))
    pipe.save_pretrained(tmp_path / "m")
    loaded = MolDiffPipeline.from_pretrained(tmp_path / "m")
    assert loaded.bond_types == K
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(mols, loaded.sample(6, steps=5, seed=0, batch_size=4)))
    with pytest.raises(ValueError, match="generate bonds"):
        pipe.sample(2, steps=3, formula="CH4")


def test_compiled_inference_compiles_the_bond_head_and_agrees_with_eager():
    """``configure_inference(compile=True)`` also compiles a bond model's bond head (an eager head was
    about a seventh of a compiled step): its edge logits run through torch.compile and match eager."""
    from moldiff.pipeline import load_pretrained

    pipe = load_pretrained("qm9-bonds")
    g = gen(5)
    sizes = torch.tensor([5, 7])
    batch = torch.repeat_interleave(torch.arange(2), sizes)
    edge_index = fully_connected_edges(batch)
    rev = reverse_edges(edge_index, int(sizes.sum()))
    pos = torch.randn(int(sizes.sum()), 3, generator=g)
    h = torch.nn.functional.one_hot(torch.randint(0, 5, (int(sizes.sum()),), generator=g),
                                    pipe.features.dim).float()
    cls = torch.randint(0, pipe.bond_types, (edge_index.shape[1],), generator=g)
    cls = torch.minimum(cls, cls[rev])  # equal on i -> j and j -> i
    e = torch.nn.functional.one_hot(cls, pipe.bond_types).float()
    t = torch.tensor([0.15, 0.7])
    ref = pipe.predict_noise(pos, h, t, batch, edge_index=edge_index, e_t=e)
    outputs = []

    def recording_backend(gm, example_inputs):  # runs each captured graph as it is, keeping its outputs
        def run(*args):
            out = gm.forward(*args)
            outputs.extend(x for x in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(x))
            return out
        return run

    assert load_pretrained("qm9").configure_inference(compile=True, compile_backend=recording_backend)._compiled_head is None
    pipe.configure_inference(compile=True, compile_backend=recording_backend)
    assert pipe._compiled_head is not None
    got = pipe.predict_noise(pos, h, t, batch, edge_index=edge_index, e_t=e)
    assert any(x.shape == (edge_index.shape[1], pipe.bond_types) for x in outputs), "the bond head ran eagerly"
    assert not torch.equal(got[2], torch.zeros_like(got[2]))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
