"""Physical plausibility of 3D molecules: PoseBusters checks, force-field relaxation and strain, and
the ``--posebusters`` / ``--relax`` options of ``moldiff evaluate`` and ``moldiff sample``."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem, rdMolTransforms
from rdkit.Geometry import Point3D

from moldiff.chemistry.io import read_molecules, write_sdf
from moldiff.chemistry.plausibility import (
    CHECKS_EXTRA,
    assess_plausibility,
    format_plausibility,
    relax,
    summarize_plausibility,
)
from moldiff.chemistry.report import assess_sample
from moldiff.cli import main


@pytest.fixture(scope="module")
def test_pairs(qm9, split):
    """The first three QM9 test molecules as (symbols, positions)."""
    return [qm9.molecule(int(i)) for i in split["test"][:3]]


@pytest.fixture(scope="module")
def qm9_mol(test_pairs):
    """A QM9 test molecule (CCCC(O)C(C)(C)C) as the RDKit molecule sampling builds, hydrogens explicit."""
    chem = assess_sample(*test_pairs[0])
    assert chem.bonds == "rdDetermineBonds"
    return chem.mol


def _embedded(smiles: str, seed: int = 0) -> Chem.Mol:
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=seed) == 0
    return mol


def _move_atom(mol: Chem.Mol, atom: int, towards: int, distance: float) -> Chem.Mol:
    """Copy of ``mol`` with ``atom`` put ``distance`` Å from ``towards`` along their current direction."""
    out = Chem.Mol(mol)
    conf = out.GetConformer()
    p = conf.GetPositions()
    d = p[atom] - p[towards]
    conf.SetAtomPosition(atom, Point3D(*(p[towards] + distance * d / np.linalg.norm(d))))
    return out


# ---------------------------------------------------------------------------------- PoseBusters


def test_a_qm9_molecule_passes_every_check(qm9_mol):
    pytest.importorskip("posebusters")
    from moldiff.chemistry.plausibility import posebusters_checks

    checks = posebusters_checks(qm9_mol)
    assert {"bond_lengths", "bond_angles", "internal_steric_clash", "internal_energy"} <= set(checks)
    assert all(checks.values()), checks


def test_a_bond_stretched_to_2_5_angstrom_fails_the_bond_length_check(qm9_mol):
    pytest.importorskip("posebusters")
    from moldiff.chemistry.plausibility import posebusters_checks

    bond = next(b for b in qm9_mol.GetBonds() if b.GetBeginAtom().GetAtomicNum() > 1 and b.GetEndAtom().GetAtomicNum() > 1)
    stretched = Chem.Mol(qm9_mol)
    rdMolTransforms.SetBondLength(stretched.GetConformer(), bond.GetBeginAtomIdx(), bond.GetEndAtomIdx(), 2.5)
    assert not posebusters_checks(stretched)["bond_lengths"]


def test_two_atoms_half_an_angstrom_apart_fail_the_clash_check():
    pytest.importorskip("posebusters")
    from moldiff.chemistry.plausibility import posebusters_checks

    mol = _embedded("OCCCCO")
    assert AllChem.MMFFOptimizeMolecule(mol) == 0
    assert all(posebusters_checks(mol).values())
    clashed = _move_atom(mol, 5, 0, 0.5)  # the two oxygens, five bonds apart
    assert np.linalg.norm(clashed.GetConformer().GetPositions()[5] - clashed.GetConformer().GetPositions()[0]) == pytest.approx(0.5)
    assert not posebusters_checks(clashed)["internal_steric_clash"]


def test_pass_rates_per_check_and_all_together(qm9_mol):
    pytest.importorskip("posebusters")
    bad = Chem.Mol(qm9_mol)
    rdMolTransforms.SetBondLength(bad.GetConformer(), 0, 1, 2.5)
    results = assess_plausibility([(0, qm9_mol), (7, bad)], checks=True)
    summary = summarize_plausibility(results, checks=True, forcefield=None)["posebusters"]
    assert summary["n"] == 2 and summary["all"] == 0.5
    assert summary["checks"]["bond_lengths"] == 0.5 and summary["checks"]["sanitization"] == 1.0
    assert results[1].index == 7 and results[1].row()["pb_all"] == 0
    assert "all checks" in format_plausibility({"posebusters": summary})


# ---------------------------------------------------------------------------------- relaxation


def test_relaxation_lowers_the_mmff_energy_and_strain_is_not_negative(qm9_mol):
    result = relax(qm9_mol, "mmff")
    assert result.mol is not None and not result.untyped and result.error is None
    assert result.energy_relaxed < result.energy_raw
    assert result.strain == pytest.approx(result.energy_raw - result.energy_relaxed) and result.strain >= 0
    assert 0 < result.rmsd < 0.5  # a QM9 (DFT) geometry is already near an MMFF minimum
    # the input is untouched; the relaxed copy keeps atom order
    assert np.allclose(qm9_mol.GetConformer().GetPositions(), Chem.Mol(qm9_mol).GetConformer().GetPositions())
    assert [a.GetSymbol() for a in result.mol.GetAtoms()] == [a.GetSymbol() for a in qm9_mol.GetAtoms()]


def test_a_distorted_molecule_has_large_strain_and_moves(qm9_mol):
    distorted = Chem.Mol(qm9_mol)
    rdMolTransforms.SetBondLength(distorted.GetConformer(), 0, 1, 2.0)
    raw, bent = relax(qm9_mol, "uff"), relax(distorted, "uff")
    assert bent.strain > raw.strain + 10 and bent.rmsd > raw.rmsd


def test_a_molecule_mmff_cannot_type_is_counted_and_named(qm9_mol):
    borane = _embedded("CB(C)C")  # MMFF94 has no boron types; UFF does
    results = assess_plausibility([(0, qm9_mol), (3, borane)], forcefield="mmff")
    assert results[1].relaxation.untyped and results[1].relaxation.mol is None
    summary = summarize_plausibility(results, checks=False, forcefield="mmff")["relax"]
    assert summary["n"] == 2 and summary["n_relaxed"] == 1
    assert summary["n_untyped"] == 1 and summary["untyped"] == [3]
    assert "1 not typed by MMFF94: #3" in format_plausibility({"relax": summary})
    assert relax(borane, "uff").mol is not None


def test_workers_give_the_serial_results(test_pairs):
    items = list(enumerate(test_pairs))
    serial = assess_plausibility(items, forcefield="mmff")
    parallel = assess_plausibility(items, forcefield="mmff", workers=2)
    assert [r.index for r in parallel] == [0, 1, 2]
    assert [r.relaxation.strain for r in parallel] == pytest.approx([r.relaxation.strain for r in serial])


# ---------------------------------------------------------------------------------- CLI


def run(*args):
    return subprocess.run([sys.executable, "-m", "moldiff.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_evaluate_relax_mmff_end_to_end(tmp_path, test_pairs):
    sdf = tmp_path / "x.sdf"
    write_sdf(sdf, test_pairs)
    out, table = tmp_path / "m.json", tmp_path / "m.csv"
    r = run("evaluate", str(sdf), "--relax", "mmff", "--no-novelty", "--json", str(out), "--csv", str(table),
            "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "molecule stable" in r.stdout and "relaxation (MMFF94) of 3 valid molecules: 3 relaxed" in r.stdout
    m = json.loads(out.read_text())
    assert m["validity"] == 1.0  # raw metrics stay as they were
    rx = m["relax"]
    assert rx["n_relaxed"] == 3 and rx["n_untyped"] == 0 and rx["failed"] == []
    assert rx["strain_kcal_mol"]["mean"] >= 0 and rx["rmsd_heavy"]["max"] < 0.5
    relaxed = read_molecules(tmp_path / "x_relaxed.sdf")
    assert len(relaxed) == 3 and [rec.properties["index"] for rec in relaxed] == [0, 1, 2]
    assert all(rec.properties["strain_kcal_mol"] >= 0 for rec in relaxed)
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 3 and all(float(row["relax_strain"]) >= 0 for row in rows)


def test_cli_evaluate_posebusters_reports_pass_rates(tmp_path, test_pairs):
    pytest.importorskip("posebusters")
    sdf = tmp_path / "x.sdf"
    write_sdf(sdf, test_pairs[:2])
    out, table = tmp_path / "m.json", tmp_path / "m.csv"
    r = run("evaluate", str(sdf), "--posebusters", "--no-novelty", "--json", str(out), "--csv", str(table))
    assert r.returncode == 0, r.stderr
    assert "PoseBusters (mol checks) on 2 valid molecules" in r.stdout and "all checks" in r.stdout
    pb = json.loads(out.read_text())["posebusters"]
    assert pb["all"] == 1.0 and pb["checks"]["internal_steric_clash"] == 1.0
    assert [row["pb_all"] for row in csv.DictReader(table.open())] == ["1", "1"]


@pytest.mark.parametrize("command", ["evaluate", "sample"])
def test_cli_posebusters_without_the_extra_is_a_one_line_error(command, tmp_path, test_pairs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "posebusters", None)  # `import posebusters` now raises ImportError
    sdf = tmp_path / "x.sdf"
    write_sdf(sdf, test_pairs[:1])
    before = sorted(tmp_path.iterdir())
    if command == "evaluate":
        argv = ["evaluate", str(sdf), "--posebusters", "--relax", "mmff", "--no-novelty", "--json", str(tmp_path / "m.json")]
    else:
        argv = ["sample", "-n", "2", "--steps", "2", "--posebusters", "-o", str(tmp_path / "out"), "--no-novelty"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moldiff: error:") and CHECKS_EXTRA in err[0]
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_cli_sample_relax_writes_the_relaxed_sdf_with_the_others(tmp_path):
    from test_sample import tiny_pipeline  # an untrained model: few or no valid molecules, but every file

    checkpoint = tiny_pipeline().save_pretrained(tmp_path / "tiny")
    out = tmp_path / "out"
    r = run("sample", "-n", "3", "--steps", "2", "--checkpoint", str(checkpoint), "-o", str(out), "--no-novelty",
            "--relax", "uff", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"samples{s}" for s in (".csv", ".json", ".png", ".sdf", "_relaxed.sdf")]
    m = json.loads((out / "samples.json").read_text())
    assert m["relax"]["forcefield"] == "UFF" and m["relax"]["n"] == m["n_valid"]
    assert m["relaxed_records"] == m["relax"]["n_relaxed"]
    assert "relaxation (UFF)" in r.stdout and "samples_relaxed.sdf" in r.stdout


# ------------------------------------------------------------------ the internal-energy ensemble size


def test_a_smaller_energy_ensemble_gives_the_same_verdicts_and_zero_leaves_the_energy_check_out(qm9_mol):
    pytest.importorskip("posebusters")
    from moldiff.chemistry.plausibility import ENERGY_CONFORMERS, posebusters_checks

    clashed = _move_atom(qm9_mol, 1, 3, 0.3)  # a carbon 0.3 Å from a non-bonded atom: fails clash and energy
    for mol in (qm9_mol, clashed):
        full = posebusters_checks(mol)
        assert posebusters_checks(mol, ENERGY_CONFORMERS) == full
        assert posebusters_checks(mol, 8) == full  # the ratio threshold (100) is far from either molecule
        without = posebusters_checks(mol, 0)
        assert "internal_energy" not in without
        assert without == {k: v for k, v in full.items() if k != "internal_energy"}
    assert posebusters_checks(qm9_mol, 8)["internal_energy"] and not posebusters_checks(clashed, 8)["internal_energy"]
    summary = summarize_plausibility(assess_plausibility([(0, qm9_mol)], checks=True, energy_conformers=0),
                                     checks=True, forcefield=None, energy_conformers=0)
    assert summary["posebusters"]["energy_conformers"] == 0 and summary["posebusters"]["all"] == 1.0
    assert "internal energy not checked" in format_plausibility(summary)


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_a_bad_energy_ensemble_size_is_refused(qm9_mol, bad):
    with pytest.raises(ValueError, match="energy_conformers"):
        assess_plausibility([(0, qm9_mol)], checks=False, energy_conformers=bad)


def test_cli_pb_conformers_below_zero_is_a_one_line_error(tmp_path, test_pairs, capsys):
    sdf = tmp_path / "x.sdf"
    write_sdf(sdf, test_pairs[:1])
    assert main(["evaluate", str(sdf), "--pb-conformers", "-1", "--no-novelty"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pb-conformers" in err[0]
