"""Starting a run from another model's weights (``moldiff train --init-from``): a new element
vocabulary computes what the source computed on the shared elements, a categorical model with bonds
starts with the source's geometry, identical models copy exactly, and bad sources fail in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moldiff.data.statistics import compute_statistics
from moldiff.diffusion import AtomFeatures, NoiseSchedule
from moldiff.diffusion.categorical import CategoricalFeatures
from moldiff.geometry import remove_mean
from moldiff.models import DenoiserConfig, EGNNDenoiser
from moldiff.models.egnn import EquivariantUpdate
from moldiff.pipeline import MolDiffPipeline
from moldiff.training.warmstart import warm_start

ROOT = Path(__file__).resolve().parents[1]
QM9 = ("H", "C", "N", "O", "F")
Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9, "S": 16, "Cl": 17}
SIZES = [4, 7]


def pipeline(elements, seed, *, categorical=False, bond_types=0, hidden=16, perturb=True, graph="full",
             properties=()) -> MolDiffPipeline:
    torch.manual_seed(seed)
    k = len(elements)
    features = (CategoricalFeatures(k, tuple([1.0 / k] * k), (-1, 0, 1), (0.1, 0.8, 0.1), bond_types,
                                    (0.7, 0.2, 0.05, 0.05)[:bond_types]) if categorical else AtomFeatures(k))
    cfg = DenoiserConfig(num_features=features.dim, hidden=hidden, n_layers=2, bond_types=bond_types,
                         bond_output="logits" if bond_types else "eps", graph=graph, properties=list(properties))
    net = EGNNDenoiser(cfg)
    if perturb:  # the coordinate heads start near zero: make them matter, and every bias non-zero
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, EquivariantUpdate):
                    m.out.weight.copy_(0.3 * torch.randn(m.out.weight.shape, generator=g))
    types = np.arange(sum(SIZES)) % k
    stats = compute_statistics(elements, np.array(SIZES), types)
    return MolDiffPipeline(net.double().eval(), NoiseSchedule.polynomial(), features, stats, [Z[e] for e in elements])


def molecule(elements_idx, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = torch.repeat_interleave(torch.arange(len(SIZES)), torch.tensor(SIZES))
    pos = remove_mean(torch.randn(batch.numel(), 3, generator=g, dtype=torch.float64), batch, len(SIZES))
    types = torch.as_tensor(elements_idx, dtype=torch.long)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    return pos, types, batch, t


@pytest.mark.parametrize("graph", ["full", "knn:6"])
def test_a_new_element_vocabulary_computes_the_source_on_the_shared_elements(graph):
    source = pipeline(QM9, 0)
    wider = ("H", "C", "S", "N", "O", "Cl", "F")  # new elements in the middle: columns matched by symbol
    # knn:6 on molecules of at most 7 atoms is the full graph, and its centre skip (new) starts at zero
    target = pipeline(wider, 1, graph=graph)
    report = warm_start(target, source, "source")
    assert report.matched_elements == ["H", "C", "N", "O", "F"] and report.new_elements == ["S", "Cl"]
    assert report.outputs and report.fresh == ([] if graph == "full" else ["centre_skip.weight", "centre_skip.bias"])
    pos, _, batch, t = molecule([])
    g = torch.Generator().manual_seed(3)
    h_target = torch.randn(batch.numel(), 8, generator=g, dtype=torch.float64)  # any noisy features, S and Cl too
    keep = [wider.index(e) for e in QM9] + [7]  # the source's channels in the target's layout (+ atomic number)
    with torch.no_grad():
        out_t = target.denoiser(pos, h_target, t, batch)
        out_s = source.denoiser(pos, h_target[:, keep], t, batch)
    torch.testing.assert_close(out_t.pos, out_s.pos, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_t.h[:, keep], out_s.h, rtol=1e-12, atol=1e-12)
    assert out_s.pos.abs().max() > 1e-3  # the comparison is not between zeros
    fresh = pipeline(wider, 1, graph=graph)  # without the warm start the same target computes something else
    with torch.no_grad():
        assert not torch.allclose(fresh.denoiser(pos, h_target, t, batch).pos, out_s.pos)


def test_a_categorical_bond_model_starts_with_the_sources_geometry():
    source = pipeline(QM9, 0)
    target = pipeline(QM9, 2, categorical=True, bond_types=4)
    report = warm_start(target, source, "source")
    assert not report.outputs  # logits are not noise: the atom output rows stay fresh
    assert any(n.startswith("bond_head") for n in report.fresh) and report.widened  # edge layers gain bond columns
    types = [0, 1, 1, 2, 0, 3, 4, 1, 0, 0, 1]
    pos, types, batch, t = molecule(types)
    clean_edm = source.features.encode(types, torch.as_tensor([Z[QM9[k]] for k in types]), dtype=torch.float64)
    charge_class = torch.ones_like(types)  # neutral
    clean_cat = target.features.encode(types, charge_class, dtype=torch.float64)
    from moldiff.geometry import fully_connected_edges

    edges = fully_connected_edges(batch)
    g = torch.Generator().manual_seed(5)
    e_t = torch.nn.functional.one_hot(torch.randint(0, 4, (edges.shape[1],), generator=g), 4).double()
    with torch.no_grad():
        out_t, bonds = target.denoiser(pos, clean_cat, t, batch, edge_index=edges, e_t=e_t)
        out_s = source.denoiser(pos, clean_edm, t, batch, edge_index=edges)
    # clean atoms reach the hidden layer with the source's pre-activation (the atomic-number channel
    # folded into the element columns), and the bond inputs start at zero: the same coordinates
    torch.testing.assert_close(out_t.pos, out_s.pos, rtol=1e-10, atol=1e-12)
    assert bonds.shape == (edges.shape[1], 4)


def test_a_conditional_model_starts_as_the_unconditional_source_for_every_condition():
    # the property-conditional generator (issue 21) can start from the shipped unconditional model:
    # its context columns start at zero, so at step 0 it is the source whatever it is asked for
    source = pipeline(QM9, 0)
    target = pipeline(QM9, 6, properties=("gap", "mu"))
    report = warm_start(target, source, "source")
    assert report.outputs and report.matched_elements == list(QM9) and not report.fresh
    weight = target.denoiser.state_dict()["embedding.weight"]
    k = len(QM9) + 2  # the features (five elements and the atomic number), then the time
    assert weight.shape[1] == k + 4 and torch.count_nonzero(weight[:, k:]) == 0
    pos, _, batch, t = molecule([])
    g = torch.Generator().manual_seed(7)
    h = torch.randn(batch.numel(), k - 1, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out_s = source.denoiser(pos, h, t, batch)
        for context in (torch.zeros(2, 4, dtype=torch.float64), torch.tensor([[1.5, -0.3, 1, 1], [0.0, 2.0, 0, 1]],
                                                                            dtype=torch.float64)):
            out_t = target.denoiser(pos, h, t, batch, context=context)
            torch.testing.assert_close(out_t.pos, out_s.pos, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(out_t.h, out_s.h, rtol=1e-12, atol=1e-12)
    assert out_s.pos.abs().max() > 1e-3


def test_the_same_model_is_copied_exactly_and_other_widths_are_refused():
    source = pipeline(QM9, 0)
    target = pipeline(QM9, 4)
    report = warm_start(target, source, "source")
    assert not report.fresh and not report.dropped and not report.widened
    for (name, a), b in zip(source.denoiser.state_dict().items(), target.denoiser.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="model.hidden=16, this run 24"):
        warm_start(pipeline(QM9, 5, hidden=24), source, "source")


def moldiff(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "moldiff.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_starts_a_run_from_another_and_refuses_bad_sources(tmp_path):
    base = ["train", "--config", ROOT / "configs" / "debug_tiny.yaml", "--threads", "1", "--set", "train.max_steps=2",
            "--set", "train.val_every=0"]
    src = moldiff(*base, "--run-dir", tmp_path / "src")
    assert src.returncode == 0, src.stderr
    cat = moldiff(*base, "--run-dir", tmp_path / "cat", "--init-from", tmp_path / "src",
                  "--set", "diffusion.categorical=true", "--set", "model.num_features=8",
                  "--set", "model.bond_types=4", "--set", "model.bond_output=logits")
    assert cat.returncode == 0, cat.stderr
    assert "initialised from" in cat.stdout and "elements H, C, N, O, F" in cat.stdout
    assert f"init_from: {tmp_path / 'src'}" in (tmp_path / "cat" / "config.yaml").read_text()
    resumed = moldiff("train", "--resume", "--run-dir", tmp_path / "cat", "--set", "train.max_steps=3", "--threads", "1")
    assert resumed.returncode == 0 and "initialised from" not in resumed.stdout  # read once, at step 0
    both = moldiff("train", "--resume", "--run-dir", tmp_path / "cat", "--init-from", tmp_path / "src")
    assert both.returncode == 2 and len(both.stderr.strip().splitlines()) == 1 and "--resume" in both.stderr
    wide = moldiff(*base, "--run-dir", tmp_path / "wide", "--init-from", "qm9")  # the shipped 128-wide model
    assert wide.returncode == 2 and len(wide.stderr.strip().splitlines()) == 1 and "model.hidden=128, this run 16" in wide.stderr
    assert not (tmp_path / "wide" / "checkpoint.pt").exists()
    missing = moldiff(*base, "--run-dir", tmp_path / "missing", "--init-from", tmp_path / "nothing.pt")
    assert missing.returncode == 2 and "nothing.pt" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
