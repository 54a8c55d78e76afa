"""Elements decided late (issue 19, recipe b): the elements' own noise time ``t_h`` as a network
input (``model.type_time``), training with ``diffusion.type_lag_prob``, and sampling with
``type_lag`` (elements behind the coordinates, then decided with the geometry held)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moldiff.cli import main
from moldiff.diffusion import add_noise
from moldiff.diffusion.times import lagged_type_times
from moldiff.models import DenoiserConfig, EGNNDenoiser
from moldiff.pipeline import load_pretrained
from moldiff.training.config import ConfigError, load_config
from moldiff.training.loop import Trainer, diffusion_loss, load_training_data

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_tiny.yaml"
LAG = ["model.type_time=true", "diffusion.type_lag_prob=0.5"]


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def debug_data():
    return load_training_data(load_config(DEBUG))


@pytest.fixture(scope="module")
def lag_run(tmp_path_factory, debug_data):
    """A plain debug run of 2 steps, resumed to 6 with the elements' noise time switched on."""
    run = tmp_path_factory.mktemp("lag")
    Trainer(load_config(DEBUG, ["train.max_steps=2"]), run, data=debug_data, log=quiet).train()
    plain = Trainer(load_config(DEBUG, ["train.max_steps=2"]), run / "plain", data=debug_data, log=quiet)
    plain.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=False))
    lagged = Trainer(load_config(DEBUG, ["train.max_steps=6", *LAG]), run, data=debug_data, log=quiet)
    assert lagged.resume()
    return run, plain, lagged


def test_lagged_type_times_are_never_earlier_and_uniform_above_t():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(200_000, generator=g, dtype=torch.float64)
    assert torch.equal(lagged_type_times(t, 0.0, g), t)
    t_h = lagged_type_times(t, 1.0, g)
    assert (t_h >= t).all() and (t_h <= 1).all()
    u = (t_h - t) / (1 - t)  # U(0, 1): mean 1/2, variance 1/12
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    moved = (lagged_type_times(t, 0.3, g) > t).double().mean()
    assert abs(float(moved) - 0.3) < 0.005


def test_a_zero_type_time_column_keeps_the_plain_function_and_the_column_is_last():
    torch.manual_seed(0)
    plain = EGNNDenoiser(DenoiserConfig(num_features=6, hidden=16, n_layers=2)).double()
    lagged = EGNNDenoiser(DenoiserConfig(num_features=6, hidden=16, n_layers=2, type_time=True)).double()
    state = plain.state_dict()
    state["embedding.weight"] = torch.cat([state["embedding.weight"], torch.zeros(16, 1, dtype=torch.float64)], 1)
    lagged.load_state_dict(state)
    batch = torch.tensor([0] * 5 + [1] * 4)
    pos, h = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 6, dtype=torch.float64)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    a = plain(pos, h, t, batch)
    for t_h in (None, torch.tensor([0.9, 1.0], dtype=torch.float64)):
        b = lagged(pos, h, t, batch, t_h=t_h)
        torch.testing.assert_close(b.pos, a.pos, atol=1e-12, rtol=0)
        torch.testing.assert_close(b.h, a.h, atol=1e-12, rtol=0)
    with torch.no_grad():  # the last column is t_h: with weight there, t_h changes the output
        lagged.embedding.weight[:, -1] = 1.0
    assert not torch.allclose(lagged(pos, h, t, batch, t_h=t + 0.2).h, lagged(pos, h, t, batch).h)
    with pytest.raises(ValueError, match="type_time"):
        plain(pos, h, t, batch, t_h=t)


class Recorder(torch.nn.Module):
    """Our own network, run as is, keeping the inputs it was given."""

    def __init__(self, net):
        super().__init__()
        self.net, self.config, self.seen = net, net.config, {}

    def forward(self, pos_t, h_t, t, batch, **kw):
        self.seen = {"h_t": h_t.detach().clone(), "t": t.detach().clone(), "t_h": kw.get("t_h")}
        return self.net(pos_t, h_t, t, batch, **kw)


