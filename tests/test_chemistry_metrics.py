"""EDM protocol: stability, validity, uniqueness, novelty, and robustness to bad input."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from rdkit import Chem, rdBase
from rdkit.Chem import AllChem

from moldiff.chemistry import (
    MoleculeResult,
    build_mol,
    check_stability,
    edm_bond_matrix,
    edm_bond_order,
    edm_mol,
    evaluate_molecule,
    evaluate_molecules,
    format_table,
    mol_to_smiles_edm,
    reference_smiles,
    reference_smiles_set,
    summarize,
    validity_smiles,
)
from moldiff.chemistry.elements import SYMBOL_TO_Z, allowed_valences


def embedded(smiles: str, seed: int = 42) -> tuple[tuple[str, ...], np.ndarray]:
    """(symbols, positions Å) of an ETKDG + MMFF geometry with a fixed seed."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=seed) == 0
    AllChem.MMFFOptimizeMolecule(mol)
    return tuple(a.GetSymbol() for a in mol.GetAtoms()), mol.GetConformer().GetPositions()


def hexagon_ring(sides: tuple[float, float], ch: float = 1.084) -> tuple[tuple[str, ...], np.ndarray]:
    """Planar C6H6 whose ring sides alternate between two lengths (Å), 120° angles, radial C-H."""
    steps = [sides[k % 2] * np.array([np.cos(np.pi / 3 * k), np.sin(np.pi / 3 * k), 0.0]) for k in range(6)]
    carbons = np.cumsum([np.zeros(3)] + steps[:-1], axis=0)
    carbons -= carbons.mean(axis=0)
    radial = carbons / np.linalg.norm(carbons, axis=1, keepdims=True)
    return ("C",) * 6 + ("H",) * 6, np.vstack([carbons, carbons + ch * radial])


def ammonium_without_charge() -> tuple[tuple[str, ...], np.ndarray]:
    """N with four H at 1.03 Å: N's bond-order sum is 4, so RDKit sanitization fails."""
    tetrahedron = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / np.sqrt(3)
    return ("N", "H", "H", "H", "H"), np.vstack([np.zeros(3), 1.03 * tetrahedron])


def edm_literal(symbols, positions):
    """EDM's steps written out naively (pair loops, scalar bond orders) as an oracle."""
    n = len(symbols)
    distance = lambda i, j: float(np.linalg.norm(positions[i] - positions[j]))  # noqa: E731
    valence = np.zeros(n, dtype=int)
    for i in range(n):
        for j in range(i + 1, n):
            order = edm_bond_order(symbols[i], symbols[j], distance(i, j))
            valence[i] += order
            valence[j] += order
    n_stable = sum(int(v) in allowed_valences(s) for s, v in zip(symbols, valence))
    mol = Chem.RWMol()
    for symbol in symbols:
        mol.AddAtom(Chem.Atom(symbol))
    kinds = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}
    for i in range(n):
        for j in range(i):
            first, second = sorted((symbols[i], symbols[j]), key=SYMBOL_TO_Z.__getitem__)
            order = edm_bond_order(first, second, distance(i, j))
            if order:
                mol.AddBond(i, j, kinds[order])
    smiles = mol_to_smiles_edm(mol)
    if smiles is not None:
        fragments = Chem.GetMolFrags(mol, asMols=True)
        smiles = mol_to_smiles_edm(max(fragments, key=lambda m: m.GetNumAtoms()))
    return n_stable == n, n_stable, smiles


# ---------------------------------------------------------------------------- golden molecules

GOLDEN_SMILES = {
    "O": "[H]O[H]",
    "C": "[H]C([H])([H])[H]",
    "CCO": "[H]OC([H])([H])C([H])([H])[H]",
    "CC#N": "[H]C([H])([H])C#N",
}


