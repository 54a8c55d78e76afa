"""Composition-conditioned modelling: training with some molecules' atom types given clean
(``diffusion.known_types_prob``) and sampling a composition drawn from the training data
(``composition="data"``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moldiff.chemistry.elements import QM9_ELEMENTS
from moldiff.cli import main
from moldiff.data.statistics import DatasetStatistics, compute_statistics
from moldiff.diffusion import AtomFeatures, NoiseSchedule
from moldiff.diffusion.losses import epsilon_loss
from moldiff.models import DenoiserConfig, EGNNDenoiser
from moldiff.pipeline import MolDiffPipeline
from moldiff.training.config import ConfigError, load_config
from moldiff.training.loop import Trainer, diffusion_loss, load_training_data

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_tiny.yaml"

# H, C, N, O, F counts + number of molecules: CH4 (x3), H2O, NH3 (x2), C2H2 (x1), CHN (x1, HCN)
TABLE = [[4, 1, 0, 0, 0, 3], [2, 0, 0, 1, 0, 1], [3, 0, 1, 0, 0, 2], [2, 2, 0, 0, 0, 1], [1, 1, 1, 0, 0, 1]]


def quiet(_msg: str) -> None:
    pass


def stats_with_formulas() -> DatasetStatistics:
    sizes = [0, 0, 0, 2, 4, 3]
    return DatasetStatistics(QM9_ELEMENTS, sizes, [40, 20, 5, 8, 1], TABLE)


def tiny_pipeline(known_types_prob: float | None = 0.5, stats: DatasetStatistics | None = None) -> MolDiffPipeline:
    torch.manual_seed(0)
    meta = {"run_name": "tiny"} | ({} if known_types_prob is None else {"known_types_prob": known_types_prob})
    return MolDiffPipeline(EGNNDenoiser(DenoiserConfig(num_features=6, hidden=16, n_layers=2)), NoiseSchedule.polynomial(),
                           AtomFeatures(num_types=5, include_charges=True), stats or stats_with_formulas(), [1, 6, 7, 8, 9],
                           metadata=meta)


# ----------------------------------------------------------------------------- statistics
def test_compositions_are_counted_per_molecule():
    # methane, water, methane, then HCN; types in QM9 order H, C, N, O, F
    num_atoms = np.array([5, 3, 5, 3])
    types = np.array([1, 0, 0, 0, 0] + [3, 0, 0] + [0, 1, 0, 0, 0] + [0, 1, 2])
    stats = compute_statistics(QM9_ELEMENTS, num_atoms, types)
    assert sorted(stats.formula_counts) == sorted([[4, 1, 0, 0, 0, 2], [2, 0, 0, 1, 0, 1], [1, 1, 1, 0, 0, 1]])
    assert stats.size_counts == [0, 0, 0, 2, 0, 2]
    with pytest.raises(ValueError, match="atom types"):
        compute_statistics(QM9_ELEMENTS, np.array([5, 3]), types)


def test_compositions_are_drawn_with_their_training_frequencies():
    stats = stats_with_formulas()
    rng = np.random.default_rng(0)
    draws = stats.sample_compositions(np.array([5] * 4000 + [3]), rng)
    five = np.array([d.tolist() for d in draws[:4000]])
    # size 5: CH4 (3 molecules) and C2H2? no: C2H2 has 4 atoms; CH4 is the only 5-atom formula
    assert (five == [4, 1, 0, 0, 0]).all()
    draws = stats.sample_compositions(np.array([4] * 4000), rng)
    nh3 = np.mean([d.tolist() == [3, 0, 1, 0, 0] for d in draws])
    assert abs(nh3 - 2 / 3) < 0.03  # NH3 (2 molecules) against C2H2 (1)
    assert all(d.sum() == 4 for d in draws)
    with pytest.raises(ValueError, match="7 atoms"):
        stats.sample_compositions(np.array([7]), rng)
    old = DatasetStatistics.from_dict({k: v for k, v in stats.to_dict().items() if k != "formula_counts"})
    with pytest.raises(ValueError, match="no compositions"):
        old.sample_compositions(np.array([5]), rng)
    assert DatasetStatistics.from_dict(stats.to_dict()) == stats


# ----------------------------------------------------------------------------- training loss
def test_known_types_are_shown_clean_and_carry_no_type_loss(tmp_path, debug_data):
    """p = 1: the network's feature input equals the clean encoding for every atom, and the loss is
    the coordinate error alone (the same value whatever the network says about types)."""
    cfg = load_config(DEBUG)
    pipe = Trainer(cfg, tmp_path, data=debug_data, log=quiet).pipe
    _, batch = next(iter(debug_data.train.batches(8, 0, 0, 0)))
    t = torch.full((batch.num_graphs,), 0.7)
    seen = {}
    original = pipe.predict_noise

    def recording(pos_t, h_t, tt, bvec, **kw):
        seen["h_t"] = h_t.detach().clone()
        out = original(pos_t, h_t, tt, bvec, **kw)
        seen["pred"] = tuple(o.detach().clone() for o in out)
        return out

    pipe.predict_noise = recording
    with torch.no_grad():
        loss = diffusion_loss(pipe, batch, t, torch.Generator().manual_seed(3), known_types_prob=1.0)
    clean = pipe.features.encode(batch.types, batch.charges, dtype=batch.pos.dtype)
    torch.testing.assert_close(seen["h_t"], clean, rtol=0, atol=0)
    # recompute: the same noise stream gives the same eps; the type error is zero
    g = torch.Generator().manual_seed(3)
    from moldiff.diffusion import add_noise

    alpha, sigma = pipe.schedule.alpha_sigma(t)
    _, _, eps_pos, eps_h = add_noise(batch.pos, clean, alpha, sigma, batch.batch, generator=g)
    expected = epsilon_loss(seen["pred"][0], eps_pos, eps_h, eps_h, batch.batch, batch.num_graphs)
    torch.testing.assert_close(loss, expected)
    with torch.no_grad():
        plain = diffusion_loss(pipe, batch, t, torch.Generator().manual_seed(3))
    assert float(plain) > float(loss)  # an untrained network's type error is large; given types have none


def test_known_types_prob_zero_draws_nothing_and_half_mixes(tmp_path, debug_data):
    cfg = load_config(DEBUG)
    pipe = Trainer(cfg, tmp_path, data=debug_data, log=quiet).pipe
    _, batch = next(iter(debug_data.train.batches(32, 0, 0, 0)))
    t = torch.full((batch.num_graphs,), 0.5)
    with torch.no_grad():
        a = diffusion_loss(pipe, batch, t, torch.Generator().manual_seed(1))
        b = diffusion_loss(pipe, batch, t, torch.Generator().manual_seed(1), known_types_prob=0.0)
        lo = diffusion_loss(pipe, batch, t, torch.Generator().manual_seed(1), known_types_prob=1.0)
        mid = diffusion_loss(pipe, batch, t, torch.Generator().manual_seed(1), known_types_prob=0.5)
    assert float(a) == float(b)
    assert float(mid) not in (float(a), float(lo))  # half the molecules given, half not


@pytest.fixture(scope="module")
def debug_data():
    return load_training_data(load_config(DEBUG))


def test_config_checks_the_probability_and_clashes(tmp_path, debug_data):
    with pytest.raises(ConfigError, match="known_types_prob"):
        load_config(DEBUG, ["diffusion.known_types_prob=1.5"])
    with pytest.raises(ValueError, match="known_types_prob does not combine with model.self_condition"):
        Trainer(load_config(DEBUG, ["diffusion.known_types_prob=0.5", "model.self_condition=true"]), tmp_path,
                data=debug_data, log=quiet)


def test_training_with_known_types_exports_a_pipeline_that_samples_data_compositions(tmp_path, debug_data):
    cfg = load_config(DEBUG, ["train.max_steps=2", "train.val_every=0", "train.log_every=1", "diffusion.known_types_prob=0.5"])
    trainer = Trainer(cfg, tmp_path, data=debug_data, log=quiet)
    trainer.train()
    pipe = MolDiffPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipe.known_types_prob == 0.5
    assert pipe.statistics.formula_counts  # compositions of the training split travel with the model
    arrays = pipe.sample_arrays(6, steps=3, seed=0, composition="data")
    table = {tuple(r[:-1]) for r in pipe.statistics.formula_counts}
    for k in range(6):
        comp = tuple(np.bincount(arrays.types[k], minlength=5).tolist())
        assert comp in table
        assert np.isfinite(arrays.positions[k]).all()


# ----------------------------------------------------------------------------- sampling
def test_data_compositions_keep_the_sizes_and_starting_noise_of_model_sampling():
    pipe = tiny_pipeline()
    model = pipe.sample_arrays(8, steps=4, seed=5)
    data = pipe.sample_arrays(8, steps=4, seed=5, composition="data")
    assert [len(p) for p in model.positions] == [len(p) for p in data.positions]
    assert data.extra["composition"] == "data" and model.extra["composition"] == "model"
    table = {tuple(r[:-1]) for r in TABLE}
    for k in range(8):
        assert tuple(np.bincount(data.types[k], minlength=5).tolist()) in table
        assert not np.allclose(model.positions[k], data.positions[k])  # the types changed what the network saw
    again = pipe.sample_arrays(8, steps=4, seed=5, composition="data")
    for k in range(8):
        np.testing.assert_array_equal(again.positions[k], data.positions[k])
        np.testing.assert_array_equal(again.types[k], data.types[k])


def test_data_compositions_are_equivariant_in_the_network_inputs():
    """Rotating the whole sampled state rotates the noise prediction: the network sees clean types,
    which are invariant, so E(3) equivariance of the positions' noise is kept."""
    pipe = tiny_pipeline().double()
    types = torch.tensor([1, 0, 0, 0, 0, 2, 0, 0, 0])
    batch = torch.tensor([0] * 5 + [1] * 4)
    h = pipe.features.encode(types, torch.tensor([1, 6, 7, 8, 9])[types], dtype=torch.float64)
    pos = torch.randn(9, 3, dtype=torch.float64)
    pos = pos - torch.zeros(2, 3, dtype=torch.float64).index_add_(0, batch, pos)[batch] / torch.bincount(batch)[batch, None]
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    t = torch.tensor([0.6, 0.6], dtype=torch.float64)
    e1, h1 = pipe.predict_noise(pos, h, t, batch)
    e2, h2 = pipe.predict_noise(pos @ q.T, h, t, batch)
    torch.testing.assert_close(e1 @ q.T, e2, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(h1, h2, atol=1e-9, rtol=1e-9)


def test_data_compositions_need_a_model_trained_for_them():
    with pytest.raises(ValueError, match="known_types_prob > 0"):
        tiny_pipeline(known_types_prob=None).sample_arrays(2, steps=2, composition="data")
    plain_stats = DatasetStatistics(QM9_ELEMENTS, [0, 0, 0, 2, 4, 3], [40, 20, 5, 8, 1])
    with pytest.raises(ValueError, match="no compositions"):
        tiny_pipeline(stats=plain_stats).sample_arrays(2, steps=2, composition="data")
    with pytest.raises(ValueError, match="composition must be one of"):
        tiny_pipeline().sample_arrays(2, steps=2, composition="formula")
    with pytest.raises(ValueError, match="does not combine"):
        tiny_pipeline().sample(2, steps=2, formula="CH4", composition="data")


def test_cli_samples_data_compositions_and_refuses_models_without(tmp_path, capsys):
    good = tiny_pipeline().save_pretrained(tmp_path / "good")
    plain = tiny_pipeline(known_types_prob=None).save_pretrained(tmp_path / "plain")
    out = tmp_path / "out"
    assert main(["sample", "--checkpoint", str(good), "-n", "3", "--steps", "2", "--composition", "data",
                 "-o", str(out), "--threads", "1"]) == 0
    assert (out / "samples.sdf").is_file()
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(plain), "-n", "3", "--steps", "2", "--composition", "data",
                 "-o", str(tmp_path / "out2"), "--threads", "1"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "known_types_prob > 0" in err[0]
    assert not (tmp_path / "out2" / "samples.sdf").exists()


def test_given_types_are_kept_exactly_and_checked():
    pipe = tiny_pipeline()
    types = [np.array([1, 0, 0, 0, 0]), np.array([3, 0, 0]), np.array([2, 0, 0, 0])]
    arrays = pipe.sample_arrays(3, steps=3, seed=0, types=types)
    for k in range(3):
        np.testing.assert_array_equal(arrays.types[k], types[k])
        assert arrays.positions[k].shape == (len(types[k]), 3) and np.isfinite(arrays.positions[k]).all()
        np.testing.assert_allclose(arrays.positions[k].mean(0), 0.0, atol=1e-5 * max(1.0, np.abs(arrays.positions[k]).max()))
    assert arrays.extra["composition"] == "given"
    with pytest.raises(ValueError, match="for 2 molecules"):
        pipe.sample_arrays(3, steps=2, types=types[:2])
    with pytest.raises(ValueError, match="element indices"):
        pipe.sample_arrays(1, steps=2, types=[np.array([0, 7, 0])])
    with pytest.raises(ValueError, match="not both"):
        pipe.sample_arrays(3, steps=2, types=types, num_atoms=4)


def test_formula_molecules_not_drawn_are_sampled_with_the_types_given():
    """With a model trained with given types, the molecules that drawing does not find are sampled
    in one pass with the formula's elements as input (not clamped with RePaint): every molecule has
    exactly the formula; with formula_draws=0 all of them take that route."""
    from moldiff.pipeline import SampleRequest

    pipe = tiny_pipeline()
    mols = pipe.sample(4, steps=3, seed=0, formula="CH4")
    assert all(sorted(m.symbols) == ["C", "H", "H", "H", "H"] for m in mols)
    arrays = pipe.generate(SampleRequest(4, formula="CH4", steps=3, seed=0))
    assert set(arrays.extra["formula_route"]) <= {"drawn", "given"} and len(arrays.extra["formula_route"]) == 4
    given = pipe.generate(SampleRequest(4, formula="CH4", steps=3, seed=0, formula_draws=0))
    assert given.extra["formula_route"] == ["given"] * 4 and given.extra["resample"] == 1
    assert given.time_power == 2.0  # plain sampling's defaults, not RePaint's
    plain = tiny_pipeline(known_types_prob=None)
    clamped = plain.generate(SampleRequest(2, formula="CH4", steps=2, seed=0, formula_draws=0))  # RePaint, as before
    assert clamped.extra["formula_route"] == ["clamped"] * 2 and clamped.extra["resample"] > 1 and clamped.time_power == 1.0


def test_a_faulted_molecule_keeps_its_given_types_and_is_flagged():
    """A network output that turns one molecule non-finite flags it (never repaired); with given
    types its elements are still the given ones (not decoded from NaN), and the others are finite."""
    pipe = tiny_pipeline()
    network = pipe.predict_noise

    def faulty(pos_t, h_t, t, batch, **kw):
        eps_pos, eps_h = network(pos_t, h_t, t, batch, **kw)
        eps_pos = eps_pos.clone()
        eps_pos[batch == 1] = float("nan")
        return eps_pos, eps_h

    pipe.predict_noise = faulty
    types = [np.array([1, 0, 0, 0, 0]), np.array([3, 0, 0]), np.array([2, 0, 0, 0])]
    arrays = pipe.sample_arrays(3, steps=3, seed=0, types=types)
    assert list(arrays.fault_step) == [-1, 0, -1]
    assert not np.isfinite(arrays.positions[1]).any()
    assert np.isfinite(arrays.positions[0]).all() and np.isfinite(arrays.positions[2]).all()
    for k in range(3):
        np.testing.assert_array_equal(arrays.types[k], types[k])
        np.testing.assert_array_equal(arrays.charges[k], np.array([1, 6, 7, 8, 9])[types[k]])


def test_a_model_trained_with_every_type_given_samples_data_compositions_by_default(tmp_path, capsys):
    """known_types_prob = 1: the network never learned to generate elements, so sampling defaults to
    compositions from the data, plain EDM sampling and fragments are refused in one line, and a
    formula skips drawing (every molecule gets its types given)."""
    from moldiff.inpainting import Fragment, inpaint_arrays
    from moldiff.pipeline import SampleRequest

    pipe = tiny_pipeline(known_types_prob=1.0)
    assert pipe.default_composition == "data" and tiny_pipeline().default_composition == "model"
    arrays = pipe.sample_arrays(3, steps=2, seed=0)
    assert arrays.extra["composition"] == "data"
    with pytest.raises(ValueError, match="generates atom types"):
        pipe.sample_arrays(3, steps=2, composition="model")
    with pytest.raises(ValueError, match="generates atom types"):
        inpaint_arrays(pipe, 2, fragment=Fragment(["C", "O"], np.array([[0.0, 0, 0], [1.2, 0, 0]])), num_atoms=5, steps=2)
    with pytest.raises(ValueError, match="generates atom types"):
        inpaint_arrays(pipe, 2, formula="CH4", steps=2, initial_noise=np.zeros((10, 9)))
    formula = pipe.generate(SampleRequest(3, formula="CH4", steps=2, seed=0))
    assert formula.extra["formula_route"] == ["given"] * 3 and formula.extra["formula_draws_used"] == 0
    ckpt = pipe.save_pretrained(tmp_path / "given")
    assert main(["sample", "--checkpoint", str(ckpt), "-n", "3", "--steps", "2", "-o", str(tmp_path / "out"),
                 "--threads", "1"]) == 0
    import json

    assert json.loads((tmp_path / "out" / "samples.json").read_text())["composition"] == "data"
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(ckpt), "-n", "3", "--steps", "2", "--composition", "model",
                 "-o", str(tmp_path / "out2"), "--threads", "1"]) != 0
    assert "generates atom types" in capsys.readouterr().err


