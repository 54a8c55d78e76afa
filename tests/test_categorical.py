"""Categorical (marginal-transition) diffusion of atom types, formal charges and bond classes: the
maths against closed forms and brute-force Bayes, Monte Carlo frequencies, symmetric edges; the
network in categorical mode (invariant logits, equivariant coordinates); training from scratch on
the debug data, resume, save/load of the marginals; the training-time distribution."""

from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest
import torch

from moldiff.data.statistics import DatasetStatistics, compute_statistics
from moldiff.diffusion import NoiseSchedule, sample_times
from moldiff.diffusion.categorical import (CATEGORICAL_SCHEDULES, CHARGE_VALUES, CategoricalDiffusion,
                                           CategoricalFeatures, MarginalTransition, categorical_alpha_bar)
from moldiff.diffusion.times import parse_time_sampling
from moldiff.geometry import fully_connected_edges, reverse_edges

M4 = [0.5, 0.3, 0.15, 0.05]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def transition(kind: str = "coordinate", marginals=M4) -> MarginalTransition:
    return MarginalTransition(marginals, categorical_alpha_bar(kind, NoiseSchedule.polynomial()))


def matrices(tr: MarginalTransition, s: float, t: float):
    """Brute-force transition matrices (rows: from, columns: to): Qbar_s, Qbar_t, Q_{t|s}."""
    m = tr.marginals
    k = len(m)
    ab_s, ab_t = (float(tr.alpha_bar(torch.tensor(x, dtype=torch.float64))) for x in (s, t))
    eye, ones = torch.eye(k, dtype=torch.float64), torch.ones(k, 1, dtype=torch.float64)
    q_s = ab_s * eye + (1 - ab_s) * ones * m
    q_t = ab_t * eye + (1 - ab_t) * ones * m
    a = ab_t / ab_s
    q_ts = a * eye + (1 - a) * ones * m
    return q_s, q_t, q_ts


# ----------------------------------------------------------------------------- schedule, forward
@pytest.mark.parametrize("kind", CATEGORICAL_SCHEDULES)
def test_forward_marginals_are_the_data_at_t0_and_the_marginal_at_t1(kind):
    tr = transition(kind)
    x0 = torch.tensor([0, 1, 2, 3])
    onehot = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(tr.forward_probs(x0, 0.0), onehot, atol=0, rtol=0)
    torch.testing.assert_close(tr.forward_probs(x0, torch.ones(4)), tr.marginals.expand(4, 4), atol=1e-15, rtol=0)
    ab = tr.alpha_bar(torch.linspace(0, 1, 101, dtype=torch.float64))
    assert float(ab[0]) == 1.0 and float(ab[-1]) == 0.0 and bool((ab.diff() < 0).all())
    # in between: alpha_bar onehot + (1 - alpha_bar) m, rows summing to 1
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    p = tr.forward_probs(x0, t)
    a = tr.alpha_bar(t).unsqueeze(-1)
    torch.testing.assert_close(p, a * onehot + (1 - a) * tr.marginals, atol=1e-15, rtol=0)
    torch.testing.assert_close(p.sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-15, rtol=0)


def test_coordinate_schedule_is_the_rescaled_alpha_squared_and_cosine_is_midis():
    ns = NoiseSchedule.polynomial()
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    a2 = ns.alpha_sigma(t)[0] ** 2
    want = (a2 - a2[-1]) / (a2[0] - a2[-1])
    torch.testing.assert_close(categorical_alpha_bar("coordinate", ns)(t), want, atol=1e-12, rtol=0)
    s = 0.008
    cos = torch.cos((t + s) / (1 + s) * np.pi / 2) ** 2 / np.cos(s / (1 + s) * np.pi / 2) ** 2
    torch.testing.assert_close(categorical_alpha_bar("cosine")(t)[:-1], cos[:-1], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="noise schedule"):
        categorical_alpha_bar("coordinate")
    with pytest.raises(ValueError, match="unknown categorical schedule"):
        categorical_alpha_bar("linear")


def test_transitions_compose_multiplicatively():
    tr = transition()
    q_s, q_t, q_ts = matrices(tr, 0.3, 0.65)
    torch.testing.assert_close(q_s @ q_ts, q_t, atol=1e-14, rtol=0)


def test_forward_draws_match_the_closed_form():
    tr = transition()
    n = 200_000
    x0 = torch.full((n,), 1)
    draws = tr.sample_forward(x0, 0.55, gen(0))
    freq = torch.bincount(draws, minlength=4).double() / n
    want = tr.forward_probs(x0[:1], 0.55)[0]
    assert (freq - want).abs().max() < 4.5 * float((want * (1 - want) / n).sqrt().max()), (freq, want)
    prior = torch.bincount(tr.sample_prior(n, gen(1)), minlength=4).double() / n
    assert (prior - tr.marginals).abs().max() < 0.005
    again = tr.sample_forward(x0[:1000], 0.55, gen(0))
    assert torch.equal(again, draws[:1000])  # the generator decides