@pytest.mark.parametrize(("smiles", "expected"), GOLDEN_SMILES.items())
def test_golden_molecules_are_stable_and_valid(smiles, expected):
    symbols, positions = embedded(smiles)
    result = evaluate_molecule(symbols, positions)
    assert result == MoleculeResult(expected, True, True, len(symbols), len(symbols), None)
    assert check_stability(symbols, positions).mol_stable
    assert validity_smiles(symbols, positions) == reference_smiles(symbols, positions) == expected


def test_benzene_at_real_geometry_is_valid_but_unstable():
    # C-C 1.397 Å is single by the tables: each C has bond-order sum 3, so all 6 carbons are
    # unstable (the 6 H are fine). RDKit then gives each C an implicit H: the SMILES reads as
    # cyclohexane written with its six explicit hydrogens.
    symbols, positions = hexagon_ring((1.397, 1.397))
    result = evaluate_molecule(symbols, positions)
    assert (result.valid, result.mol_stable, result.n_stable_atoms, result.n_atoms) == (True, False, 6, 12)
    assert result.smiles == "[H]C1C([H])C([H])C([H])C([H])C1[H]"
    assert "C0 (bond-order sum 3, allowed 4)" in result.reason


def test_kekule_benzene_is_stable_and_aromatic_after_sanitization():
    result = evaluate_molecule(*hexagon_ring((1.34, 1.46)))
    assert (result.valid, result.mol_stable, result.n_stable_atoms) == (True, True, 12)
    assert result.smiles == "[H]c1c([H])c([H])c([H])c([H])c1[H]"


def test_edm_atoms_take_implicit_hydrogens_unlike_build_mol():
    # Planar CH3: EDM's plain Chem.Atom gets an implicit H (methane in SMILES); build_mol's
    # NoImplicit atoms keep the radical. The EDM flavour is the one metrics must use.
    angles = np.arange(3) * 2 * np.pi / 3
    positions = np.vstack([np.zeros(3), 1.08 * np.stack([np.cos(angles), np.sin(angles), 0 * angles], 1)])
    symbols = ("C", "H", "H", "H")
    assert mol_to_smiles_edm(edm_mol(symbols, positions)) == "[H]C([H])[H]"
    strict = build_mol(symbols, positions, edm_bond_matrix(symbols, positions))
    assert mol_to_smiles_edm(strict) == "[H][C]([H])[H]"


# ------------------------------------------------------------------------------ known failures


def test_stretched_ch_bond_makes_that_c_and_h_unstable():
    symbols, positions = embedded("C")
    assert symbols[0] == "C"
    direction = positions[1] - positions[0]
    positions = positions.copy()
    positions[1] = positions[0] + 2.0 * direction / np.linalg.norm(direction)
    result = evaluate_molecule(symbols, positions)
    assert (result.mol_stable, result.n_stable_atoms, result.n_atoms) == (False, 3, 5)
    assert "C0 (bond-order sum 3" in result.reason and "H1 (bond-order sum 0" in result.reason
    # Still valid: the CH3 fragment (plus an implicit H) is the largest fragment.
    assert result.valid and result.smiles == "[H]C([H])[H]"


def test_disconnected_molecules_give_the_largest_fragment():
    ethanol, ethanol_pos = embedded("CCO")
    water, water_pos = embedded("O")
    symbols = water + ethanol  # water first: the largest fragment need not come first
    positions = np.vstack([water_pos + [8.0, 0, 0], ethanol_pos])
    result = evaluate_molecule(symbols, positions)
    assert result.valid and result.mol_stable
    assert result.smiles == GOLDEN_SMILES["CCO"]
    # The novelty reference keeps the whole molecule.
    assert reference_smiles(symbols, positions) == "[H]OC([H])([H])C([H])([H])[H].[H]O[H]"


def test_over_bonded_nitrogen_is_invalid_with_rdkits_reason():
    result = evaluate_molecule(*ammonium_without_charge())
    assert not result.valid and result.smiles is None and not result.mol_stable
    assert result.n_stable_atoms == 4  # the four H are fine
    assert result.reason.startswith("invalid: ") and "valence" in result.reason
    assert reference_smiles(*ammonium_without_charge()) is None


