"""Late resampling in plain sampling (``resample`` / ``resample_below``): the steps that start at
``t <= resample_below`` are taken ``resample`` times, the state pushed back up by the forward
process in between. What is checked: the number of network calls against the closed form on the
``(k/K)^2`` grid, that ``resample_below = 0`` is the plain loop bit for bit, the defaults each route
gets, and the bad inputs."""

import json
import math

import numpy as np
import pytest
import torch

from moldiff.chemistry.elements import QM9_ELEMENTS
from moldiff.cli import main
from moldiff.data.statistics import compute_statistics
from moldiff.diffusion import CategoricalFeatures, NoiseSchedule, make_sampler
from moldiff.models import DenoiserConfig, EGNNDenoiser
from moldiff.pipeline import MolDiffPipeline, SampleRequest
from moldiff.sampling import DEFAULT_LATE_RESAMPLE, DEFAULT_RESAMPLE_BELOW, network_evaluations

SIZES = [5, 7, 9]


def categorical_pipeline(seed: int = 0) -> MolDiffPipeline:
    torch.manual_seed(seed)
    features = CategoricalFeatures(5, (0.5, 0.35, 0.05, 0.08, 0.02), (-1, 0, 1), (0.01, 0.98, 0.01), 4,
                                   (0.88, 0.1, 0.015, 0.005))
    net = EGNNDenoiser(DenoiserConfig(num_features=features.dim, hidden=16, n_layers=2, bond_types=4,
                                      bond_output="logits"))
    types = np.arange(sum(SIZES)) % 5
    return MolDiffPipeline(net.double().eval(), NoiseSchedule.polynomial(), features,
                           compute_statistics(QM9_ELEMENTS, np.array(SIZES), types), [1, 6, 7, 8, 9])


@pytest.fixture(scope="module")
def pipe():
    return categorical_pipeline()


def _counting(pipe):
    calls = []
    handle = pipe.denoiser.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("steps, below", [(10, 0.1), (50, 0.1), (20, 0.3), (7, 1.0)])
def test_network_calls_match_the_closed_form_on_the_squared_grid(steps, below):
    # t_k = (k/K)^2 starts a step for k = K .. 1; it is resampled when k <= K sqrt(T)
    times = make_sampler("ancestral", NoiseSchedule.polynomial(), time_power=2.0).timesteps(steps)
    late = sum(1 for k in range(1, steps + 1) if (k / steps) ** 2 <= below + 1e-12)
    assert late == min(steps, math.floor(steps * math.sqrt(below) + 1e-9))
    for rounds in (1, 2, 3):
        assert network_evaluations(times, rounds, below) == steps + (rounds - 1) * late + 1


def test_the_loop_calls_the_network_as_often_as_it_records(pipe):
    calls, handle = _counting(pipe)
    try:
        out = pipe.sample_arrays(3, steps=10, num_atoms=[5, 7, 9], seed=1, resample=3, resample_below=0.1)
    finally:
        handle.remove()
    assert out.extra["network_evaluations"] == 10 + 2 * 3 + 1 == len(calls)  # k = 1, 2, 3 are late
    assert out.extra["resample"] == 3 and out.extra["resample_below"] == 0.1


def test_below_zero_is_the_plain_loop_bit_for_bit_and_late_rounds_change_the_molecules(pipe):
    kw = dict(steps=8, num_atoms=[5, 7, 9], seed=4)
    plain = pipe.sample_arrays(3, **kw)
    none_late = pipe.sample_arrays(3, resample=4, resample_below=0.0, **kw)
    late = pipe.sample_arrays(3, resample=2, resample_below=0.2, **kw)
    again = pipe.sample_arrays(3, resample=2, resample_below=0.2, **kw)
    for j in range(3):
        assert np.array_equal(plain.positions[j], none_late.positions[j])
        assert np.array_equal(plain.types[j], none_late.types[j])
        assert np.array_equal(late.positions[j], again.positions[j])  # same seed, same molecules
    assert plain.extra["network_evaluations"] == none_late.extra["network_evaluations"] == 9
    assert not all(np.allclose(plain.positions[j], late.positions[j]) for j in range(3))


def test_each_route_gets_its_own_default(pipe):
    plain = SampleRequest(4).resolved(pipe)
    assert (plain.resample, plain.resample_below) == (DEFAULT_LATE_RESAMPLE, DEFAULT_RESAMPLE_BELOW)
    off = SampleRequest(4, resample=1).resolved(pipe)
    assert (off.resample, off.resample_below) == (1, DEFAULT_RESAMPLE_BELOW)
    formula = SampleRequest(4, formula="C2H6O").resolved(pipe)
    assert formula.resample == 10 and formula.resample_below == 1.0  # RePaint on every step
    calls, handle = _counting(pipe)
    try:
        mols = pipe.sample(2, steps=10, num_atoms=6, seed=0)
    finally:
        handle.remove()
    late = sum(1 for k in range(1, 11) if (k / 10) ** 2 <= DEFAULT_RESAMPLE_BELOW)
    assert len(mols) == 2 and len(calls) == 10 + (DEFAULT_LATE_RESAMPLE - 1) * late + 1


@pytest.mark.parametrize("options, message", [
    ({"resample": 0}, "resample must be an integer >= 1"),
    ({"resample": 1.5}, "resample must be an integer >= 1"),
    ({"resample_below": 1.5}, "resample_below must be a time in \\[0, 1\\]"),
    ({"resample_below": float("nan")}, "resample_below must be a time in \\[0, 1\\]"),
])
def test_bad_values_are_refused_in_one_line(pipe, options, message):
    with pytest.raises(ValueError, match=message):
        SampleRequest(2, **options).resolved(pipe)
    with pytest.raises(ValueError, match="resample"):
        pipe.sample_arrays(1, steps=2, num_atoms=5, resample=0)


def test_the_cli_records_the_late_rounds_and_refuses_bad_ones(pipe, tmp_path, capsys):
    ckpt = pipe.save_pretrained(tmp_path / "cat")
    out = tmp_path / "late"
    assert main(["sample", "--checkpoint", str(ckpt), "-n", "3", "--steps", "10", "--no-novelty", "--threads", "1",
                 "--resample", "3", "--resample-below", "0.3", "-o", str(out)]) == 0
    summary = json.loads((out / "samples.json").read_text())
    late = sum(1 for k in range(1, 11) if (k / 10) ** 2 <= 0.3)
    assert (summary["resample"], summary["resample_below"]) == (3, 0.3)
    assert summary["network_evaluations"] == 10 + 2 * late + 1
    assert f"resampled x3 below t = 0.3, {10 + 2 * late + 1} network calls per molecule" in capsys.readouterr().out
    for bad in (["--resample-below", "2"], ["--resample", "0"]):
        assert main(["sample", "--checkpoint", str(ckpt), "-n", "2", "--steps", "2", *bad, "-o", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "resample" in err
    assert not (tmp_path / "bad").exists()