def test_training_noises_the_elements_at_their_own_time(lag_run, debug_data):
    _, _, lagged = lag_run
    pipe = lagged.pipe
    _, batch = next(iter(debug_data.train.batches(8, 0, 0, 0)))
    t = torch.rand(batch.num_graphs, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.5
    recorder = Recorder(pipe.denoiser)
    pipe.denoiser = recorder
    try:
        loss = diffusion_loss(pipe, batch, t, torch.Generator().manual_seed(7), type_lag_prob=1.0)
    finally:
        pipe.denoiser = recorder.net
    assert torch.isfinite(loss)
    # the same draws, in the loss's order: the noise of add_noise, then the lagged times
    g = torch.Generator().manual_seed(7)
    h0 = pipe.features.encode(batch.types, batch.charges, dtype=batch.pos.dtype)
    alpha, sigma = pipe.schedule.alpha_sigma(t)
    _, _, _, eps_h = add_noise(batch.pos, h0, alpha, sigma, batch.batch, generator=g)
    t_h = lagged_type_times(t, 1.0, g)
    a_h, s_h = (x.float()[batch.batch].unsqueeze(-1) for x in pipe.schedule.alpha_sigma(t_h))
    torch.testing.assert_close(recorder.seen["h_t"], a_h * h0 + s_h * eps_h, atol=1e-6, rtol=0)
    torch.testing.assert_close(recorder.seen["t_h"].double(), t_h, atol=1e-6, rtol=0)
    assert (recorder.seen["t_h"].double() > t).all()
    # prob 0 leaves EDM's loss: the network is then not told t_h at all
    pipe.denoiser = recorder
    try:
        diffusion_loss(pipe, batch, t, torch.Generator().manual_seed(7))
    finally:
        pipe.denoiser = recorder.net
    assert recorder.seen["t_h"] is None


def test_the_compiled_or_ddp_proxy_passes_the_elements_time(lag_run, debug_data):
    """Under torch.compile or DDP the loss sees a proxy of the pipeline (Trainer._loss_pipe): the
    same draws give the same loss through it as through the pipeline, t_h included."""
    _, _, lagged = lag_run
    _, batch = next(iter(debug_data.train.batches(8, 0, 0, 0)))
    t = torch.rand(batch.num_graphs, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.5
    direct = diffusion_loss(lagged.pipe, batch, t, torch.Generator().manual_seed(11), type_lag_prob=1.0)
    recorder = Recorder(lagged.model)
    saved = lagged.forward_model
    lagged.forward_model = recorder  # a wrapper in place of the compiled / DDP module
    try:
        proxy = lagged._loss_pipe()
        assert proxy is not lagged.pipe
        through = diffusion_loss(proxy, batch, t, torch.Generator().manual_seed(11), type_lag_prob=1.0)
    finally:
        lagged.forward_model = saved
    assert recorder.seen["t_h"] is not None and (recorder.seen["t_h"].double() > t).all()
    assert float(through.detach()) == pytest.approx(float(direct.detach()), rel=1e-6)
    without = diffusion_loss(lagged.pipe, batch, t, torch.Generator().manual_seed(11))
    assert abs(float(without.detach()) - float(direct.detach())) > 1e-4  # the lag changes the loss: not vacuous


def test_switching_type_time_on_at_resume_keeps_the_function_then_trains(lag_run, debug_data):
    run, plain, lagged = lag_run
    _, batch = next(iter(debug_data.train.batches(8, 0, 0, 0)))
    h = lagged.pipe.features.encode(batch.types, batch.charges)
    t = torch.full((batch.num_graphs,), 0.4)
    with torch.no_grad():
        a = plain.model(batch.pos, h, t, batch.batch)
        b = lagged.model(batch.pos, h, t, batch.batch, t_h=torch.full_like(t, 0.9))
    torch.testing.assert_close(b.h, a.h, atol=1e-6, rtol=0)
    lagged.train()
    assert lagged.step == 6 and lagged.model.embedding.weight[:, -1].abs().max() > 0  # the new column learns
    back = Trainer(load_config(DEBUG, ["train.max_steps=8"]), run, data=debug_data, log=quiet)
    with pytest.raises(ValueError, match="noise time"):
        back.resume()


def test_sampling_with_the_elements_behind_the_coordinates(lag_run):
    run, _, lagged = lag_run
    pipe = lagged.export_pipeline()
    ticks = []
    arrays = pipe.sample_arrays(4, steps=6, seed=3, type_lag=0.5, type_steps=3, on_step=lambda done: ticks.append(done))
    assert arrays.extra["network_evaluations"] == 6 + 3 + 1
    assert len(arrays.positions) == 4 and all(np.isfinite(p).all() for p in arrays.positions)
    assert (arrays.fault_step == -1).all()
    again = pipe.sample_arrays(4, steps=6, seed=3, type_lag=0.5, type_steps=3)
    assert all(np.array_equal(a, b) for a, b in zip(arrays.positions, again.positions))
    plain = pipe.sample_arrays(4, steps=6, seed=3)  # the lag changes the process
    assert not all(np.array_equal(a, b) for a, b in zip(arrays.positions, plain.positions))
    mols = pipe.sample(3, steps=4, seed=0, type_lag=0.25)  # type_steps default: round(4 x 0.25) = 1
    assert len(mols) == 3


def test_cli_sample_with_a_lag_records_it_in_the_json(lag_run, tmp_path):
    import json

    run, _, lagged = lag_run
    folder = lagged.export_pipeline().save_pretrained(tmp_path / "model")
    out = tmp_path / "o"
    assert main(["sample", "-n", "2", "--steps", "4", "--type-lag", "0.5", "--checkpoint", str(folder), "-o", str(out),
                 "--no-novelty"]) == 0
    summary = json.loads((out / "samples.json").read_text())
    assert summary["type_lag"] == 0.5 and summary["type_steps"] == 2 and summary["network_evaluations"] == 4 + 2 + 1
    assert main(["sample", "-n", "2", "--steps", "4", "--checkpoint", str(folder), "-o", str(tmp_path / "p"),
                 "--no-novelty"]) == 0
    assert "type_lag" not in json.loads((tmp_path / "p" / "samples.json").read_text())


@pytest.mark.parametrize("options, message", [
    (dict(type_lag=1.5), "type_lag must be in"),
    (dict(type_lag=0.2, type_steps=0), "type_steps must be a positive"),
    (dict(type_steps=3), "type_steps goes with type_lag"),
    (dict(type_lag=0.2, composition="data"), "plain sampling"),
])
def test_bad_lag_options_are_one_line_errors(lag_run, options, message):
    pipe = lag_run[2].export_pipeline()
    with pytest.raises(ValueError, match=message):
        pipe.sample(2, steps=3, **options)


def test_a_model_without_type_time_refuses_a_lag_and_the_cli_says_so(tmp_path, capsys):
    pipe = load_pretrained("qm9")
    with pytest.raises(ValueError, match="model.type_time"):
        pipe.sample(2, steps=3, type_lag=0.3)
    assert main(["sample", "-n", "2", "--steps", "3", "--type-lag", "0.3", "-o", str(tmp_path / "o"),
                 "--no-novelty"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--type-lag needs a model trained" in err[0]
    assert not (tmp_path / "o").exists()


def test_type_lag_prob_needs_type_time_and_a_plain_gaussian_model(tmp_path, debug_data):
    with pytest.raises(ConfigError, match="type_lag_prob"):
        load_config(DEBUG, ["diffusion.type_lag_prob=1.5"])
    for extra, what in ((["diffusion.type_lag_prob=0.5"], "model.type_time off"),
                        ([*LAG, "model.self_condition=true"], "model.self_condition")):
        with pytest.raises(ValueError, match=what):
            Trainer(load_config(DEBUG, extra), tmp_path, data=debug_data, log=quiet)
