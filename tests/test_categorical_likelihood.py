"""The likelihood bound of categorical models (elements, charges and bonds by discrete diffusion):
each step's KL against brute-force Bayes, the one-sample estimator against the bound enumerated
exactly, the bound against the model's exact likelihood, and `moldiff nll` on the shipped bond model."""

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moldiff.diffusion import NoiseSchedule, estimate_nll_categorical
from moldiff.diffusion.categorical import CategoricalDiffusion, CategoricalFeatures, MarginalTransition, categorical_alpha_bar
from moldiff.geometry import remove_mean

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = NoiseSchedule.polynomial().double()
M3 = (0.6, 0.3, 0.1)


def transition(marginals=M3, kind="coordinate") -> MarginalTransition:
    return MarginalTransition(marginals, categorical_alpha_bar(kind, SCHEDULE))


def brute_force_kl(tr: MarginalTransition, x_t: int, x0: int, logits: torch.Tensor, s: float, t: float) -> float:
    """KL(q(x_s | x_t, x_0) || sum_c p(c) q(x_s | x_t, c)) from the K x K matrices and Bayes' rule."""
    m = tr.marginals
    k = len(m)
    ab_s, ab_t = (float(tr.alpha_bar(torch.tensor(v, dtype=torch.float64))) for v in (s, t))
    eye, ones = torch.eye(k, dtype=torch.float64), torch.ones(k, 1, dtype=torch.float64)
    q_s0 = ab_s * eye + (1 - ab_s) * ones * m  # rows x_0, columns x_s
    q_ts = (ab_t / ab_s) * eye + (1 - ab_t / ab_s) * ones * m  # rows x_s, columns x_t

    def posterior(c):
        joint = q_s0[c] * q_ts[:, x_t]
        return joint / joint.sum()

    q = posterior(x0)
    p_clean = torch.softmax(logits.double(), -1)
    p = sum(p_clean[c] * posterior(c) for c in range(k))
    on = q > 0
    return float((q[on] * (q[on].log() - p[on].log())).sum())


@pytest.mark.parametrize("kind", ["coordinate", "cosine"])
def test_step_kl_matches_bayes_by_brute_force_and_is_the_reconstruction_at_s0(kind):
    tr = transition(kind=kind)
    g = torch.Generator().manual_seed(0)
    for s, t in [(0.3, 0.31), (0.0, 0.001), (0.7, 0.9), (0.05, 0.5)]:
        x_t = torch.tensor([0, 1, 2, 2, 0, 1])
        x0 = torch.tensor([0, 0, 2, 1, 1, 2])
        logits = 2.0 * torch.randn(6, 3, generator=g, dtype=torch.float64)
        got = tr.reverse_kl(x_t, x0, logits, s, t)
        want = torch.tensor([brute_force_kl(tr, int(a), int(b), logits[i], s, t)
                             for i, (a, b) in enumerate(zip(x_t, x0))], dtype=torch.float64)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
        assert (got >= -1e-12).all()
        if s == 0.0:  # the posterior is onehot(x_0): the term is -log p(x_0 | x_t)
            torch.testing.assert_close(got, -torch.log_softmax(logits, -1).gather(1, x0[:, None]).squeeze(1))
    # a network sure of the true clean class makes the model's step equal the posterior: KL 0
    x_t, x0 = torch.tensor([2, 0]), torch.tensor([1, 1])
    sure = torch.nn.functional.one_hot(x0, 3).double() * 60.0
    assert tr.reverse_kl(x_t, x0, sure, 0.4, 0.6).abs().max() < 1e-12
    # the prior term is exactly zero: alpha_bar(1) = 0 for both schedules
    assert tr.prior_kl(torch.tensor([0, 1, 2])).abs().max() < 1e-12


