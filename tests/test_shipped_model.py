"""The model shipped inside the package: loads offline, samples via API and CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moldiff
from moldiff.pipeline import DEFAULT_MODEL, PRETRAINED_DIR, PRETRAINED_ROOT


def test_shipped_checkpoint_is_small_and_loads_with_weights_only():
    weights = PRETRAINED_DIR / "model.pt"
    assert weights.stat().st_size < 20 * 2**20
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    cfg = json.loads((PRETRAINED_DIR / "config.json").read_text())
    assert cfg["statistics"]["elements"] == ["H", "C", "N", "O", "F"]


def test_load_pretrained_samples_deterministically():
    pipe = moldiff.load_pretrained()
    a = pipe.sample(3, steps=3, seed=7)
    b = pipe.sample(3, steps=3, seed=7)
    assert [m.num_atoms for m in a] == [m.num_atoms for m in b]
    for x, y in zip(a, b):
        assert np.array_equal(x.positions, y.positions) and x.symbols == y.symbols
    assert all(set(m.symbols) <= {"H", "C", "N", "O", "F"} for m in a)
    assert all(2 <= m.num_atoms <= pipe.statistics.max_atoms for m in a)


def test_cli_sample_with_shipped_model(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "moldiff.cli", "sample", "-n", "4", "--steps", "3", "-o", str(out),
                        "--no-novelty"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.iterdir()} == {"samples.sdf", "samples.csv", "samples.png", "samples.json"}
    summary = json.loads((out / "samples.json").read_text())
    assert summary["n"] == 4 and summary["steps"] == 3
    assert summary["checkpoint"] == str(PRETRAINED_DIR) == str(PRETRAINED_ROOT / DEFAULT_MODEL)
    # the default model generates bonds: the JSON scores them beside EDM's table
    assert "own_bonds" in summary


def test_cli_rejects_impossible_sizes_for_shipped_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "moldiff.cli", "sample", "-n", "2", "--num-atoms", "500", "-o",
                        str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "num_atoms" in r.stderr and not (tmp_path / "x").exists()


def test_cli_sample_with_novelty_reference(tmp_path):
    """Novelty on (the default): reads the cached reference SMILES and reports novelty in the JSON."""
    from moldiff.data.qm9 import CACHE_VERSION

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"qm9_train_smiles_v{CACHE_VERSION}.json").write_text(json.dumps(["[H]C([H])([H])[H]"]))
    out = tmp_path / "novel"
    r = subprocess.run([sys.executable, "-m", "moldiff.cli", "sample", "-n", "3", "--steps", "2", "-o", str(out),
                        "--cache-dir", str(cache)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "samples.json").read_text())
    assert "novelty" in summary and (summary["n_valid"] == 0 or summary["novelty"] is not None)


def test_shipped_models_load_by_name_and_a_local_folder_of_that_name_wins(tmp_path, monkeypatch):
    from moldiff.pipeline import PRETRAINED_ROOT, CheckpointError, resolve_checkpoint, shipped_models

    names = shipped_models()
    assert "qm9" in names and all((PRETRAINED_ROOT / n / "model.pt").is_file() for n in names)
    assert resolve_checkpoint(DEFAULT_MODEL) == PRETRAINED_DIR and resolve_checkpoint(None) == PRETRAINED_DIR
    assert resolve_checkpoint("qm9") == PRETRAINED_ROOT / "qm9" != PRETRAINED_DIR
    for name in names:
        pipe = moldiff.load_pretrained(name)
        assert list(pipe.elements) == ["H", "C", "N", "O", "F"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="models shipped by name: .*qm9"):
        moldiff.load_pretrained("no-such-model")
    (tmp_path / "qm9").mkdir()
    assert resolve_checkpoint("qm9").resolve() == (tmp_path / "qm9").resolve()


def test_every_shipped_model_samples_from_the_cli_by_name(tmp_path):
    """Each shipped model samples end to end by name; one trained with every molecule's types given
    draws its compositions from the data (every molecule a real QM9 composition, even valence sum)."""
    from moldiff.chemistry.elements import valence_sum_parity
    from moldiff.pipeline import shipped_models

    for name in shipped_models():
        pipe = moldiff.load_pretrained(name)
        out = tmp_path / name
        r = subprocess.run([sys.executable, "-m", "moldiff.cli", "sample", "--checkpoint", name, "-n", "6", "--steps", "3",
                            "-o", str(out), "--no-novelty"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        summary = json.loads((out / "samples.json").read_text())
        assert summary["n"] == 6 and summary["composition"] == pipe.default_composition
        if pipe.default_composition == "data":
            from moldiff.chemistry.io import read_molecules

            records = read_molecules(out / "samples.sdf")
            assert len(records) == 6 and all(valence_sum_parity(rec.symbols) == 0 for rec in records)


def test_formula_alone_uses_the_given_types_model_unless_a_checkpoint_is_named(tmp_path):
    """`moldiff sample --formula` with no --checkpoint places the atoms with the given-types model (one
    pass, every molecule of the formula); naming the joint model keeps its draw-then-clamp route; a
    fragment (which the given-types model cannot grow) keeps the default model."""
    from moldiff.pipeline import FORMULA_MODEL, PRETRAINED_DIR, PRETRAINED_ROOT

    def run(name, *extra):
        out = tmp_path / name
        r = subprocess.run([sys.executable, "-m", "moldiff.cli", "sample", "--formula", "C2H6O", "-n", "2", "--steps", "2",
                            "--resample", "1", "--formula-draws", "0", "-o", str(out), "--no-novelty", *extra],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r, json.loads((out / "samples.json").read_text())

    r, summary = run("default")
    assert summary["checkpoint"] == str(PRETRAINED_ROOT / FORMULA_MODEL)
    assert summary["conditioning"]["formula_given"] == 2 and summary["conditioning"]["formula_clamped"] == 0
    assert f"using the shipped model {FORMULA_MODEL}" in r.stderr
    r, summary = run("joint", "--checkpoint", "qm9")
    assert summary["checkpoint"] == str(PRETRAINED_ROOT / "qm9")
    assert summary["conditioning"]["formula_given"] == 0 and summary["conditioning"]["formula_clamped"] == 2
    assert FORMULA_MODEL not in r.stderr
    r, summary = run("fragment", "--fragment-smiles", "CO")
    assert summary["checkpoint"] == str(PRETRAINED_DIR)


def test_condition_alone_uses_the_shipped_conditional_model(tmp_path):
    """`moldiff sample --condition` with no --checkpoint samples the shipped qm9-cond model, writes each
    target beside the shipped predictor's estimate, and the unconditional default is untouched."""
    from rdkit import Chem

    from moldiff.pipeline import CONDITIONAL_MODEL, PRETRAINED_ROOT, shipped_models

    assert CONDITIONAL_MODEL in shipped_models()
    pipe = moldiff.load_pretrained(CONDITIONAL_MODEL)
    assert set(pipe.conditioning.names) == {"alpha", "gap", "homo", "lumo", "mu", "cv"}
    out = tmp_path / "cond"
    r = subprocess.run([sys.executable, "-m", "moldiff.cli", "sample", "--condition", "gap=6.5eV", "--condition",
                        "mu=2", "-n", "3", "--steps", "3", "--seed", "2", "-o", str(out), "--no-novelty"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"conditioned on gap = 6.5 eV, mu = 2 D (the shipped model {CONDITIONAL_MODEL})" in r.stdout
    summary = json.loads((out / "samples.json").read_text())
    assert summary["checkpoint"] == str(PRETRAINED_ROOT / CONDITIONAL_MODEL)
    assert summary["condition"]["properties"] == {"gap": 6.5, "mu": 2.0}
    records = [m for m in Chem.SDMolSupplier(str(out / "samples.sdf"), sanitize=False, removeHs=False)]
    assert len(records) == 3
    for mol in records:
        assert float(mol.GetProp("target_gap_eV")) == 6.5 and np.isfinite(float(mol.GetProp("predicted_gap_eV")))


def test_the_default_models_recipe_config_builds_its_architecture():
    """configs/qm9_bonds.yaml (the README's recipe for the default model) gives the shipped
    qm9-bonds network: the same denoiser settings, categorical elements, charges and bonds."""
    from dataclasses import asdict

    from moldiff.training.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "qm9_bonds.yaml")
    shipped = json.loads((PRETRAINED_ROOT / "qm9-bonds" / "config.json").read_text())["denoiser"]
    model = asdict(cfg.model)
    assert {k: model[k] for k in shipped if k in model} == {k: v for k, v in shipped.items() if k in model}
    assert cfg.diffusion.categorical and cfg.diffusion.categorical_charges and cfg.diffusion.class_floor == 0.05