@pytest.mark.parametrize("seed", range(4))
def test_fast_path_matches_literal_edm_steps_on_distorted_molecules(seed):
    rng = np.random.default_rng(seed)
    with rdBase.BlockLogs():
        for smiles in ["CCO", "CC#N", "c1ccncc1", "OC1CC1C=O", "FC(F)C#C"]:
            symbols, positions = embedded(smiles, seed=seed)
            distorted = positions + rng.normal(scale=0.12, size=positions.shape)
            order = rng.permutation(len(symbols))
            symbols, distorted = tuple(np.array(symbols)[order]), distorted[order]
            result = evaluate_molecule(symbols, distorted)
            assert (result.mol_stable, result.n_stable_atoms, result.smiles) == edm_literal(symbols, distorted)


# ---------------------------------------------------------------------------- set-level metrics


def molecule_set():
    water, methane, ethanol = embedded("O"), embedded("C"), embedded("CCO")
    nan_water = (water[0], np.full((3, 3), np.nan))
    return [water, water, methane, ethanol, ammonium_without_charge(), nan_water]


def test_set_metrics_arithmetic_with_duplicates_and_reference():
    report = evaluate_molecules(molecule_set(), reference=[GOLDEN_SMILES["O"], "CCC"])
    assert (report.n, report.n_valid, report.n_unique, report.n_novel) == (6, 4, 3, 2)
    assert report.validity == pytest.approx(4 / 6)
    assert report.uniqueness == pytest.approx(3 / 4)
    assert report.valid_and_unique == pytest.approx(3 / 6)
    assert report.novelty == pytest.approx(2 / 3)  # methane and ethanol are not in the reference
    assert report.mol_stable == pytest.approx(4 / 6)
    # Atoms are pooled: (3 + 3 + 5 + 9 + 4 + 0) stable of (3 + 3 + 5 + 9 + 5 + 3).
    assert report.atom_stable == pytest.approx(24 / 28)
    assert [r.valid for r in report.per_molecule] == [True, True, True, True, False, False]


def test_novelty_is_none_without_reference_and_report_is_json_ready():
    report = evaluate_molecules(molecule_set())
    assert report.novelty is None and report.n_novel is None
    data = json.loads(json.dumps(report.to_dict()))
    assert data["validity"] == pytest.approx(4 / 6)
    assert len(data["per_molecule"]) == 6 and data["per_molecule"][5]["reason"].startswith("malformed")
    assert "per_molecule" not in report.to_dict(per_molecule=False)


def test_nothing_valid_gives_zero_uniqueness_like_edm():
    report = summarize([MoleculeResult(None, False, False, 0, 3, "x")], reference=set())
    assert (report.validity, report.uniqueness, report.novelty) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        summarize([])


def test_reference_smiles_set_deduplicates_and_skips_failures():
    molecules = [embedded("O"), embedded("O"), ammonium_without_charge(), embedded("C")]
    assert reference_smiles_set(molecules) == {GOLDEN_SMILES["O"], GOLDEN_SMILES["C"]}


def test_format_table_shows_percentages():
    table = format_table(evaluate_molecules(molecule_set(), reference=[]))
    assert "66.67%" in table and "75.00%" in table and "100.00%" in table
    assert "n/a" in format_table(evaluate_molecules(molecule_set()))


def test_workers_give_the_same_report():
    molecules = molecule_set()
    assert evaluate_molecules(molecules, workers=2) == evaluate_molecules(molecules)


