"""Property-conditional generation with classifier-free guidance (issue 21, the machinery): training
with each molecule's properties as the network's context and randomly dropped, sampling through the
one reverse loop with guidance, and the ``moldiff train`` / ``moldiff sample`` interfaces.

Everything here is at debug size (configs/debug_tiny.yaml, a few steps): it checks the plumbing,
not what a trained conditional model achieves.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moldiff.chemistry.elements import QM9_ELEMENTS
from moldiff.cli import main
from moldiff.data.properties import PropertyConditioning, edm_halves, edm_targets, property_norms
from moldiff.data.statistics import compute_statistics
from moldiff.diffusion import AtomFeatures, NoiseSchedule, make_sampler
from moldiff.models import DenoiserConfig, EGNNDenoiser
from moldiff.pipeline import DEFAULT_GUIDANCE, DEFAULT_NOISE_SCALE, DEFAULT_TIME_POWER, MolDiffPipeline, SampleRequest
from moldiff.sampling import denoise_batch, guided_noise
from moldiff.training.config import ConfigError, load_config
from moldiff.training.loop import load_training_data, property_context

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_tiny.yaml"
NAMES = ("gap", "mu")


def synthetic_conditioning(names=NAMES, m: int = 400, seed: int = 0) -> tuple[PropertyConditioning, np.ndarray]:
    """A conditioning table from made-up EDM targets (gap in meV around QM9's, mu in D) and sizes."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(6, 15, m)
    targets = np.stack([rng.normal(6800.0, 1300.0, m), rng.gamma(2.0, 1.4, m)], axis=1)[:, : len(names)]
    valid = np.stack([rng.normal(6850.0, 1300.0, m), rng.gamma(2.0, 1.4, m)], axis=1)[:, : len(names)]
    return PropertyConditioning.from_data(names, targets, sizes, valid), sizes


def conditional_pipeline(seed: int = 0) -> MolDiffPipeline:
    """An untrained tiny conditional model (random weights, so the context changes its output)."""
    conditioning, sizes = synthetic_conditioning()
    types = np.random.default_rng(1).integers(0, 4, int(sizes.sum()))
    stats = compute_statistics(QM9_ELEMENTS, sizes, types)
    torch.manual_seed(seed)
    net = EGNNDenoiser(DenoiserConfig(num_features=6, hidden=16, n_layers=2, properties=list(NAMES)))
    return MolDiffPipeline(net, NoiseSchedule.polynomial(), AtomFeatures(num_types=5, include_charges=True), stats,
                           [1, 6, 7, 8, 9], metadata={"run_name": "cond", "conditioning": conditioning.to_dict()})


def same_arrays(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.positions, b.positions)) and \
        all(np.array_equal(x, y) for x, y in zip(a.types, b.types)) and len(a.positions) == len(b.positions)


# ----------------------------------------------------------------------------- configuration and data
def test_config_sets_the_context_from_the_properties():
    cfg = load_config(DEBUG, ["model.properties=[alpha, gap, homo, lumo, mu, Cv]"])
    assert cfg.model.properties == ["alpha", "gap", "homo", "lumo", "mu", "cv"]
    assert cfg.model.context_dim == 12
    assert (cfg.diffusion.property_dropout, cfg.diffusion.uncond_prob) == (0.5, 0.1)
    assert "properties" not in load_config(DEBUG).model.to_dict()  # unconditional configs as before
    with pytest.raises(ValueError, match="context_dim"):
        load_config(DEBUG, ["model.properties=[gap]", "model.context_dim=3"])
    with pytest.raises(ConfigError, match="uncond_prob"):
        load_config(DEBUG, ["diffusion.uncond_prob=1.5"])
    with pytest.raises(ConfigError, match="train_half"):
        load_config(DEBUG, ["data.train_half=first"])


