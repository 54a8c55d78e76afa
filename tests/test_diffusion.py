"""Diffusion maths and the sampling pipeline: schedules, the forward process, the reverse-step
posterior, samplers (contract, exactness, equivariance), losses, and MolDiffPipeline end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from moldiff.chemistry.elements import QM9_ELEMENTS
from moldiff.data.statistics import DatasetStatistics
from moldiff.diffusion import (
    SAMPLERS,
    AncestralSampler,
    AtomFeatures,
    DDIMSampler,
    NoiseSchedule,
    SamplerStep,
    add_noise,
    centred_noise,
    degrees_of_freedom,
    epsilon_loss,
    make_sampler,
)
from moldiff.diffusion.schedules import cosine_alphas2, polynomial_alphas2
from moldiff.equivariance import assert_equivariant
from moldiff.geometry import remove_mean, scatter_mean
from moldiff.models import DenoiserConfig, EGNNDenoiser
from moldiff.models.egnn import EquivariantUpdate
from moldiff.pipeline import CheckpointError, MolDiffPipeline

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def flat_batch(sizes) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor(sizes))


def per_atom(x: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return x[batch].unsqueeze(-1)


# ============================================================================= schedules
def polynomial_reference(grid: int, power: float, precision: float) -> list[float]:
    """alpha^2 on t = k / grid from the docstring's recipe, one scalar at a time (no numpy)."""
    out, cum, prev = [], 1.0, 1.0
    for k in range(grid + 1):
        raw = (1.0 - (k / grid) ** power) ** 2
        cum *= min(max(raw / prev, 0.001), 1.0)
        prev = raw
        out.append((1.0 - 2.0 * precision) * cum + precision)
    return out


def cosine_reference(grid: int, s: float) -> list[float]:
    steps = grid + 2
    f = [math.cos((k / (steps - 1) + s) / (1.0 + s) * math.pi / 2) ** 2 for k in range(steps)]
    out, cum = [], 1.0
    for k in range(1, steps):
        beta = min(max(1.0 - f[k] / f[k - 1], 0.0), 0.999)
        cum *= 1.0 - beta
        out.append(cum)
    return out


SCHEDULES = {
    "polynomial": (lambda: NoiseSchedule.polynomial(power=2.0, precision=1e-5), lambda: polynomial_reference(1000, 2.0, 1e-5)),
    "cosine": (lambda: NoiseSchedule.cosine(s=0.008), lambda: cosine_reference(1000, 0.008)),
}


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_schedule_is_variance_preserving_with_decreasing_snr(kind):
    sched = SCHEDULES[kind][0]()
    t = torch.linspace(0.0, 1.0, 20_011, dtype=F64)  # not a multiple of the grid: most points interpolate
    alpha, sigma = sched.alpha_sigma(t)
    assert alpha.dtype == sigma.dtype == F64
    assert (alpha**2 + sigma**2 - 1.0).abs().max() < 1e-14
    snr = sched.snr(t)
    assert torch.all(snr[1:] < snr[:-1]), "SNR must strictly decrease in t"
    assert torch.allclose(snr, alpha**2 / sigma**2, rtol=1e-10)
    # Times are clamped to [0, 1].
    assert sched.gamma(torch.tensor([-0.5, 1.5], dtype=F64)).tolist() == sched.gamma(torch.tensor([0.0, 1.0], dtype=F64)).tolist()


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_schedule_grid_values_equal_a_direct_recomputation(kind):
    build, reference = SCHEDULES[kind]
    sched = build()
    a2_ref = torch.tensor(reference(), dtype=F64)
    gamma_ref = torch.log1p(-a2_ref) - torch.log(a2_ref)
    t = torch.arange(1001, dtype=F64) / 1000.0
    assert torch.allclose(sched.gamma(t), gamma_ref, rtol=1e-9, atol=1e-9)
    alpha, _ = sched.alpha_sigma(t)
    assert torch.allclose(alpha**2, a2_ref, rtol=1e-9, atol=0)
    # The vectorised builders agree with the loops too.
    vec = polynomial_alphas2(1000, 2.0, 1e-5) if kind == "polynomial" else cosine_alphas2(1000, 0.008)
    assert np.allclose(vec, a2_ref.numpy(), rtol=1e-12, atol=0)


def test_polynomial_schedule_end_points():
    p = 1e-5
    sched = NoiseSchedule.polynomial(power=2.0, precision=p)
    a2 = sched.alpha_sigma(torch.tensor([0.0, 1.0], dtype=F64))[0] ** 2
    # t = 0: the clipped cumulative product is 1, so alpha^2 = (1 - 2p) + p = 1 - p.
    assert a2[0].item() == pytest.approx(1.0 - p, rel=1e-13)
    # t = 1: the raw ratios telescope to alpha_raw^2(0.999) = (1 - 0.999^2)^2; the last ratio is
    # 0 / alpha_raw^2(0.999), clipped up to 0.001 (the only clipped one: the one before is ~0.25).
    expected = p + (1.0 - 2.0 * p) * (1.0 - 0.999**2) ** 2 * 1e-3
    assert a2[1].item() == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(1.0003996e-5, rel=1e-7)


