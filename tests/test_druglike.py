"""Drug-sized training sets built offline (docs/drug_sized.md): ``scripts/build_druglike.py`` (SMILES
embedded by ETKDG + MMFF94, MOSES read from the molsets wheel) and ``scripts/geom_to_sdf.py`` (GEOM's
per-molecule pickles, read through a restricted unpickler), each read back by ``moldiff.data.sdf``.

Everything runs on a handful of molecules written here; the one test that downloads the MOSES wheel
is marked ``slow`` (``pytest -m slow tests/test_druglike.py``)."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import sys
import zipfile
from pathlib import Path

import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

from moldiff.data.sdf import build_sdf_dataset

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SMILES = [
    "CC(=O)Nc1ccc(O)cc1",  # paracetamol
    "CC(N)C(O)c1ccccc1",  # two open stereocentres: one stereoisomer is chosen, for every conformer
    "C1CC",  # unclosed ring: parse failure
    "O=C(O)c1ccccc1Cl",
]


def script(name: str, monkeypatch):
    spec = importlib.util.spec_from_file_location(f"moldiff_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def run(module, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", [module.__file__, *map(str, argv)])
    module.main()


def records(path: Path) -> list[Chem.Mol]:
    return [m for m in Chem.SDMolSupplier(str(path), removeHs=False)]


# ----------------------------------------------------------------------------- build_druglike.py
def test_build_druglike_embeds_skips_and_counts_and_the_sdf_reader_takes_it(tmp_path, monkeypatch, capsys):
    build = script("build_druglike", monkeypatch)
    smiles_file = tmp_path / "few.smi"
    smiles_file.write_text("SMILES\n# a comment\n" + "\n".join(f"{s},name{i}" for i, s in enumerate(SMILES)) + "\n")
    out, report = tmp_path / "few.sdf", tmp_path / "few.json"
    run(build, monkeypatch, "--smiles-file", smiles_file, "--out", out, "--n", 10, "--conformers", 2,
        "--no-progress", "--report", report)
    assert "failed: parse 1, embed 0, mmff_parameters 0" in capsys.readouterr().out
    mols = records(out)
    assert all(m is not None and m.GetNumConformers() == 1 for m in mols)
    titles = [m.GetProp("_Name") for m in mols]
    assert {t.rsplit("_", 1)[1] for t in titles} == {"0", "1", "3"} and titles == sorted(titles)
    for m in mols:
        assert m.GetConformer().Is3D() and any(a.GetAtomicNum() == 1 for a in m.GetAtoms())
        assert float(m.GetProp("mmff94_energy_kcal_mol")) < 1e3 and m.GetProp("mmff94_converged") in ("0", "1")
    # all conformers of the molecule with open stereocentres are one stereoisomer
    chiral = [m for m in mols if m.GetProp("smiles") == SMILES[1]]
    assert chiral and "@" in chiral[0].GetProp("stereo_smiles")
    for m in chiral:
        Chem.AssignStereochemistryFrom3D(m)
    assert len({Chem.MolToSmiles(Chem.RemoveHs(m)) for m in chiral}) == 1
    data = build_sdf_dataset(out, cache_dir=tmp_path / "cache")
    assert data.report.num_skipped == 0 and len(data) == len(mols) and data.num_molecules == 3


def test_build_druglike_output_does_not_depend_on_the_workers(tmp_path, monkeypatch):
    build = script("build_druglike", monkeypatch)
    smiles_file = tmp_path / "few.smi"
    smiles_file.write_text("\n".join(SMILES) + "\n")
    for workers in (1, 2):
        run(build, monkeypatch, "--smiles-file", smiles_file, "--out", tmp_path / f"w{workers}.sdf", "--n", 3,
            "--seed", 5, "--workers", workers, "--no-progress")
    assert (tmp_path / "w1.sdf").read_bytes() == (tmp_path / "w2.sdf").read_bytes()
    assert len(records(tmp_path / "w1.sdf")) in (2, 3)  # 3 drawn of 4; the broken one may be among them


def test_moses_smiles_are_read_from_the_wheel_without_importing_it(tmp_path, monkeypatch):
    build = script("build_druglike", monkeypatch)
    wheel = tmp_path / "molsets-test.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("moses/__init__.py", "raise ImportError('never imported')\n")
        archive.writestr("moses/dataset/data/test.csv.gz", gzip.compress(b"SMILES\nCCO\nc1ccccc1\n"))
    assert build.read_moses(wheel, "test") == ["CCO", "c1ccccc1"]
    fake = tmp_path / build.MOSES_WHEEL  # the pinned name with other bytes: refused
    fake.write_bytes(wheel.read_bytes())
    with pytest.raises(SystemExit, match="SHA-256"):
        build.read_moses(fake, "test")


@pytest.mark.slow
def test_the_molsets_wheel_on_pypi_holds_the_moses_smiles(tmp_path, monkeypatch):
    build = script("build_druglike", monkeypatch)
    smiles = build.read_moses(build.download_moses_wheel(tmp_path), "train")
    assert len(smiles) == 1_584_663 and Chem.MolFromSmiles(smiles[0]) is not None


# ----------------------------------------------------------------------------- geom_to_sdf.py
def geom_pickle(path: Path, smiles: str, energies: list[float], first_id: int, protocol: int = 4) -> list[Chem.Mol]:
    """A GEOM-layout pickle: ``{"smiles", "conformers": [{"rd_mol", "geom_id", "totalenergy", ...}]}``."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = 3
    ids = list(AllChem.EmbedMultipleConfs(mol, len(energies), params))
    assert len(ids) == len(energies)
    confs = []
    for k, (cid, energy) in enumerate(zip(ids, energies)):
        one = Chem.Mol(mol, confId=cid)
        confs.append({"geom_id": first_id + k, "set": k + 1, "degeneracy": 1, "totalenergy": energy,
                      "relativeenergy": 627.5 * (energy - min(energies)), "boltzmannweight": 1.0 / len(energies),
                      "conformerweights": [1.0 / len(energies)], "rd_mol": one})
    data = {"smiles": smiles, "charge": 0, "totalconfs": len(energies), "uniqueconfs": len(energies),
            "conformers": confs}
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    return [c["rd_mol"] for c in confs]


