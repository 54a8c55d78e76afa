"""Fragment- and formula-conditioned sampling (moldiff.inpainting) and its RDKit helpers.

A tiny random pipeline (no training needed: the guarantees tested here hold for any network):
known atoms end exactly at the fragment geometry up to a rigid motion, formulas are honoured
exactly, fragment-conditioned sampling is E(3)-equivariant, bad input gives one-line errors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from rdkit import Chem
from rdkit.Chem import AllChem

import moldiff
from moldiff.chemistry.fragments import (
    FormulaError,
    cut_fragment,
    format_formula,
    formula_problem,
    kabsch_rmsd,
    murcko_scaffold_atoms,
    parse_formula,
    retained_in_place,
    substructure_retained,
)
from moldiff.chemistry.io import MoleculeFileError, write_sdf, write_xyz
from moldiff.geometry import random_orthogonal
from moldiff.inpainting import Fragment, fragment_report, fragment_reports, formula_honoured, inpaint_arrays
from moldiff.models import DenoiserConfig
from moldiff.pipeline import FORMAT_VERSION, MolDiffPipeline, SampleRequest

MAX_ATOMS = 20


def tiny_config() -> dict:
    """The config.json a debug_tiny training run writes, with a made-up size distribution."""
    sizes = [0] * (MAX_ATOMS + 1)
    for n in range(3, MAX_ATOMS + 1):
        sizes[n] = 1 + (n % 4)
    return {
        "format_version": FORMAT_VERSION,
        "denoiser": DenoiserConfig(num_features=6, hidden=16, n_layers=2).to_dict(),
        "schedule": {"kind": "polynomial", "grid": 1000, "power": 2.0, "precision": 1e-5},
        "features": {"num_types": 5, "include_charges": True, "type_scale": 0.25, "charge_scale": 0.1},
        "statistics": {"elements": ["H", "C", "N", "O", "F"], "size_counts": sizes, "element_counts": [10, 7, 1, 1, 1]},
        "atomic_numbers": [1, 6, 7, 8, 9],
        "parametrization": "eps",
        "metadata": {},
    }


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return MolDiffPipeline.from_config(tiny_config())


@pytest.fixture(scope="module")
def pipe64():
    torch.manual_seed(0)
    return MolDiffPipeline.from_config(tiny_config()).to(torch.float64)


@pytest.fixture(scope="module")
def benzene():
    return Fragment.from_smiles("c1ccccc1")


@pytest.fixture(scope="module")
def acetamide():
    return Fragment.from_smiles("CC(=O)N", keep_hydrogens=True)


def assert_fragment_exact(arrays, fragment):
    k = fragment.num_atoms
    for j in range(len(arrays.positions)):
        assert arrays.fault_step[j] == -1
        assert tuple(arrays.symbols(j)[:k]) == fragment.symbols
        assert kabsch_rmsd(arrays.positions[j][:k], fragment.positions) < 1e-5
        # pairwise distances too: the check does not rely on our own Kabsch
        d_gen = np.linalg.norm(arrays.positions[j][:k, None] - arrays.positions[j][None, :k], axis=-1)
        d_ref = np.linalg.norm(fragment.positions[:, None] - fragment.positions[None], axis=-1)
        assert np.abs(d_gen - d_ref).max() < 1e-5
        np.testing.assert_allclose(arrays.positions[j].mean(0), 0.0, atol=1e-9)


# ------------------------------------------------------------------------------ fragment sampling


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "ddim:0.5"])
def test_known_atoms_end_exactly_at_fragment(pipe, benzene, sampler):
    arrays = inpaint_arrays(pipe, 3, fragment=benzene, num_atoms=14, steps=8, sampler=sampler, seed=1)
    assert [len(p) for p in arrays.positions] == [14, 14, 14]
    assert_fragment_exact(arrays, benzene)
    assert arrays.extra["num_known_atoms"] == 6 and arrays.extra["conditioning"] == "fragment"
    # the fragment's place in the molecule is the model's choice, not pinned to the centre
    assert max(np.linalg.norm(p[:6].mean(0)) for p in arrays.positions) > 1e-3
    # and fragment_offset moves each molecule back onto the fragment's own coordinates
    for p, offset in zip(arrays.positions, arrays.extra["fragment_offset"]):
        np.testing.assert_allclose(p[:6] + offset, benzene.positions, atol=1e-9)


def test_fragment_with_hydrogens_and_resampling(pipe, acetamide):
    arrays = inpaint_arrays(pipe, 2, fragment=acetamide, num_atoms=12, steps=6, resample=3, seed=2)
    assert_fragment_exact(arrays, acetamide)
    assert arrays.extra["network_evaluations"] == 6 * 3 + 1


def test_sizes_drawn_at_least_fragment_size(pipe, acetamide):
    arrays = inpaint_arrays(pipe, 12, fragment=acetamide, steps=2, seed=3)
    sizes = [len(p) for p in arrays.positions]
    assert min(sizes) >= acetamide.num_atoms and max(sizes) <= MAX_ATOMS
    assert len(set(sizes)) > 1


def test_same_seed_same_output(pipe, benzene):
    a = inpaint_arrays(pipe, 2, fragment=benzene, num_atoms=10, steps=4, seed=5)
    b = inpaint_arrays(pipe, 2, fragment=benzene, num_atoms=10, steps=4, seed=5)
    for pa, pb in zip(a.positions, b.positions):
        np.testing.assert_array_equal(pa, pb)


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_fragment_sampling_is_equivariant(pipe64, acetamide, guidance):
    """Deterministic DDIM (eta = 0), resample = 1, float64. The free atoms start from noise that a
    rotated fragment cannot rotate by itself, so the test passes the same noise explicitly
    (``initial_noise``) and, for the rotated run, that noise rotated as well: every input of the
    run is then rotated by Q, and the outputs must be exactly the first run's rotated by Q. The
    fragment is also translated (its frame must not matter) and Q includes a reflection (E(3))."""
    n, size = 2, 11
    gen = torch.Generator().manual_seed(7)
    noise_pos = torch.randn(n * size, 3, generator=gen, dtype=torch.float64)
    noise_h = torch.randn(n * size, 6, generator=gen, dtype=torch.float64)
    kwargs = dict(num_atoms=size, steps=12, sampler="ddim", resample=1, seed=0, valence_guidance=guidance)
    ref = inpaint_arrays(pipe64, n, fragment=acetamide, initial_noise=(noise_pos, noise_h), **kwargs)
    for reflect in (False, True):
        q = random_orthogonal(generator=gen, reflect=reflect)
        moved = acetamide.transformed(q.numpy(), np.array([3.0, -1.0, 2.0]))
        out = inpaint_arrays(pipe64, n, fragment=moved, initial_noise=(noise_pos @ q.T, noise_h), **kwargs)
        for j in range(n):
            np.testing.assert_array_equal(ref.types[j], out.types[j])
            expected = ref.positions[j] @ q.numpy().T
            scale = np.abs(expected).max()
            assert np.abs(out.positions[j] - expected).max() <= 1e-9 * max(scale, 1.0)
        assert_fragment_exact(out, moved)


def gaussian_data_pipeline(s2: float) -> MolDiffPipeline:
    """A pipeline whose network is the exact noise predictor for data ``x ~ N(0, s2 I)``:
    ``sigma_t z / (alpha_t^2 s2 + sigma_t^2)`` (positions and features alike)."""
    pipe = MolDiffPipeline.from_config(tiny_config())

    def gaussian_oracle(pos_t, h_t, t, batch, context=None, edge_index=None):
        alpha, sigma = pipe.schedule.alpha_sigma(t)
        scale = (sigma / (alpha**2 * s2 + sigma**2)).to(pos_t.dtype)[batch].unsqueeze(-1)
        return scale * pos_t, scale * h_t

    pipe.predict_noise = gaussian_oracle
    return pipe


def test_fragment_centroid_is_free_in_the_zero_com_subspace():
    """The centre-of-mass treatment, checked against an exact answer. With data x ~ N(0, s^2 I) on
    the zero-CoM subspace the optimal noise predictor is ``sigma_t z / (alpha_t^2 s^2 + sigma_t^2)``
    and, given the fragment's shape, the fragment's centroid is still free: per coordinate it has
    variance ``s^2 (1/k - 1/N)``, each free atom ``s^2 (1 - 1/N)``. Pinning the fragment at the
    molecule's centre (placing it at the origin, then removing the mean) would give ~0."""
    s2, k, size = 2.25, 4, 10
    pipe = gaussian_data_pipeline(s2)
    shape = Fragment(["C"] * k, np.random.default_rng(0).normal(size=(k, 3)))
    # noise scale 1: the model's own posterior (lower temperatures sample a narrower distribution)
    arrays = inpaint_arrays(pipe, 300, fragment=shape, num_atoms=size, steps=60, resample=2, seed=0, noise_scale=1.0)
    positions = np.stack(arrays.positions)
    centroid_var = positions[:, :k].mean(1).var()
    free_var = positions[:, k:].var()
    # 60 steps under-disperse by ~10% (unconditional sampling too); sampling error ~5%
    assert abs(centroid_var / (s2 * (1 / k - 1 / size)) - 1) < 0.25
    assert abs(free_var / (s2 * (1 - 1 / size)) - 1) < 0.25
    assert_fragment_exact(arrays, shape)


