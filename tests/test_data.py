"""QM9 from qm9pack, the EDM split, statistics and batching, on the real data."""

import numpy as np
import pytest
import torch

from moldiff.chemistry.metrics import evaluate_molecules
from moldiff.data.batching import MoleculeSet, epoch_order
from moldiff.data.qm9 import QM9_NUM_MOLECULES, _parse_floats, edm_split, load_qm9
from moldiff.data.statistics import DatasetStatistics, compute_statistics


def test_all_molecules_present_and_ordered(qm9):
    assert len(qm9) == QM9_NUM_MOLECULES == 130_831
    assert np.all(np.diff(qm9.index) > 0)
    assert qm9.index[0] == 1 and qm9.index[-1] == 133_885
    assert qm9.ptr[-1] == qm9.positions.shape[0] == qm9.atom_types.shape[0]
    assert qm9.num_atoms.min() == 3 and qm9.num_atoms.max() == 29
    assert np.isfinite(qm9.positions).all()


def test_first_molecules_are_methane_ammonia_water(qm9):
    symbols, pos = qm9.molecule(0)
    assert symbols == ["C", "H", "H", "H", "H"]
    assert qm9.smiles[0] == "C" and qm9.smiles[2] == "O"
    # C-H bond length of methane's DFT geometry (about 1.09 Å).
    assert np.allclose(np.linalg.norm(pos[1:] - pos[0], axis=1), 1.0919, atol=2e-3)


def test_properties_have_expected_ranges(qm9):
    p = qm9.properties
    for name in ("mu", "alpha", "homo", "lumo", "gap", "cv"):
        assert p[name].shape == (QM9_NUM_MOLECULES,) and np.isfinite(p[name]).all()
    assert np.allclose(p["gap"], p["lumo"] - p["homo"], atol=2e-4)  # hartree
    assert 6.0 < p["cv"].mean() < 47.0 and p["mu"].min() >= 0.0


def test_edm_split_sizes_and_first_indices():
    s = edm_split()
    assert [len(s[k]) for k in ("train", "valid", "test")] == [100_000, 17_748, 13_083]
    assert len(np.unique(np.concatenate(list(s.values())))) == QM9_NUM_MOLECULES
    # numpy seed 0, one permutation of 130,831 (EDM / Cormorant): positions into the index-ordered list.
    assert s["train"][:5].tolist() == [130195, 68784, 7957, 25911, 20168]
    assert s["valid"][:5].tolist() == [68751, 123554, 28669, 72737, 11612]
    assert s["test"][:5].tolist() == [115839, 90242, 66405, 71231, 103168]
    with pytest.raises(ValueError):
        edm_split(1000)


def test_test_split_first_molecules(qm9, split):
    first = split["test"][:3]
    assert qm9.index[first].tolist() == [117980, 92051, 68086]
    assert qm9.num_atoms[first].tolist() == [27, 20, 18]


def test_data_row_on_fixed_test_slice(qm9, split):
    # Counts computed once with the EDM protocol on the first 1,000 test molecules; the whole test
    # split gives 234336/235883 stable atoms (99.34%), 12457/13083 stable molecules (95.22%),
    # 12787/13083 valid (97.74%), the data row EDM reports.
    report = evaluate_molecules(list(qm9.molecules(split["test"][:1000])))
    assert sum(r.n_stable_atoms for r in report.per_molecule) == 17909
    assert sum(r.n_atoms for r in report.per_molecule) == 18041
    assert sum(r.mol_stable for r in report.per_molecule) == 947
    assert report.n_valid == 979


def test_parse_floats_handles_qm9_number_forms():
    assert _parse_floats("[[0.,1.5E-3,-2],[3.25e+1,-0.,7]]") == [0.0, 0.0015, -2.0, 32.5, -0.0, 7.0]


def test_cache_is_versioned_and_rebuilt_when_stale(tmp_path, qm9):
    from moldiff.data import qm9 as mod

    path = mod._cache_path(tmp_path)
    mod._save(qm9, path)
    assert load_qm9(tmp_path).smiles[3] == "C#C"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["version"] = np.array(mod.CACHE_VERSION + 1)
    np.savez(path, **arrays)
    assert mod._load(path) is None  # stale version is not trusted