def test_the_likelihood_bound_is_refused_for_a_model_that_never_generates_types(tmp_path, capsys):
    """EDM's NLL bounds -log p(x, h, N); a p = 1 network only models p(x | h), so both the API and
    ``moldiff nll`` refuse in one line (before any data is loaded)."""
    pipe = tiny_pipeline(known_types_prob=1.0)
    pos = torch.randn(3, 3, dtype=torch.float64)
    types = torch.tensor([1, 0, 0])
    charges = torch.tensor([6, 1, 1])
    batch = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="generates atom types"):
        pipe.nll_terms(pos, types, charges, batch, 1)
    assert torch.isfinite(tiny_pipeline(known_types_prob=0.5).nll_terms(pos, types, charges, batch, 1).total).all()
    ckpt = pipe.save_pretrained(tmp_path / "given")
    capsys.readouterr()
    assert main(["nll", "--checkpoint", str(ckpt), "-n", "2", "--cache-dir", str(tmp_path / "none")]) != 0
    err = capsys.readouterr().err
    assert "generates atom types" in err and len(err.strip().splitlines()) == 1


def test_a_run_with_every_type_given_is_validated_on_its_own_objective(tmp_path, debug_data):
    """p = 1: the validation loss is the coordinate error with the types given (the joint loss's type
    term is never trained and grows without bound); p < 1 keeps EDM's joint loss."""
    for p in (1.0, 0.5):
        cfg = load_config(DEBUG, ["train.max_steps=1", "train.val_every=0", f"diffusion.known_types_prob={p}"])
        trainer = Trainer(cfg, tmp_path / str(p), data=debug_data, log=quiet)
        model = trainer.ema.model if trainer.ema is not None else trainer.model
        pipe = MolDiffPipeline(model, trainer.pipe.schedule, trainer.pipe.features, trainer.pipe.statistics,
                               trainer.pipe.atomic_numbers)
        batch = next(iter(trainer.data.valid.batches(cfg.train.batch_size, seed=0, epoch=0, drop_last=False)))[1].to(trainer.device)
        gen = torch.Generator().manual_seed(12345)
        t = torch.rand(batch.num_graphs, generator=gen, dtype=torch.float64)
        expected = float(diffusion_loss(pipe, batch, t, gen, bond_weight=0.0, known_types_prob=1.0 if p == 1.0 else 0.0))
        gen = torch.Generator().manual_seed(12345)
        t = torch.rand(batch.num_graphs, generator=gen, dtype=torch.float64)
        joint = float(diffusion_loss(pipe, batch, t, gen, bond_weight=0.0))
        assert trainer.validation_loss(max_batches=1) == pytest.approx(expected, rel=1e-9)
        assert (expected < joint) if p == 1.0 else (expected == joint)