# ------------------------------------------------------------------------------ formula sampling


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_formula_honoured_exactly(pipe, sampler):
    arrays = inpaint_arrays(pipe, 3, formula="C7H8O", steps=6, sampler=sampler, seed=4)
    for j in range(3):
        assert formula_honoured(arrays.symbols(j), "C7H8O")
        assert len(arrays.positions[j]) == 16
    assert arrays.extra["formula"] == "C7H8O"


def test_fragment_and_formula_together(pipe, benzene):
    arrays = inpaint_arrays(pipe, 2, fragment=benzene, formula={"C": 7, "H": 8, "O": 1}, steps=5, resample=2, seed=6)
    assert_fragment_exact(arrays, benzene)
    for j in range(2):
        assert formula_honoured(arrays.symbols(j), "C7OH8")
    assert arrays.extra["conditioning"] == "fragment+formula"


# ------------------------------------------------------------------------------ bad input


def one_line_error(exc_info) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(fragment=Fragment(["C", "Cl"], [[0, 0, 0], [1.77, 0, 0]]), num_atoms=8), "element Cl is not in the model's vocabulary"),
        (dict(fragment="c1ccccc1", num_atoms=8), "must be a Fragment"),
        (dict(num_atoms=8), "give a fragment, a formula or both"),
        (dict(formula="C2H6S"), "element S is not in the model's vocabulary"),
        (dict(formula="C7H8O", num_atoms=15), "has 16 atoms but num_atoms is 15"),
        (dict(formula="C9H20O"), "more than the model's maximum of 20"),
        (dict(formula="C7H7O"), "cannot make a neutral closed-shell molecule: odd total valence"),
        (dict(formula="CH6"), "cannot make a neutral closed-shell molecule: too few bonds"),
        (dict(formula="C7H8O)"), "cannot parse formula"),
        (dict(formula="Xx2"), "unknown element"),
        (dict(formula="C2H6", num_atoms=[8, 8]), "got 2 sizes for 3 molecules"),
        (dict(formula="C2H6", resample=0), "resample must be an integer >= 1"),
        (dict(formula="C2H6", valence_guidance=-1.0), "valence_guidance must be a finite number >= 0"),
        (dict(fragment=Fragment(["C", "O"], [[0, 0, 0], [1.43, 0, 0]]), num_atoms=8, valence_guidance=1.0),
         "valence guidance needs the fragment's bonds"),
        (dict(formula="C2H6", initial_noise=(np.zeros((3, 3)), np.zeros((3, 6)))), r"initial_noise must have shapes \(24, 3\)"),
    ],
)
def test_bad_conditioning(pipe, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match) as exc_info:
        inpaint_arrays(pipe, 3, steps=2, **kwargs)
    one_line_error(exc_info)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(formula="C2H6", formula_draws=-1), "formula_draws must be an integer >= 0"),
        (dict(formula="C2H6", formula_draws=1.5), "formula_draws must be an integer >= 0"),
        (dict(formula="C7H7O"), "cannot make a neutral closed-shell molecule: odd total valence"),
        (dict(formula="C2H6", composition="data"), "does not combine with a fragment or formula"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(time_power=0.0), "time_power must be a positive number"),
        (dict(noise_scale=1.5), r"noise_scale must be in \[0, 1\]"),
    ],
)
def test_bad_requests_fail_in_one_line_before_sampling(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match) as exc_info:
        pipe.generate(SampleRequest(3, **{"steps": 2, **kwargs}))
    one_line_error(exc_info)


