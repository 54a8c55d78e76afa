"""The NLL bound (moldiff.diffusion.likelihood) against closed forms, and `moldiff nll` end to end."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moldiff.diffusion import AtomFeatures, NoiseSchedule, estimate_nll, kl_prior, reconstruction_nll
from moldiff.geometry import remove_mean

ROOT = Path(__file__).resolve().parents[1]
FEATURES = AtomFeatures(num_types=5)


def _molecules(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    pos = remove_mean(1.4 * torch.randn(len(batch), 3, generator=g, dtype=torch.float64), batch, len(sizes))
    types = torch.randint(0, 5, (len(batch),), generator=g)
    charges = torch.tensor([1, 6, 7, 8, 9])[types]
    return pos, types, charges, batch, len(sizes)


def test_kl_prior_matches_the_gaussian_kl_per_dimension_with_subspace_counting():
    pos, types, charges, batch, ng = _molecules([3, 8])
    h = FEATURES.encode(types, charges, dtype=torch.float64)
    a, s = torch.tensor([0.3, 0.3], dtype=torch.float64), torch.tensor([0.9, 0.9], dtype=torch.float64)
    got = kl_prior(pos, h, a, s, batch, ng)
    normal = torch.distributions.Normal
    for b, n in enumerate([3, 8]):
        m = batch == b
        kl_h = torch.distributions.kl_divergence(normal(a[b] * h[m], s[b]), normal(0.0, 1.0)).sum()
        # positions: 3 (N - 1) dimensions; the centred mean has the same norm in the subspace
        d = 3 * (n - 1)
        kl_x = 0.5 * (d * s[b] ** 2 + a[b] ** 2 * (pos[m] ** 2).sum() - d - d * torch.log(s[b] ** 2))
        torch.testing.assert_close(got[b], kl_h + kl_x)


def test_reconstruction_of_exact_types_has_probability_one_and_the_gaussian_constant():
    pos, types, charges, batch, ng = _molecules([4, 6])
    h = FEATURES.encode(types, charges, dtype=torch.float64)
    gamma0 = torch.full((ng,), -11.0, dtype=torch.float64)
    sigma0 = torch.sqrt(torch.sigmoid(gamma0))
    got = reconstruction_nll(torch.zeros(ng, dtype=torch.float64), h, types, charges, gamma0, sigma0, FEATURES, batch, ng)
    d = torch.tensor([9.0, 15.0], dtype=torch.float64)
    torch.testing.assert_close(got, d * (-5.5 + 0.5 * math.log(2 * math.pi)), atol=1e-6, rtol=0)
    # a type half-way between two bins costs log 2 nats for that atom
    h2 = h.clone()
    h2[0, :5] = 0.0
    h2[0, 0], h2[0, 1] = 0.125, 0.125
    types2 = types.clone()
    types2[0] = 0
    got2 = reconstruction_nll(torch.zeros(ng, dtype=torch.float64), h2, types2, charges, gamma0, sigma0, FEATURES, batch, ng)
    assert abs(float(got2[0] - got[0]) - math.log(2.0)) < 1e-3


def test_nll_with_the_exact_denoiser_of_a_point_mass_is_prior_plus_constant():
    """For data that is one molecule x*, eps_hat = (z_t - alpha_t x*) / sigma_t is the exact denoiser:
    the diffusion term vanishes and the bound reduces to closed-form terms."""
    schedule = NoiseSchedule.polynomial().double()
    pos, types, charges, batch, ng = _molecules([5, 9, 12], seed=3)
    h = FEATURES.encode(types, charges, dtype=torch.float64)

    def oracle(pos_t, h_t, t, b):
        a, s = schedule.alpha_sigma(t)
        a, s = a[b].unsqueeze(-1), s[b].unsqueeze(-1)
        return (pos_t - a * pos) / s, (h_t - a * h) / s

    log_p_size = torch.log(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    terms = estimate_nll(oracle, schedule, FEATURES, pos, types, charges, batch, ng, log_p_size,
                         generator=torch.Generator().manual_seed(0))
    assert terms.diffusion.abs().max() < 1e-6
    one, zero = torch.ones(ng, dtype=torch.float64), torch.zeros(ng, dtype=torch.float64)
    a1, s1 = schedule.alpha_sigma(one)
    gamma0 = schedule.gamma(zero)
    d = torch.tensor([12.0, 24.0, 33.0], dtype=torch.float64)
    expected = kl_prior(pos, h, a1, s1, batch, ng) + d * (0.5 * gamma0 + 0.5 * math.log(2 * math.pi)) - log_p_size
    torch.testing.assert_close(terms.total, expected, atol=1e-4, rtol=0)
    # a wrong denoiser can only cost more: the diffusion term is a weighted squared error
    worse = estimate_nll(lambda p, x, t, b: tuple(v + 0.1 for v in oracle(p, x, t, b)), schedule, FEATURES, pos, types,
                         charges, batch, ng, log_p_size, generator=torch.Generator().manual_seed(0))
    assert (worse.diffusion > 0).all() and (worse.total > terms.total).all()


def test_cli_nll_on_a_few_test_molecules(tmp_path):
    out = tmp_path / "nll.json"
    r = subprocess.run([sys.executable, "-m", "moldiff.cli", "nll", "-n", "16", "--json", str(out), "--threads", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "NLL on qm9:test (16 molecules" in r.stdout
    res = json.loads(out.read_text())
    assert res["n"] == 16 and math.isfinite(res["nll"]) and res["non_finite"] == 0
    assert Path(res["checkpoint"]).name == "qm9"  # no --checkpoint: the model whose bound is EDM's quantity
    assert res["mean_prior"] >= 0 and res["mean_size"] > 0


@pytest.mark.parametrize("args,match", [(["--dataset", "zinc:test"], "unknown dataset"), (["-n", "0"], "-n must be")])
def test_cli_nll_bad_input_is_one_line(args, match):
    r = subprocess.run([sys.executable, "-m", "moldiff.cli", "nll", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1
