"""Charge-aware stability (issue 24, part 2): valences allowed per (element, formal charge), an
option beside EDM's neutral rule. Real RDKit molecules (ETKDG 3D, explicit hydrogens), no mocks."""

import json
import subprocess
import sys

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

from moldiff.chemistry.bonds import edm_bond_matrix
from moldiff.chemistry.elements import (
    ALLOWED_VALENCE,
    CHARGED_VALENCE,
    allowed_valences,
    allowed_valences_charged,
)
from moldiff.chemistry.io import read_molecules, write_sdf
from moldiff.chemistry.metrics import (
    ChargedStabilityReport,
    bond_rows_stability,
    charged_stability,
    check_charged_stability,
    check_stability,
    evaluate_charged_stability,
    evaluate_molecules,
    format_table,
    own_bonds_mol_stable,
    own_bonds_result,
)

CHARGED = {
    "nitromethane": "C[N+](=O)[O-]",
    "ammonium": "[NH4+]",
    "methylammonium": "C[NH3+]",
    "acetate": "CC(=O)[O-]",
    "glycine zwitterion": "[NH3+]CC(=O)[O-]",
}


def embedded(smiles: str, seed: int = 42) -> Chem.Mol:
    """RDKit molecule with explicit hydrogens and an ETKDG conformer."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=seed) == 0
    return mol


def parts(mol: Chem.Mol):
    """(symbols, positions, RDKit bond-order matrix, formal charges) of a molecule."""
    symbols = [a.GetSymbol() for a in mol.GetAtoms()]
    positions = mol.GetConformer().GetPositions()
    matrix = np.asarray(Chem.GetAdjacencyMatrix(mol, useBO=True), dtype=np.int64)
    charges = [a.GetFormalCharge() for a in mol.GetAtoms()]
    return symbols, positions, matrix, charges


def rows(matrix: np.ndarray) -> np.ndarray:
    i, j = np.nonzero(np.triu(matrix))
    return np.stack([i, j, matrix[i, j]], axis=1)


# ------------------------------------------------------------------------------------ the table


def test_the_neutral_row_is_edms_table_exactly():
    assert set(CHARGED_VALENCE) == set(ALLOWED_VALENCE)
    for symbol in ALLOWED_VALENCE:
        assert CHARGED_VALENCE[symbol][0] == allowed_valences(symbol)
        assert allowed_valences_charged(symbol, 0) == allowed_valences(symbol)


def test_the_table_covers_the_common_ions():
    for symbol in ("H", "B", "C", "N", "O", "F", "Si", "P", "S", "Cl", "Br", "I"):
        assert symbol in CHARGED_VALENCE
    expected = {("N", 1): {4}, ("N", -1): {2}, ("O", 1): {3}, ("O", -1): {1}, ("C", 1): {3}, ("C", -1): {3},
                ("H", 1): {0}, ("F", -1): {0}, ("P", 1): {4}, ("B", -1): {4}, ("Cl", -1): {0},
                ("Br", -1): {0}, ("I", -1): {0}, ("S", -1): {1, 3}}
    for (symbol, charge), valences in expected.items():
        assert allowed_valences_charged(symbol, charge) == valences, (symbol, charge)
    # Pairs the table does not list allow nothing (MiDi would fall back to the neutral row).
    assert allowed_valences_charged("Cl", 1) == frozenset()
    assert allowed_valences_charged("N", 2) == frozenset()
    assert allowed_valences_charged("Xe", 0) == frozenset()


# ---------------------------------------------------------------------- charged molecules, stable


@pytest.mark.parametrize("name", sorted(CHARGED))
def test_charged_molecules_are_unstable_for_edm_and_stable_with_charges_allowed(name):
    symbols, positions, matrix, charges = parts(embedded(CHARGED[name]))
    assert any(charges)
    # On the molecule's own (RDKit) bonds: EDM's neutral rule fails, the charge-aware rule holds.
    assert not bond_rows_stability(symbols, rows(matrix)).mol_stable
    verdict = charged_stability(symbols, matrix, charges)
    assert verdict.mol_stable and verdict.n_stable_atoms == verdict.n_atoms == len(symbols)
    # Without the charges the same bonds are EDM's verdict again.
    assert not charged_stability(symbols, matrix).mol_stable
    # On EDM's distance-table bonds, where they read the geometry as RDKit's bonds.
    if (edm_bond_matrix(symbols, positions, pair_order="index") == matrix).all():
        assert not check_stability(symbols, positions).mol_stable
        assert check_charged_stability(symbols, positions, charges).mol_stable


@pytest.mark.parametrize("name", ["nitromethane", "ammonium", "methylammonium"])
def test_edm_table_bonds_read_these_ions_so_the_table_route_is_tested(name):
    symbols, positions, matrix, charges = parts(embedded(CHARGED[name]))
    assert (edm_bond_matrix(symbols, positions, pair_order="index") == matrix).all()
    assert not check_stability(symbols, positions).mol_stable
    assert check_charged_stability(symbols, positions, charges).mol_stable


# ------------------------------------------------------------------------- neutral = EDM's rule


def test_neutral_qm9_molecules_get_edms_verdict_atom_by_atom(qm9, split):
    molecules = [qm9.molecule(int(i)) for i in split["test"][:300]]
    edm = [check_stability(s, p) for s, p in molecules]
    assert not all(r.mol_stable for r in edm)  # some EDM-unstable ones, so equality means something
    for (symbols, positions), expected in zip(molecules, edm):
        assert check_charged_stability(symbols, positions) == expected
        assert check_charged_stability(symbols, positions, [0] * len(symbols)) == expected
    report = evaluate_charged_stability(molecules)
    protocol = evaluate_molecules(molecules)
    assert report.mol_stable == protocol.mol_stable and report.atom_stable == protocol.atom_stable
    assert report.n_charged == 0 and report.n_failed == 0 and report.bonds == "EDM table"


@pytest.mark.parametrize("smiles", ["CCO", "c1ccncc1", "CC(=O)NC", "OC(=O)C(F)(F)F"])
def test_neutral_molecules_same_answer_both_ways_on_their_own_bonds(smiles):
    mol = embedded(smiles)
    Chem.Kekulize(mol, clearAromaticFlags=True)
    symbols, _, matrix, charges = parts(mol)
    assert not any(charges)
    edm = bond_rows_stability(symbols, rows(matrix))
    assert edm.mol_stable
    assert charged_stability(symbols, matrix, charges) == edm
    broken = matrix.copy()
    broken[0, 1] = broken[1, 0] = 0  # one bond fewer: unstable both ways
    assert charged_stability(symbols, broken, charges) == bond_rows_stability(symbols, rows(broken))
    assert not charged_stability(symbols, broken, charges).mol_stable


def test_own_bonds_fraction_counts_stable_molecules_and_faults_as_unstable():
    molecules = []
    for smiles in ("CCO", "c1ccncc1", "CC(=O)NC"):
        mol = embedded(smiles)
        Chem.Kekulize(mol, clearAromaticFlags=True)
        symbols, _, matrix, _ = parts(mol)
        molecules.append((symbols, rows(matrix)))
    symbols = [m[0] for m in molecules]
    bonds = [m[1] for m in molecules]
    assert own_bonds_mol_stable(symbols, bonds) == 1.0
    bonds[1] = bonds[1][1:]  # pyridine without one bond: two atoms short of a valence
    assert own_bonds_mol_stable(symbols, bonds) == pytest.approx(2 / 3)
    assert own_bonds_mol_stable(symbols, bonds, [-1, -1, 7]) == pytest.approx(1 / 3)  # a fault is a failure
    assert own_bonds_mol_stable(symbols, []) is None  # a model without bonds
    with pytest.raises(ValueError, match="2 bond arrays for 3 molecules"):
        own_bonds_mol_stable(symbols, bonds[:2])


# ---------------------------------------------------------------------------- wrongly charged


def test_wrongly_charged_atoms_are_unstable():
    symbols, _, matrix, charges = parts(embedded("CN"))  # methylamine: N has three bonds
    n = symbols.index("N")
    plus = list(charges)
    plus[n] = 1  # N+ with valence 3
    verdict = charged_stability(symbols, matrix, plus)
    assert not verdict.mol_stable and verdict.n_stable_atoms == len(symbols) - 1
    symbols, _, matrix, charges = parts(embedded("C[NH3+]"))
    neutral = [0] * len(symbols)  # ammonium N with its charge lost: valence 4, neutral -> EDM's rule
    assert not charged_stability(symbols, matrix, neutral).mol_stable
    symbols, _, matrix, charges = parts(embedded("CO"))  # methanol O with a charge -1: valence 2
    minus = [-1 if s == "O" else 0 for s in symbols]
    assert not charged_stability(symbols, matrix, minus).mol_stable
    symbols, _, matrix, _ = parts(embedded("CCl"))  # Cl+ is not in the table
    assert not charged_stability(symbols, matrix, [1 if s == "Cl" else 0 for s in symbols]).mol_stable
    assert not charged_stability(symbols, matrix, [5 if s == "C" else 0 for s in symbols]).mol_stable


def test_bad_charges_and_bond_matrices_give_one_line_errors():
    symbols, positions, matrix, _ = parts(embedded("CCO"))
    for charges, message in [([0, 1], "one charge per atom"), ([0.5] * len(symbols), "whole numbers")]:
        with pytest.raises(ValueError, match=message) as info:
            charged_stability(symbols, matrix, charges)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="bond_matrix must have shape"):
        charged_stability(symbols, matrix[:3, :3])
    with pytest.raises(ValueError, match="non-negative"):
        charged_stability(symbols, -matrix)
    with pytest.raises(ValueError, match="one charge per atom"):
        check_charged_stability(symbols, positions, [0])


# ---------------------------------------------------------------------------------- set level


def test_set_level_reads_charges_from_sdf_records_triples_and_attributes(tmp_path):
    mols = [embedded(CHARGED["ammonium"]), embedded(CHARGED["methylammonium"]), embedded("CCO")]
    path = tmp_path / "ions.sdf"
    write_sdf(path, mols)
    records = read_molecules(path)
    assert records[0].formal_charges.tolist() == [1, 0, 0, 0, 0]
    report = evaluate_charged_stability(records)
    assert isinstance(report, ChargedStabilityReport)
    assert report.mol_stable == 1.0 and report.n_charged == 2 and report.n_failed == 0
    assert evaluate_molecules([(r.symbols, r.positions) for r in records]).mol_stable == pytest.approx(1 / 3)
    # The same as (symbols, positions, charges) triples; pairs are neutral (EDM's verdict).
    triples = [(r.symbols, r.positions, r.formal_charges) for r in records]
    assert evaluate_charged_stability(triples, workers=2).to_dict() == report.to_dict()
    assert evaluate_charged_stability([(r.symbols, r.positions) for r in records]).mol_stable == pytest.approx(1 / 3)
    # Own bonds: the records' bond blocks; malformed entries count as unstable, never raise.
    own = evaluate_charged_stability(records, own_bonds=True)
    assert own.mol_stable == 1.0 and own.bonds == "own"
    nan = (["C", "H"], np.full((2, 3), np.nan), [0, 0])
    mixed = evaluate_charged_stability([*triples, nan, (["C"], np.zeros((1, 3))), "junk"])
    assert mixed.n == 6 and mixed.mol_stable == pytest.approx(3 / 6) and mixed.n_failed == 3
    with pytest.raises(ValueError, match="no molecules"):
        evaluate_charged_stability([])


def test_own_bonds_result_carries_the_charge_aware_verdict():
    symbols, positions, matrix, charges = parts(embedded(CHARGED["glycine zwitterion"]))
    own = own_bonds_result(symbols, positions, rows(matrix), charges)
    assert own.valid and not own.mol_stable and own.mol_stable_charged
    neutral = own_bonds_result(*parts(embedded("CCO"))[:2], rows(parts(embedded("CCO"))[2]))
    assert neutral.mol_stable and neutral.mol_stable_charged


def test_format_table_adds_the_rows_only_when_asked(qm9, split):
    molecules = [qm9.molecule(int(i)) for i in split["test"][:5]]
    report = evaluate_molecules(molecules)
    plain = format_table(report)
    assert "charges allowed" not in plain
    table = format_table(report, charged=evaluate_charged_stability(molecules))
    lines = [line.split("  ")[0].strip() for line in table.splitlines()]
    at = lines.index("molecule stable")
    assert lines[at + 1 : at + 3] == ["atom stable (charges allowed)", "molecule stable (charges allowed)"]
    def words(text: str) -> list[str]:
        return [" ".join(line.split()) for line in text.splitlines() if line.strip("-")]

    assert [w for w in words(table) if "charges allowed" not in w] == words(plain)


# ---------------------------------------------------------------------------------------- CLI


def test_cli_evaluate_charged_stability_writes_the_new_keys(tmp_path):
    mols = [embedded("CCO"), embedded(CHARGED["nitromethane"]), embedded(CHARGED["ammonium"]),
            embedded(CHARGED["glycine zwitterion"])]
    sdf = tmp_path / "some.sdf"
    write_sdf(sdf, mols)
    out, csv = tmp_path / "m.json", tmp_path / "m.csv"
    r = subprocess.run([sys.executable, "-m", "moldiff.cli", "evaluate", str(sdf), "--charged-stability",
                        "--no-novelty", "--json", str(out), "--csv", str(csv)],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert "molecule stable (charges allowed)" in r.stdout and "molecule stable " in r.stdout
    m = json.loads(out.read_text())
    keys = list(m)
    assert keys[keys.index("mol_stable") + 1 : keys.index("mol_stable") + 3] == ["atom_stable_charged",
                                                                                 "mol_stable_charged"]
    # EDM's numbers as without the option; ethanol is the one EDM-stable molecule.
    assert m["mol_stable"] == 0.25
    # Table bonds: nitromethane and ammonium (seed 42) read right; the zwitterion's carboxylate C-O
    # lengths fall between EDM's single and double thresholds, so it stays unstable there.
    assert m["mol_stable_charged"] == 0.75 and m["atom_stable_charged"] > m["atom_stable"]
    info = m["charged_stability"]
    assert info["bonds"] == "EDM table" and info["n_with_charges"] == 3 and "file" in info["charges"]
    # The file's own bonds and charges: all four stable with charges allowed.
    assert m["own_bonds"]["mol_stable"] == 0.25 and m["own_bonds"]["mol_stable_charged"] == 1.0
    header = csv.read_text().splitlines()[0].split(",")
    assert header.index("mol_stable_charged") == header.index("mol_stable") + 1


def test_cli_evaluate_without_the_option_is_unchanged(tmp_path, capsys):
    from moldiff.cli import main

    sdf = tmp_path / "one.sdf"
    write_sdf(sdf, [embedded(CHARGED["ammonium"]), embedded("CCO")])
    assert main(["evaluate", str(sdf), "--no-novelty", "--json", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert not any("charged" in key for key in m) and "mol_stable_charged" not in m["own_bonds"]
    assert "charges allowed" not in capsys.readouterr().out


def test_cli_sample_reports_charged_stability_for_a_charge_generating_model(tmp_path):
    """A categorical model generates formal charges: ``moldiff sample`` reports the charge-aware
    stability by itself (table bonds and the model's own bonds), equal to scoring the same molecules
    directly, and a per-molecule CSV column."""
    import csv as csvmod

    from moldiff.cli import main
    from test_categorical import categorical_pipeline

    pipe = categorical_pipeline(seed=6)
    mols = pipe.sample(6, steps=3, seed=0, num_atoms=4)
    assert all(m.formal_charges is not None for m in mols)
    expected = evaluate_charged_stability(mols)
    expected_own = evaluate_charged_stability(mols, own_bonds=True)
    ckpt = pipe.save_pretrained(tmp_path / "cat")
    assert main(["sample", "--checkpoint", str(ckpt), "-n", "6", "--steps", "3", "--num-atoms", "4", "--seed", "0",
                 "-o", str(tmp_path / "out"), "--threads", "1", "--no-novelty"]) == 0
    summary = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert summary["mol_stable_charged"] == pytest.approx(expected.mol_stable)
    assert summary["atom_stable_charged"] == pytest.approx(expected.atom_stable)
    assert summary["own_bonds"]["mol_stable_charged"] == pytest.approx(expected_own.mol_stable)
    assert summary["charged_stability"]["charges"] == "generated by the model"
    with open(tmp_path / "out" / "samples.csv", newline="") as fh:
        rows = list(csvmod.DictReader(fh))
    assert [int(r["mol_stable_charged"]) for r in rows] == [int(r.mol_stable) for r in expected.per_molecule]


def test_cli_sample_charged_stability_of_a_neutral_model_is_edms(tmp_path):
    """Neutral atoms have EDM's valences in the charge-aware table, so for a model that generates no
    charges ``--charged-stability`` must reproduce EDM's numbers exactly."""
    from moldiff.cli import main

    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", "qm9", "-n", "40", "--steps", "8", "--seed", "3", "-o", str(out),
                 "--threads", "1", "--no-novelty", "--charged-stability"]) == 0
    summary = json.loads((out / "samples.json").read_text())
    assert summary["charged_stability"]["n_with_charges"] == 0
    assert summary["mol_stable_charged"] == summary["mol_stable"]
    assert summary["atom_stable_charged"] == pytest.approx(summary["atom_stable"])
    assert main(["sample", "--checkpoint", "qm9", "-n", "40", "--steps", "8", "--seed", "3", "-o", str(tmp_path / "plain"),
                 "--threads", "1", "--no-novelty"]) == 0
    assert "mol_stable_charged" not in json.loads((tmp_path / "plain" / "samples.json").read_text())