def test_fragment_size_errors(pipe, benzene):
    big = Fragment(["C"] * (MAX_ATOMS + 1), np.arange(3 * (MAX_ATOMS + 1), dtype=float).reshape(-1, 3))
    with pytest.raises(ValueError, match="fragment has 21 atoms, more than the model's maximum of 20") as e:
        inpaint_arrays(pipe, 1, fragment=big, steps=2)
    one_line_error(e)
    with pytest.raises(ValueError, match="fragment has 6 atoms but num_atoms is 5") as e:
        inpaint_arrays(pipe, 1, fragment=benzene, num_atoms=5, steps=2)
    one_line_error(e)
    with pytest.raises(ValueError, match="fragment has 6 C but formula C5H12 has 5") as e:
        inpaint_arrays(pipe, 1, fragment=benzene, formula="C5H12", steps=2)
    one_line_error(e)
    with pytest.raises(ValueError, match="initial_noise needs fixed molecule sizes") as e:
        inpaint_arrays(pipe, 1, fragment=benzene, steps=2, initial_noise=(np.zeros((6, 3)), np.zeros((6, 6))))
    one_line_error(e)


def test_unparsable_smiles():
    with pytest.raises(ValueError, match="cannot parse fragment SMILES 'c1cccc'") as e:
        Fragment.from_smiles("c1cccc")
    one_line_error(e)


