"""Sampling as a user meets it: ``moldiff.load_pretrained(...).sample(...)`` and ``moldiff sample``.

A tiny randomly initialised pipeline stands in for a trained model: its molecules are chemically
nonsense, which is fine here; what is tested is the plumbing (shapes, seeds, flags, files, errors).
Chemistry of real geometries is checked on a QM9 molecule written out below.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from rdkit import Chem

import moldiff
from moldiff.chemistry.elements import QM9_ELEMENTS
from moldiff.chemistry.report import assess_sample, descriptor_row, grid_image, sd_record
from moldiff.cli import main
from moldiff.data.statistics import DatasetStatistics
from moldiff.diffusion import AncestralSampler, AtomFeatures, NoiseSchedule
from moldiff.models import DenoiserConfig, EGNNDenoiser
from moldiff.pipeline import DEFAULT_TIME_POWER, GeneratedMolecule, MolDiffPipeline, SampledArrays, molecules_from_arrays
from moldiff.sampling import denoise_batch

from pathlib import Path

SHIPPED = Path(moldiff.__file__).parent / "pretrained" / "qm9"
MAX_ATOMS = 9
TAGS = ("SMILES", "valid", "mol_stable", "num_atoms", "sampler", "steps", "time_power", "noise_scale", "seed",
        "reason")
METRICS = ("atom_stable", "mol_stable", "validity", "uniqueness", "valid_and_unique", "novelty",
           "n", "n_faults", "sampler", "steps", "time_power", "noise_scale", "seed", "seconds")

# QM9 molecule 100 (cyclopropane-1,2-diol), coordinates in Å.
DIOL = (
    ["O", "C", "C", "C", "O", "H", "H", "H", "H", "H", "H"],
    np.array([[-0.217, 1.3823, -0.0107], [-0.0426, -0.0106, 0.0036], [-0.4454, -0.7881, 1.2394],
              [-1.3388, -0.7701, 0.0145], [-2.5191, -0.0351, 0.0349], [0.3113, 1.7667, 0.6959],
              [0.7915, -0.368, -0.597], [0.1076, -1.6883, 1.4859], [-0.7973, -0.2116, 2.0892],
              [-1.4224, -1.6756, -0.5787], [-2.2517, 0.8938, -0.0114]]),
)


def tiny_pipeline() -> MolDiffPipeline:
    torch.manual_seed(0)
    stats = DatasetStatistics(QM9_ELEMENTS, [0, 0, 0, 2, 3, 5, 4, 3, 2, 1], [40, 20, 5, 8, 1])
    return MolDiffPipeline(
        EGNNDenoiser(DenoiserConfig(num_features=6, hidden=16, n_layers=2)),
        NoiseSchedule.polynomial(),
        AtomFeatures(num_types=5, include_charges=True),
        stats,
        [1, 6, 7, 8, 9],
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_pipeline().save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return moldiff.load_pretrained(checkpoint)


# ------------------------------------------------------------------------------------ Python API


def test_sample_returns_flagged_molecules_with_right_shapes(pipe):
    mols = pipe.sample(4, steps=3, seed=0)
    assert len(mols) == 4 and all(isinstance(m, GeneratedMolecule) for m in mols)
    for m in mols:
        n = m.num_atoms
        assert 2 <= n <= MAX_ATOMS and len(m.symbols) == n
        assert m.positions.shape == (n, 3) and m.positions.dtype == np.float64
        assert m.charges is not None and m.charges.shape == (n,)
        assert isinstance(m.valid, bool) and isinstance(m.mol_stable, bool)
        assert (m.smiles is not None) == m.valid
        assert m.mol_stable or m.reason  # every unstable or invalid sample says why
        assert m.bonds in ("rdDetermineBonds", "EDM table", "none")
        assert m.mol is not None and m.mol.GetNumAtoms() == n and m.mol.GetNumConformers() == 1
        assert [a.GetSymbol() for a in m.mol.GetAtoms()] == m.symbols
        np.testing.assert_allclose(m.mol.GetConformer().GetPositions(), m.positions, atol=1e-9)
        assert m.formula in repr(m)
    report = moldiff.evaluate_molecules(mols)
    assert report.n == 4 and report.validity == sum(m.valid for m in mols) / 4


def test_same_seed_same_molecules_other_seed_differs(pipe):
    a = pipe.sample(3, steps=3, seed=7)
    b = pipe.sample(3, steps=3, seed=7)
    c = pipe.sample(3, steps=3, seed=8)
    for x, y in zip(a, b):
        assert x.symbols == y.symbols
        np.testing.assert_array_equal(x.positions, y.positions)
    assert any(x.positions.shape != z.positions.shape or not np.array_equal(x.positions, z.positions)
               for x, z in zip(a, c))


def test_time_power_is_used_and_recorded(pipe):
    """The time grid changes the trajectory (same seed, same sizes and initial noise), is recorded,
    and the CLI's help names the package default."""
    grid2 = pipe.sample_arrays(2, steps=3, seed=7, time_power=2.0)
    grid1 = pipe.sample_arrays(2, steps=3, seed=7, time_power=1.0)
    assert grid2.time_power == 2.0 and grid1.time_power == 1.0
    assert [p.shape for p in grid2.positions] == [p.shape for p in grid1.positions]
    assert not all(np.array_equal(x, y) for x, y in zip(grid2.positions, grid1.positions))
    assert pipe.sample_arrays(2, steps=3, seed=7).time_power == DEFAULT_TIME_POWER
    from moldiff.inpainting import DEFAULT_INPAINT_TIME_POWER, inpaint_arrays

    assert DEFAULT_INPAINT_TIME_POWER != DEFAULT_TIME_POWER  # (else this test checks nothing below)
    assert inpaint_arrays(pipe, 1, formula="C2H6O", steps=2, resample=1).time_power == DEFAULT_INPAINT_TIME_POWER
    assert inpaint_arrays(pipe, 1, formula="C2H6O", steps=2, resample=1, time_power=3.0).time_power == 3.0
    from moldiff.cli import build_parser

    sample_help = next(a for a in build_parser()._subparsers._group_actions[0].choices["sample"]._actions
                       if "--time-power" in a.option_strings).help
    assert f"default {DEFAULT_TIME_POWER:g}," in sample_help


