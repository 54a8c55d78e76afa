"""Training on the real QM9 cache with configs/debug_tiny.yaml: configuration, clipping, EMA, a
tiny overfit, bit-exact resume (in process, through the CLI, and after kill -9)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moldiff.geometry import fully_connected_edges
from moldiff.training.clipping import AdaptiveClipper
from moldiff.training.config import ConfigError, RunConfig, load_config
from moldiff.training.ema import EMA
from moldiff.training.loop import LOG_FIELDS, Trainer, diffusion_loss, load_training_data

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_tiny.yaml"


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def debug_data():
    """Training data for the debug config (256 training, 32 validation molecules)."""
    return load_training_data(load_config(DEBUG))


def read_log(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "hours"} for r in rows]


def assert_same_state(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k], b[k], atol=atol, rtol=0), k


# ----------------------------------------------------------------------------- configuration
def test_load_config_applies_typed_overrides():
    cfg = load_config(DEBUG, ["optim.lr=3e-4", "model.tanh=false", "train.max_steps=null", "name=x"])
    assert isinstance(cfg, RunConfig)
    assert cfg.optim.lr == 3e-4 and cfg.model.tanh is False and cfg.train.max_steps is None and cfg.name == "x"
    assert cfg.model.hidden == 16 and cfg.model.n_layers == 2  # from the YAML
    assert cfg.model.attention is True  # a default the YAML does not state
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["optim.learning_rate=1"], "unknown config key 'optim.learning_rate'"),
        (["nosuchsection.x=1"], "unknown config key 'nosuchsection'"),
        (["train.batch_size"], "section.key=value"),
        (["name.sub=1"], "not a section"),
    ],
)
def test_load_config_rejects_bad_overrides(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DEBUG, overrides)


def test_load_config_converts_numbers_that_yaml_reads_as_strings():
    # PyYAML (YAML 1.1) reads "3e-4" and "1e3" as strings; the CLI's own example is --set optim.lr=3e-4.
    cfg = load_config(DEBUG, ["optim.lr=3e-4", "train.max_steps=1e3", "model.coords_range=15", "optim.clip=2.5"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.model.coords_range == 15.0 and cfg.optim.clip == "2.5"


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.hidden=abc", "model.hidden must be an integer"),
        ("train.max_steps=2.5", "train.max_steps must be an integer"),
        ("model.tanh=1", "model.tanh must be true or false"),
        ("optim.lr=fast", "optim.lr must be a number"),
        ("optim.lr=true", "optim.lr must be a number"),
        ("name=[1, 2]", "name must be a string"),
    ],
)
def test_load_config_rejects_values_of_the_wrong_type(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DEBUG, [override])


def test_load_config_rejects_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {hidden: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


# ----------------------------------------------------------------------------- clipping and EMA
def test_adaptive_clipper_follows_edm():
    clipper = AdaptiveClipper(window=3, initial=3000.0)
    assert clipper.threshold() == pytest.approx(4500.0)  # 1.5 * mean + 2 * std of [3000]
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5
    norm, limit, clipped = clipper.clip([p])
    assert (norm, limit, clipped) == (pytest.approx(5.0), pytest.approx(4500.0), False)
    assert list(clipper.norms) == [3000.0, 5.0]
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0]) * 1e4  # norm 5e4 > threshold
    expected = 1.5 * np.mean([3000.0, 5.0]) + 2.0 * np.std([3000.0, 5.0])
    norm, limit, clipped = clipper.clip([p])
    assert clipped and limit == pytest.approx(expected) and norm == pytest.approx(5e4)
    assert p.grad.norm().item() == pytest.approx(expected, rel=1e-5)  # gradient scaled to the limit
    assert list(clipper.norms)[-1] == pytest.approx(expected)  # the clipped value is recorded
    restored = AdaptiveClipper()
    restored.load_state_dict(clipper.state_dict())
    assert list(restored.norms) == list(clipper.norms) and restored.norms.maxlen == 3


def test_ema_is_an_exponential_moving_average():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9)
    assert all(not p.requires_grad for p in ema.model.parameters())
    for value in (2.0, 4.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
    # 0.9 * (0.9 * 1 + 0.1 * 2) + 0.1 * 4 = 1.39
    assert torch.allclose(ema.model.weight, torch.full((1, 2), 1.39), atol=1e-6)


# ----------------------------------------------------------------------------- learning
def test_tiny_overfit_on_sixteen_molecules(tmp_path, debug_data):
    """16 molecules, t in [0.4, 0.6]: the loss (averaged over 8 fixed draws of t and noise) falls
    from ~1.28 to ~0.25 in 150 steps (measured: 5.0x on one core, ~5 s); require 3x."""
    cfg = load_config(DEBUG, ["data.max_train_molecules=16", "train.batch_size=16", "optim.lr=2e-3",
                              "optim.ema_decay=0", "optim.clip=none"])
    trainer = Trainer(cfg, tmp_path, data=load_training_data(cfg), log=quiet)
    batch = trainer.data.train.batch(np.arange(16))
    assert batch.num_graphs == 16

    def times(g):
        return 0.4 + 0.2 * torch.rand(16, generator=g, dtype=torch.float64)

    @torch.no_grad()
    def fixed_loss():
        g = torch.Generator().manual_seed(99)
        return float(np.mean([float(diffusion_loss(trainer.pipe, batch, times(g), g)) for _ in range(8)]))

    before = fixed_loss()
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        loss = diffusion_loss(trainer.pipe, batch, times(g), g)
        trainer.optimizer.zero_grad()
        loss.backward()
        trainer.optimizer.step()
    after = fixed_loss()
    assert before > 1.0  # an untrained network predicts noise no better than zero
    assert before / after >= 3.0, (before, after)


def test_train_step_reports_finite_loss_and_counts_steps(tmp_path, debug_data):
    cfg = load_config(DEBUG, ["train.max_steps=3", "train.val_every=0", "train.log_every=1"])
    trainer = Trainer(cfg, tmp_path, data=debug_data, log=quiet)
    trainer.train()
    rows = read_log(tmp_path)
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert list(rows[0]) == LOG_FIELDS
    assert all(np.isfinite(float(r["loss"])) and float(r["grad_norm"]) > 0 for r in rows)
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "pipeline" / "model.pt").is_file()
    assert (tmp_path / "config.yaml").is_file()
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("pairing", ["rotation", "permutation"])
def test_noise_pairing_trains_and_lowers_the_loss_at_high_noise(tmp_path, debug_data, pairing):
    """With paired noise the target at t -> 1 is predictable from the data's shape, so the loss of a
    fixed untrained model at t = 0.9 differs from the unpaired loss; training runs with either."""
    cfg = load_config(DEBUG, ["train.max_steps=2", "train.val_every=0", "train.log_every=1",
                              f"diffusion.noise_pairing={pairing}"])
    trainer = Trainer(cfg, tmp_path, data=debug_data, log=quiet)
    trainer.train()
    assert all(np.isfinite(float(r["loss"])) for r in read_log(tmp_path))
    _, batch = next(iter(debug_data.train.batches(32, 0, 0, 0)))
    t = torch.full((batch.num_graphs,), 0.9)
    with torch.no_grad():
        losses = {m: float(diffusion_loss(trainer.pipe, batch, t, torch.Generator().manual_seed(0), pairing=m))
                  for m in ("none", pairing)}
    assert losses["none"] != losses[pairing]


def test_unknown_noise_pairing_is_refused(tmp_path, debug_data):
    with pytest.raises(ValueError, match="noise_pairing"):
        Trainer(load_config(DEBUG, ["diffusion.noise_pairing=ot"]), tmp_path, data=debug_data, log=quiet)


def test_self_conditioning_switched_on_at_resume_keeps_the_function_then_trains(tmp_path, debug_data):
    """A plain run resumed with model.self_condition=true: zero new input columns, so the network's
    predictions are unchanged whatever the estimate; training then continues and samples."""
    Trainer(load_config(DEBUG, ["train.max_steps=2"]), tmp_path, data=debug_data, log=quiet).train()
    plain = Trainer(load_config(DEBUG, ["train.max_steps=2"]), tmp_path / "p", data=debug_data, log=quiet)
    plain.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=False))
    sc_cfg = load_config(DEBUG, ["train.max_steps=6", "train.log_every=1", "model.self_condition=true"])
    sc = Trainer(sc_cfg, tmp_path, data=debug_data, log=quiet)
    assert sc.resume()
    _, batch = next(iter(debug_data.train.batches(8, 0, 0, 0)))
    h = sc.pipe.features.encode(batch.types, batch.charges)
    t = torch.full((batch.num_graphs,), 0.4)
    cond = (torch.randn(batch.pos.shape, generator=torch.Generator().manual_seed(0)), torch.rand(h.shape))
    with torch.no_grad():
        a = plain.model(batch.pos, h, t, batch.batch)
        b = sc.model(batch.pos, h, t, batch.batch, cond=cond)
    torch.testing.assert_close(b.pos, a.pos, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.h, a.h, atol=1e-6, rtol=0)
    sc.train()
    rows = read_log(tmp_path)
    assert [int(r["step"]) for r in rows][-4:] == [3, 4, 5, 6]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    emb = sc.model.embedding.weight
    assert emb[:, -6:].abs().max() > 0  # the new columns learn
    arrays = sc.export_pipeline().sample_arrays(3, steps=4, seed=0)
    assert np.isfinite(arrays.positions[0]).all()
    back = Trainer(load_config(DEBUG, ["train.max_steps=8"]), tmp_path, data=debug_data, log=quiet)
    with pytest.raises(ValueError, match="self-conditioned"):
        back.resume()


def test_resume_takes_the_learning_rate_from_the_configuration(tmp_path, debug_data):
    Trainer(load_config(DEBUG, ["train.max_steps=2"]), tmp_path, data=debug_data, log=quiet).train()
    resumed = Trainer(load_config(DEBUG, ["train.max_steps=3", "optim.lr=1e-5"]), tmp_path, data=debug_data, log=quiet)
    assert resumed.resume()
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [1e-5]


def test_trainer_initialises_from_its_seed_without_touching_the_global_rng(tmp_path, debug_data):
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    a = Trainer(load_config(DEBUG), tmp_path / "a", data=debug_data, log=quiet)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.rand(10)  # whatever the caller does with its RNG in between ...
    b = Trainer(load_config(DEBUG), tmp_path / "b", data=debug_data, log=quiet)
    assert_same_state(a.model.state_dict(), b.model.state_dict())  # ... the initialisation is the seed's
    c = Trainer(load_config(DEBUG, ["train.seed=1"]), tmp_path / "c", data=debug_data, log=quiet)
    assert not torch.equal(a.model.embedding.weight, c.model.embedding.weight)


def test_training_set_smaller_than_a_batch_is_an_error(tmp_path):
    cfg = load_config(DEBUG, ["data.max_train_molecules=4", "train.batch_size=8", "train.max_steps=2"])
    with pytest.raises(ValueError, match="batch"):
        Trainer(cfg, tmp_path, log=quiet).train()


# ----------------------------------------------------------------------------- exact resume
def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path, debug_data):
    """15 steps straight vs 7 steps + checkpoint + a fresh Trainer resuming to 15. Step 7 is not a
    logging step (log_every=5), so the resumed run must also restore the partial loss window."""
    full_cfg = load_config(DEBUG, ["train.max_steps=15"])
    straight = Trainer(full_cfg, tmp_path / "a", data=debug_data, log=quiet)
    straight.train()

    Trainer(load_config(DEBUG, ["train.max_steps=7"]), tmp_path / "b", data=debug_data, log=quiet).train()
    assert [int(r["step"]) for r in read_log(tmp_path / "b")] == [5]
    resumed = Trainer(full_cfg, tmp_path / "b", data=debug_data, log=quiet)
    assert resumed.resume()
    assert resumed.step == 7
    resumed.train()

    rows_a, rows_b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [int(r["step"]) for r in rows_a] == [5, 10, 15]
    assert rows_a[1]["val_loss"] != ""  # val_every=10 in the debug config
    assert without_time(rows_b) == without_time(rows_a)
    assert_same_state(resumed.model.state_dict(), straight.model.state_dict())
    assert_same_state(resumed.ema.state_dict(), straight.ema.state_dict())
    assert list(resumed.clipper.norms) == list(straight.clipper.norms)
    assert torch.equal(resumed.generator.get_state(), straight.generator.get_state())


def test_resume_gives_a_log_from_before_a_new_column_the_new_header(tmp_path, debug_data):
    """A run logged before ``one_piece`` existed: the resume rewrites its log with today's header,
    keeps every old value, drops the rows past the checkpoint, and appends aligned rows."""
    Trainer(load_config(DEBUG, ["train.max_steps=10"]), tmp_path, data=debug_data, log=quiet).train()
    rows = read_log(tmp_path)
    old_fields = [f for f in LOG_FIELDS if f != "one_piece"]
    with open(tmp_path / "log.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=old_fields)
        w.writeheader()
        w.writerows([{k: r[k] for k in old_fields} for r in rows])
        w.writerow({**{k: "" for k in old_fields}, "step": "99", "loss": "1.0"})  # past the checkpoint
    resumed = Trainer(load_config(DEBUG, ["train.max_steps=15"]), tmp_path, data=debug_data, log=quiet)
    assert resumed.resume() and resumed.step == 10
    with open(tmp_path / "log.csv", newline="") as fh:
        assert next(csv.reader(fh)) == LOG_FIELDS
    assert not (tmp_path / "log.csv.tmp").exists()
    resumed.train()
    after = read_log(tmp_path)
    assert [int(r["step"]) for r in after] == [5, 10, 15]
    assert [r["loss"] for r in after[:2]] == [r["loss"] for r in rows] and after[0]["one_piece"] == ""
    assert float(after[2]["loss"]) > 0 and after[2]["val_loss"] == ""


def test_resume_without_checkpoint_returns_false(tmp_path, debug_data):
    trainer = Trainer(load_config(DEBUG), tmp_path, data=debug_data, log=quiet)
    assert trainer.resume() is False and trainer.step == 0


# ----------------------------------------------------------------------------- CLI
def moldiff(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moldiff.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_cli_train_then_resume(tmp_path):
    run = tmp_path / "run"
    first = moldiff("train", "--config", str(DEBUG), "--run-dir", str(run), "--set", "train.max_steps=6")
    assert first.returncode == 0, first.stderr
    assert [int(r["step"]) for r in read_log(run)] == [5]
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 6
    again = moldiff("train", "--run-dir", str(run), "--resume", "--set", "train.max_steps=10")
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout
    rows = read_log(run)
    assert [int(r["step"]) for r in rows] == [5, 10]
    assert rows[-1]["val_loss"] != ""
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 10


def test_cli_reports_a_bad_override_in_one_line(tmp_path):
    out = moldiff("train", "--config", str(DEBUG), "--run-dir", str(tmp_path / "r"), "--set", "optim.nope=1")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moldiff: error:") and "optim.nope" in lines[0]
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_sigterm_saves_a_checkpoint_and_exits_143_so_chained_scoring_stops(tmp_path):
    """SIGTERM mid-run: the trainer checkpoints where it stopped and `moldiff train` exits 128 + 15,
    so that `moldiff train ... && score` does not go on to score a model short of its step target."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moldiff.cli", "train", "--config", str(DEBUG), "--run-dir", str(run),
         "--set", "train.max_steps=100000", "--set", "train.checkpoint_minutes=0.001"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ((run / "log.csv").is_file() and len(read_log(run)) >= 2):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no log rows within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    step = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
    assert 10 <= step < 100000
    assert f"stopped by signal {int(signal.SIGTERM)} at step {step}; checkpoint saved" in out
    finished = moldiff("train", "--run-dir", str(run), "--resume", "--set", f"train.max_steps={step + 2}")
    assert finished.returncode == 0, finished.stderr  # a run that reaches its limit still exits 0
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == step + 2


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    """A run killed with SIGKILL right after some checkpoint continues, after --resume, exactly like a
    run that was never interrupted (losses, validation losses and final weights)."""
    target = 60
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    common = ["--config", str(DEBUG), "--set", "train.val_every=10"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moldiff.cli", "train", "--run-dir", str(killed), *common,
         "--set", "train.max_steps=100000", "--set", "train.checkpoint_minutes=0.001"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        ckpt = killed / "checkpoint.pt"
        # Wait for a few checkpoints, so the kill lands somewhere in the middle of training.
        while time.monotonic() < deadline:
            if ckpt.is_file() and (killed / "log.csv").is_file() and len(read_log(killed)) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint within 120 s")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    step_at_kill = torch.load(ckpt, weights_only=False)["step"]
    # The wait ends once step 10 is logged; its checkpoint may still be in flight (then step 9 is the last).
    assert 5 <= step_at_kill < target, step_at_kill

    resumed = moldiff("train", "--run-dir", str(killed), "--resume",
                      "--set", f"train.max_steps={target}", "--set", "train.checkpoint_minutes=5")
    assert resumed.returncode == 0, resumed.stderr
    ref = moldiff("train", "--run-dir", str(straight), *common, "--set", f"train.max_steps={target}")
    assert ref.returncode == 0, ref.stderr
    rows_k, rows_s = read_log(killed), read_log(straight)
    assert [int(r["step"]) for r in rows_s] == list(range(5, target + 1, 5))
    assert without_time(rows_k) == without_time(rows_s)
    state_k = torch.load(killed / "checkpoint.pt", weights_only=False)
    state_s = torch.load(straight / "checkpoint.pt", weights_only=False)
    assert_same_state(state_k["model"], state_s["model"])
    assert_same_state(state_k["ema"], state_s["ema"])


def test_learning_rate_annealing_follows_its_closed_form():
    o = load_config(DEBUG, ["optim.lr=2e-4", "optim.lr_decay_start=100", "optim.lr_decay_steps=50", "optim.lr_final=0.1"]).optim
    assert o.lr_at(0) == o.lr_at(99) == 2e-4  # constant before the start
    assert o.lr_at(125) == pytest.approx(2e-4 * (1 - 0.5 * 0.9))  # halfway down the line
    assert o.lr_at(150) == o.lr_at(10_000) == pytest.approx(2e-5)  # the floor, then constant
    assert load_config(DEBUG).optim.lr_at(10_000) == load_config(DEBUG).optim.lr  # default: no annealing
    for bad, message in (("optim.lr_decay_steps=0", "lr_decay_steps"), ("optim.lr_final=1.5", "lr_final")):
        with pytest.raises(ConfigError, match=message):
            load_config(DEBUG, [bad])


def test_annealed_run_updates_with_the_scheduled_rate_and_resumes_onto_it(tmp_path, debug_data):
    sets = ["optim.lr=1e-3", "optim.lr_decay_start=2", "optim.lr_decay_steps=4", "optim.lr_final=0.25"]
    trainer = Trainer(load_config(DEBUG, [*sets, "train.max_steps=5"]), tmp_path, data=debug_data, log=quiet)
    trainer.train()
    # the last update was taken at step 4: 1e-3 * (1 - (4 - 2) / 4 * 0.75)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [pytest.approx(1e-3 * 0.625)]
    resumed = Trainer(load_config(DEBUG, [*sets, "train.max_steps=7"]), tmp_path, data=debug_data, log=quiet)
    assert resumed.resume()
    resumed.train()
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [pytest.approx(1e-3 * 0.25)]  # step 6: the floor


def _even_by_enumeration(q: list[float]) -> float:
    total = 0.0
    for bits in np.ndindex(*(2,) * len(q)):
        if sum(bits) % 2 == 0:
            total += float(np.prod([qi if b else 1 - qi for b, qi in zip(bits, q)]))
    return total


def test_even_parity_probability_matches_enumeration():
    from moldiff.diffusion.losses import even_parity_probability

    rng = np.random.default_rng(3)
    sizes = [1, 2, 3, 5, 8]
    q = np.concatenate([rng.uniform(size=n) for n in sizes])
    q[[0, 4, 9]] = [0.0, 1.0, 0.5]  # certain even, certain odd, a coin
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    got = even_parity_probability(torch.tensor(q), batch, len(sizes)).numpy()
    starts = np.cumsum([0] + sizes)
    want = [_even_by_enumeration(list(q[a:b])) for a, b in zip(starts[:-1], starts[1:])]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got[0] == pytest.approx(1.0)  # one atom, certainly even
    assert got[3] == pytest.approx(0.5)  # a coin-flip atom makes the whole molecule a coin flip


def test_valence_parity_loss_is_zero_for_an_even_composition_and_large_for_an_odd_one():
    from moldiff.diffusion.losses import valence_parity_loss

    odd = torch.tensor([True, False, True, False, True])  # H C N O F
    onehot = lambda types: 100.0 * torch.nn.functional.one_hot(torch.tensor(types), 5).float()  # noqa: E731
    methane, methyl = onehot([1, 0, 0, 0, 0]), onehot([1, 0, 0, 0])
    batch = torch.tensor([0] * 5 + [1] * 4)
    loss = valence_parity_loss(torch.cat([methane, methyl]), odd, batch, 2)
    assert loss[0] == pytest.approx(0.0, abs=1e-5)
    assert loss[1] > 10.0
    unsure = torch.cat([onehot([1, 0, 0, 0]), torch.zeros(1, 5)])  # methyl + an atom of unknown type
    assert valence_parity_loss(unsure, odd, torch.zeros(5, dtype=torch.long), 1)[0] == pytest.approx(-np.log(3 / 5), rel=1e-5)


def test_parity_weight_adds_a_differentiable_term_and_zero_is_edms_loss(tmp_path, debug_data):
    cfg = load_config(DEBUG, ["diffusion.parity_weight=0.5", "train.max_steps=2", "train.val_every=0", "train.log_every=1"])
    trainer = Trainer(cfg, tmp_path, data=debug_data, log=quiet)
    _, batch = next(iter(debug_data.train.batches(32, 0, 0, 0)))
    t = torch.full((batch.num_graphs,), 0.1, dtype=torch.float64)
    plain = diffusion_loss(trainer.pipe, batch, t, torch.Generator().manual_seed(0))
    default = diffusion_loss(trainer.pipe, batch, t, torch.Generator().manual_seed(0), parity_weight=0.0)
    with_parity = diffusion_loss(trainer.pipe, batch, t, torch.Generator().manual_seed(0), parity_weight=0.5)
    assert float(default.detach()) == float(plain.detach())
    assert float(with_parity.detach()) > float(plain.detach())
    with_parity.backward()
    grads = [p.grad for p in trainer.pipe.denoiser.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    trainer.pipe.denoiser.zero_grad(set_to_none=True)
    # through a wrapper, as under torch.compile or DDP (the loss then sees a proxy of the pipeline)
    trainer.forward_model = lambda *args, **kwargs: trainer.model(*args, **kwargs)
    assert trainer._loss_pipe() is not trainer.pipe
    trainer.train()
    assert all(np.isfinite(float(r["loss"])) for r in read_log(tmp_path))


def test_negative_parity_weight_is_refused():
    with pytest.raises(ConfigError, match="parity_weight"):
        load_config(DEBUG, ["diffusion.parity_weight=-1"])


@pytest.fixture(scope="module")
def debug_bond_data():
    """The debug config's data with QM9 bond-order labels (a cached table; built once per machine)."""
    return load_training_data(load_config(DEBUG, ["model.bond_types=4"]))


@pytest.mark.parametrize("bond_output", ["eps", "logits"])
def test_bond_features_switched_on_at_resume_keep_the_function_then_train(tmp_path, debug_data, debug_bond_data, bond_output):
    """A plain run resumed with model.bond_types=4: zero new edge-input columns, so positions and
    features are predicted as before whatever the bond input; the bond head then learns (its loss
    falls on a fixed batch) and the model samples molecules with generated bonds."""
    Trainer(load_config(DEBUG, ["train.max_steps=2"]), tmp_path, data=debug_data, log=quiet).train()
    plain = Trainer(load_config(DEBUG, ["train.max_steps=2"]), tmp_path / "p", data=debug_data, log=quiet)
    plain.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=False))
    cfg = load_config(DEBUG, ["train.max_steps=60", "train.log_every=1", "model.bond_types=4", "optim.lr=1e-3",
                              f"model.bond_output={bond_output}"])
    bonded = Trainer(cfg, tmp_path, data=debug_bond_data, log=quiet)
    assert bonded.resume()
    _, batch = next(iter(debug_bond_data.train.batches(8, 0, 0, 0)))
    assert batch.bonds is not None and len(batch.bonds) > 0
    h = bonded.pipe.features.encode(batch.types, batch.charges)
    t = torch.full((batch.num_graphs,), 0.4)
    edge_index = fully_connected_edges(batch.batch)
    e_t = torch.randn(edge_index.shape[1], 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = plain.model(batch.pos, h, t, batch.batch)
        b, _ = bonded.model(batch.pos, h, t, batch.batch, edge_index=edge_index, e_t=e_t)
    torch.testing.assert_close(b.pos, a.pos, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.h, a.h, atol=1e-6, rtol=0)

    def bond_loss():
        g = torch.Generator().manual_seed(5)
        tt = torch.rand(batch.num_graphs, generator=g, dtype=torch.float64)
        with torch.no_grad():
            full = diffusion_loss(bonded.pipe, batch, tt, torch.Generator().manual_seed(6))
            atoms = diffusion_loss(bonded.pipe, batch, tt, torch.Generator().manual_seed(6), bond_weight=0.0)
        return float(full - atoms)

    before = bond_loss()
    bonded.train()
    assert bond_loss() < 0.8 * before
    assert bonded.model.blocks[0].gcls[0].edge_in.linear.weight[:, -4:].abs().max() > 0  # the new columns learn
    mols = bonded.export_pipeline().sample(3, steps=4, seed=0)
    assert all(m.generated_bonds is not None for m in mols)
    back = Trainer(load_config(DEBUG, ["train.max_steps=80"]), tmp_path, data=debug_data, log=quiet)
    with pytest.raises(ValueError, match="bond classes"):
        back.resume()


def test_bond_models_refuse_what_they_do_not_support_yet(tmp_path, debug_bond_data):
    with pytest.raises(ValueError, match="self_condition"):
        Trainer(load_config(DEBUG, ["model.bond_types=4", "model.self_condition=true"]), tmp_path, data=debug_bond_data, log=quiet)
