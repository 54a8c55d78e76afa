"""Bond orders from coordinates: EDM distance tables (scalar and vectorised) and RDKit's route."""

from __future__ import annotations

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

from moldiff.chemistry import (
    ALLOWED_VALENCE,
    BOND_LENGTHS_PM,
    BOND_MARGINS_PM,
    QM9_ELEMENTS,
    SYMBOL_TO_Z,
    Z_TO_SYMBOL,
    UnknownElementError,
    allowed_valences,
    edm_bond_matrix,
    edm_bond_order,
    rdkit_bond_orders,
    to_symbols,
)


def embedded(smiles: str, seed: int = 42) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """(symbols, positions Å, RDKit bond-order matrix) of an ETKDG + MMFF geometry, fixed seed."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=seed) == 0
    AllChem.MMFFOptimizeMolecule(mol)
    symbols = tuple(atom.GetSymbol() for atom in mol.GetAtoms())
    return symbols, mol.GetConformer().GetPositions(), Chem.GetAdjacencyMatrix(mol, useBO=True)


def hexagon_ring(sides: tuple[float, float], ch: float = 1.084) -> tuple[tuple[str, ...], np.ndarray]:
    """Planar C6H6 whose ring sides alternate between two lengths (Å), 120° angles, radial C-H."""
    steps = [sides[k % 2] * np.array([np.cos(np.pi / 3 * k), np.sin(np.pi / 3 * k), 0.0]) for k in range(6)]
    carbons = np.cumsum([np.zeros(3)] + steps[:-1], axis=0)
    carbons -= carbons.mean(axis=0)
    radial = carbons / np.linalg.norm(carbons, axis=1, keepdims=True)
    return ("C",) * 6 + ("H",) * 6, np.vstack([carbons, carbons + ch * radial])


# ----------------------------------------------------------------------------------------- elements


def test_element_table_matches_rdkit_periodic_table():
    table = Chem.GetPeriodicTable()
    assert all(table.GetElementSymbol(z) == symbol for z, symbol in Z_TO_SYMBOL.items())
    assert all(SYMBOL_TO_Z[symbol] == z for z, symbol in Z_TO_SYMBOL.items())
    assert QM9_ELEMENTS == ("H", "C", "N", "O", "F")


def test_allowed_valences_are_edms():
    assert {s: ALLOWED_VALENCE[s] for s in QM9_ELEMENTS} == {"H": 1, "C": 4, "N": 3, "O": 2, "F": 1}
    assert allowed_valences("P") == {3, 5}
    assert allowed_valences("Cl") == {1}
    assert allowed_valences("Na") == frozenset()  # EDM lists nothing: such an atom is never stable


def test_to_symbols_accepts_symbols_and_atomic_numbers():
    assert to_symbols(["C", "cl", " O ", 1, np.int64(9), "6", 35, "I"]) == ("C", "Cl", "O", "H", "F", "C", "Br", "I")
    assert to_symbols(np.array([6, 7, 8])) == ("C", "N", "O")
    assert to_symbols([]) == ()


@pytest.mark.parametrize("bad", [["C", "Xx"], [6, 200], [0], [True], [6.0], [None], "CCO"])
def test_to_symbols_rejects_unknown_elements_with_one_line(bad):
    with pytest.raises(UnknownElementError) as info:
        to_symbols(bad)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------- EDM thresholds


def test_tables_hold_edms_key_values():
    assert BOND_MARGINS_PM == {1: 10, 2: 5, 3: 3}
    assert BOND_LENGTHS_PM[1]["C"]["H"] == 109 and BOND_LENGTHS_PM[1]["C"]["C"] == 154
    assert BOND_LENGTHS_PM[2]["C"]["C"] == 134 and BOND_LENGTHS_PM[3]["C"]["N"] == 116
    single = BOND_LENGTHS_PM[1]
    assert all(single[b][a] == length for a in single for b, length in single[a].items())


@pytest.mark.parametrize(
    ("pair", "distance", "order"),
    [
        (("C", "C"), 1.635, 1),  # < 154 + 10 pm
        (("C", "C"), 1.645, 0),
        (("C", "C"), 1.385, 2),  # < 134 + 5 pm
        (("C", "C"), 1.395, 1),  # benzene-like: just outside the double threshold
        (("C", "C"), 1.225, 3),  # < 120 + 3 pm
        (("C", "C"), 1.235, 2),
        (("C", "N"), 1.16, 3),  # nitrile
        (("C", "O"), 1.21, 2),  # carbonyl
        (("O", "H"), 0.96, 1),
        (("H", "H"), 0.85, 0),  # 85 pm is not < 74 + 10
        (("C", "F"), 1.30, 1),  # no double C-F entry: single however short
        (("H", "Al"), 1.0, 0),  # missing from the single table: EDM raises KeyError, we say 0
        (("Na", "Cl"), 2.4, 0),
    ],
)
def test_edm_bond_order_thresholds(pair, distance, order):
    assert edm_bond_order(*pair, distance) == order
    assert edm_bond_matrix(list(pair), np.array([[0.0, 0, 0], [distance, 0, 0]]))[0, 1] == order


def test_edm_double_table_asymmetry_is_kept():
    # EDM's double table has C->S but not S->C, so the pair order decides (1.60 Å = 160 pm).
    assert edm_bond_order("C", "S", 1.60) == 2
    assert edm_bond_order("S", "C", 1.60) == 1
    positions = np.array([[0.0, 0, 0], [1.60, 0, 0]])
    assert edm_bond_matrix(["S", "C"], positions, pair_order="index")[0, 1] == 1
    assert edm_bond_matrix(["S", "C"], positions, pair_order="atomic_number")[0, 1] == 2
    with pytest.raises(ValueError):
        edm_bond_matrix(["S", "C"], positions, pair_order="sorted")


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_matrix_equals_scalar_loop(seed):
    rng = np.random.default_rng(seed)
    pool = ["H", "C", "N", "O", "F", "S", "P", "Cl", "Br", "Si", "B", "I", "Na"]
    n = 14
    symbols = list(rng.choice(pool, n))
    positions = rng.uniform(0.0, 3.5, size=(n, 3))
    distances = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    by_index = np.zeros((n, n), dtype=int)
    by_z = np.zeros((n, n), dtype=int)
    for i in range(n):
        for j in range(i + 1, n):
            by_index[i, j] = by_index[j, i] = edm_bond_order(symbols[i], symbols[j], distances[i, j])
            a, b = sorted((symbols[i], symbols[j]), key=SYMBOL_TO_Z.__getitem__)
            by_z[i, j] = by_z[j, i] = edm_bond_order(a, b, distances[i, j])
    np.testing.assert_array_equal(edm_bond_matrix(symbols, positions), by_index)
    np.testing.assert_array_equal(edm_bond_matrix(symbols, positions, pair_order="atomic_number"), by_z)
    assert by_index.any(), "the random geometry should contain some bonds"


def test_bond_matrix_of_nan_positions_has_no_bonds():
    positions = np.array([[0.0, 0, 0], [np.nan, 0, 0], [1.0, 0, 0]])
    assert not edm_bond_matrix(["C", "C", "H"], positions)[:, 1].any()


def test_bond_matrix_checks_lengths():
    with pytest.raises(ValueError):
        edm_bond_matrix(["C", "C"], np.zeros((3, 3)))


# ---------------------------------------------------------------------------- golden molecules


@pytest.mark.parametrize("smiles", ["O", "C", "CCO", "CC#N"])
def test_golden_molecules_get_their_true_bond_orders(smiles):
    symbols, positions, expected = embedded(smiles)
    np.testing.assert_array_equal(edm_bond_matrix(symbols, positions), expected.astype(int))


def test_acetonitrile_has_a_triple_cn_bond():
    symbols, positions, _ = embedded("CC#N")
    bonds = edm_bond_matrix(symbols, positions)
    carbon, nitrogen = 1, 2
    assert (symbols[carbon], symbols[nitrogen]) == ("C", "N")
    assert bonds[carbon, nitrogen] == 3
    assert bonds[0, carbon] == 1


def test_benzene_at_real_geometry_gets_only_single_ring_bonds():
    # Aromatic C-C is 1.397 Å = 139.7 pm: below 154 + 10 (bonded) but not below 134 + 5 (double).
    symbols, positions = hexagon_ring((1.397, 1.397))
    bonds = edm_bond_matrix(symbols, positions)
    ring = bonds[:6, :6]
    assert set(ring[np.triu_indices(6, 1)]) == {0, 1}
    assert ring.sum(axis=1).tolist() == [2] * 6
    assert bonds.sum(axis=1).tolist() == [3] * 6 + [1] * 6  # carbons one short of 4
    # An MMFF geometry (C-C ≈ 1.395 Å) says the same.
    symbols, positions, _ = embedded("c1ccccc1")
    assert edm_bond_matrix(symbols, positions)[:6].sum(axis=1).tolist() == [3] * 6


def test_kekule_benzene_gets_alternating_bonds():
    symbols, positions = hexagon_ring((1.34, 1.46))
    bonds = edm_bond_matrix(symbols, positions)
    assert [bonds[k, (k + 1) % 6] for k in range(6)] == [2, 1, 2, 1, 2, 1]
    assert bonds.sum(axis=1).tolist() == [4] * 6 + [1] * 6


# ------------------------------------------------------------------------------ RDKit's route


def test_rdkit_bond_orders_perceives_acetonitrile():
    symbols, positions, _ = embedded("CC#N")
    result = rdkit_bond_orders(symbols, positions)
    assert result.reason is None
    assert Chem.MolToSmiles(Chem.RemoveHs(result.mol)) == "CC#N"
    assert result.mol.GetNumAtoms() == 6 and result.mol.GetNumConformers() == 1


def test_rdkit_bond_orders_assigns_formal_charges():
    result = rdkit_bond_orders(["C", "O"], np.array([[0.0, 0, 0], [1.128, 0, 0]]))
    assert Chem.MolToSmiles(result.mol) == "[C-]#[O+]"


@pytest.mark.parametrize(
    ("symbols", "positions"),
    [
        (["C", "H"], np.array([[0.0, 0, 0], [np.nan, 0, 0]])),
        (["C", "Xx"], np.zeros((2, 3))),
        (["C", "C"], np.zeros((3, 3))),
        (["C"] + ["H"] * 8, np.vstack([np.zeros(3), np.eye(3), -np.eye(3), [[0.6, 0.6, 0.6], [-0.6, -0.6, 0.6]]])),
    ],
)
def test_rdkit_bond_orders_reports_instead_of_raising(symbols, positions):
    result = rdkit_bond_orders(symbols, positions)
    assert result.mol is None
    assert result.reason and "\n" not in result.reason


def test_rdkit_bond_orders_survives_random_clusters():
    rng = np.random.default_rng(7)
    for _ in range(5):
        result = rdkit_bond_orders(list(rng.choice(["C", "N", "O", "H"], 20)), rng.uniform(0, 4, (20, 3)))
        assert (result.mol is None) != (result.reason is None)