def test_on_step_reports_progress_after_every_network_evaluation(pipe):
    """3 batches (2 + 2 + 1 molecules) x (3 steps + final decode): 12 calls, rising to n, each batch
    ending on its molecule count; the molecules themselves do not depend on being watched."""
    seen = []
    watched = pipe.sample_arrays(5, steps=3, seed=2, batch_size=2, on_step=seen.append)
    assert len(seen) == 3 * 4
    assert all(a < b for a, b in zip(seen, seen[1:]))
    assert seen[3] == 2 and seen[7] == 4 and seen[-1] == 5 and seen[0] == pytest.approx(0.5)
    plain = pipe.sample_arrays(5, steps=3, seed=2, batch_size=2)
    assert all(np.array_equal(a, b) for a, b in zip(watched.positions, plain.positions))


def test_noise_scale_is_used_and_recorded(pipe, monkeypatch):
    """Lower-temperature sampling changes the trajectory, is recorded, defaults per task, and the CLI
    help names the package default."""
    from moldiff.inpainting import DEFAULT_INPAINT_NOISE_SCALE, inpaint_arrays
    from moldiff.pipeline import DEFAULT_NOISE_SCALE

    cold = pipe.sample_arrays(2, steps=3, seed=7, noise_scale=0.3)
    warm = pipe.sample_arrays(2, steps=3, seed=7, noise_scale=1.0)
    assert cold.noise_scale == 0.3 and warm.noise_scale == 1.0
    assert not all(np.array_equal(x, y) for x, y in zip(cold.positions, warm.positions))
    assert pipe.sample_arrays(2, steps=3, seed=7).noise_scale == DEFAULT_NOISE_SCALE
    assert inpaint_arrays(pipe, 1, formula="C2H6O", steps=2, resample=1).noise_scale == DEFAULT_INPAINT_NOISE_SCALE
    # conditioned sampling reads its own default (patched to a value no other default has)
    import moldiff.inpainting

    monkeypatch.setattr(moldiff.inpainting, "DEFAULT_INPAINT_NOISE_SCALE", 0.7)
    assert inpaint_arrays(pipe, 1, formula="C2H6O", steps=2, resample=1).noise_scale == 0.7
    assert pipe.sample_arrays(1, steps=2, seed=7).noise_scale == DEFAULT_NOISE_SCALE
    with pytest.raises(ValueError, match="noise_scale"):
        pipe.sample_arrays(1, steps=2, noise_scale=1.5)
    from moldiff.cli import build_parser

    sample_help = next(a for a in build_parser()._subparsers._group_actions[0].choices["sample"]._actions
                       if "--noise-scale" in a.option_strings).help
    assert f"default {DEFAULT_NOISE_SCALE:g}," in sample_help