def test_class_floor_caps_alpha_bar_and_keeps_the_random_stream():
    """``floor = f``: q(x_t | x_0) = (1 - f) [x_0] + f m wherever alpha_bar(t) > 1 - f, the plain
    process elsewhere; the draws consume the generator exactly as without a floor."""
    tr, f = transition(), 0.05
    x0 = torch.tensor([0, 1, 2, 3])
    eye = torch.eye(4, dtype=torch.float64)
    for t in (0.0, 0.01):  # alpha_bar ~ 1: the floor decides
        torch.testing.assert_close(tr.forward_probs(x0, t, floor=f), (1 - f) * eye + f * tr.marginals, rtol=0, atol=1e-12)
    late = 0.8  # alpha_bar well below 1 - f: unchanged
    assert float(tr.alpha_bar(torch.tensor(late, dtype=torch.float64))) < 1 - f
    torch.testing.assert_close(tr.forward_probs(x0, late, floor=f), tr.forward_probs(x0, late), rtol=0, atol=0)
    n = 100_000
    g_plain, g_floor = gen(3), gen(3)
    plain = tr.sample_forward(torch.full((n,), 2), 0.0, g_plain)
    floored = tr.sample_forward(torch.full((n,), 2), 0.0, g_floor, floor=f)
    assert torch.equal(plain, torch.full((n,), 2))  # t = 0: the data itself
    changed = float((floored != 2).double().mean())
    want = f * (1 - float(tr.marginals[2]))
    assert abs(changed - want) < 4.5 * (want * (1 - want) / n) ** 0.5, (changed, want)
    assert torch.equal(torch.rand(5, generator=g_plain), torch.rand(5, generator=g_floor))


# ----------------------------------------------------------------------------- posterior
@pytest.mark.parametrize("kind", CATEGORICAL_SCHEDULES)
@pytest.mark.parametrize("s, t", [(0.0, 0.2), (0.3, 0.6), (0.7, 0.71), (0.5, 1.0)])
def test_posterior_is_bayes_rule_by_brute_force(kind, s, t):
    tr = transition(kind)
    q_s, q_t, q_ts = matrices(tr, s, t)
    pairs = list(itertools.product(range(4), range(4)))  # (x0, x_t)
    x0 = torch.tensor([c for c, _ in pairs])
    x_t = torch.tensor([j for _, j in pairs])
    got = tr.posterior_probs(x_t, x0, s, t)
    want = torch.stack([q_ts[:, j] * q_s[c] / q_t[c, j] for c, j in pairs])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    # per-item times give the same numbers
    got2 = tr.posterior_probs(x_t, x0, torch.full((16,), s, dtype=torch.float64), torch.full((16,), t, dtype=torch.float64))
    torch.testing.assert_close(got2, got, atol=0, rtol=0)


@pytest.mark.parametrize("s, t", [(0.1, 0.4), (0.45, 0.9)])
def test_posterior_averaged_over_the_forward_process_is_q_s_given_x0(s, t):
    tr = transition()
    for c in range(4):
        x0 = torch.full((4,), c)
        x_t = torch.arange(4)
        post = tr.posterior_probs(x_t, x0, s, t)  # row j: q(x_s | x_t = j, x0 = c)
        weight = tr.forward_probs(x0[:1], t)[0]  # q(x_t = j | x0 = c)
        torch.testing.assert_close(weight @ post, tr.forward_probs(x0[:1], s)[0], atol=1e-14, rtol=0)


def test_reverse_distribution_mixes_posteriors_by_the_networks_clean_probabilities():
    tr = transition()
    s, t = 0.35, 0.6
    g = gen(3)
    logits = torch.randn(4, 4, generator=g, dtype=torch.float64)
    x_t = torch.tensor([0, 1, 2, 3])
    q_s, q_t, q_ts = matrices(tr, s, t)
    p0 = logits.softmax(-1)
    want = torch.stack([sum(p0[r, c] * q_ts[:, j] * q_s[c] / q_t[c, j] for c in range(4)) for r, j in enumerate(x_t.tolist())])
    got = tr.reverse_probs(x_t, logits, s, t)
    torch.testing.assert_close(got, want, atol=1e-13, rtol=0)
    # a confident network gives the posterior of its class
    sure = torch.full((4, 4), -1e4, dtype=torch.float64)
    sure[:, 2] = 0.0
    torch.testing.assert_close(tr.reverse_probs(x_t, sure, s, t), tr.posterior_probs(x_t, torch.full((4,), 2), s, t),
                               atol=1e-12, rtol=0)
    # to s = 0 the reverse step is the network's own p(x0 | x_t)
    torch.testing.assert_close(tr.reverse_probs(x_t, logits, 0.0, t), p0, atol=1e-14, rtol=0)
    # Monte Carlo frequencies of the reverse draws
    n = 100_000
    draws = tr.sample_reverse(torch.full((n,), 1), logits[1:2].expand(n, 4), s, t, gen(4))
    freq = torch.bincount(draws, minlength=4).double() / n
    assert (freq - got[1]).abs().max() < 0.006, (freq, got[1])


def test_classes_of_zero_marginal_stay_consistent():
    """A class the data never shows (marginal 0) can only be x_t if it was x_0: the reverse step then
    conditions the network's clean probabilities on that, and never draws such a class from noise."""
    tr = transition(marginals=[0.6, 0.4, 0.0])
    assert not bool((tr.sample_prior(5000, gen(0)) == 2).any())
    x_t = torch.tensor([2, 0])
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]], dtype=torch.float64))
    got = tr.reverse_probs(x_t, logits, 0.3, 0.6)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(-1), torch.ones(2, dtype=torch.float64), atol=1e-14, rtol=0)
    torch.testing.assert_close(got[0], tr.posterior_probs(x_t[:1], torch.tensor([2]), 0.3, 0.6)[0], atol=1e-14, rtol=0)
    assert float(tr.posterior_probs(torch.tensor([0]), torch.tensor([1]), 0.3, 0.6)[0, 2]) == 0.0