# --------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("molecule", "n_atoms", "words"),
    [
        ((("C", "H"), np.array([[0.0, 0, 0], [np.nan, 0, 0]])), 2, "non-finite"),
        ((("C", "H"), np.array([[0.0, 0, 0], [np.inf, 0, 0]])), 2, "non-finite"),
        ((("C",), np.zeros((1, 3))), 1, "1 atom"),
        (((), np.zeros((0, 3))), 0, "0 atom"),
        ((("C", "Xx"), np.eye(2, 3)), 2, "unknown element 'Xx'"),
        (([6, 200], np.eye(2, 3)), 2, "unknown element 200"),
        ((("C", "H"), np.zeros((3, 3))), 2, "shape"),
        ((("C", "H"), [["a", "b", "c"], [0, 0, 0]]), 2, "not numeric"),
        ("not a pair", 0, "pair"),
    ],
)
def test_malformed_molecules_are_counted_not_raised(molecule, n_atoms, words):
    report = evaluate_molecules([embedded("O"), molecule])
    bad = report.per_molecule[1]
    assert (bad.valid, bad.mol_stable, bad.n_stable_atoms, bad.n_atoms) == (False, False, 0, n_atoms)
    assert bad.reason.startswith("malformed") and words in bad.reason and "\n" not in bad.reason
    assert report.validity == 0.5


# ---------------------------------------------------------------------------------- throughput


@pytest.mark.slow
def test_ten_thousand_qm9_size_molecules_in_well_under_30_seconds():
    rng = np.random.default_rng(0)
    templates = [embedded(s) for s in ["CC(=O)OC1CC1", "OCC1=CC=CN1", "CC(C)(O)C#N", "FC1=NC=CO1", "CCOC(=O)CN"]]
    molecules = []
    for k in range(10_000):
        symbols, positions = templates[k % len(templates)]
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        molecules.append((symbols, positions @ q + rng.normal(scale=0.02, size=positions.shape)))
    start = time.perf_counter()
    report = evaluate_molecules(molecules)
    elapsed = time.perf_counter() - start
    assert report.n == 10_000 and report.validity > 0.9
    assert elapsed < 30.0, f"{elapsed:.1f} s"


def test_objects_with_symbols_and_positions_are_evaluated_like_pairs():
    """Sampled molecules (any object with ``symbols`` and ``positions``) are scored, not counted as
    malformed: the same report as for the plain pairs."""
    from types import SimpleNamespace

    pairs = [embedded("O"), embedded("C"), (("C", "H"), np.array([[0.0, 0, 0], [np.nan, 0, 0]]))]
    objects = [SimpleNamespace(symbols=s, positions=p, other=1) for s, p in pairs]
    a = evaluate_molecules(pairs).to_dict(per_molecule=False)
    b = evaluate_molecules(objects).to_dict(per_molecule=False)
    assert a == b and a["validity"] == pytest.approx(2 / 3)
    assert reference_smiles_set(objects) == reference_smiles_set(pairs)


@pytest.mark.parametrize(
    "symbols, parity",
    [("CH4", 0), ("CH3", 1), ("C2H6N", 1), ("C2H7N", 0), ("C2H5N", 0), ("CHF3", 0), ("HO", 1), ("H2O", 0), ("PH3", 0), ("CHg", None)],
)
def test_valence_sum_parity_of_compositions(symbols, parity):
    from moldiff.chemistry.elements import valence_sum_parity
    from moldiff.chemistry.fragments import parse_formula

    expanded = [element for element, count in parse_formula(symbols).items() for _ in range(count)]
    assert valence_sum_parity(expanded) == parity


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_geometry_makes_an_odd_valence_composition_stable(seed):
    """The handshake argument behind ``odd_valence``: drop one H from a stable molecule and no
    placement of the remaining atoms (here random perturbations) gives every atom its valence."""
    from moldiff.chemistry.elements import valence_sum_parity

    symbols, pos = embedded("CC(=O)N")
    assert check_stability(symbols, pos).mol_stable and valence_sum_parity(symbols) == 0
    drop = symbols.index("H")
    odd_symbols = symbols[:drop] + symbols[drop + 1 :]
    odd_pos = np.delete(pos, drop, axis=0)
    assert valence_sum_parity(odd_symbols) == 1
    rng = np.random.default_rng(seed)
    for _ in range(50):
        moved = odd_pos + rng.normal(scale=0.15, size=odd_pos.shape)
        assert not check_stability(odd_symbols, moved).mol_stable