def test_cosine_schedule_end_points():
    s = 0.008
    sched = NoiseSchedule.cosine(s=s)
    a2 = sched.alpha_sigma(torch.tensor([0.0, 1.0], dtype=F64))[0] ** 2

    def f(x):
        return math.cos((x + s) / (1 + s) * math.pi / 2) ** 2

    # EDM's grid has 1002 points x_k = k / 1001 and drops the first; the last beta (1 - ~0) is clipped at 0.999.
    assert a2[0].item() == pytest.approx(f(1 / 1001) / f(0.0), rel=1e-12)
    assert a2[1].item() == pytest.approx(f(1000 / 1001) / f(0.0) * 1e-3, rel=1e-9)


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_schedule_interpolation_between_grid_points_is_linear_in_gamma(kind):
    sched = SCHEDULES[kind][0]()
    table = sched.gamma_table
    k = torch.arange(1000)
    for frac in (0.25, 0.5, 0.9):
        t = (k.to(F64) + frac) / 1000.0
        g = sched.gamma(t)
        assert torch.all(g > table[:-1]) and torch.all(g < table[1:])
        assert torch.allclose(g, (1 - frac) * table[:-1] + frac * table[1:], rtol=1e-9, atol=1e-9)


def test_schedule_rejects_unknown_kind_and_round_trips_its_config():
    with pytest.raises(ValueError, match="unknown schedule"):
        NoiseSchedule("linear")
    sched = NoiseSchedule.polynomial(power=3.0, precision=1e-4, grid=500)
    cfg = dict(sched.config)
    again = NoiseSchedule(cfg.pop("kind"), cfg.pop("grid"), **cfg)
    assert torch.equal(again.gamma_table, sched.gamma_table)
    assert json.loads(json.dumps(sched.config)) == sched.config


# ============================================================================= forward process
def test_centred_noise_has_zero_centroid_per_molecule():
    batch = flat_batch([1, 3, 7, 2])
    eps = centred_noise(batch, 4, generator=gen(0), dtype=F64)
    assert eps.shape == (13, 3)
    assert scatter_mean(eps, batch, 4).abs().max() < 1e-14
    assert torch.equal(eps[0], torch.zeros(3, dtype=F64))  # a one-atom molecule has no free coordinates


def test_forward_process_moments_match_q_zt_given_x():
    """z_t | x over 20,000 copies of one molecule: mean alpha_t x; positions live in the (N-1)*3
    dimensional zero-CoM subspace, so each coordinate has variance sigma_t^2 (N-1)/N and two atoms
    of one molecule have covariance -sigma_t^2 / N; features have variance sigma_t^2."""
    n_atoms, n_feat, copies = 4, 6, 20_000
    g = gen(1)
    x = torch.randn(n_atoms, 3, generator=g, dtype=F64)
    x = x - x.mean(0)
    hx = torch.randn(n_atoms, n_feat, generator=g, dtype=F64)
    batch = flat_batch([n_atoms] * copies)
    sched = NoiseSchedule.polynomial()
    t = torch.full((copies,), 0.6, dtype=F64)
    alpha, sigma = sched.alpha_sigma(t)
    a, s = alpha[0].item(), sigma[0].item()
    noised = add_noise(x.repeat(copies, 1), hx.repeat(copies, 1), alpha, sigma, batch, generator=g)

    # Exactly z = alpha x + sigma eps, with centred position noise.
    assert torch.allclose(noised.pos_t, a * x.repeat(copies, 1) + s * noised.eps_pos, atol=1e-14)
    assert torch.allclose(noised.h_t, a * hx.repeat(copies, 1) + s * noised.eps_h, atol=1e-14)
    assert scatter_mean(noised.eps_pos, batch, copies).abs().max() < 1e-14

    z = noised.pos_t.view(copies, n_atoms, 3)
    zh = noised.h_t.view(copies, n_atoms, n_feat)
    var_pos = s**2 * (n_atoms - 1) / n_atoms
    se_mean = math.sqrt(var_pos / copies)
    assert (z.mean(0) - a * x).abs().max() < 5 * se_mean
    assert (zh.mean(0) - a * hx).abs().max() < 5 * s / math.sqrt(copies)
    # Variance estimates have relative standard error sqrt(2 / copies) = 1%; allow 5%.
    assert torch.allclose(z.var(0), torch.full((n_atoms, 3), var_pos, dtype=F64), rtol=0.05)
    assert torch.allclose(zh.var(0), torch.full((n_atoms, n_feat), s**2, dtype=F64), rtol=0.05)
    centred = z - z.mean(0)
    cov01 = (centred[:, 0, :] * centred[:, 1, :]).mean(0)
    assert torch.allclose(cov01, torch.full((3,), -(s**2) / n_atoms, dtype=F64), atol=0.05 * var_pos)
    # Different coordinates are uncorrelated.
    assert (centred[:, 0, 0] * centred[:, 0, 1]).mean().abs() < 0.05 * var_pos