def test_decode_is_argmax_or_a_draw_of_the_clean_distribution():
    tr = transition()
    logits = torch.tensor([[0.0, 3.0, 1.0, -1.0], [2.0, 0.0, 0.0, 0.0]])
    assert tr.decode(logits).tolist() == [1, 0]
    n = 50_000
    draws = tr.decode(logits[:1].expand(n, 4), sample=True, generator=gen(2))
    freq = torch.bincount(draws, minlength=4).double() / n
    assert (freq - logits[0].double().softmax(-1)).abs().max() < 0.01


# ----------------------------------------------------------------------------- symmetric edges
def edges(sizes=(3, 4, 6, 1)):
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    edge_index = fully_connected_edges(batch)
    return batch, edge_index, reverse_edges(edge_index, batch.shape[0])


def test_edge_draws_are_one_per_pair_and_symmetric():
    tr = transition()
    batch, edge_index, rev = edges()
    g = gen(5)
    x0 = torch.randint(0, 4, (edge_index.shape[1],), generator=g)
    x0 = torch.where(edge_index[0] < edge_index[1], x0, x0[rev])
    t = torch.rand(4, generator=g, dtype=torch.float64)[batch[edge_index[0]]]
    x_t = tr.sample_forward_edges(x0, t, edge_index, rev, g)
    assert torch.equal(x_t, x_t[rev])
    prior = tr.sample_prior_edges(edge_index, rev, g)
    assert torch.equal(prior, prior[rev])
    logits = torch.randn(edge_index.shape[1], 4, generator=g)  # deliberately not symmetric
    x_s = tr.sample_reverse_edges(x_t, logits, 0.5 * t, t, edge_index, rev, g)
    assert torch.equal(x_s, x_s[rev])
    upper = edge_index[0] < edge_index[1]
    assert torch.equal(tr.decode_edges(logits, edge_index, rev)[upper], logits.argmax(-1)[upper])
    for sample in (False, True):
        d = tr.decode_edges(logits, edge_index, rev, sample=sample, generator=g)
        assert torch.equal(d, d[rev])


def test_edge_draws_compute_the_upper_half_only_and_match_the_full_computation():
    """The edge samplers evaluate probabilities on the ``i < j`` half only: the same draws, from the same
    generator state, as drawing from the rows of the full ``(E, K)`` computation."""
    from moldiff.diffusion.categorical import symmetric_sample

    tr = transition()
    batch, edge_index, rev = edges()
    E = edge_index.shape[1]
    g = gen(8)
    x = torch.randint(0, 4, (E,), generator=g)
    x = torch.where(edge_index[0] < edge_index[1], x, x[rev])
    logits = torch.randn(E, 4, generator=g)
    t = torch.rand(4, generator=g, dtype=torch.float64)[batch[edge_index[0]]]
    s = 0.5 * t
    pairs = [(lambda r: tr.sample_reverse_edges(x, logits, s, t, edge_index, rev, r),
              lambda r: symmetric_sample(tr.reverse_probs(x, logits, s, t), edge_index, rev, r)),
             (lambda r: tr.sample_transition_edges(x, s, t, edge_index, rev, r),
              lambda r: symmetric_sample(tr.transition_probs(x, s, t), edge_index, rev, r)),
             (lambda r: tr.sample_forward_edges(x, t, edge_index, rev, r, floor=0.05),
              lambda r: symmetric_sample(tr.forward_probs(x, t, 0.05), edge_index, rev, r)),
             (lambda r: tr.sample_reverse_edges(x, logits, 0.2, 0.3, edge_index, rev, r),  # one time for all
              lambda r: symmetric_sample(tr.reverse_probs(x, logits, 0.2, 0.3), edge_index, rev, r)),
             (lambda r: tr.decode_edges(logits, edge_index, rev, sample=True, generator=r),
              lambda r: symmetric_sample(tr.clean_probs(logits), edge_index, rev, r))]
    for half, full in pairs:
        got, want = half(gen(9)), full(gen(9))
        assert torch.equal(got, want) and torch.equal(got, got[rev])
    assert not torch.equal(pairs[0][0](gen(9)), pairs[0][0](gen(10)))  # the draws do depend on the generator


def test_edge_draw_frequencies_match_the_closed_form():
    tr = transition()
    batch = torch.repeat_interleave(torch.arange(2000), torch.full((2000,), 6))  # 30,000 pairs
    edge_index = fully_connected_edges(batch)
    rev = reverse_edges(edge_index, batch.shape[0])
    x0 = torch.full((edge_index.shape[1],), 2)
    x_t = tr.sample_forward_edges(x0, 0.4, edge_index, rev, gen(6))
    upper = edge_index[0] < edge_index[1]
    freq = torch.bincount(x_t[upper], minlength=4).double() / int(upper.sum())
    assert (freq - tr.forward_probs(x0[:1], 0.4)[0]).abs().max() < 0.012


