"""The maintained scripts stay importable and answer ``--help`` (docs/design.md, section 7).

A script does its work under ``if __name__ == "__main__":``, so importing it must not sample, train
or write anything. Each Python script has a ``main()`` that parses ``--help`` and exits 0; each
shell script must at least parse (``bash -n``). One-off studies leave ``scripts/`` once their
results are in ``docs/results/``; this test keeps the ones that stay from rotting.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
PYTHON_SCRIPTS = sorted(SCRIPTS.glob("*.py"))
SHELL_SCRIPTS = sorted(SCRIPTS.glob("*.sh"))


def load(path: Path, monkeypatch):
    """Import a script as a module (registered while the test runs, as dataclasses need)."""
    name = f"moldiff_script_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_scripts_are_files_at_the_top_of_scripts():
    assert PYTHON_SCRIPTS, "no scripts found"
    folders = [p.name for p in SCRIPTS.iterdir() if p.is_dir() and p.name != "__pycache__"]
    assert not folders, f"scripts/ holds folders {folders}: keep maintained scripts flat, one file each"


@pytest.mark.parametrize("path", PYTHON_SCRIPTS, ids=lambda p: p.name)
def test_script_imports_without_running_and_answers_help(path, monkeypatch, capsys):
    module = load(path, monkeypatch)
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as stop:
        module.main()
    assert stop.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_script_parses(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_val_loss_by_step_lines_up_runs_at_shared_steps(tmp_path, monkeypatch, capsys):
    module = load(SCRIPTS / "val_loss_by_step.py", monkeypatch)
    head = "step,epoch,hours,loss,grad_norm,clipped,skipped,val_loss\n"
    a, b = tmp_path / "a" / "log.csv", tmp_path / "b" / "log.csv"
    a.parent.mkdir(), b.parent.mkdir()
    a.write_text(head + "50,0,0.01,1.0,1,0,0,\n100,0,0.02,0.9,1,0,0,0.40\n200,0,0.04,0.8,1,0,0,0.20\n")
    b.write_text(head + "100,0,0.03,0.9,1,0,0,0.50\n150,0,0.05,0.8,1,0,0,0.45\n200,0,0.06,0.7,1,0,0,0.30\n")
    out = tmp_path / "table.csv"
    assert module.main([str(a), str(b), "--out", str(out)]) == 0
    rows = out.read_text().splitlines()
    assert rows[0] == "step,a_hours,b_hours,a_val_loss,b_val_loss,b_ratio"
    assert [r.split(",")[0] for r in rows[1:]] == ["100", "200"]  # 50 has no validation, 150 is b's only
    assert [float(r.split(",")[-1]) for r in rows[1:]] == [1.25, 1.5]
    assert module.main([str(a), str(b), "--names", "only_one"]) == 2
    (tmp_path / "bad.csv").write_text("step,loss\n1,2\n")
    assert module.main([str(a), str(tmp_path / "bad.csv")]) == 2
    assert "not a moldiff training log" in capsys.readouterr().err


def test_invalid_reasons_counts_the_rejected_atoms(tmp_path, monkeypatch, capsys):
    from rdkit import Chem

    script = load(SCRIPTS / "invalid_reasons.py", monkeypatch)
    reasons = ["", "unstable atoms: C0",
               "invalid: Explicit valence for atom # 2 C, 5, is greater than permitted; unstable atoms: C2",
               "invalid: Explicit valence for atom # 0 C, 5, is greater than permitted; unstable atoms: C0",
               "invalid: Explicit valence for atom # 1 O, 3, is greater than permitted; unstable atoms: O1",
               "invalid: no atoms placed"]
    path = tmp_path / "samples.sdf"
    with Chem.SDWriter(str(path)) as writer:
        for reason in reasons:
            mol = Chem.MolFromSmiles("CO")
            mol.SetProp("reason", reason)
            writer.write(mol)
    assert script.main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{path}: 6 records, 4 invalid"
    assert lines[1].split() == ["2", "C", "with", "5", "bonds"]
    assert sorted(" ".join(line.split()) for line in lines[2:]) == ["1 O with 3 bonds", "1 invalid: no atoms placed"]
    (tmp_path / "plain.sdf").write_text(Chem.MolToMolBlock(Chem.MolFromSmiles("C")) + "$$$$\n")
    assert script.main([str(tmp_path / "plain.sdf")]) == 2
    assert "has no 'reason' tag" in capsys.readouterr().err


def test_sampler_grid_scores_every_setting_of_a_bond_model(tmp_path, monkeypatch, capsys):
    import json

    import numpy as np
    import torch

    from moldiff.diffusion.categorical import CHARGE_VALUES, CategoricalFeatures
    from moldiff.data.statistics import compute_statistics
    from moldiff.diffusion import NoiseSchedule
    from moldiff.models import DenoiserConfig, EGNNDenoiser
    from moldiff.pipeline import MolDiffPipeline

    script = load(SCRIPTS / "sampler_grid.py", monkeypatch)
    features = CategoricalFeatures(5, (0.5, 0.35, 0.06, 0.08, 0.01), CHARGE_VALUES, (0.01, 0.98, 0.01), 4,
                                   (0.88, 0.11, 0.008, 0.002))
    torch.manual_seed(0)
    net = EGNNDenoiser(DenoiserConfig(num_features=features.dim, hidden=16, n_layers=2, bond_types=4, bond_output="logits"))
    stats = compute_statistics(("H", "C", "N", "O", "F"), np.array([3, 4]), np.array([0, 1, 0, 1, 2, 3, 4]))
    MolDiffPipeline(net, NoiseSchedule.polynomial(), features, stats, [1, 6, 7, 8, 9]).save_pretrained(tmp_path / "m")
    out = tmp_path / "grid.jsonl"
    argv = ["--checkpoint", str(tmp_path / "m"), "--samples", "3", "--steps", "2", "--powers", "1,2",
            "--noise-scales", "0,1", "--precision", "fp32", "--no-compile", "--out", str(out)]
    assert script.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["time_power"], r["noise_scale"]) for r in rows] == [(1.0, 0.0), (1.0, 1.0), (2.0, 0.0), (2.0, 1.0)]
    for r in rows:
        assert r["metrics"]["n"] == 3 and r["steps"] == 2 and r["precision"] == "fp32"
        assert 0.0 <= r["own_bond_mol_stable"] <= 1.0  # the model generates bonds: scored from them
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 |")]
    assert len(table) == 4
    assert script.main(argv[:-2] + ["--noise-scales", "-1", "--out", str(out)]) == 2
    assert script.main(argv[:-2] + ["--steps", "two", "--out", str(out)]) == 2
    assert len(out.read_text().splitlines()) == 4  # bad arguments append nothing


def test_bench_bond_head_times_both_heads_and_refuses_a_model_without_one(tmp_path, monkeypatch, capsys):
    import json

    import torch

    script = load(SCRIPTS / "bench_bond_head.py", monkeypatch)
    threads = torch.get_num_threads()
    try:
        assert script.main(["--checkpoint", "qm9", "-n", "2"]) == 2
        assert "has no bond head" in capsys.readouterr().err
        out = tmp_path / "head.jsonl"
        assert script.main(["-n", "3", "--atoms", "4", "--repeats", "1", "--precision", "fp32",
                            "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    record = json.loads(out.read_text())
    assert record["edges"] == 3 * 4 * 3 and record["step_eager_head_s"] > 0 and record["step_compiled_head_s"] > 0
    assert record["ratio"] == record["step_compiled_head_s"] / record["step_eager_head_s"]


def test_resample_window_resamples_only_the_steps_in_its_window(tmp_path, monkeypatch, capsys):
    import json

    import moldiff.sampling
    import torch

    script = load(SCRIPTS / "resample_window.py", monkeypatch)
    monkeypatch.setattr(moldiff.sampling, "resample_rounds", moldiff.sampling.resample_rounds)  # undone after
    threads = torch.get_num_threads()
    try:
        # 4 steps on the (k/4)^2 grid start at 1, 0.5625, 0.25, 0.0625: two of them in (0.1, 0.6]
        assert script.main(["--lo", "0.1", "--hi", "0.6", "--rounds", "3", "--", "-n", "2", "--steps", "4",
                            "--seed", "0", "--threads", "1", "--no-novelty", "-o", str(tmp_path / "w")]) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((tmp_path / "w" / "samples.json").read_text())
    assert summary["network_evaluations"] == 1 + 3 + 3 + 1 + 1
    assert script.main(["--lo", "0.3", "--hi", "0.2", "--rounds", "2"]) == 2
    assert "lo < hi" in capsys.readouterr().err