def test_add_noise_is_reproducible_and_uses_per_molecule_times():
    batch = flat_batch([2, 3])
    pos = remove_mean(torch.randn(5, 3, generator=gen(2), dtype=F64), batch)
    h = torch.randn(5, 6, generator=gen(3), dtype=F64)
    alpha = torch.tensor([1.0, 0.0], dtype=F64)
    sigma = torch.tensor([0.0, 1.0], dtype=F64)
    one = add_noise(pos, h, alpha, sigma, batch, generator=gen(4))
    two = add_noise(pos, h, alpha, sigma, batch, generator=gen(4))
    assert all(torch.equal(u, v) for u, v in zip(one, two))
    assert torch.equal(one.pos_t[:2], pos[:2]) and torch.equal(one.h_t[:2], h[:2])  # clean molecule
    assert torch.equal(one.pos_t[2:], one.eps_pos[2:]) and torch.equal(one.h_t[2:], one.eps_h[2:])  # pure noise


def test_atom_features_encode_and_decode():
    feats = AtomFeatures(num_types=5)
    types = torch.tensor([0, 1, 4, 2])
    charges = torch.tensor([1, 6, 9, 7])
    h = feats.encode(types, charges, dtype=F64)
    assert h.shape == (4, 6) and feats.dim == 6
    assert h[1].tolist() == pytest.approx([0.0, 0.25, 0.0, 0.0, 0.0, 0.6])
    t2, c2 = feats.decode(h + 0.01)
    assert torch.equal(t2, types) and torch.equal(c2, charges)
    no_charge = AtomFeatures(num_types=5, include_charges=False)
    assert no_charge.encode(types).shape == (4, 5) and no_charge.decode(no_charge.encode(types))[1] is None
    with pytest.raises(ValueError):
        feats.encode(types)


# ============================================================================= losses
def test_degrees_of_freedom_count_the_zero_com_subspace():
    batch = flat_batch([1, 2, 9, 29])
    dof = degrees_of_freedom(batch, 4, num_features=6)
    assert dof.tolist() == [3 * (n - 1) + 6 * n for n in (1, 2, 9, 29)]
    # A trailing molecule without atoms would have -3 dimensions; the count is per molecule index.
    assert degrees_of_freedom(batch, 5, num_features=0).tolist() == [0.0, 3.0, 24.0, 84.0, -3.0]


def test_epsilon_loss_exact_prediction_and_known_error():
    batch = flat_batch([2, 3])
    g = gen(5)
    eps_pos = remove_mean(torch.randn(5, 3, generator=g, dtype=F64), batch)
    eps_h = torch.randn(5, 2, generator=g, dtype=F64)
    assert epsilon_loss(eps_pos, eps_pos, eps_h, eps_h, batch, 2).item() == 0.0
    pred_pos, pred_h = eps_pos.clone(), eps_h.clone()
    pred_pos[1, 2] += 1.0  # molecule 0: squared error 1
    pred_h[3, 0] -= 0.5  # molecule 1: squared error 0.25 + 0.25
    pred_h[4, 1] += 0.5
    dof0, dof1 = 3 * 1 + 2 * 2, 3 * 2 + 2 * 3  # 7 and 12
    want = (1.0 / dof0 + 0.5 / dof1) / 2
    assert epsilon_loss(pred_pos, eps_pos, pred_h, eps_h, batch, 2).item() == pytest.approx(want, rel=1e-14)
    w = torch.tensor([2.0, 0.5], dtype=F64)
    want_w = (2.0 / dof0 + 0.5 * 0.5 / dof1) / 2
    assert epsilon_loss(pred_pos, eps_pos, pred_h, eps_h, batch, 2, weight=w).item() == pytest.approx(want_w, rel=1e-14)


def test_zero_predictor_loss_is_one_per_dimension_in_expectation():
    """E||eps||^2 equals the degrees of freedom exactly when the counting matches the noise."""
    sizes = [3, 5, 9, 17, 29] * 1000
    batch = flat_batch(sizes)
    num = len(sizes)
    noised = add_noise(
        torch.zeros(batch.shape[0], 3, dtype=F64), torch.zeros(batch.shape[0], 6, dtype=F64),
        torch.zeros(num, dtype=F64), torch.ones(num, dtype=F64), batch, generator=gen(6),
    )
    zero_pos, zero_h = torch.zeros_like(noised.eps_pos), torch.zeros_like(noised.eps_h)
    loss = epsilon_loss(zero_pos, noised.eps_pos, zero_h, noised.eps_h, batch, num).item()
    assert loss == pytest.approx(1.0, abs=0.015)  # standard error ~0.004
    # Dividing by 3N + FN (forgetting the centring) would give a clearly smaller value, ~0.95.
    miscounted = np.mean([(3 * (n - 1) + 6 * n) / (9 * n) for n in (3, 5, 9, 17, 29)])
    assert abs(loss - miscounted) > 0.03


# ============================================================================= reverse-step maths
def random_time_pairs(n: int, seed: int):
    g = gen(seed)
    a = torch.rand(n, generator=g, dtype=F64)
    b = torch.rand(n, generator=g, dtype=F64)
    t, s = torch.maximum(a, b), torch.minimum(a, b)
    # Add EDM-like adjacent pairs and the two ends.
    t = torch.cat([t, torch.tensor([1.0, 0.001, 0.5005], dtype=F64)])
    s = torch.cat([s, torch.tensor([0.999, 0.0, 0.5], dtype=F64)])
    keep = t - s > 1e-6
    return t[keep], s[keep]


