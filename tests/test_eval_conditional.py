"""scripts/eval_conditional.py: EDM's conditional-generation score (issue 21's MAE table machinery).

A tiny conditional generator (configs/debug_tiny.yaml conditioned on gap, 3 steps) and an untrained
tiny predictor check the plumbing: the cells, the baselines, the draws, the JSON written after every
cell, w = 0 being the unconditional mode exactly, and the one-line errors. No number here says
anything about a trained model.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moldiff.chemistry.elements import QM9_ELEMENTS
from moldiff.data.properties import EDM_TABLE3, EDM_UNITS, edm_halves, edm_targets
from moldiff.models.property import PredictorConfig, PropertyPredictor, load_predictor, save_predictor

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_tiny.yaml"




def tiny_predictor(folder: Path, properties=("gap", "mu")) -> Path:
    """An untrained 16 x 2 predictor of EDM's targets, saved with a recorded test MAE."""
    torch.manual_seed(0)
    cfg = PredictorConfig(elements=QM9_ELEMENTS, properties=properties, units=tuple(EDM_UNITS[k] for k in properties),
                          target_mean=(6800.0, 2.7)[: len(properties)], target_mad=(1000.0, 1.2)[: len(properties)],
                          hidden=16, n_layers=2, notes={"edm_targets": True})
    meta = {"test_mae": {"gap": 64.0, "mu": 0.043}, "test_set": "the generator half", "n_test": 400}
    save_predictor(folder, PropertyPredictor(cfg), meta)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A conditional generator (gap) trained 3 steps, a gap + mu predictor and an alpha-only one."""
    from moldiff.cli import main as moldiff

    root = tmp_path_factory.mktemp("evalcond")
    assert moldiff(["train", "--config", str(DEBUG), "--set", "model.properties=[gap]", "--set", "train.device=cpu",
                    "--set", "train.max_steps=3", "--set", "train.val_every=0", "--run-dir", str(root / "gen"),
                    "--threads", "1"]) == 0
    return {"generator": root / "gen", "predictor": tiny_predictor(root / "pred"),
            "alpha_only": tiny_predictor(root / "pred_alpha", ("alpha",)), "root": root}


COMMON = ["-n", "6", "--steps", "3", "--seed", "0", "--device", "cpu", "--precision", "fp32", "--threads", "1"]


def test_scores_every_cell_beside_the_baselines(models, tmp_path, load_script, monkeypatch, capsys):
    script = load_script("eval_conditional")
    snapshots = []
    real_write = script.write_json
    monkeypatch.setattr(script, "write_json", lambda path, doc: (snapshots.append(json.loads(json.dumps(doc))),
                                                                 real_write(path, doc)))
    out = tmp_path / "evalcond.json"
    code = script.main(["--generator", str(models["generator"]), "--predictor", str(models["predictor"]),
                        "--property", "gap", "--guidance", "0,2", "--per-molecule", "--out", str(out), *COMMON])
    printed = capsys.readouterr().out
    assert code == 0
    doc = json.loads(out.read_text())
    # rewritten after every cell: the first snapshot holds one cell and is marked incomplete
    assert len(snapshots) == 3 and len(snapshots[0]["cells"]) == 1 and not snapshots[0]["complete"]
    assert doc["complete"] and doc == snapshots[-1]
    assert [(c["property"], c["guidance_scale"]) for c in doc["cells"]] == [("gap", 0.0), ("gap", 2.0)]
    for cell in doc["cells"]:
        assert cell["n"] == cell["n_scored"] == 6 and cell["n_unscored"] == 0 and cell["unit"] == "meV"
        assert math.isfinite(cell["mae"]) and cell["mae"] >= 0 and cell["mae_se"] >= 0
        for key in ("mol_stable", "atom_stable", "validity", "uniqueness"):
            assert 0.0 <= cell[key] <= 1.0
        mol = cell["molecules"]
        assert cell["mae"] == pytest.approx(np.abs(np.array(mol["predicted"]) - mol["target"]).mean())
        assert [sum(int(c) if c else 1 for c in __import__("re").findall(r"[A-Z][a-z]?(\d*)", f)) for f in mol["formula"]] \
            == mol["num_atoms"]  # one formula per molecule, counting its atoms
        assert all(r is None or r >= 0 for r in mol["radius"])
    base = doc["baselines"]["gap"]
    assert base["edm_table3"] == {row: v["gap"] for row, v in EDM_TABLE3.items()} and base["geoldm"] == 587
    assert base["qm9_lower_bound"] == 64.0 and "400 molecules" in base["qm9_lower_bound_on"]
    assert 1300 < base["naive_data_only"] < 1600 and 780 < base["atoms_median"] < 940  # full halves (EDM 1470, 866)
    assert math.isfinite(base["atoms_on_draws"]) and base["atoms_on_draws"] >= 0
    assert doc["machine"]["cpu"] and doc["command"].startswith("python scripts/eval_conditional.py --generator")
    assert doc["timings"]["elapsed_s"] > 0 and doc["cells"][0]["sample_and_interpret_s"] >= 0
    assert "Naive" in printed and "GeoLDM 587" in printed and "wrote" in printed

    # the pairs are drawn jointly from the generator's training molecules, exact values
    assert doc["draws"]["gap"]["source"].startswith("exact")
    train = edm_halves().generator[:256]  # debug_tiny: data.max_train_molecules = 256
    from moldiff.data.qm9 import load_qm9

    qm9 = load_qm9()
    pairs = set(zip(qm9.num_atoms[train].tolist(), edm_targets(qm9, ["gap"], train)[:, 0].tolist()))
    drawn = doc["cells"][0]["molecules"]
    assert all((n, y) in pairs for n, y in zip(drawn["num_atoms"], drawn["target"]))
    assert doc["cells"][1]["molecules"]["target"] == drawn["target"]  # every scale on the same targets

    # w = 0 is the unconditional mode: the same molecules as sampling without a condition at those sizes
    from moldiff.pipeline import load_pretrained

    pipe = load_pretrained(models["generator"]).configure_inference("fp32")
    plain = pipe.sample(6, num_atoms=drawn["num_atoms"], steps=3, seed=0)
    predictor, meta = load_predictor(models["predictor"])
    again = script.predict(predictor, meta, plain, "gap")
    assert np.allclose(again, drawn["predicted"], rtol=1e-6)
    assert [m.valid for m in plain] == drawn["valid"]
    assert not np.allclose(doc["cells"][1]["molecules"]["predicted"], drawn["predicted"])  # w = 2 is not

    # the training mark is recorded, and scripts/cond_curve.py turns marks into the MAE-against-hours table
    assert doc["generator_step"] == 3 and doc["generator_train_hours"] >= 0  # 3 steps round to 0.0 h
    import subprocess

    curve = tmp_path / "curve"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "cond_curve.py"), str(out), "--out", str(curve)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with open(curve.with_suffix(".csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["property"], float(r["guidance_scale"]), int(r["step"])) for r in rows] == [("gap", 0.0, 3), ("gap", 2.0, 3)]
    assert [float(r["mae"]) for r in rows] == pytest.approx([c["mae"] for c in doc["cells"]])
    assert float(rows[0]["edm"]) == EDM_TABLE3["EDM"]["gap"] and float(rows[0]["geoldm"]) == 587
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "cond_curve.py"), str(bad), "--out", str(curve)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "not a scripts/eval_conditional.py result" in done.stderr


@pytest.mark.parametrize("options, message", [
    (["--property", "zpve"], "--property: unknown property 'zpve'"),
    (["--property", "mu"], "conditions on gap only; it cannot condition on mu"),
    (["--property", "gap", "--guidance", "0,-1"], "--guidance: scales must be numbers >= 0, got -1"),
    (["--property", "gap", "--guidance", "0,x"], "--guidance: 'x' is not a number"),
    (["--property", "gap", "-n", "0"], "-n must be at least 1"),
    (["--property", "gap", "--predictor-alpha"], "predicts alpha only, not gap"),
    (["--property", "gap", "--generator-missing"], "--generator: checkpoint directory not found"),
])
def test_bad_inputs_are_one_line_and_write_nothing(models, tmp_path, load_script, capsys, options, message):
    script = load_script("eval_conditional")
    generator, predictor = str(models["generator"]), str(models["predictor"])
    if "--predictor-alpha" in options:
        options, predictor = [o for o in options if o != "--predictor-alpha"], str(models["alpha_only"])
    if "--generator-missing" in options:
        options, generator = [o for o in options if o != "--generator-missing"], str(tmp_path / "missing")
    out = tmp_path / "never.json"
    code = script.main(["--generator", generator, "--predictor", predictor, *options, "--out", str(out), *COMMON[2:]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("eval_conditional: error:"), err
    assert message in err, err
    assert not out.exists()


def test_draws_fall_back_to_the_float16_table(load_script, qm9):
    """A generator whose training molecules are not the head of EDM's generator half (here made-up
    ones) is drawn from its own float16 table, clipped to its training range."""
    from tests.test_conditional import synthetic_conditioning

    script = load_script("eval_conditional")
    conditioning, sizes = synthetic_conditioning(("gap", "mu"))
    values, got_sizes, targets, source = script.draw_pool(conditioning, qm9, edm_halves().generator, "gap")
    assert source.startswith("float16") and np.array_equal(got_sizes, sizes)
    assert np.all((values >= conditioning.low[0]) & (values <= conditioning.high[0]))
    assert np.allclose(values, conditioning.reference_values[:, 0], atol=0.01)
    assert np.allclose(targets, 1000 * values)  # eV -> meV, EDM's target unit


def test_curve_forecast_recovers_a_known_log_linear_curve(tmp_path):
    """scripts/cond_curve.py's forecast: marks on the line MAE = 9 - 0.5 ln(hours) (alpha, w = 2) put
    EDM's row (2.76) at exp((9 - 2.76) / 0.5) hours; a rising series (w = 0) never reaches it; the
    marks before --fit-from are left out of the fit."""
    import subprocess

    files = []
    for step, hours in [(10, 0.5), (20, 2.0), (40, 4.0), (80, 8.0), (160, 16.0)]:
        cells = [{"property": "alpha", "guidance_scale": 2.0, "unit": "Bohr^3", "n": 300, "n_scored": 300,
                  "mae": 9 - 0.5 * math.log(hours) + (5.0 if hours < 1 else 0.0), "mae_se": 0.1,
                  "mol_stable": 0.5, "validity": 0.7, "valid_and_unique": 0.7},
                 {"property": "alpha", "guidance_scale": 0.0, "unit": "Bohr^3", "n": 300, "n_scored": 300,
                  "mae": 5 + 0.01 * hours, "mae_se": 0.2, "mol_stable": 0.5, "validity": 0.7, "valid_and_unique": 0.7}]
        doc = {"generator_run": "toy", "generator_step": step, "generator_train_hours": hours, "steps": 50,
               "cells": cells, "baselines": {"alpha": {"edm_table3": {"EDM": 2.76}, "geoldm": 2.37}}}
        files.append(tmp_path / f"toy_s{step}.json")
        files[-1].write_text(json.dumps(doc))
    out = tmp_path / "curve"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "cond_curve.py"), *map(str, files), "--out", str(out),
                           "--fit-from", "1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "curve_forecast.csv", newline="") as fh:
        rows = {float(r["guidance_scale"]): r for r in csv.DictReader(fh)}
    guided = rows[2.0]
    assert int(guided["marks"]) == 4 and float(guided["first_hours"]) == 2.0  # the 0.5-h mark is left out
    assert float(guided["change_per_doubling"]) == pytest.approx(-0.5 * math.log(2), rel=1e-9)
    logs = np.log([2.0, 4.0, 8.0, 16.0])  # every mark's SE is 0.1: the slope's SE is 0.1 / sqrt(Sxx)
    assert float(guided["change_per_doubling_se"]) == pytest.approx(0.1 / np.sqrt(((logs - logs.mean()) ** 2).sum())
                                                                    * math.log(2), rel=1e-9)
    assert float(guided["hours_to_edm"]) == pytest.approx(math.exp((9 - 2.76) / 0.5), rel=1e-9)
    assert float(guided["hours_to_geoldm"]) == pytest.approx(math.exp((9 - 2.37) / 0.5), rel=1e-9)
    assert rows[0.0]["hours_to_edm"] == "" and float(rows[0.0]["change_per_doubling"]) > 0
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "cond_curve.py"), str(files[0]), "--out", str(out),
                           "--fit-from", "-1"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--fit-from" in done.stderr


def test_guidance_interval_guides_only_the_calls_in_its_window(models, tmp_path, load_script):
    """scripts/guidance_interval.py: a window holding every step is eval_conditional.py's guided cell
    molecule for molecule; a window holding none of the 3-step grid's times (1, 0.444, 0.111, then 0)
    is the plain conditional cell (w = 1); a window holding one of them is neither."""
    common = ["--generator", str(models["generator"]), "--predictor", str(models["predictor"]), "--property", "gap",
              "--guidance", "1,2", "--per-molecule", *COMMON]

    def predicted(path):
        cells = json.loads(path.read_text())["cells"]
        return {c["guidance_scale"]: c["molecules"]["predicted"] for c in cells}

    assert load_script("eval_conditional").main([*common, "--out", str(tmp_path / "ref.json")]) == 0
    ref = predicted(tmp_path / "ref.json")
    assert ref[1.0] != ref[2.0]
    script = load_script("guidance_interval")
    runs = {}
    for lo, hi in [(0.0, 1.0), (0.5, 0.6), (0.3, 0.5)]:
        out = tmp_path / f"w_{lo}_{hi}.json"
        assert script.main(["--lo", str(lo), "--hi", str(hi), "--", *common, "--out", str(out)]) == 0
        runs[lo, hi] = predicted(out)
        doc = json.loads(out.read_text())
        assert doc["guidance_interval"] == [lo, hi] and doc["command"].startswith(f"python scripts/guidance_interval.py --lo {lo:g}")
        # the plain conditional cell has no guidance to confine (float32 rounding of an untrained predictor's
        # outputs in the millions aside)
        assert runs[lo, hi][1.0] == pytest.approx(ref[1.0], rel=1e-6)
    assert runs[0.0, 1.0][2.0] == pytest.approx(ref[2.0], rel=1e-6)
    assert runs[0.5, 0.6][2.0] == pytest.approx(ref[1.0], rel=1e-6)
    for other in (ref[1.0], ref[2.0]):
        assert runs[0.3, 0.5][2.0] != pytest.approx(other, rel=1e-6)
    assert script.main(["--lo", "0.4", "--hi", "0.2", "--", *common]) == 2