def test_geometry_diagnostics_on_known_sets():
    from moldiff.chemistry.diagnostics import geometry_diagnostics

    ethanol = embedded("CCO")
    methyl = (ethanol[0][:-1], ethanol[1][:-1])  # one H fewer: odd valence sum
    far = (ethanol[0] * 2, np.vstack([ethanol[1], ethanol[1] + 20.0]))  # two copies: two pieces
    squashed = (ethanol[0], ethanol[1] * 0.5)  # atoms closer than 0.9 Å
    d = geometry_diagnostics([ethanol, methyl, far, squashed])
    assert d["n"] == 4
    assert d["odd_valence"] == pytest.approx(1 / 4)
    assert d["close_contact"] == pytest.approx(1 / 4)
    assert d["one_piece"] < 1 and d["mean_fragments"] > 1
    with_ref = geometry_diagnostics([ethanol], reference=[ethanol])
    assert with_ref["element_tv"] == 0.0 and with_ref["bond_C-H_mean_err"] == pytest.approx(0.0)


@pytest.mark.parametrize("smiles, expected", [
    ("c1ccccc1", True),          # benzene
    ("Cc1ccncc1", True),         # 4-methylpyridine: an N with two ring neighbours
    ("C1CCCCC1", False),         # cyclohexane: puckered, four-coordinated carbons
    ("C1=CCC=CC1", False),       # 1,4-cyclohexadiene: two sp3 ring carbons
    ("CCCCCC", False),           # no ring at all
])
def test_planar_six_ring_on_known_molecules(smiles, expected):
    from moldiff.chemistry.diagnostics import has_planar_six_ring

    symbols, pos = embedded(smiles)
    assert has_planar_six_ring(symbols, pos) is expected


def test_planar_six_ring_needs_flatness_and_three_neighbours():
    from moldiff.chemistry.diagnostics import RING_PLANARITY_ANGSTROM, geometry_diagnostics, has_planar_six_ring

    symbols, pos = hexagon_ring((1.39, 1.39))
    assert has_planar_six_ring(symbols, pos)
    # Rotating and shifting the molecule changes nothing.
    rot = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))[0]
    assert has_planar_six_ring(symbols, pos @ rot.T + 5.0)
    # Lift one carbon (and its H) out of the plane: RMS from the best plane well above the cut.
    bent = pos.copy()
    bent[[0, 6], 2] += 0.6
    assert not has_planar_six_ring(symbols, bent)
    # A ring carbon without its hydrogen has two neighbours: not aromatic-like.
    radical = (symbols[:-1], pos[:-1])
    assert not has_planar_six_ring(*radical)
    d = geometry_diagnostics([(symbols, pos), (symbols, bent), radical, embedded("CCO")])
    assert d["planar_six_ring"] == pytest.approx(1 / 4)
    assert 0 < RING_PLANARITY_ANGSTROM < 0.6 / np.sqrt(6)


def test_bond_rows_stability_applies_the_valence_rule_to_given_bonds():
    from moldiff.chemistry.metrics import bond_rows_stability

    # formaldehyde: C=O plus two C-H
    rows = np.array([[0, 1, 2], [0, 2, 1], [0, 3, 1]])
    assert bond_rows_stability(["C", "O", "H", "H"], rows).mol_stable
    single = bond_rows_stability(["C", "O", "H", "H"], np.array([[0, 1, 1], [0, 2, 1], [0, 3, 1]]))
    assert not single.mol_stable and single.n_stable_atoms == 2  # C (3) and O (1) fail, both H pass
    with pytest.raises(ValueError, match="different atoms"):
        bond_rows_stability(["C", "O"], np.array([[0, 2, 1]]))
