"""Bond-order training labels: Kekulé matrices from RDKit (EDM-table fallback), the flat table,
its cache, and bonds in batches. Hand-built geometries, real RDKit, no QM9."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moldiff.data.qm9_bonds as qm9_bonds
from moldiff.chemistry.bonds import edm_bond_matrix, kekule_bond_matrix, pairwise_distances
from moldiff.chemistry.elements import QM9_ELEMENTS
from moldiff.data.batching import MoleculeSet
from moldiff.data.qm9_bonds import BondTable, bond_table, load_qm9_bonds

CC_DOUBLE, CH = 1.33, 1.09
TYPE = {s: i for i, s in enumerate(QM9_ELEMENTS)}


def ethene() -> tuple[list[str], np.ndarray]:
    """Planar C2H4: C=C along x, H-C=C angles 121.5° (order C C H H H H)."""
    tilt = np.deg2rad(180.0 - 121.5)  # angle between a C-H bond and the outward C=C axis
    c1, c2 = np.array([-CC_DOUBLE / 2, 0.0, 0.0]), np.array([CC_DOUBLE / 2, 0.0, 0.0])
    hydrogens = [c + CH * np.array([out * np.cos(tilt), up * np.sin(tilt), 0.0])
                 for c, out in ((c1, -1.0), (c2, 1.0)) for up in (1.0, -1.0)]
    return ["C", "C", "H", "H", "H", "H"], np.array([c1, c2, *hydrogens])


def benzene() -> tuple[list[str], np.ndarray]:
    """Regular hexagon (1.39 Å sides), C-H radial 1.09 Å; carbons 0-5 around the ring, then H 6-11."""
    phi = np.pi / 3 * np.arange(6)
    ring = np.stack([np.cos(phi), np.sin(phi), np.zeros(6)], axis=1)  # unit radial vectors
    carbons = 1.39 * ring  # circumradius of a regular hexagon equals its side
    return ["C"] * 6 + ["H"] * 6, np.concatenate([carbons, carbons + CH * ring])


def pentavalent_carbon() -> tuple[list[str], np.ndarray]:
    """CH5: trigonal bipyramid of hydrogens at 1.09 Å, no valid bond orders."""
    dirs = np.array([[0, 0, 1], [0, 0, -1], [1, 0, 0], [-0.5, np.sqrt(3) / 2, 0], [-0.5, -np.sqrt(3) / 2, 0]])
    return ["C"] + ["H"] * 5, np.vstack([np.zeros(3), CH * dirs])


def water() -> tuple[list[str], np.ndarray]:
    """H2O: O-H 0.96 Å, H-O-H 104.5° (order O H H)."""
    angle = np.deg2rad(104.5) / 2
    return ["O", "H", "H"], np.array([[0, 0, 0], [0.96 * np.sin(angle), 0.96 * np.cos(angle), 0],
                                      [-0.96 * np.sin(angle), 0.96 * np.cos(angle), 0]])


def flat_store(molecules):
    """``(ptr, atom_types, positions)`` of molecules concatenated in order."""
    counts = [len(s) for s, _ in molecules]
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    types = np.array([TYPE[s] for symbols, _ in molecules for s in symbols], dtype=np.int8)
    return ptr, types, np.concatenate([p for _, p in molecules])


def test_ethene_geometry_is_as_built():
    symbols, pos = ethene()
    d = pairwise_distances(pos)
    assert d[0, 1] == pytest.approx(CC_DOUBLE)
    assert np.allclose(d[[0, 0, 1, 1], [2, 3, 4, 5]], CH)
    assert np.allclose(pos[:, 2], 0.0)
    assert d[2, 3] == pytest.approx(2 * CH * np.sin(np.deg2rad(58.5)))  # H-C-H 117°


def test_ethene_has_one_double_and_four_single_bonds():
    symbols, pos = ethene()
    orders, source = kekule_bond_matrix(symbols, pos)
    assert source == 0
    assert orders.dtype == np.int64 and orders.shape == (6, 6) and np.array_equal(orders, orders.T)
    expected = np.zeros((6, 6), dtype=np.int64)
    expected[0, 1] = 2
    expected[0, 2] = expected[0, 3] = expected[1, 4] = expected[1, 5] = 1
    assert np.array_equal(orders, expected + expected.T)


def test_benzene_is_kekulized_with_alternating_ring_bonds():
    symbols, pos = benzene()
    orders, source = kekule_bond_matrix(symbols, pos)
    assert source == 0
    ring = [int(orders[k, (k + 1) % 6]) for k in range(6)]
    assert sorted(ring) == [1, 1, 1, 2, 2, 2]
    assert all(ring[k] != ring[(k + 1) % 6] for k in range(6))  # alternating
    assert np.array_equal(orders[:6].sum(axis=1), [4] * 6)  # every carbon: valence 4
    assert np.array_equal(orders[6:].sum(axis=1), [1] * 6)
    assert all(orders[k, k + 6] == 1 for k in range(6))  # each H on its own (input-order) carbon
    assert set(np.unique(orders)) == {0, 1, 2}


@pytest.mark.parametrize("make", [pentavalent_carbon, lambda: (["H", "H"], np.array([[0.0, 0, 0], [5.0, 0, 0]]))])
def test_rdkit_failure_falls_back_to_edm_table(make):
    symbols, pos = make()
    orders, source = kekule_bond_matrix(symbols, pos)
    assert source == 1
    assert np.array_equal(orders, edm_bond_matrix(symbols, pos))
    if len(symbols) == 6:
        assert orders[0].sum() == 5  # the table bonds all five hydrogens


def test_non_finite_positions_do_not_raise():
    symbols, pos = water()
    pos = pos.copy()
    pos[1, 0] = np.nan
    orders, source = kekule_bond_matrix(symbols, pos)
    assert source == 1 and orders[0, 1] == 0 and orders[0, 2] == 1


def test_bond_table_on_a_small_store():
    molecules = [water(), ethene(), pentavalent_carbon()]
    table = bond_table(*flat_store(molecules), QM9_ELEMENTS)
    assert table.ptr.tolist() == [0, 2, 7, 12]
    assert table.pairs.dtype == np.int16 and table.orders.dtype == np.int8 and table.source.dtype == np.int8
    assert table.ptr.dtype == np.int64 and len(table) == 3
    assert table.source.tolist() == [0, 0, 1]
    pairs, orders = table.molecule(0)
    assert pairs.tolist() == [[0, 1], [0, 2]] and orders.tolist() == [1, 1]
    pairs, orders = table.molecule(1)
    assert pairs.tolist() == [[0, 1], [0, 2], [0, 3], [1, 4], [1, 5]] and orders.tolist() == [2, 1, 1, 1, 1]
    pairs, orders = table.molecule(2)
    assert pairs.tolist() == [[0, k] for k in range(1, 6)] and orders.tolist() == [1] * 5


class FakeQM9:
    """Just the attributes :func:`load_qm9_bonds` reads."""

    def __init__(self, molecules):
        self.ptr, self.atom_types, self.positions = flat_store(molecules)

    def __len__(self) -> int:
        return len(self.ptr) - 1


def test_cache_round_trip_loads_without_recomputing(tmp_path, monkeypatch):
    fake = FakeQM9([ethene(), water()])
    first = load_qm9_bonds(fake, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f"qm9_bonds_v{qm9_bonds.BONDS_CACHE_VERSION}.npz"]

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although the cache is valid")

    monkeypatch.setattr(qm9_bonds, "bond_table", fail)
    second = load_qm9_bonds(fake, tmp_path)
    for name in ("ptr", "pairs", "orders", "source"):
        a, b = getattr(first, name), getattr(second, name)
        assert a.dtype == b.dtype and np.array_equal(a, b)
    # A cache of other molecules (here: atom counts differ) is rebuilt, not trusted.
    with pytest.raises(AssertionError, match="recomputed"):
        load_qm9_bonds(FakeQM9([water(), ethene()]), tmp_path)


def test_corrupt_cache_is_rebuilt(tmp_path):
    fake = FakeQM9([water()])
    path = tmp_path / f"qm9_bonds_v{qm9_bonds.BONDS_CACHE_VERSION}.npz"
    path.write_bytes(b"not an npz")
    table = load_qm9_bonds(fake, tmp_path)
    assert table.ptr.tolist() == [0, 2]
    assert np.array_equal(load_qm9_bonds(fake, tmp_path).pairs, table.pairs)


def test_batch_bonds_use_global_atom_indices():
    molecules = [water(), ethene(), benzene(), pentavalent_carbon()]
    ptr, types, positions = flat_store(molecules)
    table = bond_table(ptr, types, positions, QM9_ELEMENTS)
    ms = MoleculeSet(ptr, types, positions, [1, 6, 7, 8, 9], np.array([3, 1, 0, 2]), bonds=table)
    batch = ms.batch(np.array([2, 0, 3]))  # store molecules 0 (water), 3 (CH5), 2 (benzene)
    bonds = batch.bonds
    assert bonds.dtype == torch.int64 and bonds.shape == (2 + 5 + 12, 3)
    i, j, order = bonds.unbind(1)
    assert bool((i < j).all()) and bool((batch.batch[i] == batch.batch[j]).all())
    # Bonded atoms sit at the distance the store geometry gives (centring keeps distances).
    stored = {}
    for m, k in enumerate([0, 3, 2]):
        d = pairwise_distances(positions[ptr[k] : ptr[k + 1]])
        pairs, orders = table.molecule(k)
        stored[m] = [(d[a, b], o) for (a, b), o in zip(pairs.tolist(), orders.tolist())]
    got = (batch.pos[i] - batch.pos[j]).norm(dim=1).double().numpy()
    expected = [x for m in range(3) for x in stored[m]]
    assert np.allclose(got, [d for d, _ in expected], atol=1e-5)
    assert order.tolist() == [o for _, o in expected]
    assert batch.batch[i].tolist() == [0] * 2 + [1] * 5 + [2] * 12
    moved = batch.to("cpu")
    assert torch.equal(moved.bonds, bonds)


def test_batch_without_bond_table_is_unchanged():
    ptr, types, positions = flat_store([water(), ethene()])
    batch = MoleculeSet(ptr, types, positions, [1, 6, 7, 8, 9], np.array([0, 1])).batch(np.array([1, 0]))
    assert batch.bonds is None and batch.to("cpu").bonds is None
    assert batch.num_graphs == 2 and batch.pos.shape == (9, 3)
    with pytest.raises(ValueError):
        MoleculeSet(ptr, types, positions, [1, 6, 7, 8, 9], np.array([0]), bonds=BondTable(
            ptr=np.zeros(2, dtype=np.int64), pairs=np.zeros((0, 2), np.int16),
            orders=np.zeros(0, np.int8), source=np.zeros(1, np.int8)))


def test_formal_charges_are_kept_with_the_bond_orders():
    """Nitromethane (RDKit-embedded): DetermineBonds makes the nitro group N+ and O-; the labels keep
    them per atom in input order, the table stores them per store atom, and batches carry them."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    from moldiff.chemistry.bonds import kekule_bond_labels

    mol = Chem.AddHs(Chem.MolFromSmiles("C[N+](=O)[O-]"))
    assert AllChem.EmbedMolecule(mol, randomSeed=7) == 0
    symbols = [a.GetSymbol() for a in mol.GetAtoms()]
    pos = mol.GetConformer().GetPositions()
    orders, charges, source = kekule_bond_labels(symbols, pos)
    assert source == 0 and charges.dtype == np.int64 and charges.sum() == 0
    assert {(s, int(q)) for s, q in zip(symbols, charges) if q} == {("N", 1), ("O", -1)}
    assert np.array_equal(orders, kekule_bond_matrix(symbols, pos)[0])
    _, fallback_charges, fallback = kekule_bond_labels(*pentavalent_carbon())
    assert fallback == 1 and not fallback_charges.any()
    molecules = [water(), (symbols, pos)]
    ptr, types, positions = flat_store(molecules)
    table = bond_table(ptr, types, positions, QM9_ELEMENTS)
    assert table.charges.dtype == np.int8 and table.charges.tolist() == [0, 0, 0, *charges.tolist()]
    batch = MoleculeSet(ptr, types, positions, [1, 6, 7, 8, 9], np.array([1, 0]), bonds=table).batch(np.array([0, 1]))
    assert batch.formal_charges.tolist() == [*charges.tolist(), 0, 0, 0]
    assert torch.equal(batch.to("cpu").formal_charges, batch.formal_charges)