class ToyNetwork:
    """A fixed 'network' for atoms with 3 element classes and no charges or bonds: the coordinates'
    noise estimate is 0 and each atom's clean-class logits depend on its own noisy class and the time
    only, so the exact likelihood of the classes factorises over atoms and can be computed by the
    forward algorithm."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.table = 1.5 * torch.randn(3, 3, generator=g, dtype=torch.float64)
        self.slope = torch.randn(3, generator=g, dtype=torch.float64)

    def logits(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.table[x_t] + t.double().reshape(-1, 1) * self.slope

    def __call__(self, pos_t, h_t, e_t, t, batch):
        return torch.zeros_like(pos_t), self.logits(h_t.argmax(-1), t[batch]), None


def test_one_sample_estimate_averages_to_the_bound_enumerated_exactly_and_bounds_the_exact_likelihood():
    steps = 8
    feats = CategoricalFeatures(3, M3)
    cat = CategoricalDiffusion.from_features(feats, SCHEDULE)
    net = ToyNetwork()
    x0 = [0, 2]  # every molecule: two atoms of classes 0 and 2
    tr = cat.types

    def reverse_matrix(i):  # rows x_t, columns x_s: the model's step from t_i to t_{i-1}
        t, s = i / steps, (i - 1) / steps
        return torch.stack([tr.reverse_probs(torch.tensor([j]), net.logits(torch.tensor([j]), torch.tensor([t])), s, t)[0]
                            for j in range(3)])

    def exact_terms(c0: int) -> tuple[float, float, float]:
        """The bound as the sum of the steps' expected KLs (the prior term is 0), the same bound
        summed over all 3^T paths of the chain, E_q[log q(x_1:T | x_0) - log p(x_0:T)], and the
        model's exact -log p(x_0 = c0) by the forward algorithm."""
        by_steps = 0.0
        for i in range(1, steps + 1):
            t, s = i / steps, (i - 1) / steps
            q_t = tr.forward_probs(torch.tensor([c0]), t)[0]
            for j in range(3):
                logits = net.logits(torch.tensor([j]), torch.tensor([t]))
                by_steps += float(q_t[j]) * float(tr.reverse_kl(torch.tensor([j]), torch.tensor([c0]), logits, s, t)[0])
        fwd = [tr.transition_probs(torch.arange(3), (i - 1) / steps, i / steps) for i in range(1, steps + 1)]
        rev = [reverse_matrix(i) for i in range(1, steps + 1)]
        by_paths = 0.0
        for path in itertools.product(range(3), repeat=steps):  # path[i - 1] = x_{t_i}
            states = (c0,) + path
            log_q = sum(math.log(float(fwd[i][states[i], states[i + 1]])) for i in range(steps))
            log_p = math.log(float(tr.marginals[states[-1]])) + sum(
                math.log(float(rev[i][states[i + 1], states[i]])) for i in range(steps))
            by_paths += math.exp(log_q) * (log_q - log_p)
        dist = tr.marginals.clone()  # x_1 ~ m, then the model's steps down to t = 0
        for i in range(steps, 0, -1):
            dist = dist @ rev[i - 1]
        return by_steps, by_paths, -math.log(float(dist[c0]))

    exact = [exact_terms(c) for c in x0]
    for by_steps, by_paths, nll in exact:
        assert abs(by_steps - by_paths) < 1e-8  # the per-step KLs add up to the path-wise bound
        assert by_steps >= nll - 1e-9  # which bounds the model's exact -log likelihood
    exact = [(e, n) for e, _, n in exact]
    expected_classes = sum(e for e, _ in exact)

    n_mol = 4000
    batch = torch.arange(n_mol).repeat_interleave(2)
    g = torch.Generator().manual_seed(1)
    pos = remove_mean(torch.randn(2 * n_mol, 3, generator=g, dtype=torch.float64), batch, n_mol)
    types = torch.tensor(x0).repeat(n_mol)
    log_p_size = torch.zeros(n_mol, dtype=torch.float64)
    terms = estimate_nll_categorical(lambda p, h, e, t: net(p, h, e, t, batch), SCHEDULE, feats, cat, pos, types, None,
                                     None, None, None, batch, n_mol, log_p_size, steps=steps, generator=g)
    classes = terms.classes
    mean, se = float(classes.mean()), float(classes.std() / math.sqrt(n_mol))
    assert abs(mean - expected_classes) < 4 * se, (mean, se, expected_classes)
    assert (terms.diffusion >= classes - 1e-9).all()  # the coordinates' share is a weighted square: >= 0
    torch.testing.assert_close(terms.total, terms.prior + terms.diffusion + terms.reconstruction + terms.size)
    assert torch.isfinite(terms.total).all()


