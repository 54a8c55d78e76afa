"""Training sets from your own SD files (moldiff.data.sdf, ``moldiff data sdf``, ``moldiff train --data``).

The SD files are written here with RDKit (ETKDG + MMFF), small enough that the whole file runs in
well under a minute on one core; the CLI runs in-process (``moldiff.cli.main``) for speed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from rdkit import Chem
from rdkit.Chem import AllChem

from moldiff.cli import main
from moldiff.data.sdf import (
    DEFAULT_ELEMENTS,
    SKIP_REASONS,
    SDFDataError,
    SDFOptions,
    _split_molecules,
    build_sdf_dataset,
    load_sdf_dataset,
    sdf_cache_path,
)

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_tiny.yaml"

#: drug-like molecules with S, Cl, Br, P, F, I, B and a charged N+ / O- pair
GOOD = {
    "paracetamol": "CC(=O)Nc1ccc(O)cc1",
    "chlorobenzamide": "NC(=O)c1ccc(Cl)cc1",
    "bromosulfonamide": "NS(=O)(=O)c1ccc(Br)cc1",
    "thioanisole_acid": "CSc1ccccc1C(=O)O",
    "nitrochlorobenzene": "O=[N+]([O-])c1ccc(Cl)cc1",
    "iodo_cf3": "FC(F)(F)c1ccc(I)cc1",
    "ethyl_phosphate": "CCOP(=O)(O)O",
    "phenylboronic": "OB(O)c1ccccc1",
}
FLEXIBLE = ("butoxyphenylacetic", "CCCCOc1ccc(CC(=O)O)cc1")  # three conformers


def embed(smiles: str, n: int = 1, seed: int = 7) -> tuple[Chem.Mol, list[int]]:
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    params.pruneRmsThresh = 0.5
    ids = list(AllChem.EmbedMultipleConfs(mol, n, params))
    assert ids, smiles
    if AllChem.MMFFHasAllMoleculeParams(mol):
        AllChem.MMFFOptimizeMoleculeConfs(mol, maxIters=200)
    return mol, ids


def write_records(path: Path, records: list[tuple[str, Chem.Mol, int]], extra: str = "") -> Path:
    """``records``: (title, mol, conformer id); ``extra``: raw text appended (bad records)."""
    with open(path, "w") as handle:
        writer = Chem.SDWriter(handle)
        for title, mol, conf in records:
            mol.SetProp("_Name", title)
            writer.write(mol, confId=conf)
        writer.close()
        handle.write(extra)
    return path


def rotated(mol: Chem.Mol, conf: int) -> Chem.Mol:
    """A copy with conformer ``conf`` only, rotated and translated."""
    copy = Chem.Mol(mol, confId=conf)
    pos = copy.GetConformer().GetPositions()
    a = 0.7
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    new = pos @ rot.T + np.array([3.0, -1.0, 2.0])
    for i, p in enumerate(new):
        copy.GetConformer().SetAtomPosition(i, p.tolist())
    return copy


GARBAGE = "garbage record\n\n\nthis is not a counts line\nM  END\n$$$$\n"


@pytest.fixture(scope="module")
def sdf_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdf")
    records = []
    for name, smiles in GOOD.items():
        mol, ids = embed(smiles)
        records.append((name, mol, ids[0]))
    flex, ids = embed(FLEXIBLE[1], 3)
    assert len(ids) == 3
    # conformers of one molecule, not consecutive
    records.insert(1, (f"{FLEXIBLE[0]}_0", flex, ids[0]))
    records.insert(4, (f"{FLEXIBLE[0]}_1", flex, ids[1]))
    records.append((f"{FLEXIBLE[0]}_2", flex, ids[2]))
    good = list(records)
    # bad records
    flat = Chem.AddHs(Chem.MolFromSmiles("Oc1ccccc1"))
    AllChem.Compute2DCoords(flat)
    tin, tin_ids = embed("CC[Si](CC)(CC)CC")
    tin.GetAtomWithIdx(2).SetAtomicNum(50)  # Sn at the silicon's place
    salt, salt_ids = embed("C[NH3+].[Cl-]")
    big, big_ids = embed("CCCCCCCCCCCCCCCCCCCC")  # 62 atoms > --max-atoms 60
    heavy, heavy_ids = embed("CCO")
    heavy = Chem.RemoveHs(heavy)
    first_flex = (f"{FLEXIBLE[0]}_copy", rotated(flex, ids[0]), 0)
    records += [("phenol_2d", flat, -1), ("tetraethyltin", tin, tin_ids[0]), ("salt", salt, salt_ids[0]),
                ("eicosane", big, big_ids[0]), ("ethanol_no_h", heavy, heavy_ids[0]), first_flex]
    mixed = write_records(folder / "mixed.sdf", records, extra=GARBAGE)
    return {"folder": folder, "mixed": mixed, "good": good, "flex": (flex, ids), "flat": flat, "tin": (tin, tin_ids),
            "big": (big, big_ids)}


OPTIONS = SDFOptions(max_atoms=60)


@pytest.fixture(scope="module")
def dataset(sdf_files, tmp_path_factory):
    return build_sdf_dataset(sdf_files["mixed"], cache_dir=tmp_path_factory.mktemp("cache"), options=OPTIONS)


# ----------------------------------------------------------------------------- reading
def test_counts_per_skip_reason(dataset):
    r = dataset.report
    expected = {k: 0 for k in SKIP_REASONS}
    expected.update(unreadable=1, not_3d=1, unsupported_element=1, multiple_fragments=1, too_large=1,
                    implicit_hydrogens=1, duplicate_conformer=1)
    assert r.skipped == expected
    assert r.records == 18 and r.kept == 11 and r.molecules == 9 and r.num_skipped == 7
    assert len(dataset) == 11 and dataset.num_molecules == 9
    assert "Sn" in r.examples["unsupported_element"][0]
    text = "\n".join(r.lines())
    assert "skipped duplicate_conformer: 1" in text and "kept 11 conformers of 9 molecules" in text


def test_vocabulary_is_the_elements_present_sorted_by_atomic_number(dataset):
    assert dataset.elements == ("H", "B", "C", "N", "O", "F", "P", "S", "Cl", "Br", "I")
    assert set(dataset.elements) <= set(DEFAULT_ELEMENTS)
    symbols = [s for k in range(len(dataset)) for s in dataset.molecule_at(k)[0]]
    counts = dict(zip(dataset.report.elements, dataset.report.element_counts))
    assert counts == {e: symbols.count(e) for e in dataset.elements}


def test_conformers_of_one_molecule_share_an_id_wherever_they_are(dataset):
    titles = dataset.titles.tolist()
    flex = [titles.index(f"{FLEXIBLE[0]}_{k}") for k in range(3)]
    assert flex == [1, 4, 10]  # not consecutive in the file
    assert len(set(dataset.molecule[flex].tolist())) == 1
    others = [k for k in range(len(dataset)) if k not in flex]
    assert len(set(dataset.molecule[others].tolist())) == len(others)


def test_coordinates_charges_and_bond_orders_match_rdkit(sdf_files, dataset):
    supplier = Chem.SDMolSupplier(str(sdf_files["mixed"]), removeHs=False)
    by_title = {m.GetProp("_Name"): m for m in supplier if m is not None}
    for k, title in enumerate(dataset.titles.tolist()):
        mol = Chem.Mol(by_title[title])
        lo, hi = dataset.ptr[k], dataset.ptr[k + 1]
        symbols, pos = dataset.molecule_at(k)
        assert symbols == [a.GetSymbol() for a in mol.GetAtoms()]
        assert np.allclose(pos, mol.GetConformer().GetPositions(), atol=1e-5)
        assert dataset.formal_charges[lo:hi].tolist() == [a.GetFormalCharge() for a in mol.GetAtoms()]
        Chem.Kekulize(mol, clearAromaticFlags=True)
        theirs = sorted((min(b.GetBeginAtomIdx(), b.GetEndAtomIdx()), max(b.GetBeginAtomIdx(), b.GetEndAtomIdx()),
                         int(b.GetBondTypeAsDouble())) for b in mol.GetBonds())
        pairs, orders = dataset.bonds.molecule(k)
        assert [(int(i), int(j), int(o)) for (i, j), o in zip(pairs, orders)] == theirs
    nitro = dataset.titles.tolist().index("nitrochlorobenzene")
    lo, hi = dataset.ptr[nitro], dataset.ptr[nitro + 1]
    assert sorted(dataset.formal_charges[lo:hi][dataset.formal_charges[lo:hi] != 0].tolist()) == [-1, 1]
    assert dataset.report.charged_atoms == 2
    assert set(dataset.bonds.orders.tolist()) == {1, 2}  # Kekulé rings, no triple bonds in these molecules


def test_split_is_by_molecule_seeded_and_independent_of_record_order(dataset):
    sizes = {s: len(dataset.split_indices(s)) for s in ("train", "valid", "test")}
    assert sum(sizes.values()) == len(dataset)
    for split in ("train", "valid", "test"):
        mols = set(dataset.molecule[dataset.split_indices(split)].tolist())
        assert mols and all(dataset.molecule_split[m] == ("train", "valid", "test").index(split) for m in mols)
    # many molecules: fractions, reproducibility, order independence, seed dependence
    keys = [f"mol{k}" for k in range(100)]
    split, order = _split_molecules(keys, (0.8, 0.1, 0.1), 0)
    assert np.bincount(split).tolist() == [80, 10, 10] and sorted(order.tolist()) == list(range(100))
    again, _ = _split_molecules(keys, (0.8, 0.1, 0.1), 0)
    assert np.array_equal(split, again)
    reversed_split, _ = _split_molecules(keys[::-1], (0.8, 0.1, 0.1), 0)
    assert np.array_equal(reversed_split[::-1], split)
    other, _ = _split_molecules(keys, (0.8, 0.1, 0.1), 1)
    assert not np.array_equal(other, split)
    tiny, _ = _split_molecules(["a", "b", "c"], (0.8, 0.1, 0.1), 0)
    assert sorted(tiny.tolist()) == [0, 1, 2]


def test_training_sets_batches_and_statistics(dataset):
    train, valid, stats = dataset.training_sets(labels=True)
    assert stats.elements == dataset.elements
    assert len(train) == len(dataset.split_indices("train"))
    batch = train.batch(np.arange(len(train)))
    assert batch.bonds is not None and batch.formal_charges is not None
    assert batch.charges.tolist() == [Chem.GetPeriodicTable().GetAtomicNumber(dataset.elements[t])
                                      for t in batch.types.tolist()]
    assert sum(stats.element_counts) == len(batch.types) and sum(c for _, c in stats.charge_counts) == len(batch.types)
    assert stats.bond_counts[1:] == np.bincount(batch.bonds[:, 2].numpy(), minlength=4)[1:].tolist()
    plain_train, _, plain = dataset.training_sets(max_train=2, labels=False)
    assert len(plain_train) == 2 and plain.charge_counts == [] and plain_train.batch([0, 1]).bonds is None


def test_pyg_view_equals_the_flat_arrays(dataset):
    from torch_geometric.data import Batch

    graphs = dataset.as_pyg()
    assert len(graphs) == len(dataset)
    for k in range(len(dataset)):
        g = graphs[k]
        lo, hi = dataset.ptr[k], dataset.ptr[k + 1]
        assert torch.equal(g.pos, torch.from_numpy(dataset.positions[lo:hi]))
        assert g.z.tolist() == [dataset.atomic_numbers[t] for t in dataset.atom_types[lo:hi]]
        assert g.formal_charge.tolist() == dataset.formal_charges[lo:hi].tolist()
        pairs, orders = dataset.bonds.molecule(k)
        edges = {(int(i), int(j)): int(o) for (i, j), o in zip(g.edge_index.T.tolist(), g.edge_attr.tolist())}
        assert edges == {**{(int(i), int(j)): int(o) for (i, j), o in zip(pairs, orders)},
                         **{(int(j), int(i)): int(o) for (i, j), o in zip(pairs, orders)}}
        assert int(g.mol_id) == dataset.molecule[k]
    batch = Batch.from_data_list([graphs[k] for k in range(len(graphs))])
    assert torch.equal(batch.pos, torch.from_numpy(dataset.positions))


# ----------------------------------------------------------------------------- cache
def test_cache_is_reused_and_rebuilt_when_the_file_or_options_change(sdf_files, tmp_path):
    path = tmp_path / "set.sdf"
    path.write_bytes(sdf_files["mixed"].read_bytes())
    first = build_sdf_dataset(path, cache_dir=tmp_path, options=OPTIONS)
    assert not first.from_cache and sdf_cache_path("set", tmp_path).is_file()
    again = build_sdf_dataset(path, cache_dir=tmp_path, options=OPTIONS)
    assert again.from_cache and again.key == first.key and np.array_equal(again.positions, first.positions)
    assert again.report.skipped == first.report.skipped
    other = build_sdf_dataset(path, cache_dir=tmp_path, options=SDFOptions(max_atoms=70))
    assert not other.from_cache and other.key != first.key and other.report.skipped["too_large"] == 0
    # loading by file: the cached options stay as long as the file is the same
    assert load_sdf_dataset(str(path), tmp_path).key == other.key
    mol, ids = embed("CCN")
    write_records(tmp_path / "more.sdf", [("ethylamine", mol, ids[0])])
    path.write_bytes(path.read_bytes() + (tmp_path / "more.sdf").read_bytes())
    changed = load_sdf_dataset(str(path), tmp_path)
    assert not changed.from_cache and changed.key != other.key and changed.options == other.options
    assert len(changed) == len(other) + 1
    by_name = load_sdf_dataset("set", tmp_path)
    assert by_name.from_cache and by_name.key == changed.key
    leftovers = [p.name for p in (tmp_path / "sdf").iterdir() if p.name.startswith(".")]
    assert not leftovers


# ----------------------------------------------------------------------------- CLI
def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("moldiff: error:"), err
    assert "Traceback" not in err and all(w in lines[0] for w in words), lines[0]


def test_cli_data_sdf_then_train_resume_sample_evaluate(sdf_files, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOLDIFF_CACHE", str(cache))
    own = tmp_path / "own.sdf"
    own.write_bytes(sdf_files["mixed"].read_bytes())
    code, out, err = run_cli(capsys, "data", "sdf", own, "--name", "mine", "--max-atoms", "60")
    assert code == 0, err
    assert "kept 11 conformers of 9 molecules" in out and "skipped too_large: 1" in out and "--data mine" in out
    code, out, _ = run_cli(capsys, "data", "sdf", own, "--name", "mine", "--max-atoms", "60")
    assert code == 0 and "loaded from" in out
    run = tmp_path / "run"
    common = ["--set", "train.batch_size=2", "--set", "train.log_every=2", "--set", "train.val_every=4",
              "--set", "train.sample_every=4", "--set", "train.sample_n=2", "--set", "train.sample_steps=2"]
    code, out, err = run_cli(capsys, "train", "--config", DEBUG, "--data", "mine", "--run-dir", run,
                             "--set", "train.max_steps=4", *common)
    assert code == 0, err
    assert "model.num_features=12 for the dataset's 11 elements" in out
    code, out, err = run_cli(capsys, "train", "--run-dir", run, "--resume", "--set", "train.max_steps=6")
    assert code == 0, err
    assert "resumed from" in out
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 6
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["dataset"] == "mine" and saved["model"]["num_features"] == 12
    from moldiff.pipeline import MolDiffPipeline

    pipe = MolDiffPipeline.from_pretrained(run / "pipeline")
    assert pipe.elements == ("H", "B", "C", "N", "O", "F", "P", "S", "Cl", "Br", "I")
    assert pipe.atomic_numbers == [1, 5, 6, 7, 8, 9, 15, 16, 17, 35, 53]
    samples = tmp_path / "x.sdf"
    code, out, err = run_cli(capsys, "sample", "--checkpoint", run / "pipeline", "-n", "8", "--steps", "3",
                             "--out", samples, "--no-novelty", "--device", "cpu", "--threads", "1")
    assert code == 0, err
    written = [m for m in Chem.SDMolSupplier(str(samples), sanitize=False, removeHs=False) if m is not None]
    assert len(written) == 8
    symbols = {a.GetSymbol() for m in written for a in m.GetAtoms()}
    assert symbols <= set(pipe.elements) and symbols - {"H", "C", "N", "O", "F"}  # beyond QM9's five
    code, out, err = run_cli(capsys, "evaluate", samples, "--no-novelty")
    assert code == 0, err
    assert "8" in out
    # --data FILE.sdf: the dataset built from that file (its cached options), path saved absolute
    run2 = tmp_path / "run2"
    code, out, err = run_cli(capsys, "data", "sdf", sdf_files["mixed"], "--max-atoms", "60")
    assert code == 0, err
    monkeypatch.chdir(sdf_files["folder"])
    code, out, err = run_cli(capsys, "train", "--config", DEBUG, "--data", "mixed.sdf", "--run-dir", run2,
                             "--set", "train.max_steps=1", "--set", "train.batch_size=2")
    assert code == 0, err
    saved = yaml.safe_load((run2 / "config.yaml").read_text())
    assert saved["data"]["dataset"] == str(sdf_files["mixed"].resolve())
    # the file behind "mine" loses its iodine compound: the dataset is rebuilt, the run refuses it
    write_records(own, [r for r in sdf_files["good"] if r[0] != "iodo_cf3"])
    code, _, err = run_cli(capsys, "train", "--run-dir", run, "--resume", "--set", "train.max_steps=8")
    assert code == 2 and "rebuilding" in err
    assert err.strip().splitlines()[-1].startswith("moldiff: error:") and "data changed" in err


def test_the_druglike_config_trains_on_knn_graphs_with_in_training_samples(sdf_files, tmp_path, capsys, monkeypatch):
    """configs/druglike_small.yaml as the README runs it, shrunk: --data overrides its dataset, the
    network uses k-nearest-neighbour graphs, and the sampled metrics land in the log."""
    monkeypatch.setenv("MOLDIFF_CACHE", str(tmp_path / "cache"))
    code, out, err = run_cli(capsys, "data", "sdf", sdf_files["mixed"], "--name", "mini", "--max-atoms", "60")
    assert code == 0, err
    spread = float(out.split("coordinate spread of the training molecules: ")[1].split(" Å")[0])
    assert 0.5 < spread < 5.0  # drug-like molecules: about 1-3 Å per coordinate
    run = tmp_path / "druglike"
    code, out, err = run_cli(capsys, "train", "--config", ROOT / "configs" / "druglike_small.yaml", "--data", "mini",
                             "--run-dir", run, "--set", "model.hidden=16", "--set", "model.n_layers=2",
                             "--set", "train.batch_size=4", "--set", "train.max_steps=2", "--set", "train.sample_every=2",
                             "--set", "train.sample_n=2", "--set", "train.sample_steps=2", "--set", "train.val_every=2",
                             "--set", "train.log_every=1", "--threads", "1")
    assert code == 0, err
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["graph"] == "knn:16" and saved["data"]["dataset"] == "mini"
    header, *rows = (run / "log.csv").read_text().splitlines()
    last = dict(zip(header.split(","), rows[-1].split(",")))
    assert last["step"] == "2" and last["validity"] != "" and 0.0 <= float(last["validity"]) <= 1.0
    assert last["one_piece"] != "" and 0.0 <= float(last["one_piece"]) <= 1.0  # connectivity beside validity


def test_cli_bad_inputs_are_one_line_errors_and_write_nothing(sdf_files, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOLDIFF_CACHE", str(cache))
    empty = tmp_path / "empty.sdf"
    empty.write_text("\n  \n")
    flat = write_records(tmp_path / "flat.sdf", [("phenol_2d", sdf_files["flat"], -1)])
    tin, tin_ids = sdf_files["tin"]
    unknown = write_records(tmp_path / "tin.sdf", [("tin", tin, tin_ids[0])])
    big, big_ids = sdf_files["big"]
    large = write_records(tmp_path / "large.sdf", [("eicosane", big, big_ids[0])])
    garbage = tmp_path / "garbage.sdf"
    garbage.write_text(GARBAGE * 2)
    cases = [
        ((empty,), ("empty file",)),
        ((flat,), ("no usable molecules", "not_3d 1")),
        ((unknown,), ("no usable molecules", "unsupported_element 1")),
        ((large, "--max-atoms", "60"), ("no usable molecules", "too_large 1")),
        ((garbage,), ("no usable molecules", "unreadable 2")),
        ((tmp_path / "missing.sdf",), ("no such file",)),
        ((sdf_files["mixed"], "--elements", "C,H,Xx"), ("--elements", "Xx")),
        ((sdf_files["mixed"], "--split", "0.5,0.5"), ("--split",)),
        ((sdf_files["mixed"], "--name", "../up"), ("dataset name",)),
    ]
    for args, words in cases:
        code, _, err = run_cli(capsys, "data", "sdf", *args)
        one_line_error(code, err, *words)
    code, _, err = run_cli(capsys, "data", "sdf")
    one_line_error(code, err, "give the .sdf file")
    code, _, err = run_cli(capsys, "data", "qm9", "--max-atoms", "5")
    one_line_error(code, err, "--max-atoms", "only for")
    code, _, err = run_cli(capsys, "train", "--config", DEBUG, "--data", tmp_path / "missing.sdf", "--run-dir",
                           tmp_path / "r")
    one_line_error(code, err, "no such file")
    code, _, err = run_cli(capsys, "train", "--config", DEBUG, "--data", "nosuchset", "--run-dir", tmp_path / "r")
    one_line_error(code, err, "unknown dataset", "moldiff data sdf")
    assert not (tmp_path / "r").exists()
    assert not (cache / "sdf").exists() or not any((cache / "sdf").iterdir())  # nothing half-written
    # mixed good and bad records: the report counts them, nothing fails
    code, out, err = run_cli(capsys, "data", "sdf", sdf_files["mixed"], "--elements", "H,C,N,O,S,Cl,Br,F,P,I,B",
                             "--max-atoms", "60")
    assert code == 0, err
    assert "skipped unsupported_element: 1" in out
    with pytest.raises(SDFDataError, match="empty file"):
        build_sdf_dataset(empty, cache_dir=tmp_path)
