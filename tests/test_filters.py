"""Filters for pipelines: ``moldiff.filters.sample_passing`` and ``moldiff sample --keep / --max-strain``.

The shipped QM9 model at few steps passes some criteria and fails others, so every branch is
exercised with real molecules; nothing is mocked."""

import csv
import json

import numpy as np
import pytest

from moldiff.cli import main
from moldiff.filters import KEEP_CRITERIA, Keep, sample_passing
from moldiff.pipeline import load_pretrained

STEPS = 10  # few steps: some molecules pass, many fail


@pytest.fixture(scope="module")
def pipe():
    return load_pretrained("qm9")


def test_keep_parses_criteria_in_canonical_order_and_refuses_unknown_ones():
    assert Keep.parse("posebusters, valid,stable").criteria == ("valid", "stable", "posebusters")
    assert Keep.parse("", max_strain=5).criteria == () and Keep.parse("", max_strain=5).max_strain == 5
    with pytest.raises(ValueError, match="unknown criterion 'druglike'"):
        Keep.parse("valid,druglike")
    with pytest.raises(ValueError, match="max_strain"):
        Keep.parse("valid", max_strain=-1)
    with pytest.raises(ValueError, match="at least one criterion"):
        Keep.parse(" , ")
    with pytest.raises(ValueError, match="forcefield"):
        Keep.parse("valid", max_strain=3, forcefield="gaff")
    assert set(KEEP_CRITERIA) == {"valid", "stable", "unique", "posebusters"}


def test_kept_molecules_pass_and_every_draw_is_accounted_for(pipe):
    out = sample_passing(pipe, 4, "valid,stable,unique", budget=60, seed=3, steps=STEPS)
    assert out.reached and len(out.kept) == 4
    assert all(m.valid and m.mol_stable for m in out.kept)
    assert len({m.smiles for m in out.kept}) == 4
    # kept molecules are the drawn ones at their indices, and kept + rejected = drawn
    assert all(out.drawn[i] is m for i, m in zip(out.kept_indices, out.kept))
    assert len(out.kept) + sum(out.rejected.values()) == len(out.drawn) <= 60
    # the rejections are right: an unstable draw is counted as such unless it was already invalid
    invalid = sum(not m.valid for m in out.drawn)
    assert out.rejected.get("valid", 0) == invalid
    assert out.rejected.get("stable", 0) == sum(m.valid and not m.mol_stable for m in out.drawn)
    assert out.pass_rate == pytest.approx(out.passed / len(out.drawn))
    d = out.to_dict()
    assert d["kept"] == 4 and d["drawn"] == len(out.drawn) and d["reached"] is True
    assert list(d["rejected"]) == [k for k in ("valid", "stable", "unique", "strain", "surplus") if k in d["rejected"]]


def test_the_first_round_is_plain_sampling_with_the_same_seed(pipe):
    out = sample_passing(pipe, 3, "valid", budget=30, seed=11, steps=STEPS)
    plain = pipe.sample(3, seed=11, steps=STEPS)
    for a, b in zip(out.drawn[:3], plain):
        assert a.symbols == b.symbols
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-5)
    if out.rounds > 1:  # later rounds use other seeds: not a repeat of the first molecules
        assert not np.array_equal(out.drawn[3].positions[:2], out.drawn[0].positions[:2])


def test_the_budget_stops_the_draws_and_says_so(pipe):
    # no molecule relaxes by less than 1e-6 kcal/mol after 10 steps: nothing passes
    out = sample_passing(pipe, 3, Keep((), max_strain=1e-6), budget=7, seed=0, steps=STEPS)
    assert not out.reached and out.kept == [] and len(out.drawn) == 7
    assert sum(out.rejected.values()) == 7
    assert "budget of 7 draws ran out" in out.describe()
    # every valid molecule was relaxed and its strain is above the ceiling
    strained = [p.relaxation.strain for p in out.plausibility.values() if p.relaxation and p.relaxation.strain is not None]
    assert strained and min(strained) > 1e-6


def test_strain_ceiling_keeps_only_molecules_below_it(pipe):
    out = sample_passing(pipe, 3, Keep(("valid",), max_strain=30.0), budget=40, seed=5, steps=20)
    assert out.kept
    for i in out.kept_indices:
        assert out.plausibility[i].relaxation.strain <= 30.0
    above = [i for i, p in out.plausibility.items() if p.relaxation.strain is not None and p.relaxation.strain > 30.0]
    assert all(i not in out.kept_indices for i in above)
    assert out.rejected.get("strain", 0) >= len([i for i in above if out.drawn[i].valid])


def test_posebusters_filter_keeps_molecules_passing_every_check(pipe):
    out = sample_passing(pipe, 2, "valid,posebusters", budget=20, seed=2, steps=20)
    for i in out.kept_indices:
        assert all(out.plausibility[i].checks.values())
    failed = [i for i, p in out.plausibility.items() if p.checks is not None and not all(p.checks.values())]
    assert out.rejected.get("posebusters", 0) == len(failed)


@pytest.mark.parametrize("bad, message", [
    (dict(n=0), "n must be a positive integer"),
    (dict(budget=2), "budget must be an integer >= n"),
    (dict(num_atoms=[5, 6, 7]), "num_atoms must be one integer"),
    (dict(steps=-1), "steps"),
])
def test_bad_arguments_fail_before_any_draw(pipe, bad, message):
    kwargs = dict(n=3, keep="valid", budget=10) | bad
    with pytest.raises(ValueError, match=message):
        sample_passing(pipe, **kwargs)


def test_cli_keep_writes_only_the_kept_molecules_and_reports_every_draw(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sample", "-n", "3", "--steps", str(STEPS), "--keep", "valid,stable", "--budget", "40",
                 "-o", str(out), "--no-novelty", "--seed", "4"]) == 0
    text = capsys.readouterr().out
    m = json.loads((out / "samples.json").read_text())
    f = m["filter"]
    assert f["kept"] == 3 and f["requested"] == 3 and f["keep"] == ["valid", "stable"]
    assert m["n"] == f["drawn"] > 3  # the metrics cover every draw
    assert m["records"] == 3 and m["metrics_over"] == f"all {f['drawn']} drawn samples"
    rows = list(csv.DictReader((out / "samples.csv").open()))
    assert len(rows) == 3 and all(r["valid"] == "1" and r["mol_stable"] == "1" for r in rows)
    sdf = (out / "samples.sdf").read_text()
    assert sdf.count("$$$$") == 3
    assert "kept 3 of 3 requested (valid, stable)" in text and "pass rate" in text


@pytest.mark.parametrize("argv, message", [
    (["--keep", "valid,shiny"], "unknown criterion 'shiny'"),
    (["--keep", "valid", "--budget", "2"], "--budget must be at least -n"),
    (["--budget", "50"], "--budget goes with --keep"),
    (["--max-strain", "-3"], "max_strain must be"),
])
def test_cli_bad_filter_options_are_one_line_errors_and_write_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["sample", "-n", "5", "--steps", "2", "-o", str(out), "--no-novelty", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()
