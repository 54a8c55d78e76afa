"""SDF / XYZ / CSV reading and atomic writing."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

from moldiff.chemistry import (
    MoleculeFileError,
    MoleculeRecord,
    edm_mol,
    read_molecules,
    write_csv,
    write_sdf,
    write_xyz,
)


def embedded_mol(smiles: str, seed: int = 42) -> Chem.Mol:
    """ETKDG + MMFF molecule with explicit hydrogens and a fixed seed."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=seed) == 0
    AllChem.MMFFOptimizeMolecule(mol)
    return mol


def record_of(smiles: str, name: str = "", properties: dict | None = None) -> MoleculeRecord:
    mol = embedded_mol(smiles)
    symbols = tuple(a.GetSymbol() for a in mol.GetAtoms())
    return MoleculeRecord(symbols, mol.GetConformer().GetPositions(), name, properties or {})


def assert_same_molecules(read, written):
    assert len(read) == len(written)
    for got, want in zip(read, written):
        assert got.error is None
        assert got.symbols == want.symbols
        np.testing.assert_allclose(got.positions, want.positions, atol=1e-4, rtol=0)


def one_line_error(path) -> str:
    with pytest.raises(MoleculeFileError) as info:
        read_molecules(path)
    message = str(info.value)
    assert "\n" not in message
    return message


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("cannot serialise this")


# ----------------------------------------------------------------------------------- round trips


def test_sdf_round_trip_keeps_symbols_coordinates_names_and_tags(tmp_path):
    records = [
        record_of("CCO", "ethanol", {"energy": -154.75, "source": "test"}),
        record_of("CC#N", "acetonitrile"),
        MoleculeRecord(("O", "H", "H"), np.array([[0.0, 0.0, 0.1173], [0.0, 0.7572, -0.4692], [0.0, -0.7572, -0.4692]])),
    ]
    path = tmp_path / "mols.sdf"
    write_sdf(path, records)
    read = read_molecules(path)
    assert_same_molecules(read, records)
    assert [r.name for r in read] == ["ethanol", "acetonitrile", ""]
    assert read[0].properties == {"energy": -154.75, "source": "test"}
    assert read[1].properties == {}


def test_sdf_accepts_rdkit_mols_and_pairs_and_keeps_bonds(tmp_path):
    mol = embedded_mol("CC#N")
    symbols = tuple(a.GetSymbol() for a in mol.GetAtoms())
    positions = mol.GetConformer().GetPositions()
    path = tmp_path / "mixed.sdf"
    write_sdf(path, [mol, (symbols, positions)])
    first, second = Chem.SDMolSupplier(str(path), removeHs=False, sanitize=False)
    assert first.GetNumBonds() == 5 and second.GetNumBonds() == 0  # pairs are coordinates only
    assert_same_molecules(read_molecules(path), [MoleculeRecord(symbols, positions)] * 2)


def test_sdf_writes_unsanitizable_table_bonded_molecules(tmp_path):
    # A generated sample can be over-bonded (here N with 4 bonds, no charge); it must still save.
    tetrahedron = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / np.sqrt(3)
    positions = np.vstack([np.zeros(3), 1.03 * tetrahedron])
    path = tmp_path / "bad.sdf"
    write_sdf(path, [edm_mol(("N", "H", "H", "H", "H"), positions)])
    assert read_molecules(path)[0].symbols == ("N", "H", "H", "H", "H")


def test_xyz_round_trip_multi_frame(tmp_path):
    records = [record_of("CCO", "ethanol"), record_of("c1ccccc1", "benzene"), record_of("O", "water")]
    path = tmp_path / "mols.xyz"
    write_xyz(path, records)
    read = read_molecules(path)
    assert_same_molecules(read, records)
    assert [r.name for r in read] == ["ethanol", "benzene", "water"]


def test_xyz_parses_odd_number_forms_and_atomic_numbers(tmp_path):
    path = tmp_path / "odd.xyz"
    path.write_text(
        "3\nfirst frame\n"
        "O 0. 0 1.2E-3\n"
        "H  -.75 1.2e+00 -4.692D-1\n"
        "1 0.75 2.1*^-1 -0.4692 extra columns ignored\n"
        "\n"
        "2\n\n"
        "C 0 0 0\n"
        "O 1.13 0 0\n"
    )
    first, second = read_molecules(path)
    assert first.symbols == ("O", "H", "H") and first.name == "first frame"
    np.testing.assert_allclose(first.positions, [[0, 0, 1.2e-3], [-0.75, 1.2, -0.4692], [0.75, 0.21, -0.4692]])
    assert second.symbols == ("C", "O") and second.name == ""