class Sneaky:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless here, but any callable could stand in its place


def test_geom_pickles_become_a_multi_conformer_sdf_lowest_energy_first(tmp_path, monkeypatch, capsys):
    geom = script("geom_to_sdf", monkeypatch)
    folder = tmp_path / "drugs"
    folder.mkdir()
    flexible = geom_pickle(folder / "CCCCOc1ccccc1.pickle", "CCCCOc1ccccc1", [-5.2, -5.4, -5.3, -5.1], 100)
    geom_pickle(folder / "NC(=O)c1ccc(Cl)cc1.pickle", "NC(=O)c1ccc(Cl)cc1", [-9.0], 200, protocol=2)
    (folder / "broken.pickle").write_bytes(b"not a pickle")
    (folder / "empty.pickle").write_bytes(pickle.dumps({"smiles": "C", "conformers": []}))
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "geom.sdf"
    run(geom, monkeypatch, folder, "--out", out, "--max-conformers", 3, "--no-progress")
    said = capsys.readouterr().out
    assert "2 molecules, 4 conformers from 4 files" in said and "unreadable_pickle 1, no_conformers 1" in said
    mols = records(out)
    assert [m.GetProp("_Name") for m in mols] == ["geom_101", "geom_102", "geom_100", "geom_200"]
    assert [m.GetProp("conformer_rank") for m in mols] == ["0", "1", "2", "0"]
    assert float(mols[0].GetProp("totalenergy_hartree")) == -5.4
    # coordinates as GEOM stored them (RDKit pickles them in single precision)
    want = flexible[1].GetConformer().GetPositions()
    got = mols[0].GetConformer().GetPositions()
    assert abs(want - got).max() < 1e-3
    data = build_sdf_dataset(out, cache_dir=tmp_path / "cache")
    assert data.report.num_skipped == 0 and len(data) == 4 and data.num_molecules == 2
    # single files work too, and 0 keeps every conformer
    run(geom, monkeypatch, folder / "CCCCOc1ccccc1.pickle", "--out", tmp_path / "one.sdf", "--max-conformers", 0,
        "--no-progress")
    assert len(records(tmp_path / "one.sdf")) == 4


def test_geom_pickles_that_ask_for_other_objects_are_refused(tmp_path, monkeypatch):
    geom = script("geom_to_sdf", monkeypatch)
    folder = tmp_path / "drugs"
    folder.mkdir()
    geom_pickle(folder / "a.pickle", "CCO", [-1.0], 1)
    (folder / "b.pickle").write_bytes(pickle.dumps({"smiles": "CC", "conformers": [{"rd_mol": Sneaky()}]}))
    out = tmp_path / "geom.sdf"
    with pytest.raises(SystemExit, match=r"b.pickle: refusing to load posix.getcwd"):
        run(geom, monkeypatch, folder, "--out", out, "--no-progress")
    assert not out.exists() and not list(tmp_path.glob(".geom.sdf*"))  # nothing half-written
    with pytest.raises(pickle.UnpicklingError):
        geom.load_pickle(folder / "b.pickle")
    # --unsafe-pickle loads it (the object is not a molecule, so the molecule is skipped)
    run(geom, monkeypatch, folder, "--out", out, "--no-progress", "--unsafe-pickle")
    assert len(records(out)) == 1
