"""Right on every machine: device, precision and compile choices, resume across devices, and the
GPU path itself.

The first part runs everywhere (CI included): the one arithmetic decision
(``moldiff.runtime.choose_arithmetic``) given faked CPU and GPU capabilities, ``--device auto`` on a
machine without a GPU, the RNG-state path of a resume, and a run saved with ``train.precision: bf16``
resuming on a CPU without native bf16.

The tests marked ``gpu`` need a CUDA GPU and are skipped without one (``pytest -m gpu`` runs them
alone; ``scripts/gpu_check.sh`` sets a GPU machine up and runs them): sampling on CUDA, a few training
steps on CUDA, a training process killed after a checkpoint and resumed, and two-process DDP over
NCCL through ``torchrun`` (two GPUs). Each takes seconds on a GPU (configs/debug_tiny.yaml sizes).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import moldiff.runtime as runtime
from moldiff.training.config import ConfigError, RunConfig, load_config
from moldiff.training.loop import Trainer, load_training_data

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_tiny.yaml"
HAS_GPU = torch.cuda.is_available()


def quiet(_msg: str) -> None:
    pass


def moldiff(*args: str, timeout: float = 300.0, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moldiff.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def read_log(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def debug_data():
    return load_training_data(load_config(DEBUG))


def fake_cpu(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)


def fake_gpu(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(runtime, "cuda_has_bf16", lambda device=None: native)


# ----------------------------------------------------------------------------- one decision, faked hardware
@pytest.mark.parametrize("native, precision, compiled", [(True, "bf16", True), (False, "fp32", False)])
def test_auto_arithmetic_follows_the_cpu(monkeypatch, native, precision, compiled):
    """A CPU with AMX/AVX512-BF16 trains in bf16, compiled (as the shipped models were); an AVX2-only
    CPU in fp32 eager, where bf16 is emulated and compile measured slower (docs/benchmarks.md)."""
    from moldiff.pipeline import auto_precision

    fake_cpu(monkeypatch, native)
    got = runtime.choose_arithmetic("cpu", "auto", "auto")
    assert (got.precision, got.compile) == (precision, compiled)
    assert "auto" in got.reason
    assert runtime.choose_arithmetic(torch.device("cpu"), "auto", None) == got  # None means auto
    assert auto_precision("cpu") == precision  # sampling asks the same function
    # fp32 asked for on a bf16 CPU: not compiled by default (compile measured faster only in bf16)
    assert runtime.choose_arithmetic("cpu", "fp32", "auto").compile is False


@pytest.mark.parametrize("native", [True, False])
def test_auto_arithmetic_follows_the_gpu(monkeypatch, native):
    """CUDA: fp32, also on GPUs with native bf16 (on an H200 bf16 autocast made a 128 x 6 training
    step 1.2-1.5x slower); never compiled by default (not measured on a GPU yet)."""
    from moldiff.pipeline import auto_precision

    fake_gpu(monkeypatch, native)
    fake_cpu(monkeypatch, not native)  # the CPU's capabilities must not leak into the GPU's choice
    got = runtime.choose_arithmetic("cuda:0", "auto", "auto")
    assert (got.precision, got.compile) == ("fp32", False)
    assert auto_precision("cuda") == got.precision
    assert ("bf16 measured slower" in got.reason) == native


def test_explicit_values_are_kept_and_bad_ones_refused(monkeypatch):
    fake_cpu(monkeypatch, False)
    got = runtime.choose_arithmetic("cpu", "bf16", True)
    assert (got.precision, got.compile, got.reason) == ("bf16", True, "as configured (CPU without native bf16)")
    with pytest.raises(ValueError, match="precision must be one of"):
        runtime.choose_arithmetic("cpu", "fp16", "auto")
    with pytest.raises(ValueError, match="compile must be true, false or auto"):
        runtime.choose_arithmetic("cpu", "auto", "yes please")


def test_slow_choices_warn_only_where_they_are_slow(monkeypatch):
    fake_cpu(monkeypatch, False)
    warning = runtime.slow_bf16_warning("cpu", "bf16", True)
    assert warning is not None and "\n" not in warning
    assert "train.precision=bf16 with train.compile=true" in warning
    assert "--set train.precision=auto --set train.compile=auto" in warning
    warning = runtime.slow_bf16_warning("cpu", "bf16", False)
    assert "train.precision=bf16 on a CPU without native bf16" in warning and "compile" not in warning
    assert runtime.slow_bf16_warning("cpu", "fp32", True) is None  # fp32 compiled: not slower here
    assert runtime.slow_bf16_warning("cpu", "auto", "auto") is None
    fake_cpu(monkeypatch, True)
    assert runtime.slow_bf16_warning("cpu", "bf16", True) is None
    fake_gpu(monkeypatch, False)
    assert "compute capability < 8.0" in runtime.slow_bf16_warning("cuda:0", "bf16")
    fake_gpu(monkeypatch, True)
    assert runtime.slow_bf16_warning("cuda:0", "bf16") is None


AUTO = ["train.precision=auto", "train.compile=auto"]  # configs/debug_tiny.yaml pins fp32 eager
CPU_AUTO = AUTO + ["train.device=cpu"]  # the CPU's decision, also on a machine with a GPU (auto would pick it)


def test_trainer_takes_the_decision(monkeypatch, tmp_path, debug_data):
    fake_cpu(monkeypatch, True)
    messages = []
    trainer = Trainer(load_config(DEBUG, CPU_AUTO), tmp_path, data=debug_data, log=messages.append)
    assert (trainer.arithmetic.precision, trainer.arithmetic.compile) == ("bf16", True)
    assert trainer.forward_model is not trainer.model  # wrapped by torch.compile (compiled on first call)
    assert messages[0].startswith("training on cpu in bf16, compiled: precision auto -> bf16")
    fake_cpu(monkeypatch, False)
    messages.clear()
    trainer = Trainer(load_config(DEBUG, CPU_AUTO), tmp_path, data=debug_data, log=messages.append)
    assert (trainer.arithmetic.precision, trainer.arithmetic.compile) == ("fp32", False)
    assert trainer.forward_model is trainer.model
    assert messages == ["training on cpu in fp32, eager: precision auto -> fp32, compile auto -> off "
                        "(CPU without native bf16)"]


def test_bf16_training_reaches_the_network(tmp_path, debug_data):
    """train.precision=bf16 runs the network's products in bf16 also without torch.compile (the
    pipeline's own autocast region must not switch the training step's off): the loss moves by bf16
    rounding, not more."""
    losses = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(load_config(DEBUG, [f"train.precision={precision}"]), tmp_path / precision, data=debug_data,
                          log=quiet)
        assert trainer.arithmetic.precision == precision and trainer.forward_model is trainer.model
        losses[precision] = trainer.train_step(trainer.data.train.batch(np.arange(8)))[0]
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
    assert Trainer(load_config(DEBUG, ["train.precision=bf16"]), tmp_path / "x", data=debug_data,
                   log=quiet).export_pipeline().inference_precision == "fp32"  # sampling chooses its own


# ----------------------------------------------------------------------------- configuration
def test_defaults_are_auto_and_old_values_still_load(tmp_path):
    t = RunConfig().train
    assert (t.device, t.precision, t.compile) == ("auto", "auto", "auto")
    for name in ("qm9_small", "edm_qm9"):
        t = load_config(ROOT / "configs" / f"{name}.yaml").train
        assert (t.precision, t.compile) == ("auto", "auto"), name
    # committed run configs and checkpoints carry the old explicit values
    old = tmp_path / "config.yaml"
    old.write_text("name: old\ntrain: {device: cpu, precision: bf16, compile: true}\n")
    saved = load_config(old).train
    assert (saved.device, saved.precision, saved.compile) == ("cpu", "bf16", True)
    for committed in sorted(ROOT.glob("runs/*/config.yaml")):
        load_config(committed)
    t = load_config(DEBUG, ["train.precision=fp32", "train.compile=false", "train.device=cuda:1"]).train
    assert (t.precision, t.compile, t.device) == ("fp32", False, "cuda:1")
    assert load_config(DEBUG, ["train.compile=null"]).train.compile == "auto"
    assert load_config(DEBUG, ["train.compile=auto"]).train.compile == "auto"


@pytest.mark.parametrize("override, match", [
    ("train.precision=fp16", "train.precision must be auto, fp32 or bf16"),
    ("train.compile=sometimes", "train.compile must be true, false or auto"),
    ("train.device=tpu", "train.device must be auto, cpu, cuda or cuda:N"),
])
def test_bad_arithmetic_and_device_values_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DEBUG, [override])


def test_cli_refuses_a_bad_device_in_one_line(tmp_path):
    out = moldiff("train", "--config", str(DEBUG), "--run-dir", str(tmp_path / "r"), "--set", "train.device=tpu")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["moldiff: error: train.device must be auto, cpu, cuda or cuda:N, got 'tpu'"]


@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a GPU")
def test_cuda_without_a_gpu_is_one_line_for_train_and_nll(tmp_path):
    out = moldiff("train", "--config", str(DEBUG), "--run-dir", str(tmp_path / "r"), "--set", "train.device=cuda")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "moldiff: error: train.device cuda: no CUDA GPU is available (torch.cuda.is_available() is False)"]
    assert not (tmp_path / "r").exists()
    out = moldiff("nll", "--device", "cuda", "-n", "2")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "moldiff: error: --device cuda: no CUDA GPU is available (torch.cuda.is_available() is False)"]


# ----------------------------------------------------------------------------- --device auto
@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a GPU")
def test_device_auto_is_the_cpu_here(tmp_path, debug_data):
    from moldiff.cli import _check_device, build_parser
    from moldiff.pipeline import load_pretrained

    parser = build_parser()
    assert parser.parse_args(["sample"]).device == "auto"
    assert parser.parse_args(["nll"]).device == "auto"
    assert runtime.resolve_device("auto") == runtime.resolve_device(None) == "cpu"
    assert _check_device("auto") == "cpu"
    assert Trainer(load_config(DEBUG), tmp_path, data=debug_data, log=quiet).device == torch.device("cpu")
    assert load_pretrained(device="auto").device == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU is available"):
        runtime.resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        runtime.resolve_device("gpu")


def test_device_auto_is_not_written_back(tmp_path):
    """The run directory's config keeps "auto", so a run moved to another machine resolves afresh."""
    run = tmp_path / "run"
    out = moldiff("train", "--config", str(DEBUG), "--run-dir", str(run), "--set", "train.max_steps=2",
                  "--set", "train.val_every=0", "--set", "train.precision=auto")
    assert out.returncode == 0, out.stderr
    expected = "cuda" if HAS_GPU else "cpu"
    assert f"training on {expected}" in out.stdout
    assert f"in {runtime.auto_precision(expected)}, eager" in out.stdout
    saved = load_config(run / "config.yaml").train
    assert (saved.device, saved.precision, saved.compile) == ("auto", "auto", False)