def test_num_atoms_int_and_list_are_honoured(pipe):
    assert [m.num_atoms for m in pipe.sample(3, steps=2, num_atoms=5)] == [5, 5, 5]
    assert [m.num_atoms for m in pipe.sample(3, steps=2, num_atoms=[2, 9, 4], batch_size=2)] == [2, 9, 4]
    with pytest.raises(ValueError, match="between 2 and 9"):
        pipe.sample(1, steps=2, num_atoms=10)
    with pytest.raises(ValueError):
        pipe.sample(2, steps=2, num_atoms=[3])
    with pytest.raises(ValueError):
        pipe.sample(0, steps=2)
    with pytest.raises(ValueError):
        pipe.sample(1, steps=0)
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe.sample(1, steps=2, sampler="heun")


def test_save_load_round_trip_gives_identical_samples(pipe, tmp_path):
    again = moldiff.load_pretrained(pipe.save_pretrained(tmp_path / "copy"))
    for x, y in zip(pipe.sample(3, steps=3, seed=1, sampler="ddim:0.5"), again.sample(3, steps=3, seed=1, sampler="ddim:0.5")):
        assert x.symbols == y.symbols and x.smiles == y.smiles
        np.testing.assert_array_equal(x.positions, y.positions)


def test_a_save_that_fails_halfway_leaves_the_saved_model_whole(pipe, tmp_path, monkeypatch):
    target = pipe.save_pretrained(tmp_path / "model")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the old files, all of them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left


def test_load_pretrained_accepts_a_run_dir_and_explains_what_is_missing(checkpoint, tmp_path):
    run = tmp_path / "run"
    tiny_pipeline().save_pretrained(run / "pipeline")
    assert isinstance(moldiff.load_pretrained(run), MolDiffPipeline)
    with pytest.raises(moldiff.CheckpointError, match="not a moldiff checkpoint"):
        moldiff.load_pretrained(tmp_path)
    if not (moldiff.pipeline.PRETRAINED_DIR / "config.json").is_file():
        with pytest.raises(moldiff.CheckpointError, match="no pretrained model is shipped"):
            moldiff.load_pretrained()


def test_numerical_faults_are_flagged_never_repaired():
    nan = np.full((3, 3), np.nan)
    arrays = SampledArrays([DIOL[1], nan], [np.array([3, 1, 1, 1, 3, 0, 0, 0, 0, 0, 0]), np.array([1, 0, 0])],
                           [None, None], np.array([-1, 4]), steps=10)
    good, bad = molecules_from_arrays(arrays)
    assert good.valid and good.mol_stable and good.reason is None and not good.fault
    assert bad.fault and bad.fault_step == 4 and not bad.valid and not bad.mol_stable
    assert bad.reason == "numerical fault at reverse step 4" and bad.mol is None
    assert np.isnan(bad.positions).all()
    report = moldiff.evaluate_molecules([good, bad])
    assert report.validity == 0.5 and report.mol_stable == 0.5
    # In an SD file the faulty sample is still one readable (coordinates-only) record.
    record = sd_record(bad.mol, bad.symbols, bad.positions, {"reason": bad.reason})
    block = Chem.MolToMolBlock(record)
    assert Chem.MolFromMolBlock(block, sanitize=False, removeHs=False).GetNumAtoms() == 3