def test_bad_fragment_files(tmp_path):
    garbage = tmp_path / "garbage.sdf"
    garbage.write_text("this is not\na molecule\n")
    broken = tmp_path / "broken.sdf"
    broken.write_text("title\n  program\n\n  2  1  0  0  0  0  0  0  0  0999 V2000\n    0.0 x\nM  END\n$$$$\n")
    flat = tmp_path / "flat.mol"
    mol = Chem.MolFromSmiles("CCO")
    AllChem.Compute2DCoords(mol)
    Chem.MolToMolFile(mol, str(flat))
    empty = tmp_path / "empty.sdf"
    empty.write_text("")
    for path, match in [
        (garbage, "no molecule records found"),
        (broken, "could not be parsed"),
        (flat, "2D coordinates"),
        (empty, "empty file"),
        (tmp_path / "missing.sdf", "no such file"),
        (tmp_path / "frag.pdb", "unknown fragment file extension"),
    ]:
        with pytest.raises(MoleculeFileError, match=match) as e:
            Fragment.from_file(path)
        one_line_error(e)


# ------------------------------------------------------------------------------ loading fragments


def test_fragment_from_smiles_is_deterministic_and_3d(benzene):
    again = Fragment.from_smiles("c1ccccc1", seed=0)
    np.testing.assert_array_equal(again.positions, benzene.positions)
    assert benzene.symbols == ("C",) * 6
    ring = np.linalg.norm(benzene.positions - np.roll(benzene.positions, 1, axis=0), axis=1)
    assert np.all(np.abs(ring - 1.39) < 0.03)  # MMFF94 aromatic C-C
    with_h = Fragment.from_smiles("c1ccccc1", keep_hydrogens=True)
    assert with_h.symbols.count("H") == 6 and with_h.num_atoms == 12