def test_ancestral_posterior_matches_gaussian_conditioning():
    """q(z_s | z_t, x) from conditioning the joint Gaussian of (z_s, z_t) given x:
    Cov(z_s, z_t) = alpha_{t|s} sigma_s^2, Var(z_t) = sigma_t^2, so
    mean = alpha_s x + (alpha_{t|s} sigma_s^2 / sigma_t^2)(z_t - alpha_t x),
    var = sigma_s^2 - alpha_{t|s}^2 sigma_s^4 / sigma_t^2; with x = (z_t - sigma_t eps) / alpha_t."""
    sched = NoiseSchedule.polynomial()
    sampler = AncestralSampler(sched)
    t, s = random_time_pairs(200, 7)
    g = gen(8)
    z_t = torch.randn(t.shape, generator=g, dtype=F64)
    eps = torch.randn(t.shape, generator=g, dtype=F64)
    alpha_t, sigma_t = sched.alpha_sigma(t)
    alpha_s, sigma_s = sched.alpha_sigma(s)
    a_ts = alpha_t / alpha_s
    x = (z_t - sigma_t * eps) / alpha_t
    mean = alpha_s * x + a_ts * sigma_s**2 / sigma_t**2 * (z_t - alpha_t * x)
    var = sigma_s**2 - a_ts**2 * sigma_s**4 / sigma_t**2
    # The brief's form: alpha_{t|s} sigma_s^2/sigma_t^2 z_t + alpha_s sigma_{t|s}^2/sigma_t^2 x.
    s2_ts = sigma_t**2 - a_ts**2 * sigma_s**2
    mean_brief = a_ts * sigma_s**2 / sigma_t**2 * z_t + alpha_s * s2_ts / sigma_t**2 * x
    coef_z, coef_eps, std = sampler.posterior(t, s)
    assert coef_z.dtype == F64 and coef_z.shape == t.shape
    got = coef_z * z_t - coef_eps * eps
    scale = z_t.abs() + eps.abs()
    assert torch.all((got - mean).abs() <= 1e-9 * scale * coef_z)
    assert torch.all((got - mean_brief).abs() <= 1e-9 * scale * coef_z)
    assert torch.allclose(std**2, var, rtol=1e-8, atol=1e-15)
    assert torch.all(std < sigma_s + 1e-15)  # conditioning never adds variance


def make_state(sizes, seed, features=6):
    g = gen(seed)
    batch = flat_batch(sizes)
    x = remove_mean(torch.randn(batch.shape[0], 3, generator=g, dtype=F64), batch)
    hx = torch.randn(batch.shape[0], features, generator=g, dtype=F64)
    return batch, x, hx


def test_ddim_eta0_step_with_the_true_noise_is_exact():
    """With the true eps, x_hat = x, and a deterministic DDIM step maps alpha_t x + sigma_t eps to
    alpha_s x + sigma_s eps; chaining steps from t = 1 to 0 lands on alpha_0 x + sigma_0 eps."""
    sched = NoiseSchedule.cosine()
    sampler = DDIMSampler(sched, eta=0.0)
    batch, x, hx = make_state([3, 6, 1], 9)
    noise = add_noise(x, hx, torch.ones(3, dtype=F64), torch.ones(3, dtype=F64), batch, generator=gen(10))
    eps_pos, eps_h = noise.eps_pos, noise.eps_h
    times = sampler.timesteps(25)
    a, sg = sched.alpha_sigma(times[0].expand(3))
    pos, h = per_atom(a, batch) * x + per_atom(sg, batch) * eps_pos, per_atom(a, batch) * hx + per_atom(sg, batch) * eps_h
    for i in range(25):
        t, s = times[i].expand(3), times[i + 1].expand(3)
        out = sampler.step(eps_pos, eps_h, t, s, pos, h, batch)
        a_s, s_s = (per_atom(v, batch) for v in sched.alpha_sigma(s))
        # x_hat divides by alpha_t (5e-5 at t = 1 for the cosine schedule), amplifying rounding there.
        assert torch.allclose(out.pos0, x, atol=1e-10), i
        assert torch.allclose(out.h0, hx, atol=1e-10), i
        assert torch.allclose(out.pos, a_s * x + s_s * eps_pos, atol=1e-12)
        assert torch.allclose(out.h, a_s * hx + s_s * eps_h, atol=1e-12)
        pos, h = out.pos, out.h
    assert times[-1].item() == 0.0


def test_ancestral_step_with_true_noise_has_the_posterior_mean_and_std():
    sched = NoiseSchedule.polynomial()
    sampler = AncestralSampler(sched)
    batch, x, hx = make_state([4, 2], 11)
    eps = add_noise(x, hx, torch.ones(2, dtype=F64), torch.ones(2, dtype=F64), batch, generator=gen(12))
    t = torch.tensor([0.7, 0.3], dtype=F64)
    s = torch.tensor([0.6, 0.29], dtype=F64)
    alpha_t, sigma_t = sched.alpha_sigma(t)
    alpha_s, sigma_s = sched.alpha_sigma(s)
    pos_t = per_atom(alpha_t, batch) * x + per_atom(sigma_t, batch) * eps.eps_pos
    h_t = per_atom(alpha_t, batch) * hx + per_atom(sigma_t, batch) * eps.eps_h
    det, noise = deterministic_and_noise(sampler, eps.eps_pos, eps.eps_h, t, s, pos_t, h_t, batch, seed=13)
    a_ts = alpha_t / alpha_s
    c = per_atom(a_ts * sigma_s**2 / sigma_t**2, batch)
    want_pos = per_atom(alpha_s, batch) * x + c * (pos_t - per_atom(alpha_t, batch) * x)
    want_h = per_atom(alpha_s, batch) * hx + c * (h_t - per_atom(alpha_t, batch) * hx)
    assert torch.allclose(det[0], want_pos, atol=1e-12)
    assert torch.allclose(det[1], want_h, atol=1e-12)
    assert scatter_mean(noise[0], batch, 2).abs().max() < 1e-14
    assert noise[0].abs().max() > 1e-3 and noise[1].abs().max() > 1e-3