# ------------------------------------------------------------------------------------ chemistry


def test_chemist_route_gives_bonds_and_heavy_atom_smiles():
    chem = assess_sample(*DIOL)
    assert chem.bonds == "rdDetermineBonds" and chem.rdkit_smiles == "OC1CC1O"
    assert chem.result.valid and chem.result.mol_stable
    assert [a.GetSymbol() for a in chem.mol.GetAtoms()] == DIOL[0]
    row = descriptor_row(chem.mol)
    assert row["MW"] == pytest.approx(74.079, abs=0.01) and 0 < row["QED"] < 1 and row["logP"] is not None
    # Isolated atoms: rdDetermineBonds gives up, the EDM molecule (implicit H) still sanitizes.
    chem = assess_sample(["C", "O"], np.array([[0.0, 0, 0], [10.0, 0, 0]]))
    assert chem.bonds == "EDM table" and chem.rdkit_smiles is None and chem.rdkit_reason
    # Pentavalent carbon: nothing sanitizes, coordinates only.
    pos = np.array([[0, 0, 0], [0.6, 0, 0], [-0.6, 0, 0], [0, 0.6, 0], [0, -0.6, 0], [0, 0, 0.6]], dtype=float)
    chem = assess_sample(["C", "H", "H", "H", "H", "H"], pos)
    assert chem.bonds == "none" and chem.mol.GetNumBonds() == 0 and not chem.result.valid
    assert grid_image([]).size[0] > 0  # placeholder image when nothing is valid


# ------------------------------------------------------------------------------------ CLI


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "moldiff.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, **kw)


def test_cli_sample_novelty_uses_the_shipped_reference_on_a_fresh_cache(checkpoint, tmp_path):
    """Default novelty on an empty cache: the reference shipped for this RDKit serves, nothing is built."""
    from moldiff.data.qm9 import shipped_training_smiles

    if shipped_training_smiles() is None:
        pytest.skip("shipped novelty reference not valid for the installed RDKit (it is rebuilt at use)")
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    r = run_cli("sample", "-n", 2, "--steps", 1, "--checkpoint", checkpoint, "-o", out,
                env=dict(os.environ, MOLDIFF_CACHE=str(cache)))
    assert r.returncode == 0, r.stderr
    assert "building the novelty reference" not in r.stderr and "novelty" in r.stdout
    assert not cache.exists() or not any(cache.iterdir())