def test_conditional_training_data_is_the_generator_half_with_targets(qm9, split):
    cfg = load_config(DEBUG, ["model.properties=[gap, mu]"])
    data = load_training_data(cfg)
    generator = edm_halves(split).generator
    assert np.array_equal(data.train.indices, generator[: cfg.data.max_train_molecules])
    batch = data.train.batch(np.arange(5))
    expected = edm_targets(qm9, NAMES, data.train.indices[:5])
    assert np.array_equal(batch.targets.numpy(), expected)
    cond = data.conditioning
    mean, mad = property_norms(edm_targets(qm9, NAMES, split["valid"]))  # EDM: the whole validation split
    assert np.allclose(cond.mean, mean) and np.allclose(cond.mad, mad)
    gap_ev = edm_targets(qm9, ["gap"], data.train.indices)[:, 0] / 1000.0
    assert cond.low[0] == pytest.approx(gap_ev.min()) and cond.high[0] == pytest.approx(gap_ev.max())
    plain = load_training_data(load_config(DEBUG))
    assert plain.conditioning is None and plain.train.batch(np.arange(2)).targets is None
    assert np.array_equal(plain.train.indices, split["train"][: cfg.data.max_train_molecules])


def test_dropout_statistics_and_masks():
    conditioning, _ = synthetic_conditioning()
    b = 40_000
    targets = torch.tensor(np.random.default_rng(2).normal([6800.0, 2.8], [1300.0, 1.5], (b, 2)))
    gen = torch.Generator().manual_seed(0)
    ctx = property_context(conditioning, targets, gen, property_dropout=0.5, uncond_prob=0.1)
    assert ctx.shape == (b, 4) and ctx.dtype == torch.float32
    z, present = ctx[:, :2], ctx[:, 2:]
    assert set(present.unique().tolist()) <= {0.0, 1.0}
    assert bool((z[present == 0] == 0).all())  # a dropped property carries no value
    expected = ((targets - torch.tensor(conditioning.mean)) / torch.tensor(conditioning.mad)).float()
    assert torch.equal(z[present == 1], expected[present == 1])
    # each property kept with (1 - 0.1) x (1 - 0.5) = 0.45; all dropped with 0.1 + 0.9 x 0.25 = 0.325
    assert present.mean(0).numpy() == pytest.approx([0.45, 0.45], abs=0.01)
    assert float((present.sum(1) == 0).float().mean()) == pytest.approx(0.325, abs=0.01)
    kept_one = present[:, 0] == 1  # the drops of the two properties are independent given no all-drop
    assert float(present[kept_one, 1].mean()) == pytest.approx(0.5, abs=0.015)
    again = property_context(conditioning, targets, torch.Generator().manual_seed(0), 0.5, 0.1)
    assert torch.equal(ctx, again)  # reproducible from the trainer's generator
    full = property_context(conditioning, targets)  # validation: nothing dropped, nothing drawn
    assert bool((full[:, 2:] == 1).all()) and torch.equal(full[:, :2], expected)


def test_conditioning_checks_values_and_draws_sizes_near_them():
    conditioning, sizes = synthetic_conditioning()
    restored = PropertyConditioning.from_dict(json.loads(json.dumps(conditioning.to_dict())))
    assert restored.names == NAMES and np.array_equal(restored.reference_sizes, conditioning.reference_sizes)
    assert np.allclose(restored.reference_values, conditioning.reference_values)
    assert conditioning.check({"mu": "1.5D", "Gap": "6900meV"}) == {"gap": pytest.approx(6.9), "mu": 1.5}
    for bad, message in (({"alpha": 70.0}, "conditions on gap, mu only"), ({"zpve": 1.0}, "unknown property"),
                         ({"gap": 60.0}, "outside the range seen in training"), ({"gap": "6 kcal"}, "unknown unit"),
                         ({}, "empty")):
        with pytest.raises(ValueError, match=message):
            conditioning.check(bad)
    values = conditioning.reference_values.astype(np.float64)
    k = int(np.argmax(values[:, 1]))  # the molecule with the largest mu: its size among the nearest
    drawn = conditioning.draw_sizes({"mu": float(values[k, 1])}, 500, np.random.default_rng(0), neighbours=3)
    nearest = np.argsort(np.abs(values[:, 1] - values[k, 1]))[:3]
    assert set(drawn.tolist()) <= set(sizes[nearest].tolist()) and sizes[k] in drawn
    # one value per molecule: each molecule's size drawn near its own value
    low, high = float(conditioning.low[1]), float(conditioning.high[1])  # float64; the table is float16
    per = conditioning.check({"mu": [low, high, high]}, n=3)
    assert np.array_equal(per["mu"], [low, high, high])
    each = conditioning.draw_sizes(per, 3, np.random.default_rng(0), neighbours=1)
    assert each.tolist() == [sizes[np.argmin(values[:, 1])], sizes[k], sizes[k]]
    with pytest.raises(ValueError, match="2 values for 3 molecules"):
        conditioning.check({"mu": [1.0, 2.0]}, n=3)
    with pytest.raises(ValueError, match="outside the range"):
        conditioning.check({"mu": [1.0, high + 1.0]})
    # Cv is conditioned as the molecule's heat capacity; the network's target takes 2.981 N off
    cv, _ = synthetic_conditioning(names=("gap",))
    assert cv.targets(np.array([[7.0]]), np.array([9]))[0, 0] == pytest.approx(7000.0)