def test_xyz_bad_frame_in_the_middle_keeps_the_others(tmp_path):
    path = tmp_path / "mixed.xyz"
    path.write_text("1\na\nC 0 0 0\n1\nb\nXx 0 0 0\n1\nc\nN 0 0 0\n")
    a, b, c = read_molecules(path)
    assert a.symbols == ("C",) and c.symbols == ("N",)
    assert b.symbols == () and b.name == "b" and "Xx" in b.error


def test_xyz_truncated_frame_is_an_error_record(tmp_path):
    path = tmp_path / "cut.xyz"
    path.write_text("1\nok\nC 0 0 0\n5\ncut\nC 0 0 0\n")
    ok, cut = read_molecules(path)
    assert ok.error is None and "5 atoms announced, 1 present" in cut.error


# ------------------------------------------------------------------------------ bad input files


def test_sdf_with_one_broken_record_in_the_middle_reads_the_others(tmp_path):
    block = Chem.MolToMolBlock(embedded_mol("CCO"))
    broken = block.splitlines()
    broken[5] = "   this is not an atom line"
    path = tmp_path / "broken.sdf"
    path.write_text(f"{block}$$$$\n" + "\n".join(broken) + f"\n$$$$\n{block}$$$$\n")
    first, middle, last = read_molecules(path)
    assert first.error is None and last.error is None and len(first.symbols) == 9
    assert middle.symbols == () and "record 2" in middle.error


@pytest.mark.parametrize(("name", "content"), [("empty.sdf", ""), ("blank.sdf", "\n  \n"), ("empty.xyz", "")])
def test_empty_files_raise(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    assert "empty file" in one_line_error(tmp_path / name)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("garbage.sdf", "hello world\nthis is not\n$$$$\n"),
        ("garbage2.sdf", "garbage " * 50 + "\n\n\nmore\n"),
        ("garbage.xyz", "hello world\nthis is not\n"),
        ("binary.xyz", b"\x89PNG\r\n\x1a\n\x00\xff\xfe"),
    ],
)
def test_unparseable_files_raise(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert str(path) in one_line_error(path)


def test_missing_file_and_unknown_extension_raise(tmp_path):
    assert "no such file" in one_line_error(tmp_path / "missing.sdf")
    (tmp_path / "mols.mol2").write_text("x")
    assert "unknown extension" in one_line_error(tmp_path / "mols.mol2")
    assert isinstance(MoleculeFileError("x"), ValueError)


# ------------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize(
    ("writer", "name", "payload"),
    [
        (write_sdf, "out.sdf", [record_of("O"), (("C", "Xx"), np.zeros((2, 3)))]),
        (write_sdf, "out.sdf", [record_of("O", properties={"bad": Unprintable()})]),
        (write_xyz, "out.xyz", [record_of("O"), (("C", "Xx"), np.zeros((2, 3)))]),
        (write_csv, "out.csv", [{"a": 1}, {"a": Unprintable()}]),
    ],
)
def test_failed_write_leaves_old_file_and_no_debris(tmp_path, writer, name, payload):
    path = tmp_path / name
    path.write_text("precious old content\n")
    with pytest.raises((ValueError, RuntimeError)):
        writer(path, payload)
    assert path.read_text() == "precious old content\n"
    assert os.listdir(tmp_path) == [name]


def test_write_replaces_existing_file_with_normal_permissions(tmp_path):
    path = tmp_path / "out.xyz"
    path.write_text("old\n")
    write_xyz(path, [record_of("O", "water")])
    assert read_molecules(path)[0].name == "water"
    assert os.stat(path).st_mode & 0o044  # not the 0600 of a mkstemp file
    assert os.listdir(tmp_path) == ["out.xyz"]


def test_csv_rows_with_different_keys(tmp_path):
    path = tmp_path / "metrics.csv"
    write_csv(path, [{"smiles": "C", "valid": True}, {"smiles": None, "reason": "malformed: 1 atom(s)"}])
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["smiles", "valid", "reason"]
    assert rows == [
        {"smiles": "C", "valid": "True", "reason": ""},
        {"smiles": "", "valid": "", "reason": "malformed: 1 atom(s)"},
    ]