def test_statistics_and_size_sampling(qm9, split):
    train = split["train"]
    types = np.concatenate([qm9.atom_types[qm9.ptr[i] : qm9.ptr[i + 1]] for i in train[:2000]])
    stats = compute_statistics(qm9.elements, qm9.num_atoms[train[:2000]], types)
    p = stats.size_distribution()
    assert p.sum() == pytest.approx(1.0) and stats.max_atoms <= 29
    freq = stats.element_frequencies()
    assert max(freq, key=freq.get) == "H"
    sizes = stats.sample_sizes(5000, np.random.default_rng(0), min_atoms=20)
    assert sizes.min() >= 20
    assert abs(sizes.mean() - (np.arange(len(p))[20:] * p[20:]).sum() / p[20:].sum()) < 0.2
    assert DatasetStatistics.from_dict(stats.to_dict()) == stats
    with pytest.raises(ValueError):
        stats.sample_sizes(3, np.random.default_rng(0), min_atoms=40)


def test_batches_are_centred_flat_graphs(qm9, split):
    z = [1, 6, 7, 8, 9]
    ms = MoleculeSet(qm9.ptr, qm9.atom_types, qm9.positions, z, split["train"][:100])
    b = ms.batch(np.array([3, 0, 7]))
    counts = torch.bincount(b.batch).tolist()
    assert counts == ms.num_atoms[[3, 0, 7]].tolist()
    for k, mol in enumerate([3, 0, 7]):
        sym, pos = qm9.molecule(int(split["train"][mol]))
        got = b.pos[b.batch == k].double().numpy()
        assert np.allclose(got, pos - pos.mean(0), atol=1e-5)
        assert [qm9.elements[t] for t in b.types[b.batch == k]] == sym
        assert b.charges[b.batch == k].tolist() == [dict(H=1, C=6, N=7, O=8, F=9)[s] for s in sym]


def test_epoch_order_is_a_deterministic_permutation():
    a, b, c = epoch_order(50, 0, 1), epoch_order(50, 0, 1), epoch_order(50, 0, 2)
    assert sorted(a.tolist()) == list(range(50))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_shipped_novelty_reference_matches_the_training_split(qm9, split, tmp_path):
    """The reference shipped for novelty holds exactly what the build gives for training molecules,
    none of the test molecules that are not also training molecules, and an empty cache uses it."""
    from moldiff.chemistry.metrics import reference_smiles_set
    from moldiff.data.qm9 import shipped_training_smiles, training_smiles

    shipped = shipped_training_smiles()
    if shipped is None:
        from rdkit import rdBase

        pytest.skip(f"shipped reference was written by another RDKit than {rdBase.rdkitVersion} (rebuilt at use)")
    assert len(shipped) > 90_000
    train = reference_smiles_set(qm9.molecules(split["train"][:300]))
    assert train <= shipped
    test_only = reference_smiles_set(qm9.molecules(split["test"][:300])) - shipped
    assert test_only, "no test molecule is novel: the reference is not the training split alone"

    built = []
    assert training_smiles(tmp_path, on_build=lambda: built.append(1)) == shipped  # no build, no cache
    assert not built and not list(tmp_path.iterdir())


def test_shipped_novelty_reference_is_refused_when_stale(tmp_path):
    """Another RDKit version, another cache version, or a damaged file: not trusted (None)."""
    import gzip
    import json

    from moldiff.data.qm9 import shipped_training_smiles, write_shipped_training_smiles

    path = tmp_path / "ref.json.gz"
    write_shipped_training_smiles({"C", "O", "N"}, path)
    assert shipped_training_smiles(path) == {"C", "O", "N"}
    first = path.read_bytes()
    write_shipped_training_smiles({"N", "O", "C"}, path)
    assert path.read_bytes() == first  # byte-reproducible
    doc = json.loads(gzip.decompress(first))
    for key, value in (("rdkit", "2001.01.1"), ("cache_version", doc["cache_version"] + 1)):
        path.write_bytes(gzip.compress(json.dumps(doc | {key: value}).encode()))
        assert shipped_training_smiles(path) is None
    path.write_bytes(first[: len(first) // 2])
    assert shipped_training_smiles(path) is None
    assert shipped_training_smiles(tmp_path / "missing.json.gz") is None