def deterministic_and_noise(sampler, eps_pos, eps_h, t, s, pos_t, h_t, batch, seed):
    """Split a step into its noise-free part and its noise part.

    Every sampler's step is ``linear(z_t, eps_hat) + scale(t, s) * noise`` with no constant term,
    so a step from all-zero inputs with an identically seeded generator is exactly the noise part.
    """
    out = sampler.step(eps_pos, eps_h, t, s, pos_t, h_t, batch, generator=gen(seed))
    zero = sampler.step(
        torch.zeros_like(eps_pos), torch.zeros_like(eps_h), t, s, torch.zeros_like(pos_t), torch.zeros_like(h_t),
        batch, generator=gen(seed),
    )
    return (out.pos - zero.pos, out.h - zero.h), (zero.pos, zero.h)


def test_ddim_eta1_matches_the_ancestral_step():
    """eta = 1 gives Song et al.'s posterior std, which equals the ancestral one; the noise-free
    parts agree as well, so with the same draws the two samplers take the same step."""
    sched = NoiseSchedule.polynomial()
    batch, pos_t, h_t = make_state([5, 3, 8], 14)
    eps_pos = remove_mean(torch.randn(pos_t.shape, generator=gen(15), dtype=F64), batch)
    eps_h = torch.randn(h_t.shape, generator=gen(16), dtype=F64)
    t = torch.tensor([0.9, 0.5, 0.02], dtype=F64)
    s = torch.tensor([0.8, 0.45, 0.0], dtype=F64)
    anc = deterministic_and_noise(AncestralSampler(sched), eps_pos, eps_h, t, s, pos_t, h_t, batch, 17)
    ddim = deterministic_and_noise(DDIMSampler(sched, eta=1.0), eps_pos, eps_h, t, s, pos_t, h_t, batch, 17)
    for u, v in zip(anc[0] + anc[1], ddim[0] + ddim[1]):
        assert torch.allclose(u, v, atol=1e-12)


def test_ancestral_noise_has_the_posterior_variance():
    sched = NoiseSchedule.polynomial()
    sampler = AncestralSampler(sched)
    n_atoms, copies = 5, 4000
    batch = flat_batch([n_atoms] * copies)
    zeros_pos = torch.zeros(batch.shape[0], 3, dtype=F64)
    zeros_h = torch.zeros(batch.shape[0], 6, dtype=F64)
    t = torch.full((copies,), 0.4, dtype=F64)
    s = torch.full((copies,), 0.35, dtype=F64)
    out = sampler.step(zeros_pos, zeros_h, t, s, zeros_pos, zeros_h, batch, generator=gen(18))
    std = sampler.posterior(t[:1], s[:1])[2].item()
    # 60,000 position and 120,000 feature values: relative standard error of the variance <= 0.6%.
    assert out.pos.var().item() == pytest.approx(std**2 * (n_atoms - 1) / n_atoms, rel=0.03)
    assert out.h.var().item() == pytest.approx(std**2, rel=0.03)


def test_ddim_eta0_is_deterministic_given_the_initial_noise():
    sched = NoiseSchedule.polynomial()
    net = small_denoiser(seed=1)
    sampler = DDIMSampler(sched, eta=0.0)
    batch, pos, h = make_state([4, 6], 19)
    runs = []
    for seed in (0, 1):
        p, q = pos, h
        g = gen(seed)
        for t_, s_ in zip(sampler.timesteps(5)[:-1], sampler.timesteps(5)[1:]):
            t, s = t_.expand(2), s_.expand(2)
            eps = net(p, q, t, batch)
            out = sampler.step(eps.pos, eps.h, t, s, p, q, batch, generator=g)
            p, q = out.pos, out.h
        runs.append((p, q))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    # ... whereas eta > 0 uses the generator.
    noisy = DDIMSampler(sched, eta=0.5)
    t, s = torch.tensor([0.5, 0.5], dtype=F64), torch.tensor([0.4, 0.4], dtype=F64)
    eps = net(pos, h, t, batch)
    a = noisy.step(eps.pos, eps.h, t, s, pos, h, batch, generator=gen(0))
    b = noisy.step(eps.pos, eps.h, t, s, pos, h, batch, generator=gen(1))
    assert not torch.allclose(a.pos, b.pos)


