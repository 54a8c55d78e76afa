"""The Gaussian skips of the coordinates (``model.pos_skip_std``) and of the element features
(``model.h_skip``): the closed forms on top of the network, optimality for Gaussian data, the input
returned at t = 1, the features' moments against the encoded atoms, E(3) equivariance, the config
and the CLI end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moldiff.data.statistics import compute_statistics
from moldiff.diffusion import AtomFeatures, NoiseSchedule
from moldiff.equivariance import assert_equivariant
from moldiff.geometry import remove_mean
from moldiff.models import DenoiserConfig, EGNNDenoiser
from moldiff.models.egnn import EquivariantUpdate
from moldiff.pipeline import MolDiffPipeline

ROOT = Path(__file__).resolve().parents[1]
SIZES = [5, 9, 12]
S = 1.7  # the skip's data standard deviation in these tests (Å)


TYPES = np.array([0, 0, 1, 1, 1, 2, 3, 0, 0, 4, 1, 0, 0, 2, 0, 0, 3, 1, 0, 0, 0, 1, 0, 0, 1, 0])  # 26 atoms


def pipeline(skip: float, seed: int = 0, graph: str = "full", h_skip: bool = False) -> MolDiffPipeline:
    torch.manual_seed(seed)
    net = EGNNDenoiser(DenoiserConfig(num_features=6, hidden=16, n_layers=2, graph=graph, pos_skip_std=skip,
                                      h_skip=h_skip))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the coordinate heads start at gain 0.001: make the network's share visible
        for m in net.modules():
            if isinstance(m, EquivariantUpdate):
                m.out.weight.copy_(0.3 * torch.randn(m.out.weight.shape, generator=g))
    stats = compute_statistics(("H", "C", "N", "O", "F"), np.array(SIZES), TYPES)
    pipe = MolDiffPipeline(net.double().eval(), NoiseSchedule.polynomial(), AtomFeatures(5), stats, [1, 6, 7, 8, 9])
    return pipe


def inputs(seed: int = 0, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    batch = torch.repeat_interleave(torch.arange(len(SIZES)), torch.tensor(SIZES))
    pos = spread * torch.randn(batch.numel(), 3, generator=g, dtype=torch.float64)
    h = torch.randn(batch.numel(), 6, generator=g, dtype=torch.float64)
    return pos, h, batch


def coefficients(t: float, s: float) -> tuple[float, float]:
    """c_skip, c_out of the Gaussian skip, from the schedule's alpha and sigma."""
    alpha, sigma = (float(x) for x in NoiseSchedule.polynomial().alpha_sigma(torch.tensor([t], dtype=torch.float64)))
    var = alpha**2 * s**2 + sigma**2
    return sigma / var, alpha * s / var**0.5


def test_the_skip_is_the_closed_form_around_the_plain_network():
    plain, skipped = pipeline(0.0), pipeline(S)
    skipped.denoiser.load_state_dict(plain.denoiser.state_dict())
    pos, h, batch = inputs(seed=1)
    pos = pos + torch.tensor([0.3, -2.0, 1.0], dtype=torch.float64)  # off-centre: the skip centres it
    t = torch.tensor([0.05, 0.5, 0.97], dtype=torch.float64)
    with torch.no_grad():
        f_pos, f_h = plain.predict_noise(pos, h, t, batch)
        e_pos, e_h = skipped.predict_noise(pos, h, t, batch)
    centred = remove_mean(pos, batch, len(SIZES))
    for k, tk in enumerate(t.tolist()):
        c_skip, c_out = coefficients(tk, S)
        rows = batch == k
        torch.testing.assert_close(e_pos[rows], c_skip * centred[rows] + c_out * f_pos[rows], atol=1e-12, rtol=0)
    assert torch.equal(e_h, f_h)  # the element features are untouched
    assert (e_pos - f_pos).abs().max() > 0.1