def test_cli_sample_writes_sdf_csv_png_json(checkpoint, tmp_path):
    out = tmp_path / "out" / "s.sdf"
    r = run_cli("sample", "-n", 3, "--steps", 2, "--checkpoint", checkpoint, "-o", out, "--no-novelty", "--seed", 5)
    assert r.returncode == 0, r.stderr
    assert "molecule stable" in r.stdout and str(out) in r.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["s.csv", "s.json", "s.png", "s.sdf"]
    records = list(Chem.SDMolSupplier(str(out), removeHs=False, sanitize=False))
    assert len(records) == 3 and all(m is not None for m in records)
    for m in records:
        props = m.GetPropsAsDict()
        assert set(TAGS) <= set(props)
        assert props["num_atoms"] == m.GetNumAtoms() and props["sampler"] == "ancestral"
        assert props["steps"] == 2 and props["seed"] == 5 and props["time_power"] == DEFAULT_TIME_POWER
    metrics = json.loads(out.with_suffix(".json").read_text())
    assert set(METRICS) <= set(metrics) and metrics["n"] == 3 and metrics["novelty"] is None
    assert metrics["time_power"] == DEFAULT_TIME_POWER
    from moldiff.chemistry.diagnostics import geometry_diagnostics

    written = [([a.GetSymbol() for a in m.GetAtoms()], m.GetConformer().GetPositions()) for m in records]
    assert metrics["one_piece"] == pytest.approx(geometry_diagnostics(written)["one_piece"])
    assert f"in one piece: {100 * metrics['one_piece']:.2f}%" in r.stdout
    assert metrics["compile"] is False  # a short run: no compilation by default
    from moldiff.pipeline import auto_precision

    assert metrics["precision"] == auto_precision("cpu")  # bf16 where the CPU has it natively
    lines = out.with_suffix(".csv").read_text().splitlines()
    assert lines[0].startswith("index,SMILES,valid,mol_stable,QED,SA_score,MW,logP") and len(lines) == 4
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_sample_in_a_log_writes_whole_progress_lines(checkpoint, tmp_path, capsys, monkeypatch):
    import moldiff.cli

    monkeypatch.setattr(moldiff.cli, "LOG_PROGRESS_SECONDS", 0.0)  # a line at every update instead of once a minute
    assert main(["sample", "-n", "3", "--steps", "2", "--checkpoint", str(checkpoint), "-o", str(tmp_path / "o"),
                 "--no-novelty"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith(("sampling:", "bonds + RDKit:"))]
    assert any(line.startswith("sampling:") and "3/3" in line for line in lines), err
    assert any(line.startswith("bonds + RDKit:") for line in lines), err


def test_cli_output_without_sdf_suffix_is_a_folder(checkpoint, tmp_path, capsys):
    out = tmp_path / "a" / "samples"
    assert main(["sample", "-n", "2", "--steps", "1", "--checkpoint", str(checkpoint), "-o", str(out),
                 "--no-novelty", "--num-atoms", "4", "--sampler", "ddim"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["samples.csv", "samples.json", "samples.png", "samples.sdf"]
    assert all(m.GetNumAtoms() == 4 for m in Chem.SDMolSupplier(str(out / "samples.sdf"), removeHs=False, sanitize=False))


def test_cli_sample_without_rdkit_drawing_writes_the_rest(checkpoint, tmp_path):
    """A headless server whose RDKit cannot load its drawing module (seen on a GPU machine:
    ``libXrender.so.1`` missing) still gets its molecules: no PNG, one note, and no stale preview
    of earlier samples left beside the new files."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "samples.png").write_bytes(b"earlier preview")
    code = ("import sys; sys.modules['rdkit.Chem.Draw'] = None; from moldiff.cli import main; "
            f"sys.exit(main(['sample', '-n', '3', '--steps', '2', '--checkpoint', {str(checkpoint)!r}, "
            f"'-o', {str(out)!r}, '--no-novelty']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["samples.csv", "samples.json", "samples.sdf"]
    assert "note: no PNG preview: rdkit.Chem.Draw cannot load" in r.stdout
    assert "samples.png" not in r.stdout
    summary = json.loads((out / "samples.json").read_text())
    assert summary["png"].startswith("not written: rdkit.Chem.Draw cannot load") and summary["records"] == 3
    assert len(Chem.SDMolSupplier(str(out / "samples.sdf"), removeHs=False, sanitize=False)) == 3


BAD_INPUTS = {
    "n zero": ["-n", "0"],
    "n negative": ["-n", "-3"],
    "steps zero": ["--steps", "0"],
    "batch size zero": ["--batch-size", "0"],
    "num atoms 0": ["--num-atoms", "0"],
    "num atoms 1": ["--num-atoms", "1"],
    "num atoms above max": ["--num-atoms", str(MAX_ATOMS + 1)],
    "unknown sampler": ["--sampler", "heun"],
    "bad ddim eta": ["--sampler", "ddim:x"],
    "time power zero": ["--time-power", "0"],
    "time power nan": ["--time-power", "nan"],
    "noise scale above 1": ["--noise-scale", "1.5"],
    "noise scale negative": ["--noise-scale", "-0.2"],
    "valence guidance without a fragment": ["--valence-guidance", "1"],
    "valence guidance negative": ["--fragment-smiles", "CC", "--valence-guidance", "-1"],
    "formula draws without a formula": ["--formula-draws", "5"],
    "formula draws negative": ["--formula", "CH4", "--formula-draws", "-1"],
    "missing checkpoint": ["--checkpoint", "{tmp}/nowhere"],
    "corrupt checkpoint": ["--checkpoint", "{corrupt}"],
    "unwritable output": ["-o", "/etc/hostname/x.sdf"],
    "output with another suffix": ["-o", "{tmp}/out/s.csv"],
}
if not torch.cuda.is_available():
    BAD_INPUTS["cuda without a GPU"] = ["--device", "cuda"]


@pytest.fixture(scope="module")
def corrupt_checkpoint(checkpoint, tmp_path_factory):
    bad = tmp_path_factory.mktemp("corrupt")
    (bad / "config.json").write_text((checkpoint / "config.json").read_text())
    (bad / "model.pt").write_bytes((checkpoint / "model.pt").read_bytes()[:100])  # truncated weights
    return bad


def _bad_command(tmp_path, checkpoint, corrupt, extra):
    out = tmp_path / "out" / "s.sdf"
    args = ["sample", "-n", "2", "--steps", "1", "--checkpoint", str(checkpoint), "-o", str(out), "--no-novelty"]
    for i in range(0, len(extra), 2):  # later options override earlier ones in argparse
        args += [extra[i], extra[i + 1].format(tmp=tmp_path, corrupt=corrupt)]
    return args, out


@pytest.mark.parametrize("extra", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_cli_bad_input_one_line_error_and_no_files(extra, checkpoint, corrupt_checkpoint, tmp_path, capsys):
    args, out = _bad_command(tmp_path, checkpoint, corrupt_checkpoint, extra)
    out.parent.mkdir()
    out.write_text("earlier result\n")  # a good earlier output must survive untouched
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moldiff: error: "), err
    assert [p.name for p in out.parent.iterdir()] == ["s.sdf"] and out.read_text() == "earlier result\n"
    assert not (tmp_path / "out" / "s.csv").exists() and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("which", ["corrupt checkpoint", "unwritable output"])
def test_cli_bad_input_as_a_process(which, checkpoint, corrupt_checkpoint, tmp_path):
    args, out = _bad_command(tmp_path, checkpoint, corrupt_checkpoint, BAD_INPUTS[which])
    r = run_cli(*args)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("moldiff: error: ")
    assert not out.parent.exists()


def test_cli_closed_stdout_is_quiet(checkpoint, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "moldiff.cli", "sample", "-n", "1", "--steps", "1", "--checkpoint", str(checkpoint),
         "-o", str(tmp_path / "s.sdf"), "--no-novelty"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    proc.stdout.close()  # the reader goes away before moldiff prints anything, like `| head -0`
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert "Broken pipe" not in err and "Traceback" not in err and err.strip() == ""


def test_cli_failure_while_writing_leaves_nothing_behind(checkpoint, tmp_path, monkeypatch, capsys):
    import moldiff.chemistry.report as report

    def broken_png(path, image):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_png", broken_png)
    out = tmp_path / "new" / "deeper" / "s.sdf"
    assert main(["sample", "-n", "2", "--steps", "1", "--checkpoint", str(checkpoint), "-o", str(out), "--no-novelty"]) == 2
    assert "No space left" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no files, no temporaries, no folders it created


def test_cli_sample_with_fragment_and_formula(tmp_path, checkpoint):
    """`moldiff sample --fragment-smiles/--formula` end to end: tags, CSV columns, exact formula."""
    import csv as _csv
    import json as _json
    import subprocess as _sp
    import sys as _sys

    from rdkit import Chem

    out = tmp_path / "frag"
    r = _sp.run([_sys.executable, "-m", "moldiff.cli", "sample", "-n", "3", "--steps", "2", "--checkpoint",
                 str(checkpoint), "--fragment-smiles", "c1ccccc1", "--num-atoms", "9",
                 "-o", str(out), "--no-novelty"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    records = list(Chem.SDMolSupplier(str(out / "samples.sdf"), removeHs=False, sanitize=False))
    assert len(records) == 3 and all(m.HasProp("fragment_rmsd") for m in records)
    assert all(float(m.GetProp("fragment_rmsd")) < 1e-5 for m in records)  # fixed atoms at the fragment geometry
    summary = _json.loads((out / "samples.json").read_text())
    assert "fragment_retention" in summary
    from moldiff.inpainting import DEFAULT_INPAINT_TIME_POWER

    # conditioned sampling has its own default time grid, recorded like the plain one
    assert summary["time_power"] == DEFAULT_INPAINT_TIME_POWER
    assert all(float(m.GetProp("time_power")) == DEFAULT_INPAINT_TIME_POWER for m in records)

    out2 = tmp_path / "formula"
    r = _sp.run([_sys.executable, "-m", "moldiff.cli", "sample", "-n", "2", "--steps", "2", "--checkpoint",
                 str(checkpoint), "--formula", "C2H6O", "-o", str(out2), "--no-novelty"],
                capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with open(out2 / "samples.csv") as fh:
        assert [row["formula"] for row in _csv.DictReader(fh)] == ["C2H6O", "C2H6O"]
    cond = _json.loads((out2 / "samples.json").read_text())["conditioning"]
    routes = [cond["formula_drawn"], cond["formula_given"], cond["formula_clamped"]]
    assert sum(routes) == 2 and cond["formula_given"] == 0  # this model was not trained with given types
    assert (f"formula C2H6O: {routes[0]} drawn from unconditional samples, 0 sampled with the elements given "
            f"to the network, {routes[2]} clamped (RePaint)") in r.stdout

    r = _sp.run([_sys.executable, "-m", "moldiff.cli", "sample", "-n", "2", "--checkpoint",
                 str(checkpoint), "--formula", "C2H6Cl", "-o", str(tmp_path / "bad"), "--no-novelty"],
                capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_api_sample_with_fragment_reports_retention(checkpoint):
    from moldiff.inpainting import Fragment

    pipe = MolDiffPipeline.from_pretrained(checkpoint)
    frag = Fragment.from_smiles("CCO")
    mols = pipe.sample(2, steps=2, seed=0, fragment=frag, num_atoms=8)
    assert all(m.symbols[:3] == list(frag.symbols) for m in mols)
    assert all(m.fragment_rmsd is not None and m.fragment_rmsd < 1e-5 for m in mols)
    assert all(m.fragment_retained in (True, False) for m in mols)


def test_inpainting_on_step_counts_resampling_rounds(checkpoint):
    """2 batches (2 + 1 molecules) x (2 steps x 2 RePaint rounds + final decode) = 10 calls."""
    from moldiff.inpainting import Fragment, inpaint_arrays

    pipe = MolDiffPipeline.from_pretrained(checkpoint)
    seen = []
    inpaint_arrays(pipe, 3, fragment=Fragment.from_smiles("CCO"), num_atoms=8, steps=2, resample=2, batch_size=2,
                   on_step=seen.append)
    assert len(seen) == 10 and all(a < b for a, b in zip(seen, seen[1:]))
    assert seen[0] == pytest.approx(0.4) and seen[4] == 2 and seen[-1] == 3


def _noisy_probe(pipe, sizes, seed):
    """Random noisy inputs ``(pos, h, batch)`` for molecules of the given sizes."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return torch.randn(len(batch), 3, generator=g), torch.randn(len(batch), pipe.features.dim, generator=g), batch


def test_bf16_inference_is_close_to_fp32_and_leaves_weights_alone(checkpoint):
    pipe = MolDiffPipeline.from_pretrained(checkpoint)
    keys = set(pipe.state_dict())
    pos, h, batch = _noisy_probe(pipe, [5, 7], seed=0)
    t = torch.tensor([0.3, 0.8])
    ref = pipe.predict_noise(pos, h, t, batch)
    pipe.configure_inference(precision="bf16")
    got = pipe.predict_noise(pos, h, t, batch)
    assert got[0].dtype == torch.float32
    for a, b in zip(got, ref):
        assert (a - b).abs().max() <= 0.05 * b.abs().max() + 1e-3  # bf16 has ~3 significant digits
    assert set(pipe.state_dict()) == keys
    with pytest.raises(ValueError, match="precision"):
        pipe.configure_inference(precision="fp8")


def test_compiled_inference_gives_the_eager_predictions(checkpoint):
    """``configure_inference(compile=True)`` (``moldiff sample --compile``) runs and agrees with eager.
    A counting backend exercises the same compiled wrappers in seconds (inductor: tens of seconds)."""
    pipe = MolDiffPipeline.from_pretrained(checkpoint)
    pos, h, batch = _noisy_probe(pipe, [4, 6], seed=1)
    t = torch.tensor([0.2, 0.6])
    ref = pipe.predict_noise(pos, h, t, batch)
    graphs = []

    def counting_backend(gm, example_inputs):  # runs the captured graph as it is, and counts it
        graphs.append(gm)
        return gm.forward

    got = pipe.configure_inference(compile=True, compile_backend=counting_backend).predict_noise(pos, h, t, batch)
    assert graphs, "compile=True did not route the network through torch.compile"
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_auto_precision_follows_the_cpu(checkpoint):
    from moldiff.pipeline import auto_precision

    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert auto_precision("cpu") == ("bf16" if native else "fp32")
    assert auto_precision("cuda") == "fp32"  # bf16 autocast measured slower on a GPU for these networks
    pipe = MolDiffPipeline.from_pretrained(checkpoint).configure_inference(precision="auto")
    assert pipe.inference_precision == auto_precision("cpu")


def test_tune_allocator_is_public_and_reports_what_it_did():
    """``moldiff.tune_allocator()`` (what the CLI runs at start-up) says whether it tuned glibc malloc."""
    import platform

    expected = platform.libc_ver()[0] == "glibc" and not os.environ.get("MOLDIFF_DEFAULT_MALLOC")
    assert moldiff.tune_allocator() is expected


class _FaultAt(AncestralSampler):
    """The ancestral sampler, except that molecule ``victim``'s state becomes NaN after step ``at``
    (a stand-in for a diverging sample)."""

    def __init__(self, schedule, victim, at, batch, **kw):
        super().__init__(schedule, **kw)
        self.victim, self.at, self.batch, self.calls = victim, at, batch, 0

    def step(self, *args, **kwargs):
        out = super().step(*args, **kwargs)
        self.calls += 1
        if self.calls == self.at:
            out.pos[self.batch == self.victim] = float("nan")
            out.h[self.batch == self.victim] = float("nan")
        return out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_faulted_molecule_does_not_spread_to_the_rest_of_its_batch(precision):
    """The reverse loop (:func:`moldiff.sampling.denoise_batch`):
    One molecule turned non-finite mid-run is flagged at that step and keeps NaN coordinates; every
    other molecule of the batch comes out bit-identical to the run without the fault (its NaNs are
    kept out of the network, where bf16 matrix products can spread them across rows)."""
    pipe = MolDiffPipeline.from_pretrained(SHIPPED).configure_inference(precision)
    sizes = np.array([21, 19, 22, 19])  # sizes where oneDNN's bf16 products spread NaN rows on this CPU
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor(sizes))
    runs = []
    for sampler in (AncestralSampler(pipe.schedule, time_power=2.0, noise_scale=0.5),
                    _FaultAt(pipe.schedule, 2, 3, batch, time_power=2.0, noise_scale=0.5)):
        gen = torch.Generator().manual_seed(7)
        runs.append(denoise_batch(pipe, sizes, 6, sampler, gen))
    (pos_a, types_a, _, fault_a, *_), (pos_b, types_b, _, fault_b, *_) = runs
    assert fault_a.tolist() == [-1] * 4 and fault_b.tolist() == [-1, -1, 2, -1]
    member = (batch == 2).numpy()
    assert np.isnan(pos_b[member]).all()
    np.testing.assert_array_equal(pos_b[~member], pos_a[~member])
    np.testing.assert_array_equal(types_b[~member], types_a[~member])


def test_network_inputs_zero_only_the_rows_of_faulted_molecules():
    from moldiff.sampling import network_inputs

    batch = torch.tensor([0, 0, 1, 1, 1, 2])
    x = torch.arange(12.0).view(6, 2)
    same = network_inputs(torch.tensor([-1, -1, -1]), batch, x)
    assert same[0] is x
    (y,) = network_inputs(torch.tensor([-1, 4, -1]), batch, x)
    assert torch.equal(y[[0, 1, 5]], x[[0, 1, 5]]) and torch.equal(y[2:5], torch.zeros(3, 2))