@pytest.mark.parametrize("name", ["ancestral", "ddim", "ddim:0.5", "ddim:1"])
def test_sampler_contract(name):
    """One contract for every sampler: a descending grid from 1 to 0, and steps that keep shapes,
    dtype, the zero-CoM subspace, and report the clean estimate at t."""
    sched = NoiseSchedule.polynomial()
    sampler = make_sampler(name, sched)
    assert isinstance(sampler, SAMPLERS[name.split(":")[0]])
    grid = sampler.timesteps(7)
    assert grid.dtype == F64 and grid.shape == (8,)
    assert grid[0].item() == 1.0 and grid[-1].item() == 0.0 and torch.all(grid[1:] < grid[:-1])
    with pytest.raises(ValueError):
        sampler.timesteps(0)
    batch, pos, h = make_state([3, 1, 4], 20)
    eps_pos = remove_mean(torch.randn(pos.shape, generator=gen(21), dtype=F64), batch)
    eps_h = torch.randn(h.shape, generator=gen(22), dtype=F64)
    t, s = grid[2].expand(3), grid[3].expand(3)
    out = sampler.step(eps_pos, eps_h, t, s, pos, h, batch, generator=gen(23))
    assert isinstance(out, SamplerStep)
    for got, ref in ((out.pos, pos), (out.h, h), (out.pos0, pos), (out.h0, h)):
        assert got.shape == ref.shape and got.dtype == ref.dtype and torch.isfinite(got).all()
    assert scatter_mean(out.pos, batch, 3).abs().max() < 1e-13
    pos0, h0 = sampler.clean_estimate(pos, h, eps_pos, eps_h, t, batch)
    assert torch.equal(out.pos0, pos0) and torch.equal(out.h0, h0)
    # Float32 states stay float32 (the noise draws differ by dtype; the noise-free parts agree).
    out32 = sampler.step(eps_pos.float(), eps_h.float(), t, s, pos.float(), h.float(), batch, generator=gen(23))
    assert out32.pos.dtype == out32.h.dtype == torch.float32
    det64, _ = deterministic_and_noise(sampler, eps_pos, eps_h, t, s, pos, h, batch, 23)
    det32, _ = deterministic_and_noise(sampler, eps_pos.float(), eps_h.float(), t, s, pos.float(), h.float(), batch, 23)
    assert torch.allclose(det32[0].double(), det64[0], atol=1e-5) and torch.allclose(det32[1].double(), det64[1], atol=1e-5)


@pytest.mark.parametrize("name", ["ancestral", "ddim:0.5"])
def test_time_power_grid(name):
    """``t_k = (k/K)^p``: endpoints 1 and 0, strictly descending, p = 1 is the uniform grid, and p > 1
    puts more steps at low noise (a smaller first step below t = 1/2 count)."""
    sched = NoiseSchedule.polynomial()
    uniform = make_sampler(name, sched).timesteps(10)
    assert torch.equal(uniform, torch.linspace(1.0, 0.0, 11, dtype=F64))
    for p in (0.5, 2.0, 3.0):
        grid = make_sampler(name, sched, time_power=p).timesteps(10)
        k = torch.arange(10, -1, -1, dtype=F64)
        assert torch.allclose(grid, (k / 10) ** p, atol=0, rtol=1e-15)
        assert grid[0].item() == 1.0 and grid[-1].item() == 0.0 and torch.all(grid[1:] < grid[:-1])
        below_half = int((grid < 0.5).sum())
        assert below_half > int((uniform < 0.5).sum()) if p > 1 else below_half < int((uniform < 0.5).sum())
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="time_power"):
            make_sampler(name, sched, time_power=bad)