# ----------------------------------------------------------------------------- features, statistics
def test_categorical_features_encode_split_and_round_trip():
    f = CategoricalFeatures(5, (0.5, 0.3, 0.1, 0.08, 0.02), CHARGE_VALUES, (0.01, 0.98, 0.01), 4, (0.9, 0.08, 0.015, 0.005))
    assert f.dim == 8 and f.include_charges
    types, formal = torch.tensor([0, 4, 1]), torch.tensor([0, -1, 1])
    cls = f.charge_classes(formal)
    assert cls.tolist() == [1, 0, 2] and torch.equal(f.charge_values_of(cls), formal)
    h = f.encode(types, cls)
    assert h.shape == (3, 8) and torch.equal(h.sum(-1), torch.full((3,), 2.0))
    tl, cl = f.split(h)
    assert torch.equal(tl.argmax(-1), types) and torch.equal(cl.argmax(-1), cls)
    assert f.encode_bonds(torch.tensor([0, 3])).tolist() == [[1, 0, 0, 0], [0, 0, 0, 1]]
    assert CategoricalFeatures.from_dict(f.to_dict()) == f
    with pytest.raises(ValueError, match="not among the classes"):
        f.charge_classes(torch.tensor([2]))
    with pytest.raises(ValueError, match="bond marginals"):
        CategoricalFeatures(5, (0.2,) * 5, bond_types=4)
    diff = CategoricalDiffusion.from_features(f, NoiseSchedule.polynomial())
    assert diff.types.num_classes == 5 and diff.charges.num_classes == 3 and diff.bonds.num_classes == 4
    plain = CategoricalDiffusion.from_features(CategoricalFeatures(5, (0.2,) * 5, schedule="cosine"))
    assert plain.charges is None and plain.bonds is None


def test_statistics_count_charges_and_bond_classes_over_all_pairs():
    # two molecules: 3 atoms (2 bonds), 4 atoms (3 bonds, one double)
    stats = compute_statistics(("H", "C"), np.array([3, 4]), np.array([0, 1, 0, 1, 1, 0, 0]),
                               formal_charges=np.array([0, 1, -1, 0, 0, 0, 0]), bond_orders=np.array([1, 1, 1, 2, 1]))
    assert stats.charge_counts == [[-1, 1], [0, 5], [1, 1]]
    assert stats.bond_counts == [3 + 6 - 5, 4, 1, 0]
    np.testing.assert_allclose(stats.charge_marginals(CHARGE_VALUES), [1 / 7, 5 / 7, 1 / 7])
    np.testing.assert_allclose(stats.bond_marginals(4), [4 / 9, 4 / 9, 1 / 9, 0.0])
    back = DatasetStatistics.from_dict(stats.to_dict())
    assert back == stats
    old = compute_statistics(("H", "C"), np.array([3]), np.array([0, 1, 0]))
    assert "charge_counts" not in old.to_dict() and DatasetStatistics.from_dict(old.to_dict()).bond_counts == []
    with pytest.raises(ValueError, match="no formal charges"):
        old.charge_marginals(CHARGE_VALUES)
    with pytest.raises(ValueError, match="outside the classes"):
        stats.charge_marginals((0, 1))


# ----------------------------------------------------------------------------- training times
def test_time_sampling_beta_2_1_has_mean_one_third_and_uniform_is_torch_rand():
    n = 100_000
    t = sample_times(n, "beta:2,1", gen(0))
    assert t.dtype == torch.float64 and float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    assert abs(float(t.mean()) - 1.0 / 3.0) < 0.004  # sd of the mean: 0.236 / sqrt(n) = 0.00075
    # density 2 (1 - t): P(t < 0.5) = 0.75
    assert abs(float((t < 0.5).double().mean()) - 0.75) < 0.006
    u = sample_times(n, "uniform", gen(0))
    assert torch.equal(u, torch.rand(n, generator=gen(0), dtype=torch.float64))
    torch.testing.assert_close(t, 1.0 - u.sqrt(), atol=1e-12, rtol=0)  # Beta(2, 1): inverse CDF sqrt(u)
    assert parse_time_sampling("beta:2,1") == (2.0, 1.0) and parse_time_sampling("uniform") is None
    for bad in ("beta", "beta:2", "beta:0,1", "beta:a,b", "logit"):
        with pytest.raises(ValueError, match="time sampling"):
            parse_time_sampling(bad)


# ----------------------------------------------------------------------------- the network
from pathlib import Path  # noqa: E402

from moldiff.equivariance import assert_bond_equivariant  # noqa: E402
from moldiff.models import DenoiserConfig, EGNNDenoiser  # noqa: E402
from moldiff.models.egnn import EquivariantUpdate  # noqa: E402
from moldiff.pipeline import MolDiffPipeline  # noqa: E402

FEATURES = CategoricalFeatures(5, (0.5, 0.35, 0.06, 0.08, 0.01), CHARGE_VALUES, (0.01, 0.98, 0.01), 4,
                               (0.88, 0.11, 0.008, 0.002))


def categorical_pipeline(seed: int = 0, features: CategoricalFeatures = FEATURES) -> MolDiffPipeline:
    torch.manual_seed(seed)
    net = EGNNDenoiser(DenoiserConfig(num_features=features.dim, hidden=16, n_layers=3, bond_types=features.bond_types,
                                      bond_output="logits" if features.bond_types else "eps"))
    g = gen(seed)
    with torch.no_grad():  # O(1) coordinate updates, so an equivariance error could not hide
        for mod in net.modules():
            if isinstance(mod, EquivariantUpdate):
                mod.out.weight.copy_(0.3 * torch.randn(mod.out.weight.shape, generator=g))
    stats = compute_statistics(("H", "C", "N", "O", "F"), np.array([3, 4]), np.array([0, 1, 0, 1, 2, 3, 4]))
    return MolDiffPipeline(net, NoiseSchedule.polynomial(), features, stats, [1, 6, 7, 8, 9])