def test_fragment_from_files_round_trip(tmp_path, acetamide):
    sdf, mol_file, xyz = tmp_path / "a.sdf", tmp_path / "a.mol", tmp_path / "a.xyz"
    write_sdf(sdf, [acetamide.mol])
    Chem.MolToMolFile(acetamide.mol, str(mol_file))
    write_xyz(xyz, [(acetamide.symbols, acetamide.positions)])
    for path in (sdf, mol_file, xyz):
        loaded = Fragment.from_file(path)
        assert loaded.symbols == acetamide.symbols
        np.testing.assert_allclose(loaded.positions, acetamide.positions, atol=1e-4)
        assert loaded.mol is not None
        assert substructure_retained(acetamide.mol, loaded.mol)
    heavy = Fragment.from_file(sdf, keep_hydrogens=False)
    assert heavy.symbols == ("C", "C", "O", "N")


# ------------------------------------------------------------------------------ reports and helpers


def ethylbenzene_ring_first():
    """Ethylbenzene with H, 3D, renumbered so that its ring carbons are atoms 0..5 (ring order)."""
    mol = Chem.AddHs(Chem.MolFromSmiles("CCc1ccccc1"))
    params = AllChem.ETKDGv3()
    params.randomSeed = 0
    AllChem.EmbedMolecule(mol, params)
    AllChem.MMFFOptimizeMolecule(mol)
    order = [2, 3, 4, 5, 6, 7, 0, 1] + list(range(8, mol.GetNumAtoms()))
    mol = Chem.RenumberAtoms(mol, order)
    return [a.GetSymbol() for a in mol.GetAtoms()], mol.GetConformer().GetPositions()


def test_fragment_report_on_a_real_molecule(benzene):
    symbols, positions = ethylbenzene_ring_first()
    q = random_orthogonal(generator=torch.Generator().manual_seed(0), reflect=False).numpy()
    ring = Fragment(symbols[:6], positions[:6] @ q.T + 5.0, benzene.mol)  # same ring, another frame
    report = fragment_report(ring, symbols, positions)
    assert report.retained and report.retained_in_place and report.bonds == "rdDetermineBonds"
    assert report.rmsd < 1e-9
    # ETKDG's benzene on its own is a slightly different ring: retained, small RMSD
    report = fragment_report(benzene, symbols, positions)
    assert report.retained and report.retained_in_place and 0 < report.rmsd < 0.1
    # six carbons that are not the ring: the ring is still in the molecule, but not in place
    shuffled = [6, 7, 0, 1, 2, 3] + [4, 5] + list(range(8, len(symbols)))
    report = fragment_report(benzene, [symbols[i] for i in shuffled], positions[shuffled])
    assert report.retained and not report.retained_in_place
    # no pyridine in ethylbenzene; a fragment known by coordinates only matches by connectivity
    pyridine = Fragment.from_smiles("c1ccncc1")
    assert not fragment_report(pyridine, symbols, positions).retained
    bare = Fragment(symbols[:6], positions[:6])
    report = fragment_report(bare, symbols, positions)
    assert report.retained and report.retained_in_place


def test_fragment_reports_over_a_run(pipe, benzene):
    arrays = inpaint_arrays(pipe, 2, fragment=benzene, num_atoms=12, steps=3, seed=0)
    reports = fragment_reports(benzene, arrays)
    assert len(reports) == 2
    assert all(r.rmsd < 1e-5 for r in reports)
    assert all(r.bonds in ("rdDetermineBonds", "EDM table", "none") for r in reports)


def test_parse_and_format_formula():
    assert parse_formula("C7H8O") == {"C": 7, "H": 8, "O": 1}
    assert parse_formula("CH3CH2OH") == {"C": 2, "H": 6, "O": 1}
    assert parse_formula("Cl2") == {"Cl": 2}
    assert parse_formula({"C": 2, "H": 6, "N": 0}) == {"C": 2, "H": 6}
    assert format_formula({"O": 1, "H": 8, "C": 7}) == "C7H8O"
    assert format_formula({"O": 1, "H": 2}) == "H2O"
    for bad in ["", "c7h8", "C7H8O+", "C(H3)2", "C0H4", "Qq"]:
        with pytest.raises(FormulaError):
            parse_formula(bad)
    assert formula_problem(parse_formula("C7H8O")) is None
    assert formula_problem(parse_formula("H2")) is None
    assert "odd total valence" in formula_problem(parse_formula("CH3"))
    assert "too few bonds" in formula_problem(parse_formula("C2H8"))