# ----------------------------------------------------------------------------- guidance in the loop
def test_guidance_zero_is_the_unconditional_model_exactly_and_one_the_conditional():
    pipe = conditional_pipeline()
    opts = dict(steps=4, seed=3, num_atoms=[7, 9, 8])
    uncond = pipe.sample_arrays(3, **opts)  # no condition: every property dropped
    w0 = pipe.sample_arrays(3, condition={"gap": 7.5, "mu": 2.0}, guidance_scale=0.0, **opts)
    assert same_arrays(w0, uncond)
    w1 = pipe.sample_arrays(3, condition={"gap": 7.5, "mu": 2.0}, guidance_scale=1.0, **opts)
    assert not same_arrays(w1, w0)
    w2 = pipe.sample_arrays(3, condition={"gap": 7.5, "mu": 2.0}, guidance_scale=2.0, **opts)
    assert not same_arrays(w2, w1) and not same_arrays(w2, w0)
    default = pipe.sample_arrays(3, condition={"gap": 7.5, "mu": 2.0}, **opts)  # no scale asked for: DEFAULT_GUIDANCE
    assert same_arrays(default, w2) and default.extra["guidance_scale"] == DEFAULT_GUIDANCE == 2.0
    assert w2.extra["condition"] == {"gap": 7.5, "mu": 2.0} and w2.extra["guidance_scale"] == 2.0
    # values per molecule: the same molecules as one shared value where the values agree
    per = pipe.sample_arrays(3, condition={"gap": [7.5, 7.5, 7.5], "mu": 2.0}, guidance_scale=2.0, **opts)
    assert same_arrays(per, w2) and per.extra["condition"]["gap"] == [7.5, 7.5, 7.5]

    # the same through denoise_batch by hand: the all-dropped context, and the full conditional one
    c = pipe.conditioning
    z = (np.array([7500.0, 2.0]) - c.mean) / c.mad
    full = torch.tensor([[z[0], z[1], 1.0, 1.0]] * 3, dtype=torch.float32)

    def by_hand(context, scale=None):
        rng = np.random.default_rng(3)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        sampler = make_sampler("ancestral", pipe.schedule, time_power=DEFAULT_TIME_POWER, noise_scale=DEFAULT_NOISE_SCALE)
        return denoise_batch(pipe, [7, 9, 8], 4, sampler, gen, context=context, guidance_scale=scale).pos

    assert np.array_equal(by_hand(torch.zeros(3, 4)), np.concatenate(w0.positions))
    assert np.array_equal(by_hand(full), np.concatenate(w1.positions))
    assert np.array_equal(by_hand(full, 2.0), np.concatenate(w2.positions))


def test_guided_prediction_mixes_the_two_predictions_in_one_call():
    pipe = conditional_pipeline()
    gen = torch.Generator().manual_seed(0)
    batch = torch.tensor([0] * 5 + [1] * 7)
    pos, h = torch.randn(12, 3, generator=gen), torch.randn(12, 6, generator=gen)
    t = torch.tensor([0.3, 0.8])
    context = torch.tensor([[0.5, -1.0, 1.0, 1.0], [1.5, 0.0, 1.0, 0.0]])
    cond = pipe.predict_noise(pos, h, t, batch, context=context)
    free = pipe.predict_noise(pos, h, t, batch, context=torch.zeros_like(context))
    no_context = pipe.predict_noise(pos, h, t, batch)  # no context: every property dropped
    assert all(torch.equal(a, b) for a, b in zip(no_context, free))
    mixed = guided_noise(pipe, pos, h, t, batch, context, 3.0)
    for m, c, f in zip(mixed, cond, free):
        assert torch.allclose(m, f + 3.0 * (c - f), atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(guided_noise(pipe, pos, h, t, batch, context, 0.0), free))
    assert all(torch.equal(a, b) for a, b in zip(guided_noise(pipe, pos, h, t, batch, context, 1.0), cond))