def test_at_t_1_the_output_is_the_centred_input_whatever_the_network_says():
    pipe = pipeline(S, seed=2)
    pos, h, batch = inputs(seed=2)
    t = torch.ones(len(SIZES), dtype=torch.float64)
    with torch.no_grad():
        eps, _ = pipe.predict_noise(pos, h, t, batch)
    c_skip, c_out = coefficients(1.0, S)
    assert c_out < 0.01 and abs(c_skip - 1.0) < 1e-4
    miss = (eps - remove_mean(pos, batch, len(SIZES))).abs().max().item()
    with torch.no_grad():
        raw = pipe.denoiser(pos, h, t, batch).pos.abs().max().item()
    assert raw > 0.1 and miss < 0.01 * raw  # the plain network's output would miss by all of it


def test_the_skip_alone_is_the_best_linear_guess_for_gaussian_data():
    """With the network's coordinate output off, the prediction is c_skip x_t: its mean squared
    error on Gaussian clouds of standard deviation S is (N - 1) / N c_out^2, and c_skip scaled by
    0.8 or 1.25 does worse."""
    pipe = pipeline(S, seed=3)
    with torch.no_grad():
        for m in pipe.denoiser.modules():
            if isinstance(m, EquivariantUpdate):
                m.out.weight.zero_()
    g = torch.Generator().manual_seed(3)
    sizes = [9] * 400
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    x0 = remove_mean(S * torch.randn(batch.numel(), 3, generator=g, dtype=torch.float64), batch, len(sizes))
    eps = remove_mean(torch.randn(batch.numel(), 3, generator=g, dtype=torch.float64), batch, len(sizes))
    h = torch.randn(batch.numel(), 6, generator=g, dtype=torch.float64)
    for tk in (0.3, 0.7, 0.95):
        t = torch.full((len(sizes),), tk, dtype=torch.float64)
        alpha, sigma = (float(x[0]) for x in pipe.schedule.alpha_sigma(t))
        x_t = alpha * x0 + sigma * eps
        with torch.no_grad():
            pred, _ = pipe.predict_noise(x_t, h, t, batch)
        c_skip, c_out = coefficients(tk, S)
        mse = (pred - eps).square().mean().item()
        assert mse == pytest.approx(8 / 9 * c_out**2, rel=0.05)
        for scale in (0.8, 1.25):
            assert (scale * pred - eps).square().mean().item() > mse


def test_the_feature_moments_are_those_of_the_encoded_training_atoms():
    pipe = pipeline(0.0, h_skip=True)
    z = torch.tensor(pipe.atomic_numbers)[torch.as_tensor(TYPES)]
    h = pipe.features.encode(torch.as_tensor(TYPES), z, dtype=torch.float64)
    mean, var = pipe.feature_moments()
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), h.mean(0), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.tensor(var, dtype=torch.float64), h.var(0, unbiased=False), atol=1e-12, rtol=0)


def test_the_feature_skip_is_the_closed_form_and_leaves_the_coordinates_alone():
    plain, skipped = pipeline(0.0), pipeline(0.0, h_skip=True)
    skipped.denoiser.load_state_dict(plain.denoiser.state_dict())
    pos, h, batch = inputs(seed=7)
    t = torch.tensor([0.02, 0.5, 1.0], dtype=torch.float64)
    with torch.no_grad():
        f_pos, f_h = plain.predict_noise(pos, h, t, batch)
        e_pos, e_h = skipped.predict_noise(pos, h, t, batch)
    assert torch.equal(e_pos, f_pos)
    z = torch.tensor(plain.atomic_numbers)[torch.as_tensor(TYPES)]
    data = plain.features.encode(torch.as_tensor(TYPES), z, dtype=torch.float64)
    m, v = data.mean(0), data.var(0, unbiased=False)
    for k, tk in enumerate(t.tolist()):
        alpha, sigma = (float(x) for x in NoiseSchedule.polynomial().alpha_sigma(torch.tensor([tk], dtype=torch.float64)))
        total = alpha**2 * v + sigma**2
        rows = batch == k
        want = sigma / total * (h[rows] - alpha * m) + alpha * torch.sqrt(v / total) * f_h[rows]
        torch.testing.assert_close(e_h[rows], want, atol=1e-12, rtol=0)
    # at t = 1 the features' noise is the input less alpha m, whatever the network says
    last = batch == 2
    assert (e_h[last] - (h[last] - 0.0032 * m)).abs().max() < 0.01 * f_h[last].abs().max()