def test_kabsch_rmsd_is_rigid_but_not_mirror():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(7, 3))
    q = random_orthogonal(generator=torch.Generator().manual_seed(1), reflect=False).numpy()
    assert kabsch_rmsd(points @ q.T + 4.0, points) < 1e-12
    mirror = points * np.array([1.0, 1.0, -1.0])
    assert kabsch_rmsd(mirror, points) > 1e-3
    assert np.isnan(kabsch_rmsd(np.full((7, 3), np.nan), points))


def test_scaffold_cut_and_retention():
    mol = Chem.AddHs(Chem.MolFromSmiles("Cc1ccc(O)cc1C=O"))
    scaffold = murcko_scaffold_atoms(mol)
    assert sorted(mol.GetAtomWithIdx(i).GetSymbol() for i in scaffold) == ["C"] * 6
    assert all(mol.GetAtomWithIdx(i).GetIsAromatic() for i in scaffold)
    assert murcko_scaffold_atoms(Chem.AddHs(Chem.MolFromSmiles("CCO"))) == []
    ring = cut_fragment(mol, scaffold)
    assert ring.GetNumAtoms() == 6 and ring.GetNumBonds() == 6
    assert substructure_retained(ring, mol)
    assert not substructure_retained(ring, Chem.AddHs(Chem.MolFromSmiles("C1CCCCC1")))
    # in place: the kept atoms come first in the cut, so the molecule renumbered the same way matches
    rest = [i for i in range(mol.GetNumAtoms()) if i not in scaffold]
    assert retained_in_place(ring, Chem.RenumberAtoms(mol, scaffold + rest))
    assert not retained_in_place(ring, mol)


def test_resampling_defaults_to_the_measured_setting(pipe):
    """``resample=None`` (the API and CLI default) means DEFAULT_RESAMPLE rounds per step."""
    from moldiff.inpainting import DEFAULT_RESAMPLE

    arrays = inpaint_arrays(pipe, 1, formula="CH4", steps=3, seed=0)
    assert arrays.extra["resample"] == DEFAULT_RESAMPLE > 1
    assert np.all(arrays.extra["network_evaluations"] == 3 * DEFAULT_RESAMPLE + 1)


# ------------------------------------------------------------------------------ open-valence guidance


def test_open_valences_of_smiles_and_cut_fragments(benzene):
    assert benzene.open_valences().tolist() == [1] * 6
    assert Fragment.from_smiles("c1ccncc1").open_valences().tolist() == [1, 1, 1, 0, 1, 1]
    assert Fragment.from_smiles("CC(=O)N", keep_hydrogens=True).open_valences().tolist() == [0] * 9
    assert Fragment(["C", "C"], [[0, 0, 0], [1.5, 0, 0]]).open_valences() is None  # no bonds known
    ethanol = Chem.AddHs(Chem.MolFromSmiles("CCO"))
    assert AllChem.EmbedMolecule(ethanol, randomSeed=1) == 0
    cut = cut_fragment(ethanol, [0, 1])  # the two carbons: 3 H + the C-C / 2 H + O + the C-C
    assert Fragment(["C", "C"], cut.GetConformer().GetPositions(), cut).open_valences().tolist() == [3, 3]


def _soft_counts(x0, known, free):
    from moldiff.inpainting import NEIGHBOUR_CUTOFF, NEIGHBOUR_WIDTH

    d = torch.cdist(x0[known], x0[free])
    return torch.sigmoid((NEIGHBOUR_CUTOFF - d) / NEIGHBOUR_WIDTH).sum(-1)


def _guide(pos, eps, alpha, sigma, slots, known, free, strength=1.0):
    from moldiff.inpainting import _valence_guide

    i = torch.tensor([a for a in known for _ in free])
    j = torch.tensor([b for _ in known for b in free])
    which = torch.tensor([r for r, _ in enumerate(known) for _ in free])
    a = torch.full((len(pos), 1), alpha, dtype=torch.float64)
    s = torch.full((len(pos), 1), sigma, dtype=torch.float64)
    out = _valence_guide(pos, eps, a, s, torch.stack([i, j, which]), torch.tensor(slots, dtype=torch.float64), len(known), strength)
    return (pos - sigma * out) / alpha, out