# ----------------------------------------------------------------------------- RNG state on resume
class RecordingGenerator:
    """A ``torch.Generator`` stand-in that records what ``set_state`` receives."""

    def __init__(self, inner: torch.Generator):
        self.inner, self.states = inner, []

    def set_state(self, state):
        self.states.append(state)
        return self.inner.set_state(state)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_resume_restores_the_rng_state_from_a_cpu_byte_tensor(monkeypatch, tmp_path, debug_data):
    """``Generator.set_state`` takes a CPU byte tensor, also for a CUDA generator: the checkpoint is
    loaded onto the CPU (not onto the training device) and the state handed over as a CPU tensor."""
    cfg = load_config(DEBUG, ["train.max_steps=3", "train.val_every=0"])
    first = Trainer(cfg, tmp_path, data=debug_data, log=quiet)
    first.train()
    saved = first.generator.get_state()

    locations = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        locations.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    resumed = Trainer(load_config(DEBUG, ["train.max_steps=5", "train.val_every=0"]), tmp_path, data=debug_data,
                      log=quiet)
    recorder = RecordingGenerator(resumed.generator)
    resumed.generator = recorder
    assert resumed.resume()
    resumed.generator = recorder.inner
    assert locations == ["cpu"]
    (state,) = recorder.states
    assert state.device.type == "cpu" and state.dtype == torch.uint8
    assert torch.equal(resumed.generator.get_state(), saved)
    # load_state_dict also accepts a state whose tensors were mapped elsewhere: the RNG state is moved
    # to the CPU before set_state (a state loaded with map_location="cuda" holds it on the GPU)
    state = resumed.state_dict()
    moved = dict(state, generator=state["generator"].to(resumed.device))
    resumed.load_state_dict(moved)
    resumed.train()
    assert resumed.step == 5