def test_the_feature_skip_refuses_categorical_models():
    from moldiff.diffusion.categorical import CategoricalFeatures

    features = CategoricalFeatures(5, (0.5, 0.35, 0.06, 0.08, 0.01))
    net = EGNNDenoiser(DenoiserConfig(num_features=features.dim, hidden=8, n_layers=1, h_skip=True))
    stats = compute_statistics(("H", "C", "N", "O", "F"), np.array(SIZES), TYPES)
    with pytest.raises(ValueError, match="h_skip"):
        MolDiffPipeline(net, NoiseSchedule.polynomial(), features, stats, [1, 6, 7, 8, 9])


@pytest.mark.parametrize("graph", ["full", "knn:4"])
def test_the_skipped_noise_is_e3_equivariant(graph):
    pipe = pipeline(S, seed=4, graph=graph, h_skip=True)
    _, h, batch = inputs(seed=4)
    pos, _, _ = inputs(seed=5, spread=1.5)
    t = torch.tensor([0.2, 0.6, 0.99], dtype=torch.float64)

    def fn(p, hh, b):
        with torch.no_grad():
            return pipe.predict_noise(p, hh, t, b)

    assert_equivariant(fn, pos, h, batch, pos_output="vector", generator=torch.Generator().manual_seed(6))


def test_config_saves_the_skip_only_when_on_and_refuses_bad_values():
    assert "pos_skip_std" not in DenoiserConfig().to_dict()  # models saved before the options load unchanged
    assert "h_skip" not in DenoiserConfig().to_dict() and DenoiserConfig.from_dict(DenoiserConfig(h_skip=True).to_dict()).h_skip
    d = DenoiserConfig(pos_skip_std=2.5).to_dict()
    assert d["pos_skip_std"] == 2.5 and DenoiserConfig.from_dict(d).pos_skip_std == 2.5
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="pos_skip_std"):
            DenoiserConfig(pos_skip_std=bad)


def moldiff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moldiff.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cli_trains_saves_and_samples_a_model_with_the_skip(tmp_path):
    run = tmp_path / "run"
    out = moldiff("train", "--config", ROOT / "configs" / "debug_tiny.yaml", "--run-dir", run,
                  "--set", "model.pos_skip_std=1.4", "--set", "model.h_skip=true", "--set", "train.max_steps=2", "--threads", "1",
                  "--set", "model.graph=knn:3")
    assert out.returncode == 0, out.stderr
    saved = MolDiffPipeline.from_pretrained(run / "pipeline")
    assert saved.denoiser.config.pos_skip_std == 1.4 and saved.denoiser.config.h_skip is True
    got = moldiff("sample", "--checkpoint", run / "pipeline", "-n", "3", "--steps", "4", "--no-novelty",
                  "-o", tmp_path / "samples", "--threads", "1")
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "samples" / "samples.sdf").read_text().count("$$$$") == 3
    trace = subprocess.run([sys.executable, ROOT / "scripts" / "first_steps_trace.py", run / "checkpoint.pt",
                            "--atoms", "6", "--molecules", "2", "--steps", "5", "--show", "2"],
                           capture_output=True, text=True, timeout=300)
    assert trace.returncode == 0, trace.stderr
    lines = trace.stdout.splitlines()
    assert "pos_skip_std=1.4 h_skip=True" in lines[0] and len(lines) == 4 and lines[-1].strip().startswith("final:")
    assert "non-finite" not in trace.stdout
    pieces = subprocess.run([sys.executable, ROOT / "scripts" / "graph_components.py", run / "checkpoint.pt",
                             "--molecules", "3", "--steps", "4", "--data", "--data-times", "0,1"],
                            capture_output=True, text=True, timeout=300)
    assert pieces.returncode == 0, pieces.stderr
    assert "graph knn:3" in pieces.stdout and "element shares, samples (training set): H " in pieces.stdout
    assert pieces.stdout.count("3 real validation molecules") == 1 and "t = 1.00:" in pieces.stdout
    assert "hydrogen to its nearest heavy atom, samples: p10" in pieces.stdout
    assert "hydrogen to its nearest heavy atom, real molecules: p10" in pieces.stdout
    bad = moldiff("train", "--config", ROOT / "configs" / "debug_tiny.yaml", "--run-dir", tmp_path / "bad",
                  "--set", "model.pos_skip_std=-2")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "pos_skip_std" in bad.stderr
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()
    categorical = moldiff("train", "--config", ROOT / "configs" / "debug_tiny.yaml", "--run-dir", tmp_path / "cat",
                          "--set", "diffusion.categorical=true", "--set", "model.num_features=8",
                          "--set", "model.h_skip=true", "--set", "train.max_steps=1")
    assert categorical.returncode == 2 and "h_skip" in categorical.stderr
    assert len(categorical.stderr.strip().splitlines()) == 1 and not (tmp_path / "cat").exists()


