"""Even valence sums kept while sampling (``EvenValence``, ``sample_arrays(even_valence=...)``,
``moldiff sample --even-valence``), on the shipped QM9 model."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch

from moldiff.chemistry.elements import valence_sum_parity
from moldiff.cli import main
from moldiff.pipeline import PRETRAINED_ROOT, load_pretrained
from moldiff.sampling import BatchContext, EvenValence, LoopState


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return load_pretrained("qm9")


def _parities(arrays) -> list[int]:
    return [valence_sum_parity(arrays.symbols(k)) for k in range(len(arrays.positions))]


def test_the_cheapest_atom_moves_to_the_best_element_of_the_other_parity(pipe):
    """Molecule 0 is C H H H (sum 7, odd): its costs of a parity change are C->N 0.23, H1->C/O 0.25,
    H2->O 0.05, H3->C 0.20, so H2 becomes O; molecule 1 (C H H H H, even) is left alone."""
    idx = {e: i for i, e in enumerate(pipe.elements)}
    k = pipe.features.num_types
    rows = [{"C": 0.25, "N": 0.02}, {"H": 0.25}, {"H": 0.20, "O": 0.15}, {"H": 0.25, "C": 0.05},
            {"C": 0.25}, {"H": 0.25}, {"H": 0.25}, {"H": 0.25}, {"H": 0.25}]
    clean = torch.zeros(len(rows), pipe.features.dim, dtype=torch.float64)
    for r, values in enumerate(rows):
        for element, v in values.items():
            clean[r, idx[element]] = v
    sizes = np.array([4, 5])
    batch = torch.tensor([0] * 4 + [1] * 5)
    t = torch.full((2,), 0.2, dtype=torch.float64)
    alpha, sigma = pipe.schedule.alpha_sigma(t)
    eps_h = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h_t = alpha[batch].unsqueeze(-1) * clean + sigma[batch].unsqueeze(-1) * eps_h
    ctx = BatchContext(pipe, None, torch.Generator(), sizes, batch, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4]),
                       torch.empty(2, 0, dtype=torch.long), 2, torch.float64, (None, None))
    state = LoopState(torch.zeros(9, 3, dtype=torch.float64), h_t, None, torch.full((2,), -1))
    hook = EvenValence(pipe, 0.5)
    hook.begin(ctx, state, t)
    eps_pos = torch.zeros(9, 3, dtype=torch.float64)
    out_pos, out_h = hook.guide(ctx, state, eps_pos, eps_h, t)
    assert out_pos is eps_pos
    estimate = (h_t - sigma[batch].unsqueeze(-1) * out_h) / alpha[batch].unsqueeze(-1)
    changed = [r for r in range(9) if not torch.allclose(estimate[r], clean[r], atol=1e-9)]
    assert changed == [2]
    want = pipe.features.encode(torch.tensor([idx["O"]]), torch.tensor([8]), dtype=torch.float64)[0]
    assert torch.allclose(estimate[2], want, atol=1e-9)
    assert int(estimate[2, :k].argmax()) == idx["O"]
    assert hook.steered.tolist() == [1, 0]
    # above its start time the hook does nothing
    assert hook.guide(ctx, state, eps_pos, eps_h, torch.full((2,), 0.6, dtype=torch.float64))[1] is eps_h


def test_sampling_with_it_leaves_no_odd_sum_and_changes_one_atom_at_the_decode(pipe):
    plain = pipe.sample_arrays(40, steps=8, seed=3)
    assert _parities(plain).count(1) >= 5  # the shipped model makes odd sums (about 40%)
    # from t = 0: only the final decode is steered, so positions stay and one element moves per odd molecule
    last = pipe.sample_arrays(40, steps=8, seed=3, even_valence=0.0)
    assert _parities(last).count(1) == 0
    for k, parity in enumerate(_parities(plain)):
        assert np.array_equal(plain.positions[k], last.positions[k])
        diff = np.flatnonzero(plain.types[k] != last.types[k])
        assert len(diff) == parity
        if parity:
            before, after = plain.symbols(k)[diff[0]], last.symbols(k)[diff[0]]
            assert valence_sum_parity([before]) != valence_sum_parity([after])
    assert last.extra["even_valence"] == 0.0
    assert np.array_equal(last.extra["even_valence_steered"] > 0, np.array(_parities(plain)) == 1)
    early = pipe.sample_arrays(40, steps=8, seed=3, even_valence=0.5)
    assert _parities(early).count(1) == 0
    assert (early.extra["even_valence_steered"] > 0).sum() >= (last.extra["even_valence_steered"] > 0).sum()


@pytest.mark.parametrize("kwargs, message", [
    ({"even_valence": 1.5}, "in \\[0, 1\\]"),
    ({"even_valence": float("nan")}, "in \\[0, 1\\]"),
])
def test_bad_start_times_are_refused(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.sample_arrays(2, steps=2, **kwargs)


def test_the_cli_reports_the_steered_molecules(tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["sample", "-n", "12", "--steps", "6", "--seed", "1", "--threads", "1", "--no-novelty",
                 "--even-valence", "0.3", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    summary = json.loads((out / "samples.json").read_text())
    # no --checkpoint: the rule needs Gaussian element features, so the shipped qm9 (not the default) runs
    assert "--even-valence: using the shipped model qm9" in captured.err
    assert summary["checkpoint"] == str(PRETRAINED_ROOT / "qm9")
    assert summary["even_valence"]["t_start"] == 0.3
    steered = summary["even_valence"]["molecules_steered"]
    assert 0 <= steered <= 12
    assert f"even valence sums kept from t = 0.3: {steered} of 12 molecules steered" in text
    with open(out / "samples.csv", newline="") as f:
        formulas = [row["formula"] for row in csv.DictReader(f)]
    assert len(formulas) == 12
    for formula in formulas:  # e.g. C6H12N2O: H + N + F even
        counts = {e: int(c or 1) for e, c in re.findall(r"([A-Z][a-z]?)(\d*)", formula)}
        assert (counts.get("H", 0) + counts.get("N", 0) + counts.get("F", 0)) % 2 == 0, formula
    assert main(["sample", "-n", "2", "--steps", "2", "--even-valence", "2", "-o", str(tmp_path / "bad")]) == 2
    assert "even-valence" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