def test_exact_denoiser_of_a_point_mass_leaves_closed_form_terms():
    """Data = one molecule (positions and classes): eps_hat = (z_t - alpha_t x*) / sigma_t and logits
    sure of x*'s classes make every step's KL zero, positions and classes alike."""
    feats = CategoricalFeatures(3, M3)
    cat = CategoricalDiffusion.from_features(feats, SCHEDULE)
    sizes = [3, 5]
    batch = torch.repeat_interleave(torch.arange(2), torch.tensor(sizes))
    g = torch.Generator().manual_seed(4)
    pos = remove_mean(1.3 * torch.randn(8, 3, generator=g, dtype=torch.float64), batch, 2)
    types = torch.tensor([0, 1, 2, 0, 0, 1, 2, 2])

    def oracle(pos_t, h_t, e_t, t):
        a, s = SCHEDULE.alpha_sigma(t)
        eps = (pos_t - a[batch].unsqueeze(-1) * pos) / s[batch].unsqueeze(-1)
        return eps, 80.0 * torch.nn.functional.one_hot(types, 3).double(), None

    log_p_size = torch.log(torch.tensor([0.25, 0.5], dtype=torch.float64))
    terms = estimate_nll_categorical(oracle, SCHEDULE, feats, cat, pos, types, None, None, None, None, batch, 2,
                                     log_p_size, generator=g)
    assert terms.diffusion.abs().max() < 1e-6 and terms.classes.abs().max() < 1e-9
    zero, one = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    a1, s1 = SCHEDULE.alpha_sigma(one)
    d = torch.tensor([6.0, 12.0], dtype=torch.float64)
    sq = torch.zeros(2, dtype=torch.float64).index_add_(0, batch, (pos ** 2).sum(-1))
    prior = 0.5 * (d * s1 ** 2 + a1 ** 2 * sq - d - d * torch.log(s1 ** 2))
    recon = d * (0.5 * SCHEDULE.gamma(zero) + 0.5 * math.log(2 * math.pi))
    torch.testing.assert_close(terms.total, prior + recon - log_p_size, atol=1e-5, rtol=0)


def test_pipeline_bound_for_a_bond_model_needs_its_labels_and_is_finite():
    from tests.test_categorical import categorical_pipeline

    pipe = categorical_pipeline(seed=2).double().eval()
    sizes = [3, 4, 3]
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    g = torch.Generator().manual_seed(5)
    pos = torch.randn(10, 3, generator=g, dtype=torch.float64)
    types = torch.tensor([1, 0, 0, 1, 1, 3, 0, 2, 0, 0])
    formal = torch.zeros(10, dtype=torch.long)
    bonds = torch.tensor([[0, 1, 1], [0, 2, 1], [3, 4, 2], [4, 5, 1], [5, 6, 1], [7, 8, 1], [7, 9, 1]])
    terms = pipe.nll_terms(pos, types, None, batch, 3, formal_charges=formal, bonds=bonds,
                           generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(terms.total).all() and (terms.classes > 0).all()
    assert (terms.diffusion >= terms.classes).all() and (terms.prior >= 0).all()
    with pytest.raises(ValueError, match="needs each molecule's bond orders"):
        pipe.nll_terms(pos, types, None, batch, 3, formal_charges=formal)
    with pytest.raises(ValueError, match="not among this model's bond classes"):
        pipe.nll_terms(pos, types, None, batch, 3, formal_charges=formal, bonds=torch.tensor([[0, 1, 4]]))


def test_cli_nll_of_the_shipped_bond_model(tmp_path):
    out = tmp_path / "nll.json"
    r = subprocess.run([sys.executable, "-m", "moldiff.cli", "nll", "--checkpoint", "qm9-bonds", "-n", "12", "--json",
                        str(out), "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "not comparable with EDM's" in r.stdout and "classes" in r.stdout
    res = json.loads(out.read_text())
    assert res["n"] == 12 and res["non_finite"] == 0 and math.isfinite(res["nll"])
    assert res["quantity"].startswith("-log p(x, elements, charges, bonds, N)")
    assert 0 < res["mean_classes"] < res["mean_diffusion"]