def test_coordinate_spread_is_the_pooled_deviation_about_each_centroid():
    from moldiff.data.statistics import coordinate_spread

    a = [[1.0, 0, 0], [-1.0, 0, 0]]  # centred already: squares 2 over 6 numbers
    b = [[5.0, 0, 0], [5.0, 3, 0], [5.0, 0, 3]]  # centroid (5, 1, 1): squares 2 + 5 + 5 over 9
    ptr, pos = np.array([0, 2, 5]), np.array(a + b)
    assert coordinate_spread(ptr, pos) == pytest.approx((14 / 15) ** 0.5, abs=1e-12)
    assert coordinate_spread(ptr, pos, np.array([1])) == pytest.approx((12 / 9) ** 0.5, abs=1e-12)
    assert coordinate_spread(ptr, pos + 7.0) == pytest.approx((14 / 15) ** 0.5, abs=1e-12)  # translations do not count
    with pytest.raises(ValueError, match="no molecules"):
        coordinate_spread(ptr, pos, np.array([], dtype=np.int64))


def _components_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("moldiff_script_graph_components", ROOT / "scripts" / "graph_components.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pieces_counts_the_connected_parts_of_each_molecule():
    script = _components_script()
    # molecule 0: a triangle 0-1-2 and an edge 3-4 (2 pieces); molecule 1: a path 5-6-7 and a lone 8 (2);
    # molecule 2: atoms 9, 10, 11 all linked through 10 (1)
    edges = np.array([[0, 1], [1, 2], [2, 0], [3, 4], [5, 6], [6, 7], [9, 10], [11, 10]]).T
    edges = np.concatenate([edges, edges[::-1]], axis=1)
    batch = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    assert script.pieces(edges, batch).tolist() == [2, 2, 1]
    methane = np.array([[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]])
    assert script.bond_pieces(["C", "H", "H", "H", "H"], methane) == 1
    two = np.concatenate([methane, methane + [8.0, 0, 0]])
    assert script.bond_pieces(["C", "H", "H", "H", "H"] * 2, two) == 2
    assert script.bond_pieces(["H", "H", "H"], np.array([[0, 0, 0], [1.2, 0, 0], [2.4, 0, 0]])) == 3  # H-H at 1.2 Å: no bond


def test_hydrogen_reach_is_the_distance_to_the_nearest_heavy_atom():
    script = _components_script()
    water = (["O", "H", "H"], np.array([[0.0, 0, 0], [0.96, 0, 0], [0, 1.5, 0]]))
    methyl_far = (["C", "N", "H"], np.array([[0.0, 0, 0], [3.0, 0, 0], [0, 0, 1.09]]))
    only_h = (["H", "H"], np.array([[0.0, 0, 0], [0.74, 0, 0]]))  # no heavy atom: left out
    d = script.hydrogen_reach([water, methyl_far, only_h])
    assert d.tolist() == pytest.approx([0.96, 1.5, 1.09])
    assert "beyond 1.19 Å: 33.3% of 3 hydrogens" in script.reach_line(d)