def test_a_run_trained_on_a_gpu_resumes_on_a_cpu(tmp_path, debug_data):
    """A CUDA generator's state (Philox seed and offset: 16 bytes) cannot seed the CPU's Mersenne
    Twister (5,056 bytes): a run moved from a GPU to a CPU restarts its noise stream from the seed and
    the step, with one line saying so, and does so reproducibly (seen: a checkpoint trained on an H200
    failed to resume here with a RuntimeError)."""
    import shutil

    cfg = ["train.val_every=0", "train.device=cpu"]
    Trainer(load_config(DEBUG, cfg + ["train.max_steps=3"]), tmp_path / "a", data=debug_data, log=quiet).train()
    state = torch.load(tmp_path / "a" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["generator"].numel() == 5056
    state["generator"] = torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)  # CUDA's layout
    torch.save(state, tmp_path / "a" / "checkpoint.pt")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    losses = []
    for run in ("a", "b"):
        messages = []
        trainer = Trainer(load_config(DEBUG, cfg + ["train.max_steps=5"]), tmp_path / run, data=debug_data,
                          log=messages.append)
        assert trainer.resume() and trainer.step == 3
        assert any("is not a cpu generator's" in m and "step 3" in m for m in messages), messages
        losses.append([trainer.train_step(trainer.data.train.batch(np.arange(8)))[0] for _ in range(2)])
    assert losses[0] == losses[1] and all(np.isfinite(losses[0]))