def test_categorical_network_logits_are_invariant_and_coordinates_equivariant():
    pipe = categorical_pipeline(seed=1).double().eval()
    sizes = [2, 5, 7]
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    n = batch.shape[0]
    g = gen(2)
    pos = 1.5 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    types = torch.randint(0, 5, (n,), generator=g)
    charges = torch.randint(0, 3, (n,), generator=g)
    h = FEATURES.encode(types, charges, dtype=torch.float64)
    edge_index = fully_connected_edges(batch)
    rev = reverse_edges(edge_index, n)
    bonds = torch.randint(0, 4, (edge_index.shape[1],), generator=g)
    bonds = torch.where(edge_index[0] < edge_index[1], bonds, bonds[rev])
    e = FEATURES.encode_bonds(bonds, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    eps, logits, bond_logits = pipe.predict_noise(pos, h, t, batch, edge_index=edge_index, e_t=e)
    assert eps.shape == (n, 3) and logits.shape == (n, 8) and bond_logits.shape == (edge_index.shape[1], 4)
    torch.testing.assert_close(bond_logits, bond_logits[rev], atol=1e-12, rtol=0)  # symmetric in i, j
    # rotations, reflections, translations and a permutation within molecules
    assert_bond_equivariant(lambda p, x, y: pipe.predict_noise(p, x, t, batch, edge_index=edge_index, e_t=y),
                            pos, h, e, batch, edge_index, trials=4, generator=g)
    # the bond logits come out raw whatever raw_bonds says (there is no noise to convert them to)
    _, _, again = pipe.predict_noise(pos, h, t, batch, edge_index=edge_index, e_t=e, raw_bonds=True)
    torch.testing.assert_close(again, bond_logits, atol=0, rtol=0)


def test_categorical_pipeline_saves_and_loads_its_marginals(tmp_path):
    pipe = categorical_pipeline()
    pipe.save_pretrained(tmp_path / "m")
    loaded = MolDiffPipeline.from_pretrained(tmp_path / "m")
    assert loaded.features == FEATURES and loaded.config_dict() == pipe.config_dict()
    cat = loaded.categorical
    torch.testing.assert_close(cat.bonds.marginals, torch.tensor(FEATURES.bond_marginals, dtype=torch.float64))
    torch.testing.assert_close(cat.charges.marginals, torch.tensor(FEATURES.charge_marginals, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs each atom's formal charge"):
        loaded.nll_terms(torch.zeros(3, 3), torch.zeros(3, dtype=torch.long), torch.ones(3), torch.zeros(3, dtype=torch.long), 1)
    assert categorical_pipeline(features=CategoricalFeatures(5, (0.2,) * 5)).categorical.bonds is None
    with pytest.raises(ValueError, match="bond_output"):
        MolDiffPipeline(EGNNDenoiser(DenoiserConfig(num_features=8, hidden=8, n_layers=1, bond_types=4)),
                        NoiseSchedule.polynomial(), FEATURES, pipe.statistics, [1, 6, 7, 8, 9])


# ----------------------------------------------------------------------------- training
from moldiff.training.config import ConfigError, load_config  # noqa: E402
from moldiff.training.loop import (Trainer, categorical_loss_terms, diffusion_loss,  # noqa: E402
                                   load_training_data)

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_tiny.yaml"
CAT = ["diffusion.categorical=true", "model.bond_types=4", "model.bond_output=logits", "model.num_features=8"]


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def cat_data():
    """The debug config's data with bond and formal-charge labels (the cached QM9 table)."""
    return load_training_data(load_config(DEBUG, CAT))


def test_categorical_statistics_come_from_the_training_split(cat_data):
    stats = cat_data.statistics
    assert sum(stats.bond_counts) == int((cat_data.train.num_atoms * (cat_data.train.num_atoms - 1) // 2).sum())
    assert sum(c for _, c in stats.charge_counts) == int(cat_data.train.num_atoms.sum())
    _, batch = next(iter(cat_data.train.batches(8, 0, 0, 0)))
    assert batch.formal_charges is not None and batch.formal_charges.shape == batch.types.shape


def test_categorical_bond_model_trains_from_scratch_and_validates(tmp_path, cat_data):
    logged = []
    cfg = load_config(DEBUG, CAT + ["train.max_steps=10", "train.log_every=5", "train.val_every=5",
                                    "diffusion.time_sampling=beta:2,1"])
    trainer = Trainer(cfg, tmp_path, data=cat_data, log=logged.append)
    trainer.train()
    import csv

    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [int(r["step"]) for r in rows] == [5, 10]
    assert all(np.isfinite(float(r["loss"])) and np.isfinite(float(r["val_loss"])) for r in rows)
    lines = [m for m in logged if m.startswith("validation at step")]
    assert len(lines) == 2 and all(k in lines[0] for k in ("pos=", "types=", "charges=", "bonds="))
    terms = dict(kv.split("=") for kv in lines[-1].split(": ", 1)[1].split(" (")[0].split())
    assert sum(float(v) for v in terms.values()) == pytest.approx(float(rows[-1]["val_loss"]), abs=1e-5)
    loaded = MolDiffPipeline.from_pretrained(tmp_path / "pipeline")
    assert loaded.features == trainer.pipe.features and loaded.categorical.bonds is not None
    np.testing.assert_allclose(loaded.features.bond_marginals, cat_data.statistics.bond_marginals(4))


def test_categorical_loss_overfits_one_batch(tmp_path):
    """16 molecules, t in [0.3, 0.5]: the full categorical loss (8 fixed draws of times and noise)
    falls from 4.46 to 1.84 in 60 steps (measured, one core); require a 40% drop."""
    cfg = load_config(DEBUG, CAT + ["data.max_train_molecules=16", "train.batch_size=16", "optim.lr=2e-3",
                                    "optim.ema_decay=0", "optim.clip=none"])
    trainer = Trainer(cfg, tmp_path, data=load_training_data(cfg), log=quiet)
    batch = trainer.data.train.batch(np.arange(16))

    def times(g):
        return 0.3 + 0.2 * torch.rand(16, generator=g, dtype=torch.float64)

    @torch.no_grad()
    def fixed_loss():
        g = torch.Generator().manual_seed(99)
        return float(np.mean([float(diffusion_loss(trainer.pipe, batch, times(g), g)) for _ in range(8)]))

    before = fixed_loss()
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = diffusion_loss(trainer.pipe, batch, times(g), g)
        assert torch.isfinite(loss)
        trainer.optimizer.zero_grad()
        loss.backward()
        trainer.optimizer.step()
    after = fixed_loss()
    assert after < 0.6 * before, (before, after)


def test_categorical_loss_combines_its_terms_and_shards_like_the_whole_batch(tmp_path, cat_data):
    trainer = Trainer(load_config(DEBUG, CAT), tmp_path, data=cat_data, log=quiet)
    _, batch = next(iter(cat_data.train.batches(8, 0, 0, 0)))
    t = torch.rand(8, generator=gen(1), dtype=torch.float64)
    with torch.no_grad():
        terms = categorical_loss_terms(trainer.pipe, batch, t, gen(2))
        assert set(terms) == {"pos", "types", "charges", "bonds"} and all(v.shape == (8,) for v in terms.values())
        full = diffusion_loss(trainer.pipe, batch, t, gen(2), type_weight=2.0, charge_weight=0.5, bond_weight=3.0)
        want = (terms["pos"] + 2.0 * terms["types"] + 0.5 * terms["charges"] + 3.0 * terms["bonds"]).mean()
        torch.testing.assert_close(full, want, atol=1e-6, rtol=0)
        halves = [categorical_loss_terms(trainer.pipe, batch, t, gen(2), shard=(lo, lo + 4)) for lo in (0, 4)]
    for name, value in terms.items():
        torch.testing.assert_close(torch.cat([h[name] for h in halves]), value, atol=1e-5, rtol=1e-5)


def test_class_floor_trains_a_bond_model_and_is_refused_where_it_means_nothing(tmp_path, cat_data):
    _, batch = next(iter(cat_data.train.batches(8, 0, 0, 0)))
    trainer = Trainer(load_config(DEBUG, CAT), tmp_path, data=cat_data, log=quiet)
    t = torch.zeros(8, dtype=torch.float64)  # the data end, where only the floor corrupts
    with torch.no_grad():
        plain = categorical_loss_terms(trainer.pipe, batch, t, gen(4))
        floored = categorical_loss_terms(trainer.pipe, batch, t, gen(4), class_floor=0.5)
    for name in ("types", "charges", "bonds"):  # a corrupted input changes what the network sees and scores
        assert not torch.equal(plain[name], floored[name]), name
    cfg = load_config(DEBUG, CAT + ["diffusion.class_floor=0.05", "train.max_steps=4", "train.val_every=4"])
    run = Trainer(cfg, tmp_path / "run", data=cat_data, log=quiet)
    run.train()
    assert run.step == 4 and np.isfinite(run.validation_loss(max_batches=1))
    for bad, message in ((CAT + ["diffusion.class_floor=1.0"], "class_floor must be in"),
                         (["diffusion.class_floor=0.05"], "set diffusion.categorical=true")):
        with pytest.raises(ConfigError, match=message):
            load_config(DEBUG, bad)


def test_categorical_resume_reproduces_an_uninterrupted_run_exactly(tmp_path, cat_data):
    import csv

    def rows(d):
        return [{k: v for k, v in r.items() if k != "hours"} for r in csv.DictReader(open(d / "log.csv"))]

    full = load_config(DEBUG, CAT + ["train.max_steps=12", "diffusion.time_sampling=beta:2,1"])
    straight = Trainer(full, tmp_path / "a", data=cat_data, log=quiet)
    straight.train()
    Trainer(load_config(DEBUG, CAT + ["train.max_steps=7", "diffusion.time_sampling=beta:2,1"]), tmp_path / "b",
            data=cat_data, log=quiet).train()
    resumed = Trainer(full, tmp_path / "b", data=cat_data, log=quiet)
    assert resumed.resume() and resumed.step == 7
    resumed.train()
    assert rows(tmp_path / "b") == rows(tmp_path / "a")
    for k, v in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    # a categorical checkpoint does not continue as a Gaussian model (nor the other way round)
    gaussian = Trainer(load_config(DEBUG, ["model.bond_types=4", "model.bond_output=logits", "train.max_steps=14"]),
                       tmp_path / "b", data=cat_data, log=quiet)
    with pytest.raises(ValueError, match="categorical"):
        gaussian.resume()


@pytest.mark.parametrize("overrides, match", [
    (["model.num_features=6"], "set model.num_features=8"),
    (["model.bond_output=eps"], "bond_output=logits"),
    (["model.self_condition=true"], "self_condition"),
    (["diffusion.known_types_prob=0.5"], "known_types_prob"),
])
def test_categorical_mode_refuses_what_it_does_not_support(tmp_path, cat_data, overrides, match):
    with pytest.raises(ValueError, match=match):
        Trainer(load_config(DEBUG, CAT + overrides), tmp_path, data=cat_data, log=quiet)


def test_categorical_without_charges_or_bonds_trains(tmp_path):
    cfg = load_config(DEBUG, ["diffusion.categorical=true", "diffusion.categorical_charges=false",
                              "model.num_features=5", "train.max_steps=3", "train.val_every=3",
                              "diffusion.categorical_schedule=cosine"])
    data = load_training_data(cfg)
    trainer = Trainer(cfg, tmp_path, data=data, log=quiet)
    trainer.train()
    assert trainer.pipe.features.dim == 5 and trainer.pipe.categorical.charges is None
    assert trainer.pipe.features.schedule == "cosine"
    assert np.isfinite(trainer.validation_loss(max_batches=1))


def test_time_sampling_trains_gaussian_models_with_the_same_random_stream(tmp_path):
    """Beta times are the inverse CDF of the uniform numbers EDM draws: a Gaussian run with
    beta:2,1 trains, and its generator ends where the uniform run's does."""
    data = load_training_data(load_config(DEBUG))
    ends = {}
    for spec in ("uniform", "beta:2,1"):
        trainer = Trainer(load_config(DEBUG, ["train.max_steps=3", "train.val_every=0", "train.log_every=1",
                                              f"diffusion.time_sampling={spec}"]), tmp_path / spec.replace(":", "_"),
                          data=data, log=quiet)
        trainer.train()
        ends[spec] = trainer.generator.get_state()
    assert torch.equal(ends["uniform"], ends["beta:2,1"])
    import csv

    rows = list(csv.DictReader(open(tmp_path / "beta_2,1" / "log.csv")))
    assert len(rows) == 3 and all(np.isfinite(float(r["loss"])) for r in rows)


# ----------------------------------------------------------------------------- sampling


def test_categorical_models_sample_through_the_one_loop():
    """Elements, charge classes and bond orders are drawn by the reverse loop's categorical step: the
    output has valid classes, symmetric bonds (i < j rows, orders 1-3), formal charges from the
    charge classes, no faults, and the same molecules for the same seed."""
    pipe = categorical_pipeline(seed=2)
    a = pipe.sample_arrays(6, steps=5, seed=3, num_atoms=[3, 4, 4, 3, 4, 3])
    b = pipe.sample_arrays(6, steps=5, seed=3, num_atoms=[3, 4, 4, 3, 4, 3])
    assert (a.fault_step == -1).all() and len(a.bonds) == 6 and len(a.formal_charges) == 6
    for k in range(6):
        n = len(a.types[k])
        assert a.positions[k].shape == (n, 3) and np.isfinite(a.positions[k]).all()
        assert ((a.types[k] >= 0) & (a.types[k] < 5)).all()
        assert set(a.formal_charges[k].tolist()) <= set(CHARGE_VALUES)
        rows = a.bonds[k]
        assert ((rows[:, 0] < rows[:, 1]) & (rows[:, 1] < n) & (rows[:, 2] >= 1) & (rows[:, 2] <= 3)).all()
        np.testing.assert_array_equal(a.positions[k], b.positions[k])
        np.testing.assert_array_equal(a.types[k], b.types[k])
        np.testing.assert_array_equal(a.bonds[k], b.bonds[k])
    mols = pipe.sample(3, steps=4, seed=0, num_atoms=4)
    assert all(m.formal_charges is not None and m.generated_bonds is not None for m in mols)


def test_confident_logits_decide_the_classes():
    """A network certain of one clean class per variable (every atom oxygen, charge 0, every pair
    double-bonded) makes every sample exactly that: the reverse step draws from
    sum_c p(x0 = c | x_t) q(x_s | x_t, x0 = c), which reaches the clean class at s = 0."""
    pipe = categorical_pipeline(seed=3)
    network = pipe.predict_noise

    def certain(pos_t, h_t, t, batch, **kw):
        eps_pos, logits, bond_logits = network(pos_t, h_t, t, batch, **kw)
        logits = torch.full_like(logits, -30.0)
        logits[:, 3] = 30.0  # O
        logits[:, 5 + CHARGE_VALUES.index(0)] = 30.0
        bond_logits = torch.full_like(bond_logits, -30.0)
        bond_logits[:, 2] = 30.0
        return eps_pos, logits, bond_logits

    pipe.predict_noise = certain
    arrays = pipe.sample_arrays(4, steps=6, seed=0, num_atoms=3)
    for k in range(4):
        assert arrays.types[k].tolist() == [3, 3, 3] and arrays.formal_charges[k].tolist() == [0, 0, 0]
        assert arrays.bonds[k].tolist() == [[0, 1, 2], [0, 2, 2], [1, 2, 2]]


def test_non_finite_logits_are_a_recorded_fault_not_a_crash():
    pipe = categorical_pipeline(seed=4)
    network = pipe.predict_noise

    def broken(pos_t, h_t, t, batch, **kw):
        eps_pos, logits, bond_logits = network(pos_t, h_t, t, batch, **kw)
        logits = logits.clone()
        logits[batch == 1] = float("nan")
        return eps_pos, logits, bond_logits

    pipe.predict_noise = broken
    arrays = pipe.sample_arrays(3, steps=3, seed=0, num_atoms=4)
    assert arrays.fault_step.tolist() == [-1, 0, -1]
    assert not np.isfinite(arrays.positions[1]).any() and np.isfinite(arrays.positions[0]).all()


def test_categorical_models_take_formulas_and_fragments_but_refuse_data_compositions():
    from moldiff.inpainting import Fragment
    from moldiff.pipeline import SampleRequest

    pipe = categorical_pipeline(seed=5)
    made = pipe.generate(SampleRequest(2, formula="CH2O", steps=2))  # this model's molecules have at most 4 atoms
    assert all(sorted(made.symbols(j)) == ["C", "H", "H", "O"] for j in range(2)) and len(made.bonds) == 2
    grown = pipe.generate(SampleRequest(2, fragment=Fragment(["C", "O"], np.array([[0.0, 0, 0], [1.2, 0, 0]])),
                                        num_atoms=4, steps=2))
    assert all(grown.symbols(j)[:2] == ["C", "O"] for j in range(2))
    with pytest.raises(ValueError) as exc:
        pipe.generate(SampleRequest(2, composition="data", steps=2))
    assert "\n" not in str(exc.value)


def test_periodic_sampling_during_training_scores_categorical_models(tmp_path, cat_data):
    """``train.sample_every`` samples the model being trained (through the one reverse loop) and
    logs its EDM metrics."""
    import csv

    from moldiff.cli import _sampled_metrics

    cfg = load_config(DEBUG, CAT + ["train.max_steps=2", "train.sample_every=2", "train.sample_n=3",
                                    "train.sample_steps=2", "train.val_every=0"])
    Trainer(cfg, tmp_path, data=cat_data, log=quiet, evaluate=_sampled_metrics).train()
    with open(tmp_path / "log.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["mol_stable"]]
    assert rows and 0.0 <= float(rows[-1]["atom_stable"]) <= 1.0


def test_molecules_are_judged_on_their_own_bonds_and_written_with_them(tmp_path, capfd):
    """A bond model's samples carry verdicts on the bonds it generated; a valid one is written to
    the SDF with those bonds (``bonds="model"``), and ``moldiff sample`` reports both protocols."""
    import json

    from moldiff.chemistry.metrics import own_bonds_result
    from moldiff.cli import main

    ethene = (["C", "C", "H", "H", "H", "H"], np.random.default_rng(0).normal(size=(6, 3)))
    rows = np.array([[0, 1, 2], [0, 2, 1], [0, 3, 1], [1, 4, 1], [1, 5, 1]])
    good = own_bonds_result(*ethene, rows)
    assert good.valid and good.mol_stable and good.smiles == "[H]C([H])=C([H])[H]" and good.reason is None
    radical = own_bonds_result(*ethene, rows[:4])
    assert radical.valid and not radical.mol_stable
    assert radical.reason == "unstable atoms: C1 (bond-order sum 3, allowed 4), H5 (bond-order sum 0, allowed 1)"
    ammonium = own_bonds_result(["N", "H", "H", "H", "H"], ethene[1][:5], np.array([[0, i, 1] for i in range(1, 5)]),
                                [1, 0, 0, 0, 0])
    assert ammonium.valid and ammonium.smiles == "[H][N+]([H])([H])[H]"
    capfd.readouterr()
    pentavalent = own_bonds_result(["C", "H", "H", "H", "H", "H"], ethene[1], np.array([[0, i, 1] for i in range(1, 6)]))
    assert not pentavalent.valid and not pentavalent.mol_stable and pentavalent.smiles is None
    assert pentavalent.reason.startswith("invalid: Explicit valence for atom # 0 C, 5")
    assert pentavalent.reason.endswith("; unstable atoms: C0 (bond-order sum 5, allowed 4)")
    assert "valence" not in capfd.readouterr().err  # a verdict in the table, not one RDKit line per molecule

    pipe = categorical_pipeline(seed=6)
    mols = pipe.sample(4, steps=3, seed=0, num_atoms=4)
    for m in mols:
        assert m.own_valid is not None and m.own_mol_stable is not None
        assert (m.bonds == "model") == m.own_valid
    ckpt = pipe.save_pretrained(tmp_path / "cat")
    assert main(["sample", "--checkpoint", str(ckpt), "-n", "4", "--steps", "3", "--num-atoms", "4",
                 "-o", str(tmp_path / "out"), "--threads", "1", "--no-novelty"]) == 0
    summary = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert set(summary["own_bonds"]) >= {"validity", "mol_stable"}
    with open(tmp_path / "out" / "samples.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert {"own_bonds_valid", "own_bonds_reason"} <= set(table[0])
    for row, m in zip(table, mols):  # the same seed and settings: the same molecules, their own-bond verdicts written
        assert row["own_bonds_reason"] == (m.own_reason or "")
        assert (row["own_bonds_reason"] == "") == (row["own_bonds_valid"] == row["own_bonds_mol_stable"] == "1")


def test_categorical_step_passes_one_time_when_the_batch_shares_it():
    """The loop's class steps take a single time when every molecule is at the same time (one alpha_bar
    instead of one per bond), and per-variable times otherwise."""
    from moldiff.sampling import CategoricalStep

    index = torch.tensor([0, 0, 1, 2, 2, 2])
    same = torch.full((3,), 0.25, dtype=torch.float64)
    assert torch.equal(CategoricalStep._per(same, index), same[:1])
    mixed = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    assert torch.equal(CategoricalStep._per(mixed, index), mixed[index])
    tr = transition()
    x = torch.tensor([0, 1, 2, 3, 1, 0])
    logits = torch.randn(6, 4, generator=gen(3))
    assert torch.equal(tr.reverse_probs(x, logits, CategoricalStep._per(0.5 * same, index), CategoricalStep._per(same, index)),
                       tr.reverse_probs(x, logits, (0.5 * same)[index], same[index]))