def test_requests_are_checked_before_sampling():
    pipe = conditional_pipeline()
    r = SampleRequest(2, condition={"gap": "7000meV"}).resolved(pipe)
    assert r.condition == {"gap": pytest.approx(7.0)} and r.guidance_scale == DEFAULT_GUIDANCE == 2.0
    for options, message in (({"condition": {"gap": 7.0}, "guidance_scale": -1.0}, "guidance_scale must be"),
                             ({"guidance_scale": 2.0}, "goes with a condition"),
                             ({"condition": {"gap": 7.0}, "formula": "CH4"}, "plain sampling"),
                             ({"condition": {"lumo": 0.1}}, "conditions on gap, mu only")):
        with pytest.raises(ValueError, match=message):
            SampleRequest(2, **options).resolved(pipe)
    from tests.test_known_types import tiny_pipeline

    with pytest.raises(ValueError, match="not trained with property conditioning"):
        SampleRequest(2, condition={"gap": 7.0}).resolved(tiny_pipeline())


# ----------------------------------------------------------------------------- end to end, through the CLI
TRAIN = ["--config", str(DEBUG), "--set", "model.properties=[gap, mu]", "--set", "train.device=cpu",
         "--set", "train.log_every=2", "--set", "train.val_every=0"]


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    """A tiny conditional model trained 3 steps, then resumed to 6, beside one trained 6 steps straight."""
    root = tmp_path_factory.mktemp("conditional")
    assert main(["train", *TRAIN, "--set", "train.max_steps=3", "--run-dir", str(root / "run"), "--threads", "1"]) == 0
    assert main(["train", "--resume", "--set", "train.max_steps=6", "--run-dir", str(root / "run"), "--threads", "1"]) == 0
    assert main(["train", *TRAIN, "--set", "train.max_steps=6", "--run-dir", str(root / "straight"), "--threads", "1"]) == 0
    return root


