"""scripts/cond_signal.py: how much a conditional model's denoising loss depends on its condition.

A tiny conditional model (configs/debug_tiny.yaml conditioned on gap and mu, 3 steps) checks the
contexts, the pairing of noise across contexts, that a network blind to its context scores a gain
of exactly zero, and the one-line errors.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_tiny.yaml"




@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from moldiff.cli import main as moldiff

    root = tmp_path_factory.mktemp("condsignal")
    common = ["--config", str(DEBUG), "--set", "train.device=cpu", "--set", "train.max_steps=3",
              "--set", "train.val_every=0", "--threads", "1"]
    assert moldiff(["train", *common, "--set", "model.properties=[gap,mu]", "--run-dir", str(root / "cond")]) == 0
    assert moldiff(["train", *common, "--run-dir", str(root / "plain")]) == 0
    return root


def test_contexts_give_one_property_at_a_time(load_script):
    from moldiff.data.properties import PropertyConditioning

    script = load_script("cond_signal")
    rng = np.random.default_rng(0)
    values = rng.normal(size=(50, 2)) * [1000.0, 1.0] + [6800.0, 2.7]
    sizes = rng.integers(5, 20, 50)
    cond = PropertyConditioning.from_data(["gap", "mu"], values, sizes, values)
    targets = torch.as_tensor(values[:6])
    perm = torch.as_tensor(values[[3, 0, 5, 1, 2, 4]])
    ctx = script.contexts_for(cond, targets, perm)
    assert set(ctx) == {"none", "all", "gap:true", "gap:shuffled", "mu:true", "mu:shuffled"}
    assert torch.count_nonzero(ctx["none"]) == 0
    assert torch.equal(ctx["all"][:, 2:], torch.ones(6, 2))
    for k, name in enumerate(["gap", "mu"]):
        true, shuffled = ctx[f"{name}:true"], ctx[f"{name}:shuffled"]
        other = 1 - k
        assert torch.count_nonzero(true[:, [other, 2 + other]]) == 0  # the other property hidden
        assert torch.equal(true[:, 2 + k], torch.ones(6))
        assert torch.allclose(true[:, k], ctx["all"][:, k])
        # the shuffled column holds the same values as the true one, moved between molecules
        assert torch.allclose(shuffled[:, k], true[[3, 0, 5, 1, 2, 4], k])
        assert not torch.allclose(shuffled[:, k], true[:, k])


def test_gains_are_paired_and_zero_for_a_network_blind_to_its_context(runs, load_script):
    script = load_script("cond_signal")
    trainer, _ = script.load_trainer(runs / "cond", None, 1)
    first = script.measure(trainer, 16, 2)
    again = script.measure(trainer, 16, 2)
    assert first["mean"] == again["mean"]  # fixed seeds: the same times and noise every call
    assert first["molecules"] >= 16 and first["weights"].sum() == 2 * first["molecules"]
    # a randomly initialised network reads its context: the losses differ between contexts
    assert first["mean"]["all"] != first["mean"]["none"]
    assert first["mean"]["gap:true"] != first["mean"]["gap:shuffled"]
    rows = script.gain_rows(first)
    assert [r["context"] for r in rows] == ["gap", "mu", "all"]
    assert all(np.isfinite(r["gain_pct"]) and r["gain_se_pct"] >= 0 for r in rows)

    # zero the context's input columns of the EMA network: every context gives the same loss
    model = trainer.ema.model
    nf = model.config.num_features + 1  # input columns [h_t, t, context, ...]
    with torch.no_grad():
        model.embedding.weight[:, nf:nf + model.config.context_dim] = 0
    blind = script.measure(trainer, 16, 2)
    losses = set(blind["mean"].values())
    assert len(losses) == 1
    assert all(r["gain_pct"] == 0 for r in script.gain_rows(blind))


def test_cli_appends_rows_and_refuses_unconditional_runs(runs, tmp_path, load_script, capsys):
    script = load_script("cond_signal")
    out = tmp_path / "signal.csv"
    for _ in range(2):
        assert script.main([str(runs / "cond"), "--molecules", "8", "--repeats", "1", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["context"] for r in rows] == ["gap", "mu", "all"] * 2
    assert {r["step"] for r in rows} == {"3"}
    capsys.readouterr()
    assert script.main([str(runs / "plain"), "--molecules", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not property-conditional" in err[0]
    assert script.main([str(tmp_path / "missing"), "--molecules", "8"]) == 2
    assert "no config.yaml" in capsys.readouterr().err
