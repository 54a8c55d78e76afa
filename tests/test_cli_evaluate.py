"""`moldiff evaluate` and `moldiff data` run as a user runs them: subprocesses."""

import json
import subprocess
import sys

import numpy as np
import pytest

from moldiff.chemistry.io import write_sdf, write_xyz


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "moldiff.cli", *args], capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def five_test_molecules(qm9, split):
    return [qm9.molecule(int(i)) for i in split["test"][:5]]


def test_evaluate_sdf_writes_json(tmp_path, five_test_molecules):
    sdf = tmp_path / "m.sdf"
    write_sdf(sdf, five_test_molecules)
    out = tmp_path / "metrics.json"
    r = run("evaluate", str(sdf), "--json", str(out), "--no-novelty")
    assert r.returncode == 0, r.stderr
    assert "molecule stable" in r.stdout
    m = json.loads(out.read_text())
    assert m["n"] == 5
    for key in ("atom_stable", "mol_stable", "validity", "uniqueness", "valid_and_unique"):
        assert 0.0 <= m[key] <= 1.0
    assert m["validity"] == 1.0  # the first five test molecules are all valid under the protocol


def test_evaluate_xyz_with_a_broken_frame_counts_it(tmp_path, five_test_molecules):
    xyz = tmp_path / "m.xyz"
    write_xyz(xyz, five_test_molecules[:2])
    xyz.write_text(xyz.read_text() + "3\nbroken\nC 0 0 0\nH 1 oops 0\nH 0 1 0\n")
    out = tmp_path / "m.json"
    r = run("evaluate", str(xyz), "--json", str(out), "--no-novelty")
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())
    assert m["n"] == 3 and m["n_unreadable"] == 1
    assert m["validity"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "content, name",
    [("", "empty.sdf"), ("this is not a molecule\n", "junk.xyz"), (None, "missing.sdf"), ("x", "data.pdbqt")],
)
def test_evaluate_bad_files_give_one_line_errors(tmp_path, content, name):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    r = run("evaluate", str(path), "--no-novelty")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moldiff: error:")


def test_evaluate_nan_coordinates_counted_invalid(tmp_path):
    xyz = tmp_path / "nan.xyz"
    xyz.write_text("3\nwater\nO 0 0 0\nH 0.96 0 0\nH nan 0.9 0\n3\nwater\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n")
    out = tmp_path / "o.json"
    r = run("evaluate", str(xyz), "--json", str(out), "--no-novelty")
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())
    assert m["n"] == 2 and m["validity"] == pytest.approx(0.5)


def test_evaluate_dataset_prints_the_data_row():
    r = run("evaluate", "--dataset", "qm9:test", "--no-novelty")
    assert r.returncode == 0, r.stderr
    assert "99.34%" in r.stdout and "95.22%" in r.stdout and "97.74%" in r.stdout
    assert "0.00% with an odd valence sum" in r.stdout  # every QM9 molecule is closed-shell


def test_evaluate_reports_geometry_and_composition_diagnostics(tmp_path):
    """Methane, a methyl radical (odd valence sum) and two far-apart waters (two pieces)."""
    tetra = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / np.sqrt(3)
    ch4 = ["C", "H", "H", "H", "H"], np.vstack([np.zeros(3), 1.09 * tetra])
    ch3 = ch4[0][:-1], ch4[1][:-1]
    water = np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    two_waters = ["O", "H", "H"] * 2, np.vstack([water, water + 10.0])
    xyz = tmp_path / "set.xyz"
    write_xyz(xyz, [ch4, ch3, two_waters])
    out = tmp_path / "d.json"
    r = run("evaluate", str(xyz), "--json", str(out), "--no-novelty")
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())["diagnostics"]
    assert d["odd_valence"] == pytest.approx(1 / 3)
    assert d["one_piece"] == pytest.approx(2 / 3) and d["mean_fragments"] == pytest.approx(4 / 3)
    assert d["close_contact"] == 0.0 and d["planar_six_ring"] == 0.0
    assert "33.33% with an odd valence sum" in r.stdout


def test_evaluate_subsample_scores_a_seeded_random_subset(tmp_path, qm9, split):
    rows = {}
    for seed in (1, 1, 2):
        table = tmp_path / f"s{seed}.csv"
        r = run("evaluate", "--dataset", "qm9:test", "--subsample", "6", "--seed", str(seed), "--no-novelty",
                "--csv", str(table), "--json", str(tmp_path / "m.json"))
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / "m.json").read_text())["n"] == 6
        picked = [int(line.split(",")[0]) for line in table.read_text().splitlines()[1:]]
        assert picked == sorted(picked) and len(set(picked)) == 6 and max(picked) < len(split["test"])
        rows.setdefault(seed, []).append(picked)
    assert rows[1][0] == rows[1][1] and rows[1][0] != rows[2][0]  # same seed, same subset
    r = run("evaluate", "--dataset", "qm9:test", "--subsample", "0")
    assert r.returncode == 2 and "--subsample must be a positive" in r.stderr


def test_evaluate_unknown_split_is_an_error():
    r = run("evaluate", "--dataset", "qm9:everything")
    assert r.returncode == 2 and "unknown split" in r.stderr


def test_data_summary():
    r = run("data", "qm9")
    assert r.returncode == 0, r.stderr
    assert "train 100000, valid 17748, test 13083" in r.stdout
    spread = float(r.stdout.split("coordinate spread of the training molecules: ")[1].split(" Å")[0])
    assert 1.2 < spread < 1.6  # QM9's small molecules: about 1.4 Å per coordinate about the centroid


def test_evaluate_reports_the_files_own_bonds_next_to_the_edm_protocol(tmp_path, capsys):
    """An SDF's bond block and formal charges are judged too: a real molecule is stable and valid
    under its own bonds; the same molecule with one C-H bond deleted from the block is not stable."""
    import json

    from rdkit import Chem
    from rdkit.Chem import AllChem

    from moldiff.chemistry.io import read_molecules, write_sdf
    from moldiff.cli import main

    ethanol = Chem.AddHs(Chem.MolFromSmiles("CCO"))
    AllChem.EmbedMolecule(ethanol, randomSeed=1)
    broken = Chem.RWMol(ethanol)
    h = next(a.GetIdx() for a in broken.GetAtoms() if a.GetSymbol() == "H")
    heavy = broken.GetAtomWithIdx(h).GetNeighbors()[0].GetIdx()
    broken.RemoveBond(h, heavy)
    path = tmp_path / "two.sdf"
    write_sdf(path, [ethanol, broken.GetMol()])
    records = read_molecules(path)
    assert [len(r.bonds) for r in records] == [8, 7] and records[0].formal_charges.tolist() == [0] * 9
    assert main(["evaluate", str(path), "--no-novelty", "--json", str(tmp_path / "m.json")]) == 0
    own = json.loads((tmp_path / "m.json").read_text())["own_bonds"]
    assert own["n"] == 2 and own["with_bonds"] == 2 and own["mol_stable"] == 0.5
    assert "with the file's own bonds" in capsys.readouterr().out