def test_valence_guidance_moves_the_clean_estimate_towards_the_open_valences():
    """One fragment atom (row 0) with two free atoms at 1.1 Å. The clean estimate is what the
    noise estimate implies, x0 = (z - sigma eps) / alpha; guidance changes only the free atoms' part."""
    from moldiff.inpainting import GUIDANCE_ITERATIONS, GUIDANCE_MAX_MOVE

    gen = torch.Generator().manual_seed(0)
    x0 = torch.tensor([[0.0, 0, 0], [1.1, 0, 0], [-0.4, 1.02, 0]], dtype=torch.float64)
    alpha, sigma = 0.8, 0.6
    eps = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    pos = alpha * x0 + sigma * eps
    # Two neighbours but one open valence: the free atoms move away, the count falls towards 1.
    new, _ = _guide(pos, eps, alpha, sigma, [1], [0], [1, 2])
    assert torch.allclose(new[0], x0[0], atol=1e-12)
    assert (new[1:].norm(dim=-1) > x0[1:].norm(dim=-1) + 0.1).all()
    assert (new - x0).norm(dim=-1).max() <= GUIDANCE_ITERATIONS * GUIDANCE_MAX_MOVE + 1e-9
    for _ in range(6):  # evaluation after evaluation (the network's estimate held fixed here)
        new, _ = _guide(alpha * new + sigma * eps, eps, alpha, sigma, [1], [0], [1, 2])
    assert abs(_soft_counts(new, [0], [1, 2]).item() - 1.0) < 0.2 < _soft_counts(x0, [0], [1, 2]).item() - 1.0
    # Two open valences: already satisfied, nothing moves (beyond the sigmoid's tail).
    same, _ = _guide(pos, eps, alpha, sigma, [2], [0], [1, 2])
    assert (same - x0).norm(dim=-1).max() < 1e-3
    # One open valence and only a free atom 2.6 Å away: it is pulled in.
    far = torch.tensor([[0.0, 0, 0], [2.6, 0, 0]], dtype=torch.float64)
    pulled, _ = _guide(alpha * far + sigma * eps[:2], eps[:2], alpha, sigma, [1], [0], [1])
    assert pulled[1, 0] < 2.6 - 0.05 and torch.allclose(pulled[1, 1:], far[1, 1:], atol=1e-12)
    # Strength 0 returns the network's estimate.
    _, unchanged = _guide(pos, eps, alpha, sigma, [1], [0], [1, 2], strength=0.0)
    assert torch.allclose(unchanged, eps, atol=1e-12)


def test_valence_guidance_is_rotation_and_reflection_equivariant():
    gen = torch.Generator().manual_seed(1)
    pos = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    known, free, slots = [0, 1], [2, 3, 4, 5, 6], [1, 2]
    _, ref = _guide(pos, eps, 0.9, 0.4, slots, known, free)
    assert not torch.allclose(ref, eps)  # the guidance acts here
    for reflect in (False, True):
        q = random_orthogonal(generator=gen, reflect=reflect).to(torch.float64)
        _, out = _guide(pos @ q.T, eps @ q.T, 0.9, 0.4, slots, known, free)
        assert torch.allclose(out, ref @ q.T, atol=1e-10)


def test_valence_guidance_in_sampling_gives_each_ring_carbon_one_new_neighbour(benzene):
    """Free atoms drawn around a benzene ring by the exact noise predictor of Gaussian data
    (s = 1.5 Å, as in the centroid test): unguided they crowd or miss the ring carbons; guided,
    nearly every carbon ends with exactly one free atom within 1.8 Å, and the ring stays exact."""
    pipe = gaussian_data_pipeline(2.25)

    def miscount(arrays):  # mean over molecules of sum over ring carbons (new neighbours - 1)^2
        return np.mean([(((np.linalg.norm(p[:6, None] - p[None, 6:], axis=-1) < 1.8).sum(1) - 1.0) ** 2).sum()
                        for p in arrays.positions])

    kwargs = dict(fragment=benzene, num_atoms=12, steps=20, resample=1, seed=3, noise_scale=1.0)
    plain = inpaint_arrays(pipe, 40, valence_guidance=0.0, **kwargs)
    guided = inpaint_arrays(pipe, 40, valence_guidance=1.0, **kwargs)
    assert_fragment_exact(guided, benzene)
    assert guided.extra["valence_guidance"] == 1.0 and plain.extra["valence_guidance"] == 0.0
    assert miscount(plain) > 3.0 and miscount(guided) < 0.5