def test_training_resumes_exactly(conditional_run):
    resumed = torch.load(conditional_run / "run" / "checkpoint.pt", weights_only=False)
    straight = torch.load(conditional_run / "straight" / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == straight["step"] == 6
    for key in straight["ema"]:
        assert torch.equal(resumed["ema"][key], straight["ema"][key]), key
    assert torch.equal(resumed["generator"], straight["generator"])  # the dropout draws came from it
    config = json.loads((conditional_run / "run" / "pipeline" / "config.json").read_text())
    saved = config["metadata"]["conditioning"]
    assert saved["names"] == list(NAMES) and saved["subset"] == "generator"
    assert saved["units"] == {"gap": "eV", "mu": "D"} and len(saved["min"]) == len(saved["max"]) == 2
    assert (saved["property_dropout"], saved["uncond_prob"]) == (0.5, 0.1)
    assert config["denoiser"]["context_dim"] == 4 and config["denoiser"]["properties"] == list(NAMES)


def test_a_plain_checkpoint_does_not_continue_as_a_conditional_one(tmp_path, capsys):
    run = tmp_path / "plain"
    plain = ["--config", str(DEBUG), "--set", "train.device=cpu", "--set", "train.max_steps=1", "--set", "train.val_every=0"]
    assert main(["train", *plain, "--run-dir", str(run), "--threads", "1"]) == 0
    capsys.readouterr()
    code = main(["train", "--resume", "--set", "model.properties=[gap]", "--set", "train.max_steps=2",
                 "--run-dir", str(run), "--threads", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "unconditional" in err and "cannot continue conditioned on gap" in err


def test_cli_samples_with_a_condition_and_guidance(conditional_run, tmp_path, capsys):
    from rdkit import Chem

    out = tmp_path / "cond"
    code = main(["sample", "--checkpoint", str(conditional_run / "run"), "-n", "3", "--steps", "3", "--seed", "0",
                 "--condition", "gap=7.0eV", "--condition", "mu=1.5", "--guidance", "2", "-o", str(out),
                 "--no-novelty", "--device", "cpu", "--precision", "fp32", "--threads", "1"])
    printed = capsys.readouterr().out
    assert code == 0 and "conditioned on gap = 7 eV, mu = 1.5 D; guidance scale 2" in printed
    records = [m for m in Chem.SDMolSupplier(str(out / "samples.sdf"), sanitize=False, removeHs=False)]
    assert len(records) == 3
    for mol in records:
        assert float(mol.GetProp("target_gap_eV")) == 7.0 and float(mol.GetProp("target_mu_D")) == 1.5
        assert float(mol.GetProp("guidance_scale")) == 2.0
    with open(out / "samples.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and all(float(r["target_gap_eV"]) == 7.0 and float(r["target_mu_D"]) == 1.5 for r in rows)
    summary = json.loads((out / "samples.json").read_text())
    assert summary["condition"]["properties"] == {"gap": 7.0, "mu": 1.5}
    assert summary["condition"]["units"] == {"gap": "eV", "mu": "D"} and summary["condition"]["guidance_scale"] == 2.0


@pytest.mark.parametrize("options, message", [
    (["--condition", "zpve=1"], "--condition: unknown property 'zpve'"),
    (["--condition", "gap=60eV"], "--condition gap=60 eV is outside the range seen in training"),
    (["--condition", "gap=7eV", "--guidance", "-1"], "--guidance must be a number >= 0"),
    (["--condition", "gap=7 kcal"], "unknown unit"),
    (["--condition", "gap"], "write NAME=VALUE"),
    (["--guidance", "2"], "--guidance goes with --condition"),
    (["--condition", "alpha=70"], "this model conditions on gap, mu only"),
    (["--checkpoint", "qm9", "--condition", "gap=7eV"], "not trained with property conditioning"),
    (["--no-checkpoint", "--condition", "gap=60eV"], "--condition gap=60 eV is outside the range seen in training"),
    (["--no-checkpoint", "--condition", "zpve=1"], "--condition: unknown property 'zpve'"),
])
def test_bad_conditions_are_one_line_errors_and_write_nothing(conditional_run, tmp_path, capsys, options, message):
    out = tmp_path / "never"
    checkpoint = [] if "--checkpoint" in options else ["--checkpoint", str(conditional_run / "run")]
    if "--no-checkpoint" in options:  # the shipped conditional model, qm9-cond
        checkpoint, options = [], [o for o in options if o != "--no-checkpoint"]
    code = main(["sample", *checkpoint, *options, "-n", "2", "--steps", "2", "-o", str(out), "--no-novelty",
                 "--device", "cpu", "--precision", "fp32"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("moldiff: error:")
    assert message in err
    assert not out.exists()


def _predictor(folder, elements=QM9_ELEMENTS, seed=0):
    """A small untrained predictor of EDM's six targets (meV for the orbital energies), saved as
    scripts/train_predictor.py saves one: its outputs are arbitrary but fixed, which is all the
    bookkeeping below needs."""
    from moldiff.data.properties import EDM_PROPERTIES, EDM_UNITS
    from moldiff.models.property import PredictorConfig, PropertyPredictor, save_predictor

    torch.manual_seed(seed)
    cfg = PredictorConfig(elements=tuple(elements), properties=EDM_PROPERTIES,
                          units=tuple(EDM_UNITS[k] for k in EDM_PROPERTIES),
                          target_mean=(75.0, 6900.0, -6500.0, 300.0, 2.7, -22.0),
                          target_mad=(6.0, 1000.0, 450.0, 1000.0, 1.2, 2.5), hidden=16, n_layers=2,
                          notes={"edm_targets": True})
    save_predictor(folder, PropertyPredictor(cfg), {"test_mae": {"gap": 64.0}, "test_set": "the generator half",
                                                    "n_test": 50000})
    return folder


def test_sample_with_a_predictor_writes_estimates_beside_the_targets(conditional_run, tmp_path, capsys):
    from rdkit import Chem

    from moldiff.data.properties import CV_ATOM_REFERENCE
    from moldiff.models.property import load_predictor

    folder = _predictor(tmp_path / "predictor")
    out = tmp_path / "cond"
    code = main(["sample", "--checkpoint", str(conditional_run / "run"), "-n", "4", "--steps", "3", "--seed", "1",
                 "--condition", "gap=7.0eV", "--predictor", str(folder), "-o", str(out), "--no-novelty",
                 "--device", "cpu", "--precision", "fp32", "--threads", "1"])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"predictor {folder}: test MAE on the generator half, 50,000 molecules: gap 64 meV" in printed
    # every estimate is the predictor's own output for the written molecule, in the condition's units
    model, _ = load_predictor(folder)
    records = list(Chem.SDMolSupplier(str(out / "samples.sdf"), sanitize=False, removeHs=False))
    gaps, cvs = [], []
    for mol in records:
        symbols = [a.GetSymbol() for a in mol.GetAtoms()]
        pos = torch.tensor(mol.GetConformer().GetPositions(), dtype=torch.float32)
        types = torch.tensor([QM9_ELEMENTS.index(s) for s in symbols])
        want = model.predict(pos - pos.mean(0), types, torch.zeros(len(symbols), dtype=torch.long), 1)[0].double()
        gaps.append(float(mol.GetProp("predicted_gap_eV")))
        cvs.append(float(mol.GetProp("predicted_cv_cal_mol_K")))
        assert gaps[-1] == pytest.approx(float(want[1]) / 1000, rel=1e-4)  # meV -> eV
        assert cvs[-1] == pytest.approx(float(want[5]) + CV_ATOM_REFERENCE * len(symbols), rel=1e-4)  # whole Cv
        assert float(mol.GetProp("target_gap_eV")) == 7.0
    with open(out / "samples.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["predicted_gap_eV"]) for r in rows] == pytest.approx(gaps)
    summary = json.loads((out / "samples.json").read_text())["predicted"]
    mae = float(np.mean(np.abs(np.array(gaps) - 7.0)))
    entry = summary["mae_vs_target"]["gap"]
    assert entry["mae"] == pytest.approx(mae, rel=1e-4) and entry["unit"] == "eV" and entry["n_scored"] == 4
    assert entry["mae_edm_units"] == pytest.approx(1000 * mae, rel=1e-4) and entry["edm_unit"] == "meV"
    assert set(summary["mae_vs_target"]) == {"gap"}  # only what was asked for has a target
    assert summary["mean"]["mu"] == pytest.approx(float(np.mean([float(r["predicted_mu_D"]) for r in rows])), rel=1e-4)
    assert f"gap: MAE between target and predicted {mae:.4g} eV" in printed


def test_sample_refuses_a_predictor_that_cannot_read_the_models_elements(conditional_run, tmp_path, capsys):
    folder = _predictor(tmp_path / "no_fluorine", elements=("H", "C", "N", "O"))
    out = tmp_path / "never"
    code = main(["sample", "--checkpoint", str(conditional_run / "run"), "-n", "2", "--steps", "2",
                 "--predictor", str(folder), "-o", str(out), "--no-novelty", "--device", "cpu", "--precision", "fp32"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"--predictor {folder} does not know element(s) F that this model places" in err
    assert not out.exists()


def test_conditional_samples_get_the_shipped_predictors_estimates_by_default(conditional_run, tmp_path, capsys,
                                                                             monkeypatch):
    import moldiff.prediction as prediction

    root = tmp_path / "predictors"
    monkeypatch.setattr(prediction, "PREDICTOR_ROOT", root)
    _predictor(root / prediction.DEFAULT_PREDICTOR)
    common = ["sample", "--checkpoint", str(conditional_run / "run"), "-n", "3", "--steps", "2", "--seed", "4",
              "--no-novelty", "--device", "cpu", "--precision", "fp32", "--threads", "1"]

    def columns(out):
        with open(out / "samples.csv", newline="") as fh:
            return [c for c in next(csv.reader(fh)) if c.startswith("predicted_")]

    assert main([*common, "--condition", "gap=7.0eV", "-o", str(tmp_path / "default")]) == 0
    printed = capsys.readouterr().out
    assert f"predictor {prediction.DEFAULT_PREDICTOR}: test MAE" in printed
    assert "predicted_gap_eV" in columns(tmp_path / "default")
    assert "mae_vs_target" in json.loads((tmp_path / "default" / "samples.json").read_text())["predicted"]
    # the same molecules with the predictor named explicitly: the same estimates
    assert main([*common, "--condition", "gap=7.0eV", "--predictor", str(root / prediction.DEFAULT_PREDICTOR),
                 "-o", str(tmp_path / "named")]) == 0
    capsys.readouterr()
    assert (tmp_path / "named" / "samples.csv").read_text() == (tmp_path / "default" / "samples.csv").read_text()
    # --no-predictor, and unconditional sampling: no estimates unless asked for
    assert main([*common, "--condition", "gap=7.0eV", "--no-predictor", "-o", str(tmp_path / "off")]) == 0
    assert main([*common, "-o", str(tmp_path / "unconditional")]) == 0
    capsys.readouterr()
    assert columns(tmp_path / "off") == columns(tmp_path / "unconditional") == []
