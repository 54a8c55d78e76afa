"""Valence inputs of categorical bond models (``model.valence_features``, :mod:`moldiff.models.valence`):
the values on molecules whose answer is known, invariance, the switch at resume, and bad configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moldiff.data.statistics import compute_statistics
from moldiff.diffusion import NoiseSchedule
from moldiff.diffusion.categorical import CHARGE_VALUES, CategoricalFeatures
from moldiff.equivariance import assert_bond_equivariant
from moldiff.geometry import fully_connected_edges, reverse_edges
from moldiff.models import DenoiserConfig, EGNNDenoiser
from moldiff.models.valence import VALENCE_INPUTS, valence_inputs, valence_table
from moldiff.pipeline import MolDiffPipeline
from moldiff.training.config import load_config
from moldiff.training.loop import Trainer, load_training_data

ELEMENTS = ("H", "C", "N", "O", "F")
H, C, N, O, F = range(5)
MINUS, NEUTRAL, PLUS = range(3)  # charge classes of CHARGE_VALUES (-1, 0, 1)


def test_the_table_is_edms_valences_and_the_charged_ones():
    table = valence_table(ELEMENTS, CHARGE_VALUES)
    assert table[:, NEUTRAL].tolist() == [1, 4, 3, 2, 1]
    assert table[N, PLUS] == 4 and table[N, MINUS] == 2 and table[O, MINUS] == 1 and table[O, PLUS] == 3
    assert table[C, PLUS] == 3 and table[C, MINUS] == 3 and table[H, PLUS] == 0
    assert table[F, PLUS] == 1  # a pair the charge-aware rule does not list: the neutral valence
    assert valence_table(ELEMENTS).shape == (5, 1)
    with pytest.raises(ValueError, match="no valence"):
        valence_table(("C", "He"))


def molecule_batch(molecules):
    """Flat batch of molecules given as (types, charges, bonds {(i, j): order}) -> inputs for valence_inputs."""
    types = torch.tensor([a for m in molecules for a in m[0]])
    charges = torch.tensor([q for m in molecules for q in m[1]])
    sizes = torch.tensor([len(m[0]) for m in molecules])
    batch = torch.repeat_interleave(torch.arange(len(molecules)), sizes)
    edge_index = fully_connected_edges(batch)
    start = torch.cumsum(sizes, 0) - sizes
    orders = {}
    for k, (_, _, bonds) in enumerate(molecules):
        for (i, j), order in bonds.items():
            a, b = int(start[k]) + i, int(start[k]) + j
            orders[(a, b)] = orders[(b, a)] = order
    bonds = torch.tensor([orders.get((int(a), int(b)), 0) for a, b in edge_index.T])
    return types, charges, bonds, edge_index, batch


def test_known_molecules_formaldehyde_methyl_and_ammonium():
    formaldehyde = ([C, O, H, H], [NEUTRAL] * 4, {(0, 1): 2, (0, 2): 1, (0, 3): 1})
    methyl = ([C, H, H, H], [NEUTRAL] * 4, {(0, 1): 1, (0, 2): 1, (0, 3): 1})  # a radical: odd sum 7
    ammonium = ([N, H, H, H, H], [PLUS] + [NEUTRAL] * 4, {(0, k): 1 for k in range(1, 5)})
    cyanide_short = ([C, N, H], [NEUTRAL] * 3, {(0, 1): 3, (0, 2): 1, (1, 2): 1})  # N over by one, sum 8
    types, charges, bonds, edge_index, batch = molecule_batch([formaldehyde, methyl, ammonium, cyanide_short])
    out = valence_inputs(types, charges, bonds, edge_index, batch, 4, valence_table(ELEMENTS, CHARGE_VALUES))
    assert out.shape == (16, VALENCE_INPUTS) and out.dtype == torch.float32
    assert out[:, 0].tolist() == [0] * 4 + [1] * 4 + [0] * 5 + [0] * 3
    deficit = out[:, 1:].argmax(-1) - 2
    assert (out[:, 1:].sum(-1) == 1).all()
    assert deficit.tolist() == [0, 0, 0, 0] + [1, 0, 0, 0] + [0] * 5 + [0, -1, -1]
    # an atom with no bonds at all: its whole valence, clipped to 2
    lone = valence_inputs(torch.tensor([C, O]), None, torch.zeros(2, dtype=torch.long),
                          fully_connected_edges(torch.zeros(2, dtype=torch.long)), torch.zeros(2, dtype=torch.long), 1,
                          valence_table(ELEMENTS))
    assert (lone[:, 1:].argmax(-1) - 2).tolist() == [2, 2] and lone[:, 0].tolist() == [0, 0]


FEATURES = CategoricalFeatures(5, (0.5, 0.35, 0.06, 0.08, 0.01), CHARGE_VALUES, (0.01, 0.98, 0.01), 4,
                               (0.88, 0.11, 0.008, 0.002))


def valence_pipeline(seed: int = 0) -> MolDiffPipeline:
    torch.manual_seed(seed)
    net = EGNNDenoiser(DenoiserConfig(num_features=8, hidden=16, n_layers=2, bond_types=4, bond_output="logits",
                                      valence_features=True))
    stats = compute_statistics(ELEMENTS, np.array([3, 4]), np.array([0, 1, 0, 1, 2, 3, 4]))
    return MolDiffPipeline(net, NoiseSchedule.polynomial(), FEATURES, stats, [1, 6, 7, 8, 9])


def random_graph(g, sizes):
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    n = batch.shape[0]
    edge_index = fully_connected_edges(batch)
    rev = reverse_edges(edge_index, n)
    bonds = torch.randint(0, 4, (edge_index.shape[1],), generator=g)
    bonds = torch.where(edge_index[0] < edge_index[1], bonds, bonds[rev])
    h = FEATURES.encode(torch.randint(0, 5, (n,), generator=g), torch.randint(0, 3, (n,), generator=g),
                        dtype=torch.float64)
    return batch, edge_index, h, FEATURES.encode_bonds(bonds, dtype=torch.float64)


def test_the_network_reads_them_and_stays_invariant():
    pipe = valence_pipeline(1).double().eval()
    with torch.no_grad():  # make the valence columns matter
        pipe.denoiser.embedding.weight[:, -VALENCE_INPUTS:] = torch.randn(16, VALENCE_INPUTS, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    batch, edge_index, h, e = random_graph(g, [3, 6, 5])
    pos = 1.5 * torch.randn(batch.shape[0], 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64)
    eps, logits, bond_logits = pipe.predict_noise(pos, h, t, batch, edge_index=edge_index, e_t=e)
    assert_bond_equivariant(lambda p, x, y: pipe.predict_noise(p, x, t, batch, edge_index=edge_index, e_t=y),
                            pos, h, e, batch, edge_index, trials=3, generator=g)
    with pytest.raises(AssertionError):  # the check fails a network whose bond output ignores the edge order
        assert_bond_equivariant(lambda p, x, y: (*pipe.predict_noise(p, x, t, batch, edge_index=edge_index, e_t=y)[:2],
                                                 bond_logits), pos, h, e, batch, edge_index, generator=g)
    # another bond order on one pair changes the inputs and so the prediction: the columns are read
    e2 = e.clone()
    e2[0], e2[int(reverse_edges(edge_index, batch.shape[0])[0])] = e[0].roll(1), e[0].roll(1)
    _, logits3, _ = pipe.predict_noise(pos, h, t, batch, edge_index=edge_index, e_t=e2)
    assert not torch.allclose(logits3[batch == 0], logits[batch == 0])
    torch.testing.assert_close(logits3[batch != 0], logits[batch != 0], atol=1e-12, rtol=0)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="valence_features needs"):
        DenoiserConfig(num_features=6, hidden=8, n_layers=1, valence_features=True)
    with pytest.raises(ValueError, match="valence_features needs"):
        DenoiserConfig(num_features=8, hidden=8, n_layers=1, bond_types=4, arch="e3nn", valence_features=True)
    assert "valence_features" not in DenoiserConfig().to_dict() and "valence_scale" not in DenoiserConfig().to_dict()
    with pytest.raises(ValueError, match="valence_scale"):
        DenoiserConfig(num_features=8, hidden=8, n_layers=1, bond_types=4, valence_features=True, valence_scale=0.0)
    # the factor multiplies the columns: weights w at scale 4 compute what 4 w compute at scale 1
    torch.manual_seed(0)
    one = EGNNDenoiser(DenoiserConfig(num_features=8, hidden=8, n_layers=1, bond_types=4, bond_output="logits",
                                      valence_features=True)).double()
    four = EGNNDenoiser(DenoiserConfig(num_features=8, hidden=8, n_layers=1, bond_types=4, bond_output="logits",
                                       valence_features=True, valence_scale=4.0)).double()
    four.load_state_dict(one.state_dict())
    with torch.no_grad():
        one.embedding.weight[:, -VALENCE_INPUTS:] *= 4.0
    g = torch.Generator().manual_seed(5)
    batch, edge_index, h, e = random_graph(g, [4, 3])
    pos = torch.randn(batch.shape[0], 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.2, 0.6], dtype=torch.float64)
    valence = torch.nn.functional.one_hot(torch.randint(0, VALENCE_INPUTS, (batch.shape[0],), generator=g),
                                          VALENCE_INPUTS).double()
    a, _ = one(pos, h, t, batch, edge_index=edge_index, e_t=e, valence=valence)
    b, _ = four(pos, h, t, batch, edge_index=edge_index, e_t=e, valence=valence)
    torch.testing.assert_close(a.h, b.h, atol=1e-10, rtol=0)
    c, _ = four(pos, h, t, batch, edge_index=edge_index, e_t=e, valence=2 * valence)
    assert not torch.allclose(c.h, b.h)
    net = EGNNDenoiser(DenoiserConfig(num_features=6, hidden=8, n_layers=1, bond_types=4, valence_features=True))
    from moldiff.diffusion import AtomFeatures

    stats = compute_statistics(ELEMENTS, np.array([3]), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="categorical"):
        MolDiffPipeline(net, NoiseSchedule.polynomial(), AtomFeatures(5, True), stats, [1, 6, 7, 8, 9])


ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_tiny.yaml"
CAT = ["diffusion.categorical=true", "model.bond_types=4", "model.bond_output=logits", "model.num_features=8"]


def quiet(_msg: str) -> None:
    pass


def test_switching_them_on_at_resume_keeps_the_function_then_trains(tmp_path):
    data = load_training_data(load_config(DEBUG, CAT))
    Trainer(load_config(DEBUG, CAT + ["train.max_steps=2"]), tmp_path, data=data, log=quiet).train()
    plain = Trainer(load_config(DEBUG, CAT + ["train.max_steps=2"]), tmp_path / "plain", data=data, log=quiet)
    plain.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=False))
    logged = []
    on = Trainer(load_config(DEBUG, CAT + ["train.max_steps=5", "model.valence_features=true"]), tmp_path, data=data,
                 log=logged.append)
    assert on.resume() and any("valence inputs switched on" in m for m in logged)
    _, batch = next(iter(data.train.batches(8, 0, 0, 0)))
    h = on.pipe.features.encode(batch.types, on.pipe.features.charge_classes(batch.formal_charges))
    edge_index = fully_connected_edges(batch.batch)
    e = on.pipe.features.encode_bonds(torch.randint(0, 4, (edge_index.shape[1],)))
    t = torch.full((batch.num_graphs,), 0.3)
    with torch.no_grad():
        a = plain.pipe.predict_noise(batch.pos, h, t, batch.batch, edge_index=edge_index, e_t=e)
        b = on.pipe.predict_noise(batch.pos, h, t, batch.batch, edge_index=edge_index, e_t=e)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
    # under torch.compile or DDP the loss goes through a proxy (Trainer._loss_pipe): same inputs, same loss
    from moldiff.training.loop import diffusion_loss

    with torch.no_grad():
        on.model.embedding.weight[:, -VALENCE_INPUTS:] = 0.5  # make the valence columns matter
    tt = torch.rand(batch.num_graphs, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.5
    direct = diffusion_loss(on.pipe, batch, tt, torch.Generator().manual_seed(11))
    saved, on.forward_model = on.forward_model, lambda *a, **k: on.model(*a, **k)  # a wrapper, as compile / DDP
    try:
        proxy = on._loss_pipe()
        assert proxy is not on.pipe
        through = diffusion_loss(proxy, batch, tt, torch.Generator().manual_seed(11))
    finally:
        on.forward_model = saved
    assert float(through.detach()) == pytest.approx(float(direct.detach()), rel=1e-6)
    with torch.no_grad():
        on.model.embedding.weight[:, -VALENCE_INPUTS:] = 0.0
    on.train()
    assert on.step == 5 and on.model.embedding.weight[:, -VALENCE_INPUTS:].abs().max() > 0  # the new columns learn
    out = on.export_pipeline().sample_arrays(3, steps=4, seed=0, num_atoms=[4, 5, 6])  # the sampler feeds them too
    assert (out.fault_step < 0).all() and all(np.isfinite(p).all() for p in out.positions)
    back = Trainer(load_config(DEBUG, CAT + ["train.max_steps=8"]), tmp_path, data=data, log=quiet)
    with pytest.raises(ValueError, match="valence inputs"):
        back.resume()