def test_valence_guidance_default_applies_to_fragments_with_bonds(pipe, benzene):
    from moldiff.inpainting import DEFAULT_VALENCE_GUIDANCE

    assert DEFAULT_VALENCE_GUIDANCE > 0
    bonded = inpaint_arrays(pipe, 1, fragment=benzene, num_atoms=10, steps=2, resample=1)
    assert bonded.extra["valence_guidance"] == DEFAULT_VALENCE_GUIDANCE
    bare = Fragment(benzene.symbols, benzene.positions)  # coordinates only (an XYZ file): no open valences
    assert inpaint_arrays(pipe, 1, fragment=bare, num_atoms=10, steps=2, resample=1).extra["valence_guidance"] == 0.0
    assert inpaint_arrays(pipe, 1, formula="CH4", steps=2, resample=1).extra["valence_guidance"] == 0.0


# ------------------------------------------------------------------------------ formulas by drawing


def test_formula_draws_fall_back_to_clamping_within_the_budget(pipe):
    """The tiny random network never makes CH4 by itself: every molecule is clamped, after exactly
    the budget of draws (formula_draws per requested molecule); formula_draws=0 skips drawing."""
    from moldiff.inpainting import DEFAULT_FORMULA_DRAWS

    arrays = pipe.generate(SampleRequest(3, formula="CH4", steps=3, seed=1))
    assert arrays.extra["formula_route"] == ["clamped"] * 3
    assert arrays.extra["formula_draws_used"] == 3 * DEFAULT_FORMULA_DRAWS
    assert all(formula_honoured(arrays.symbols(j), "CH4") for j in range(3))
    only = pipe.generate(SampleRequest(2, formula="CH4", steps=3, seed=1, formula_draws=0))
    assert only.extra["formula_route"] == ["clamped"] * 2 and only.extra["formula_draws_used"] == 0
    assert len(only.positions) == 2


def test_formula_progress_never_runs_backwards_and_ends_at_n():
    """Progress (molecules done) during drawing counts the molecules kept, and the clamped remainder
    continues from there rather than restarting at 0."""
    pipe = MolDiffPipeline.from_pretrained(Path(moldiff.__file__).parent / "pretrained" / "qm9")
    seen, batches = [], []
    pipe.generate(SampleRequest(3, formula="C7H10O2", steps=4, seed=0, formula_draws=2, batch_size=2),
                  on_step=seen.append, progress=batches.append)
    assert seen and all(b >= a for a, b in zip(seen, seen[1:])) and seen[-1] == 3
    assert sum(batches) == 3


def test_formula_draws_keep_the_models_own_molecules():
    """With the shipped model a common QM9 formula is found among unconditional samples: the kept
    molecules are plain samples (no clamping) with exactly the formula, in a fixed order per seed."""
    pipe = MolDiffPipeline.from_pretrained(Path(moldiff.__file__).parent / "pretrained" / "qm9")
    a = pipe.generate(SampleRequest(2, formula="C7H10O2", steps=20, seed=0, formula_draws=50))
    b = pipe.generate(SampleRequest(2, formula="C7H10O2", steps=20, seed=0, formula_draws=50))
    assert a.extra["formula_route"] == ["drawn"] * 2 and a.extra["formula"] == "C7H10O2"
    assert 2 <= a.extra["formula_draws_used"] <= 100
    for j in range(2):
        assert formula_honoured(a.symbols(j), "C7H10O2") and a.fault_step[j] == -1
        np.testing.assert_array_equal(a.positions[j], b.positions[j])
