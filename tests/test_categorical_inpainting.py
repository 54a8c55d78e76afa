"""Fragments, formulas and RePaint's resampling with categorical models (elements, charges and
bonds as classes): the fragment's elements, charges and bonds come out exactly, its shape is kept,
the class transition used to push a state back up composes as the forward process does, and the
CLI grows a fragment with a categorical bond model end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moldiff.chemistry import fragments as chem_fragments
from moldiff.data.statistics import compute_statistics
from moldiff.diffusion import AtomFeatures, NoiseSchedule
from moldiff.diffusion.categorical import CategoricalFeatures, MarginalTransition, categorical_alpha_bar
from moldiff.inpainting import Fragment, inpaint_arrays
from moldiff.models import DenoiserConfig, EGNNDenoiser
from moldiff.pipeline import MolDiffPipeline

ROOT = Path(__file__).resolve().parents[1]
QM9 = ("H", "C", "N", "O", "F")
SIZES = [9, 12, 14]


def categorical_pipeline(bond_types=4, seed=0) -> MolDiffPipeline:
    torch.manual_seed(seed)
    features = CategoricalFeatures(5, (0.5, 0.35, 0.05, 0.08, 0.02), (-1, 0, 1), (0.01, 0.98, 0.01), bond_types,
                                   (0.88, 0.1, 0.015, 0.005)[:bond_types])
    net = EGNNDenoiser(DenoiserConfig(num_features=features.dim, hidden=16, n_layers=2, bond_types=bond_types,
                                      bond_output="logits" if bond_types else "eps"))
    types = np.arange(sum(SIZES)) % 5
    return MolDiffPipeline(net.double().eval(), NoiseSchedule.polynomial(), features,
                           compute_statistics(QM9, np.array(SIZES), types), [1, 6, 7, 8, 9])


def acrylate() -> Fragment:
    return Fragment.from_smiles("C=CC(=O)[O-]")  # five heavy atoms, a double bond and a charged oxygen


@pytest.mark.parametrize("resample", [1, 2])
def test_the_fragment_comes_out_with_its_elements_charges_bonds_and_shape(resample):
    pipe = categorical_pipeline()
    frag = acrylate()
    k = frag.num_atoms
    out = inpaint_arrays(pipe, 3, fragment=frag, num_atoms=12, steps=4, resample=resample, seed=0)
    want_bonds = chem_fragments.kekule_orders(frag.mol)
    want_charges = chem_fragments.formal_charges(frag.mol)
    assert want_bonds[0, 1] == 2 and want_charges.tolist() == [0, 0, 0, 0, -1]
    for j in range(3):
        assert [QM9[t] for t in out.types[j][:k]] == list(frag.symbols)
        assert out.formal_charges[j][:k].tolist() == want_charges.tolist()
        got = np.zeros((k, k), dtype=np.int64)
        for a, b, order in out.bonds[j]:
            if a < k and b < k:
                got[a, b] = got[b, a] = order
        assert (got == want_bonds).all()
        assert chem_fragments.kabsch_rmsd(out.positions[j][:k], frag.positions) < 1e-6
    assert out.extra["network_evaluations"] == 4 * resample + 1


def test_the_same_seed_gives_the_same_molecules_and_another_seed_other_free_atoms():
    pipe = categorical_pipeline()
    a = inpaint_arrays(pipe, 4, fragment=acrylate(), num_atoms=12, steps=4, resample=2, seed=3)
    b = inpaint_arrays(pipe, 4, fragment=acrylate(), num_atoms=12, steps=4, resample=2, seed=3)
    for j in range(4):
        assert np.array_equal(a.types[j], b.types[j]) and np.array_equal(a.positions[j], b.positions[j])
        assert np.array_equal(a.bonds[j], b.bonds[j])
    c = inpaint_arrays(pipe, 4, fragment=acrylate(), num_atoms=12, steps=4, resample=2, seed=4)
    assert not np.allclose(a.positions[0][5:], c.positions[0][5:])  # another seed, other free atoms
    assert chem_fragments.kabsch_rmsd(c.positions[0][:5], acrylate().positions) < 1e-6  # the same fragment


def test_a_formula_fixes_every_element_of_a_categorical_model():
    pipe = categorical_pipeline()
    out = inpaint_arrays(pipe, 3, formula="C3H6O", steps=4, seed=1)
    for j in range(3):
        assert sorted(QM9[t] for t in out.types[j]) == sorted("CCCHHHHHHO")


def test_a_fragment_without_bonds_leaves_them_to_the_model_and_unknown_charges_are_refused(tmp_path):
    pipe = categorical_pipeline()
    xyz = tmp_path / "f.xyz"
    frag = acrylate()
    xyz.write_text(f"{frag.num_atoms}\n\n" + "".join(f"{s} {x:.4f} {y:.4f} {z:.4f}\n"
                                                      for s, (x, y, z) in zip(frag.symbols, frag.positions)))
    out = inpaint_arrays(pipe, 2, fragment=Fragment.from_file(xyz), num_atoms=10, steps=3, seed=0)
    assert [QM9[t] for t in out.types[0][:5]] == list(frag.symbols)
    with pytest.raises(ValueError, match="formal charge \\+2"):
        inpaint_arrays(pipe, 1, fragment=Fragment.from_smiles("C[O+2]"), num_atoms=8, steps=2)


def test_gaussian_bond_models_are_still_refused():
    torch.manual_seed(0)
    net = EGNNDenoiser(DenoiserConfig(num_features=6, hidden=16, n_layers=2, bond_types=4))
    pipe = MolDiffPipeline(net.double().eval(), NoiseSchedule.polynomial(), AtomFeatures(5),
                           compute_statistics(QM9, np.array(SIZES), np.arange(sum(SIZES)) % 5), [1, 6, 7, 8, 9])
    with pytest.raises(ValueError, match="bond"):
        inpaint_arrays(pipe, 1, fragment=acrylate(), num_atoms=10, steps=2)


def test_the_class_transition_composes_like_the_forward_process():
    """q(x_t | x_0) = sum_i q(x_t | x_s = i) q(x_s = i | x_0): pushing a state from s back up to t
    with the transition gives the forward process at t."""
    cat = MarginalTransition([0.5, 0.3, 0.15, 0.05], categorical_alpha_bar("coordinate", NoiseSchedule.polynomial()))
    x0 = torch.tensor([0, 1, 2, 3, 1])
    s = torch.tensor([0.1, 0.3, 0.5, 0.2, 0.0])
    t = torch.tensor([0.4, 0.9, 0.6, 0.2, 1.0])
    direct = cat.forward_probs(x0, t)
    via = cat.transition_probs(cat.forward_probs(x0, s), s, t)
    torch.testing.assert_close(via, direct, rtol=1e-12, atol=1e-12)
    assert torch.allclose(cat.transition_probs(x0, s, s), torch.nn.functional.one_hot(x0, 4).double())
    g = torch.Generator().manual_seed(0)
    draws = cat.sample_transition(torch.full((40000,), 2), 0.3, 0.8, g)
    freq = torch.bincount(draws, minlength=4).double() / 40000
    torch.testing.assert_close(freq, cat.transition_probs(torch.tensor([2]), 0.3, 0.8)[0], atol=0.01, rtol=0)


def test_cli_grows_a_fragment_with_a_categorical_bond_model(tmp_path):
    run = tmp_path / "run"
    train = subprocess.run([sys.executable, "-m", "moldiff.cli", "train", "--config", ROOT / "configs" / "debug_tiny.yaml",
                            "--run-dir", run, "--threads", "1", "--set", "train.max_steps=2",
                            "--set", "diffusion.categorical=true", "--set", "model.num_features=8",
                            "--set", "model.bond_types=4", "--set", "model.bond_output=logits"],
                           capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr
    got = subprocess.run([sys.executable, "-m", "moldiff.cli", "sample", "--checkpoint", run / "pipeline",
                          "--fragment-smiles", "C=CC(=O)[O-]", "--num-atoms", "12", "-n", "2", "--steps", "4",
                          "--no-novelty", "-o", tmp_path / "grown", "--threads", "1"],
                         capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "grown" / "samples.sdf").read_text().count("$$$$") == 2
