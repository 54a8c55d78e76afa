"""EDM's property protocol: the halves, the units, the two data-only baselines, the invariant
predictor (invariance, learning, save/load) and `moldiff predict` (docs/properties.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moldiff.data.properties import (CV_ATOM_REFERENCE, EDM_PROPERTIES, EDM_TABLE3, AtomCountBaseline, data_baselines,
                                     edm_halves, edm_targets, from_edm_target, mean_pair_difference, naive_mae,
                                     property_norms)
from moldiff.equivariance import assert_equivariant
from moldiff.models.property import (PredictorConfig, PredictorError, PropertyPredictor, load_predictor,
                                     save_predictor)

ELEMENTS = ("H", "C", "N", "O", "F")


def _position(qm9, qm9_index: int) -> int:
    return int(np.searchsorted(qm9.index, qm9_index))


def _flat(qm9, which):
    """pos (n, 3) float64 centred per molecule, types (n,), batch (n,) of molecules ``which``."""
    pos, types, batch = [], [], []
    for b, k in enumerate(which):
        lo, hi = qm9.ptr[k], qm9.ptr[k + 1]
        pos.append(qm9.positions[lo:hi] - qm9.positions[lo:hi].mean(0))
        types.append(qm9.atom_types[lo:hi].astype(np.int64))
        batch.append(np.full(hi - lo, b))
    return (torch.from_numpy(np.concatenate(pos)), torch.from_numpy(np.concatenate(types)),
            torch.from_numpy(np.concatenate(batch)))


def _tiny(properties=EDM_PROPERTIES, hidden=16, layers=2, seed=0, **kw) -> PropertyPredictor:
    p = len(properties)
    torch.manual_seed(seed)
    cfg = PredictorConfig(elements=ELEMENTS, properties=tuple(properties), units=("u",) * p,
                          target_mean=tuple(float(i) for i in range(p)), target_mad=(2.0,) * p, hidden=hidden,
                          n_layers=layers, **kw)
    return PropertyPredictor(cfg)


# ------------------------------------------------------------------------------------------- halves
def test_halves_partition_the_training_split(split):
    halves = edm_halves(split)
    assert len(halves.predictor) == len(halves.generator) == 50_000
    assert not np.intersect1d(halves.predictor, halves.generator).size
    assert np.array_equal(np.sort(np.concatenate([halves.predictor, halves.generator])), np.sort(split["train"]))
    again = edm_halves()
    assert np.array_equal(again.predictor, halves.predictor) and np.array_equal(again.generator, halves.generator)


def test_halves_follow_edms_construction(qm9, split):
    # EDM: train.npz lists the training molecules by ascending QM9 index; np.random.seed(42);
    # permutation(100000); first half -> classifiers (qm9_first_half), second -> generator.
    np.random.seed(42)
    perm = np.random.permutation(100_000)
    in_file_order = np.sort(split["train"])
    halves = edm_halves(split)
    assert np.array_equal(halves.predictor, in_file_order[perm[:50_000]])
    assert np.array_equal(halves.generator, in_file_order[perm[50_000:]])
    # pinned: the first molecules (QM9 indices) of each half in EDM's order
    assert qm9.index[halves.predictor[:5]].tolist() == [101107, 106967, 26753, 102422, 123941]
    assert qm9.index[halves.generator[:5]].tolist() == [114342, 63637, 8525, 124478, 26596]


def test_halves_refuse_another_split():
    with pytest.raises(ValueError, match="100,000"):
        edm_halves({"train": np.arange(10)})


# -------------------------------------------------------------------------------------------- units
def test_units_against_known_molecules(qm9):
    methane, water = _position(qm9, 1), _position(qm9, 3)
    assert qm9.smiles[methane] == "C" and qm9.num_atoms[methane] == 5
    # qm9pack stores HOMO/LUMO/gap in hartree (QM9 gdb_1: gap 0.5048 Ha)
    assert qm9.properties["gap"][methane] == pytest.approx(0.5048)
    got = dict(zip(EDM_PROPERTIES, edm_targets(qm9, which=[methane, water])[0]))
    assert got["alpha"] == pytest.approx(13.21)  # Bohr^3, unchanged
    assert got["gap"] == pytest.approx(0.5048 * 27211.4)  # meV with EDM's 27.2114 eV/Ha
    assert got["homo"] == pytest.approx(-0.3877 * 27211.4)
    assert got["lumo"] == pytest.approx(0.1171 * 27211.4)
    assert got["mu"] == pytest.approx(0.0)
    assert got["cv"] == pytest.approx(6.469 - 5 * 2.981)  # EDM takes the free atoms' Cv off
    w = dict(zip(EDM_PROPERTIES, edm_targets(qm9, which=[water])[0]))
    assert w["mu"] == pytest.approx(1.8511) and w["cv"] == pytest.approx(6.002 - 3 * CV_ATOM_REFERENCE)
    assert from_edm_target("cv", np.array([w["cv"]]), np.array([3]))[0] == pytest.approx(6.002)
    assert from_edm_target("gap", np.array([5.0]), np.array([3]))[0] == 5.0


def test_norms_are_mean_and_mean_absolute_deviation():
    y = np.array([[1.0, 10.0], [3.0, 10.0], [8.0, 40.0]])
    mean, mad = property_norms(y)
    assert mean.tolist() == [4.0, 20.0]
    assert mad.tolist() == pytest.approx([(3 + 1 + 4) / 3, (10 + 10 + 20) / 3])


# ---------------------------------------------------------------------------------------- baselines
def test_naive_and_pair_difference_small_cases():
    y = np.array([0.0, 1.0, 3.0])
    # all pairs: |0-1|, |0-3|, |1-3| -> mean 2
    assert mean_pair_difference(y) == pytest.approx(2.0)
    rng = np.random.default_rng(1)
    z = rng.normal(size=(200, 2))
    brute = np.abs(z[:, None, :] - z[None, :, :]).sum((0, 1)) / (200 * 199)
    assert mean_pair_difference(z) == pytest.approx(brute)
    # the shuffle is a permutation: exact predictions of identical labels give zero, shifted ones give the shift
    assert naive_mae(np.ones(5), np.ones(5)).item() == 0.0
    perm_err = naive_mae(y + 10.0, y, seed=3)
    assert perm_err > 10.0 - 1e-12 and perm_err < 13.0
    with pytest.raises(ValueError):
        naive_mae(np.ones(3), np.ones(4))


def test_atom_count_baseline_is_per_size_median_with_nearest_fallback():
    n = np.array([3, 3, 3, 5, 5, 9])
    y = np.array([1.0, 2.0, 10.0, 4.0, 6.0, 7.0])
    base = AtomCountBaseline(n, y)
    assert base.predict(np.array([3, 5, 9])).tolist() == [2.0, 5.0, 7.0]
    assert base.predict(np.array([4, 7, 20, 1])).tolist() == [2.0, 5.0, 7.0, 2.0]  # ties go to the smaller size
    two = AtomCountBaseline(n, np.stack([y, -y], 1))
    assert two.predict(np.array([3])).tolist() == [[2.0, -2.0]]


def test_data_baselines_reproduce_edms_table(qm9):
    got = data_baselines(qm9)
    for name in EDM_PROPERTIES:
        # shuffle baseline with exact predictions vs EDM's (its classifier on shuffled labels): within 1.5%
        assert got["naive"][name] == pytest.approx(EDM_TABLE3["Naive (upper bound)"][name], rel=0.015), name
        assert got["pair"][name] == pytest.approx(got["naive"][name], rel=0.01), name
        # per-size median vs EDM's N -> property MLP: within 1.5%; the median (L1-optimal) comes out a little lower
        assert got["atoms"][name] == pytest.approx(EDM_TABLE3["#Atoms"][name], rel=0.015), name
        assert got["atoms"][name] < EDM_TABLE3["#Atoms"][name], name
    # without EDM's subtraction of the atoms' Cv the shuffle baseline would be far from its 6.857
    halves = edm_halves()
    raw_cv = qm9.properties["cv"][halves.generator]
    assert mean_pair_difference(raw_cv) < 0.7 * EDM_TABLE3["Naive (upper bound)"]["cv"]


def test_data_baselines_on_a_subset(qm9):
    halves = edm_halves()
    small = type(halves)(predictor=halves.predictor[:3000], generator=halves.generator[:2000])
    got = data_baselines(qm9, ("alpha", "mu"), small, seed=5)
    # size carries most of alpha and some of mu (full data: 3.8 vs 9.0 Bohr^3, 1.05 vs 1.62 D)
    assert got["atoms"]["alpha"] < 0.5 * got["naive"]["alpha"]
    assert got["atoms"]["mu"] < 0.75 * got["naive"]["mu"]
    assert got["atoms"]["alpha"] < 0.5 * got["pair"]["alpha"]


# --------------------------------------------------------------------------------------- the network
def test_predictor_is_invariant_float64(qm9):
    model = _tiny(attention=True).double()
    gen = torch.Generator().manual_seed(0)
    pos, types, batch = _flat(qm9, [_position(qm9, i) for i in (1, 50, 2000, 120000)])
    num = int(batch.max()) + 1

    def fn(p, h, b):
        out = model(p, h[:, 0].long(), b, num)
        return torch.zeros_like(p), out[b]  # per-atom copy of the molecule's output: atom order must not matter

    worst = assert_equivariant(fn, pos.double(), types[:, None].double(), batch, pos_output="vector", generator=gen)
    assert worst < 1e-9
    mean_pool = _tiny(pooling="mean").double()
    assert_equivariant(lambda p, h, b: (torch.zeros_like(p), mean_pool(p, h[:, 0].long(), b, num)[b]),
                       pos.double(), types[:, None].double(), batch, generator=gen)
    # and it does depend on the geometry (an invariant that ignored the positions would pass the check)
    stretched = model(pos.double() * 1.3, types, batch, num)
    assert (stretched - model(pos.double(), types, batch, num)).abs().max() > 1e-4


def test_predictor_config_checks():
    with pytest.raises(ValueError, match="units"):
        PredictorConfig(properties=("a", "b"), units=("u",), target_mean=(0, 0), target_mad=(1, 1))
    with pytest.raises(ValueError, match="positive"):
        PredictorConfig(target_mad=(0.0,))
    with pytest.raises(ValueError, match="pooling"):
        PredictorConfig(pooling="max")
    with pytest.raises(ValueError, match="unknown"):
        PredictorConfig.from_dict({"hidden": 8, "colour": "red"})
    cfg = _tiny().config
    assert PredictorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_tiny_predictor_learns_32_molecules(qm9):
    """A real learning check: after training on 32 small molecules the MAE on them falls far below the
    shuffle baseline for every property, and below the per-size median (mu, a vector's length that
    distances alone pin down slowly, least so)."""
    half = edm_halves().predictor
    which = half[qm9.num_atoms[half] <= 12][:32]  # small molecules keep the test fast
    y = edm_targets(qm9, EDM_PROPERTIES, which)
    mean, mad = property_norms(y)
    torch.manual_seed(0)
    cfg = PredictorConfig(elements=ELEMENTS, properties=EDM_PROPERTIES, units=("",) * 6, target_mean=tuple(mean),
                          target_mad=tuple(mad), hidden=32, n_layers=2)
    model = PropertyPredictor(cfg)
    pos, types, batch = _flat(qm9, which)
    pos, target = pos.float(), torch.tensor(y, dtype=torch.float32)
    steps = 180
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = (model(pos, types, batch, 32) - model.normalize(target)).abs().mean()  # L1 on normalised targets
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    mae = np.abs(model.predict(pos, types, batch, 32).double().numpy() - y).mean(0)
    naive = mean_pair_difference(y)
    atoms = np.abs(AtomCountBaseline(qm9.num_atoms[which], y).predict(qm9.num_atoms[which]) - y).mean(0)
    ratio = mae / naive
    assert np.all(ratio < 0.55) and ratio.mean() < 0.3, ratio.round(3).tolist()
    not_mu = [k != "mu" for k in EDM_PROPERTIES]
    assert np.all((mae / atoms)[not_mu] < 0.7), (mae / atoms).round(3).tolist()


def test_save_load_round_trip(tmp_path, qm9):
    model = _tiny(properties=("alpha", "mu"))
    pos, types, batch = _flat(qm9, [0, 1, 2])
    before = model.predict(pos.float(), types, batch, 3)
    target = tmp_path / "pred"
    save_predictor(target, model, {"test_mae": {"alpha": 0.5}})
    loaded, meta = load_predictor(target)
    assert meta == {"test_mae": {"alpha": 0.5}}
    assert loaded.config == model.config and not loaded.training
    assert torch.equal(loaded.predict(pos.float(), types, batch, 3), before)
    # overwrite in place, no temporary folders left beside it
    save_predictor(target, _tiny(properties=("alpha", "mu"), seed=1), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred"]
    assert not torch.equal(load_predictor(target)[0].predict(pos.float(), types, batch, 3), before)


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(PredictorError, match="not found"):
        load_predictor(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictorError, match="not a property predictor"):
        load_predictor(tmp_path / "empty")
    save_predictor(tmp_path / "ok", _tiny())
    (tmp_path / "ok" / "model.pt").write_bytes(b"truncated")
    with pytest.raises(PredictorError, match="cannot load") as err:
        load_predictor(tmp_path / "ok")
    assert "\n" not in str(err.value)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"denoiser": {}}))
    (tmp_path / "other" / "model.pt").write_bytes(b"")
    with pytest.raises(PredictorError, match="not a property predictor's config"):
        load_predictor(tmp_path / "other")


# ----------------------------------------------------------------------------------- moldiff predict
@pytest.fixture
def predictor_dir(tmp_path):
    model = _tiny()
    model.config.notes["edm_targets"] = True
    folder = tmp_path / "predictor"
    save_predictor(folder, model, {"test_mae": dict(zip(EDM_PROPERTIES, [0.1, 64, 39, 36, 0.043, 0.04])),
                                   "test_set": "the generator half", "n_test": 50000})
    return folder


@pytest.fixture
def sdf(tmp_path, qm9):
    from moldiff.chemistry.io import write_sdf

    path = tmp_path / "mols.sdf"
    mols = [qm9.molecule(k) for k in (0, 2, 500)]
    write_sdf(path, [(s, p) for s, p in mols])
    return path, mols


def _run(argv, capsys):
    from moldiff.cli import main

    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_predict_end_to_end(sdf, predictor_dir, tmp_path, capsys):
    path, mols = sdf
    status, out, err = _run(["predict", str(path), "--predictor", str(predictor_dir), "--device", "cpu"], capsys)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"# predictor {predictor_dir}: test MAE on the generator half, 50,000 molecules:")
    assert "alpha 0.1 u" in lines[0] and "gap 64 u" in lines[0]
    header = lines[1].split(",")
    assert header[:3] == ["index", "name", "num_atoms"] and header[3:] == [f"{k}_u" for k in EDM_PROPERTIES]
    assert len(lines) == 2 + len(mols)
    # the numbers are the model's, Cv with the atoms' share added back
    model, _ = load_predictor(predictor_dir)
    symbols, positions = mols[2]
    types = torch.tensor([ELEMENTS.index(s) for s in symbols])
    pos = torch.tensor(positions - positions.mean(0), dtype=torch.float32)
    want = model.predict(pos, types, torch.zeros(len(symbols), dtype=torch.long), 1)[0].double().numpy()
    want[-1] += CV_ATOM_REFERENCE * len(symbols)
    got = np.array([float(v) for v in lines[4].split(",")[3:]])
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    # --csv: the same table in a file
    out_csv = tmp_path / "sub" / "pred.csv"
    status, out, err = _run(["predict", str(path), "--predictor", str(predictor_dir), "--csv", str(out_csv),
                             "--device", "cpu"], capsys)
    assert status == 0, err
    assert out.splitlines()[0].startswith("# predictor") and "wrote" in out.splitlines()[-1]
    assert out_csv.read_text().splitlines() == lines[1:]


def test_predict_is_invariant_to_the_frame(tmp_path, sdf, predictor_dir, capsys):
    from moldiff.chemistry.io import write_sdf
    from moldiff.geometry import random_orthogonal

    path, mols = sdf
    q = random_orthogonal(generator=torch.Generator().manual_seed(3)).numpy()
    moved = tmp_path / "moved.sdf"
    write_sdf(moved, [(s, p @ q.T + np.array([5.0, -2.0, 1.0])) for s, p in mols])
    a = _run(["predict", str(path), "--predictor", str(predictor_dir), "--device", "cpu"], capsys)[1].splitlines()
    b = _run(["predict", str(moved), "--predictor", str(predictor_dir), "--device", "cpu"], capsys)[1].splitlines()
    for x, y in zip(a[2:], b[2:]):
        assert np.array([float(v) for v in x.split(",")[3:]]) == pytest.approx(
            np.array([float(v) for v in y.split(",")[3:]]), rel=1e-3, abs=1e-3)


def _fails(argv, capsys, *, match: str):
    status, out, err = _run(argv, capsys)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("moldiff: error: "), err
    assert match in err, err
    return out


def test_shipped_predictor_is_found_by_name_and_is_the_default(tmp_path, sdf, predictor_dir, capsys, monkeypatch):
    import shutil

    import moldiff.prediction as prediction
    from moldiff.pipeline import shipped_models

    path, _ = sdf
    root = tmp_path / "pretrained" / "predictors"
    monkeypatch.setattr(prediction, "PREDICTOR_ROOT", root)
    assert prediction.shipped_predictors() == [] and prediction.default_predictors() == []
    shutil.copytree(predictor_dir, root / prediction.DEFAULT_PREDICTOR)
    (root / "notes").mkdir()  # a folder without config.json is not a predictor
    assert prediction.shipped_predictors() == [prediction.DEFAULT_PREDICTOR]
    assert prediction.resolve_predictor(prediction.DEFAULT_PREDICTOR) == root / prediction.DEFAULT_PREDICTOR
    # a folder of that name here wins over the shipped one
    monkeypatch.chdir(tmp_path)
    (tmp_path / prediction.DEFAULT_PREDICTOR).mkdir()
    assert prediction.resolve_predictor(prediction.DEFAULT_PREDICTOR) == Path(prediction.DEFAULT_PREDICTOR)
    (tmp_path / prediction.DEFAULT_PREDICTOR).rmdir()
    explicit = _run(["predict", str(path), "--predictor", str(predictor_dir), "--device", "cpu"], capsys)
    by_name = _run(["predict", str(path), "--predictor", prediction.DEFAULT_PREDICTOR, "--device", "cpu"], capsys)
    default = _run(["predict", str(path), "--device", "cpu"], capsys)
    assert explicit[0] == by_name[0] == default[0] == 0, default[2]
    assert by_name[1].splitlines()[0] == default[1].splitlines()[0] == f"# predictor {prediction.DEFAULT_PREDICTOR}: " \
        + explicit[1].splitlines()[0].split(": ", 1)[1]
    assert explicit[1].splitlines()[1:] == by_name[1].splitlines()[1:] == default[1].splitlines()[1:]
    # the predictors' folder is not a diffusion model
    assert "predictors" not in shipped_models()


def test_predict_bad_inputs(tmp_path, sdf, predictor_dir, capsys, monkeypatch):
    import moldiff.prediction as prediction
    from moldiff.chemistry.io import write_sdf

    path, _ = sdf
    out_csv = tmp_path / "out.csv"
    common = ["--predictor", str(predictor_dir), "--csv", str(out_csv), "--device", "cpu"]
    # no predictor given and none shipped: says how to train one
    monkeypatch.setattr(prediction, "PREDICTOR_ROOT", tmp_path / "no_predictors")
    _fails(["predict", str(path)], capsys, match="train_predictor.py")
    _fails(["predict", str(tmp_path / "nope.sdf"), *common], capsys, match="no such file")
    (tmp_path / "empty.sdf").write_text("")
    _fails(["predict", str(tmp_path / "empty.sdf"), *common], capsys, match="empty file")
    (tmp_path / "mols.txt").write_text("C 0 0 0\n")
    _fails(["predict", str(tmp_path / "mols.txt"), *common], capsys, match="unknown extension")
    _fails(["predict", str(path), "--predictor", str(tmp_path / "missing"), "--csv", str(out_csv)], capsys,
           match="predictor folder not found")
    # an element the predictor does not know
    chlorine = tmp_path / "cl.sdf"
    write_sdf(chlorine, [(("C", "H", "H", "H"), np.array([[0, 0, 0], [1.09, 0, 0], [-0.36, 1.03, 0], [-0.36, -0.5, 0.9]])),
                         (("C", "Cl", "H", "H", "H"), np.array([[0, 0, 0], [1.78, 0, 0], [-0.36, 1.03, 0],
                                                                [-0.36, -0.5, 0.9], [-0.36, -0.5, -0.9]]))])
    _fails(["predict", str(chlorine), *common], capsys, match="record 1 ('') has element(s) Cl")
    # one record RDKit cannot parse among good ones
    good = path.read_text()
    broken = tmp_path / "broken.sdf"
    broken.write_text(good + "junk\n  nonsense\n\n  2  1  0  0  0  0  0  0  0  0999 V2000\n$$$$\n")
    _fails(["predict", str(broken), *common], capsys, match="1 of 4 records cannot be used")
    # two predictors of the same property
    _fails(["predict", str(path), "--predictor", str(predictor_dir), "--predictor", str(predictor_dir), "--csv",
            str(out_csv)], capsys, match="predicted by both")
    _fails(["predict", str(path), "--predictor", str(predictor_dir), "--csv", str(tmp_path)], capsys, match="folder")
    assert not out_csv.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_the_shipped_predictor_reaches_its_stated_test_mae_on_qm9(qm9):
    """The shipped qm9-props on 400 molecules of its test set (EDM's generator half): its MAE per
    property lies near the test MAE its config states for all 50,000, and far below #Atoms."""
    from types import SimpleNamespace

    from moldiff.prediction import DEFAULT_PREDICTOR, estimate, load_predictors, shipped_predictors

    if DEFAULT_PREDICTOR not in shipped_predictors():
        pytest.skip(f"no {DEFAULT_PREDICTOR} predictor is shipped with this checkout")
    (p,) = load_predictors([DEFAULT_PREDICTOR])
    which = edm_halves().generator[:400]
    molecules = [SimpleNamespace(symbols=s, positions=x) for s, x in qm9.molecules(which)]
    got = estimate(p, molecules)
    want = edm_targets(qm9, p.properties, which)
    mae = np.abs(got - want).mean(axis=0)
    stated = np.array([p.metadata["test_mae"][k] for k in p.properties])
    atoms = np.array([EDM_TABLE3["#Atoms"][k] for k in p.properties])
    assert np.all(mae > 0.6 * stated) and np.all(mae < 1.5 * stated), (mae, stated)
    assert np.all(mae < 0.5 * atoms), (mae, atoms)