@pytest.mark.parametrize("name", ["ancestral", "ddim:0.5"])
def test_noise_scale_scales_only_the_fresh_noise(name):
    """``noise_scale`` multiplies the noise a step draws and nothing else: the step is
    ``mean + lam * (step at lam=1 - mean)`` for the same noise draw, and at 0 it is the mean whatever
    the generator."""
    sched = NoiseSchedule.polynomial()
    g = gen(3)
    batch = torch.tensor([0, 0, 0, 1, 1])
    pos_t, eps_pos = (remove_mean(torch.randn(5, 3, generator=g, dtype=F64), batch, 2) for _ in range(2))
    h_t, eps_h = torch.randn(5, 6, generator=g, dtype=F64), torch.randn(5, 6, generator=g, dtype=F64)
    t, s = torch.tensor([0.6, 0.3], dtype=F64), torch.tensor([0.5, 0.2], dtype=F64)

    def step(lam, seed=1):
        return make_sampler(name, sched, noise_scale=lam).step(eps_pos, eps_h, t, s, pos_t, h_t, batch, generator=gen(seed))

    full, half, mean = step(1.0), step(0.5), step(0.0)
    assert (full.pos - mean.pos).abs().max() > 1e-3 and (full.h - mean.h).abs().max() > 1e-3
    torch.testing.assert_close(half.pos - mean.pos, 0.5 * (full.pos - mean.pos), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(half.h - mean.h, 0.5 * (full.h - mean.h), rtol=1e-12, atol=1e-12)
    assert torch.equal(step(0.0, seed=2).pos, mean.pos) and torch.equal(step(0.0, seed=2).h, mean.h)
    assert torch.equal(full.pos0, mean.pos0)  # the clean estimate does not depend on the noise
    for bad in (-0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="noise_scale"):
            make_sampler(name, sched, noise_scale=bad)


def test_make_sampler_rejects_bad_names():
    sched = NoiseSchedule.polynomial()
    assert make_sampler("ddim:0.25", sched).eta == 0.25
    for bad in ("euler", "ancestral:0.5", "ddim:2", "ddim:-0.1"):
        with pytest.raises(ValueError):
            make_sampler(bad, sched)


# ============================================================================= sampler equivariance
def small_denoiser(seed: int = 0, context_dim: int = 0) -> EGNNDenoiser:
    torch.manual_seed(seed)
    net = EGNNDenoiser(DenoiserConfig(num_features=6, hidden=16, n_layers=2, context_dim=context_dim)).double().eval()
    g = gen(seed + 100)
    with torch.no_grad():  # visible coordinate updates (EDM initialises them at gain 0.001)
        for m in net.modules():
            if isinstance(m, EquivariantUpdate):
                m.out.weight.copy_(0.3 * torch.randn(m.out.weight.shape, generator=g, dtype=F64))
    return net


@pytest.mark.parametrize("name", ["ancestral", "ddim", "ddim:0.5"])
def test_one_reverse_step_is_equivariant(name):
    """denoiser + step as a map (z_t -> z_s). Stochastic steps are equivariant in distribution: the
    noise-free part must be equivariant and the noise scale invariant. The noise itself is not
    rotated by the check (it comes from an identically seeded generator in both frames), so the
    check runs on the noise-free part, isolated exactly by ``deterministic_and_noise``; the noise
    part is checked to be identical in both frames, i.e. independent of the input."""
    sched = NoiseSchedule.polynomial()
    sampler = make_sampler(name, sched)
    net = small_denoiser(seed=2)
    batch, pos, h = make_state([1, 3, 6, 9], 24)
    pos = pos + 2.0  # assert_equivariant translates anyway; the step sees the centred state
    t = torch.tensor([0.9, 0.6, 0.3, 0.05], dtype=F64)
    s = torch.tensor([0.85, 0.5, 0.2, 0.0], dtype=F64)
    noise_parts = []

    def step(pos, h, batch):
        z = remove_mean(pos, batch)
        eps = net(z, h, t, batch)
        det, noise = deterministic_and_noise(sampler, eps.pos, eps.h, t, s, z, h, batch, seed=25)
        noise_parts.append(noise)
        return det

    def clean_estimate(pos, h, batch):
        z = remove_mean(pos, batch)
        eps = net(z, h, t, batch)
        out = sampler.step(eps.pos, eps.h, t, s, z, h, batch, generator=gen(25))
        return out.pos0, out.h0

    worst = assert_equivariant(step, pos, h, batch, pos_output="centred", trials=3, generator=gen(26))
    assert worst < 1e-9
    assert_equivariant(clean_estimate, pos, h, batch, pos_output="centred", generator=gen(27))
    for other in noise_parts[1:]:
        assert torch.equal(other[0], noise_parts[0][0]) and torch.equal(other[1], noise_parts[0][1])
    if name != "ddim":
        assert noise_parts[0][0].abs().max() > 1e-4  # the noise is really there and was separated out


# ============================================================================= pipeline
def tiny_pipeline(seed: int = 0) -> MolDiffPipeline:
    torch.manual_seed(seed)
    denoiser = EGNNDenoiser(DenoiserConfig(num_features=6, hidden=16, n_layers=2))
    sizes = [0, 0, 0, 2, 4, 6, 9, 5, 1]  # molecules of 3..8 atoms
    stats = DatasetStatistics(QM9_ELEMENTS, sizes, [40, 25, 6, 5, 1])
    return MolDiffPipeline(denoiser, NoiseSchedule.polynomial(), AtomFeatures(5), stats, [1, 6, 7, 8, 9],
                           metadata={"note": "test"})


def arrays_equal(a, b) -> bool:
    return (
        all(np.array_equal(x, y) for x, y in zip(a.positions, b.positions))
        and all(np.array_equal(x, y) for x, y in zip(a.types, b.types))
        and all(np.array_equal(x, y) for x, y in zip(a.charges, b.charges))
        and np.array_equal(a.fault_step, b.fault_step)
    )


def test_pipeline_round_trip_gives_identical_outputs_and_samples(tmp_path):
    pipe = tiny_pipeline()
    path = pipe.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.pt"]
    loaded = MolDiffPipeline.from_pretrained(path)
    assert loaded.config_dict() == pipe.config_dict()
    batch, pos, h = make_state([3, 5], 28)
    t = torch.tensor([0.2, 0.7])
    a = pipe.denoiser(pos.float(), h.float(), t, batch)
    b = loaded.denoiser(pos.float(), h.float(), t, batch)
    assert torch.equal(a.pos, b.pos) and torch.equal(a.h, b.h)
    for sampler in ("ancestral", "ddim"):
        s1 = pipe.sample_arrays(4, steps=8, sampler=sampler, seed=3)
        s2 = loaded.sample_arrays(4, steps=8, sampler=sampler, seed=3)
        assert arrays_equal(s1, s2)
    # Saving over an existing checkpoint replaces it and leaves no temporary folders behind.
    tiny_pipeline(seed=1).save_pretrained(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    replaced = MolDiffPipeline.from_pretrained(path)
    assert not torch.equal(replaced.denoiser.embedding.weight, pipe.denoiser.embedding.weight)


def test_sample_arrays_is_deterministic_per_seed_and_well_formed():
    pipe = tiny_pipeline()
    a = pipe.sample_arrays(5, steps=6, seed=11, batch_size=2)
    b = pipe.sample_arrays(5, steps=6, seed=11, batch_size=2)
    c = pipe.sample_arrays(5, steps=6, seed=12, batch_size=2)
    assert arrays_equal(a, b)
    assert not all(
        p.shape == q.shape and np.allclose(p, q) for p, q in zip(a.positions, c.positions)
    )
    assert len(a.positions) == 5 and (a.fault_step == -1).all()
    for pos, types, charges in zip(a.positions, a.types, a.charges):
        n = pos.shape[0]
        assert 3 <= n <= 8 and types.shape == (n,) and charges.shape == (n,)
        assert np.abs(pos.mean(0)).max() < 1e-4  # zero centroid (float32 arithmetic)
        assert types.min() >= 0 and types.max() < 5
    fixed = pipe.sample_arrays(3, steps=2, seed=0, num_atoms=7)
    assert [p.shape[0] for p in fixed.positions] == [7, 7, 7]
    listed = pipe.sample_arrays(3, steps=2, seed=0, num_atoms=[3, 8, 4])
    assert [p.shape[0] for p in listed.positions] == [3, 8, 4]
    assert len(a.symbols(0)) == a.positions[0].shape[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_atoms": 0}, "between 2 and 8"),
        ({"num_atoms": 1}, "between 2 and 8"),
        ({"num_atoms": 9}, "between 2 and 8"),
        ({"num_atoms": [3, 4]}, "2 sizes for 3"),
        ({"num_atoms": [3, -1, 4]}, "between 2 and 8"),
        ({"batch_size": 0}, "batch size"),
    ],
)
def test_sample_arrays_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_pipeline().sample_arrays(3, steps=2, **kwargs)


def test_sample_arrays_rejects_non_positive_counts():
    with pytest.raises(ValueError, match="positive"):
        tiny_pipeline().sample_arrays(0, steps=2)


def test_non_finite_network_output_is_flagged_not_repaired():
    pipe = tiny_pipeline()
    with torch.no_grad():
        pipe.denoiser.embedding_out.bias.fill_(float("nan"))
    out = pipe.sample_arrays(3, steps=4, seed=0)
    assert out.fault_step.tolist() == [0, 0, 0]  # the first reverse step already fails
    assert all(not np.isfinite(p).all() for p in out.positions)  # no silent zeros
    assert [t.shape for t in out.types] == [p.shape[:1] for p in out.positions]  # decoding still works


def test_from_pretrained_reports_bad_checkpoints_in_one_line(tmp_path):
    good = tiny_pipeline().save_pretrained(tmp_path / "good")

    def check(path, match):
        with pytest.raises(CheckpointError, match=match) as info:
            MolDiffPipeline.from_pretrained(path)
        assert "\n" not in str(info.value)

    check(tmp_path / "missing", "not found")
    (tmp_path / "empty").mkdir()
    check(tmp_path / "empty", "not a moldiff checkpoint")

    def copy_of(name):
        d = tmp_path / name
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        return d

    d = copy_of("truncated")
    data = (d / "model.pt").read_bytes()
    (d / "model.pt").write_bytes(data[: len(data) // 2])
    check(d, "cannot load checkpoint")

    d = copy_of("garbage")
    (d / "model.pt").write_bytes(b"\x00not a torch file\n" * 10)
    check(d, "cannot load checkpoint")

    d = copy_of("badjson")
    (d / "config.json").write_text("{ not json")
    check(d, "cannot load checkpoint")

    d = copy_of("shape")
    cfg = json.loads((d / "config.json").read_text())
    cfg["denoiser"]["hidden"] = 32
    (d / "config.json").write_text(json.dumps(cfg))
    check(d, "cannot load checkpoint")

    d = copy_of("version")
    cfg["format_version"] = 999
    (d / "config.json").write_text(json.dumps(cfg))
    check(d, "unsupported checkpoint format")
    assert isinstance(CheckpointError("x"), ValueError)


def test_loss_weightings_match_their_formulas():
    from moldiff.diffusion.losses import loss_weight

    snr = torch.tensor([0.01, 0.5, 2.0, 100.0], dtype=torch.float64)
    assert loss_weight(snr, "uniform") is None
    assert torch.allclose(loss_weight(snr, "min_snr:5"), torch.tensor([1.0, 1.0, 1.0, 0.05], dtype=torch.float64))
    assert torch.allclose(loss_weight(snr, "snr_plus_one:10"), torch.tensor([1.01, 1.5, 3.0, 10.0], dtype=torch.float64))
    for bad in ("min_snr", "min_snr:-1", "snr_plus_one:x", "huber:1"):
        with pytest.raises(ValueError):
            loss_weight(snr, bad)


def test_trainer_rejects_unknown_loss_weighting():
    from moldiff.training.config import load_config
    from moldiff.training.loop import Trainer

    cfg = load_config("configs/debug_tiny.yaml", ["diffusion.loss_weighting=focal:2"])
    with pytest.raises(ValueError, match="loss weighting"):
        Trainer(cfg, "/tmp/never-written")