@pytest.mark.skipif(runtime.cpu_has_native_bf16(), reason="this CPU has native bf16: no warning to check")
def test_a_saved_bf16_run_resumes_on_a_cpu_without_bf16_with_one_warning(tmp_path):
    """Committed run configs say ``precision: bf16``: on an AVX2-only CPU the run still resumes (same
    arithmetic, so the run continues as it was trained) and says once how to switch to fp32."""
    run = tmp_path / "run"
    first = moldiff("train", "--config", str(DEBUG), "--run-dir", str(run), "--set", "train.max_steps=3",
                    "--set", "train.log_every=1", "--set", "train.val_every=0",
                    "--set", "train.precision=bf16", "--set", "train.compile=false")
    assert first.returncode == 0, first.stderr
    again = moldiff("train", "--run-dir", str(run), "--resume", "--set", "train.max_steps=5")
    assert again.returncode == 0, again.stderr
    warnings = [line for line in again.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "train.precision=bf16" in warnings[0]
    assert "--set train.precision=auto" in warnings[0]
    assert "training on cpu in bf16, eager: as configured" in again.stdout
    assert "resumed from" in again.stdout
    assert [int(r["step"]) for r in read_log(run)] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(float(r["loss"])) for r in read_log(run))
    # and the advice works: the same run continues in fp32
    fp32 = moldiff("train", "--run-dir", str(run), "--resume", "--set", "train.max_steps=6",
                   "--set", "train.precision=auto")
    assert fp32.returncode == 0, fp32.stderr
    assert "training on cpu in fp32" in fp32.stdout and "warning:" not in fp32.stdout
    assert [int(r["step"]) for r in read_log(run)] == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_sample_on_cuda(precision):
    from moldiff.pipeline import load_pretrained

    runtime.allow_tf32()
    pipe = load_pretrained(device="auto").configure_inference(precision=precision)
    assert pipe.device.type == "cuda"
    assert pipe.inference_precision == ("fp32" if precision == "fp32" else runtime.auto_precision("cuda"))
    mols = pipe.sample(8, steps=5, seed=0)
    assert len(mols) == 8
    assert all(np.isfinite(m.positions).all() for m in mols)
    # the network computes on the GPU what it computes on the CPU (TF32 / bf16: loose tolerance)
    cpu = load_pretrained(device="cpu")
    gen = torch.Generator().manual_seed(0)
    batch = torch.repeat_interleave(torch.arange(4), torch.tensor([9, 12, 15, 18]))
    pos = torch.randn(len(batch), 3, generator=gen)
    h = torch.randn(len(batch), pipe.features.dim, generator=gen)
    t = torch.full((4,), 0.3)
    with torch.no_grad():
        ref = cpu.predict_noise(pos, h, t, batch)
        got = pipe.predict_noise(pos.cuda(), h.cuda(), t.cuda(), batch.cuda())
    for a, b in zip(got, ref):
        assert (a.float().cpu() - b).abs().max() <= 0.05 * b.abs().max() + 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_cli_sample_defaults_to_the_gpu(tmp_path):
    out = moldiff("sample", "-n", "8", "--steps", "5", "--no-novelty", "-o", str(tmp_path / "s"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "s" / "samples.sdf").is_file()
    summary = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert summary["precision"] == runtime.auto_precision("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_train_a_few_steps_on_cuda_then_resume(tmp_path, debug_data):
    runtime.allow_tf32()
    cfg = load_config(DEBUG, ["train.max_steps=10", "train.val_every=5", "train.precision=auto"])
    trainer = Trainer(cfg, tmp_path, data=debug_data, log=quiet)
    assert trainer.device.type == "cuda" and trainer.generator.device.type == "cuda"
    assert trainer.arithmetic.precision == runtime.auto_precision("cuda")
    trainer.train()
    rows = read_log(tmp_path)
    assert [int(r["step"]) for r in rows] == [5, 10]
    assert all(np.isfinite(float(r["loss"])) and np.isfinite(float(r["val_loss"])) for r in rows)
    assert next(trainer.model.parameters()).device.type == "cuda"
    saved = trainer.generator.get_state()
    # resume onto the GPU: RNG state restored through a CPU byte tensor, training continues there
    resumed = Trainer(load_config(DEBUG, ["train.max_steps=15", "train.val_every=5", "train.precision=auto"]),
                      tmp_path, data=debug_data, log=quiet)
    assert resumed.resume() and resumed.step == 10
    assert torch.equal(resumed.generator.get_state(), saved)
    assert all(s["exp_avg"].device.type == "cuda" for s in resumed.optimizer.state.values())
    resumed.train()
    assert [int(r["step"]) for r in read_log(tmp_path)] == [5, 10, 15]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_training_on_cuda_resumes_where_it_stopped(tmp_path, sig):
    """A CUDA training process killed after a checkpoint (SIGKILL: no goodbye; SIGTERM: checkpoint on
    the way out) resumes from its checkpoint: steps continue without gap or repeat, and the losses
    follow an uninterrupted run (fp32; GPU scatter-adds are not bit-reproducible, hence a tolerance)."""
    target = 40
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    common = ["--config", str(DEBUG), "--set", "train.val_every=10", "--set", "train.precision=fp32"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moldiff.cli", "train", "--run-dir", str(killed), *common,
         "--set", "train.max_steps=100000", "--set", "train.checkpoint_minutes=0.001"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if (killed / "checkpoint.pt").is_file() and (killed / "log.csv").is_file() and len(read_log(killed)) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint within 180 s")
        os.kill(proc.pid, sig)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == (-sig if sig == signal.SIGKILL else 128 + sig)  # SIGTERM: checkpoint, then exit 143
    step_at_kill = torch.load(killed / "checkpoint.pt", weights_only=False)["step"]
    assert 5 <= step_at_kill < target, step_at_kill
    resumed = moldiff("train", "--run-dir", str(killed), "--resume", "--set", f"train.max_steps={target}",
                      "--set", "train.checkpoint_minutes=5")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {killed / 'checkpoint.pt'} at step {step_at_kill}" in resumed.stdout
    ref = moldiff("train", "--run-dir", str(straight), *common, "--set", f"train.max_steps={target}")
    assert ref.returncode == 0, ref.stderr
    rows_k, rows_s = read_log(killed), read_log(straight)
    assert [int(r["step"]) for r in rows_k] == [int(r["step"]) for r in rows_s] == list(range(5, target + 1, 5))
    for a, b in zip(rows_k, rows_s):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=2e-2), a["step"]
        if b["val_loss"]:
            assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=2e-2), a["step"]
    assert torch.load(killed / "checkpoint.pt", weights_only=False)["step"] == target


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL data-parallel training needs two CUDA GPUs")
def test_two_process_ddp_over_nccl_with_torchrun(tmp_path):
    """``torchrun --nproc_per_node 2 -m moldiff.cli train``: each rank on its own GPU (set before the
    NCCL process group starts, DDP with device_ids), both stop at the same step, rank 0 writes."""
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "moldiff.cli", "train", "--config", str(DEBUG), "--run-dir", str(run),
         "--set", "train.max_steps=10", "--set", "train.batch_size=8", "--set", "train.val_every=5"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "training on cuda:0" in out.stdout and "training on cuda:1" not in out.stdout  # rank 0 logs
    rows = read_log(run)
    assert [int(r["step"]) for r in rows] == [5, 10]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 10 and state["generator"].device.type == "cpu"
