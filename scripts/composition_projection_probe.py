"""Probe (docs/experiments.md, session 9): can EDM's joint model be made to honour a real molecule's
composition at sampling time alone? At every reverse step with ``t <= t_switch`` the clean estimate of
the atom types is replaced by the composition's types assigned to the atoms by optimal assignment
(scipy's ``linear_sum_assignment`` on the estimated type scores); positions are left to the network.
The composition is drawn from the training molecules of each size, or (``adaptive``) chosen at the
first projected step as the training composition of that size nearest (L1) to the model's current
one. Result: worse than no projection (the geometry was built for the types the model chose).

    python scripts/composition_projection_probe.py moldiff/pretrained/qm9 300 50 [t_switch] [adaptive]
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from moldiff.pipeline import evaluate_molecules, load_pretrained, molecules_from_arrays
from moldiff.training.config import RunConfig
from moldiff.training.loop import load_training_data


def main() -> None:
    path, n, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    t_switch = float(sys.argv[4]) if len(sys.argv) > 4 else 1.01
    adaptive = len(sys.argv) > 5 and sys.argv[5] == "adaptive"
    torch.set_num_threads(1)
    pipe = load_pretrained(path).configure_inference(precision="auto")
    if not pipe.statistics.formula_counts:
        pipe.statistics = load_training_data(RunConfig()).statistics
    k_types = pipe.features.num_types
    z = torch.tensor(pipe.atomic_numbers, dtype=torch.float32)
    table = np.asarray(pipe.statistics.formula_counts)
    network = pipe.predict_noise
    state: dict = {}

    def choose(h0, batch):
        sizes = np.bincount(batch.cpu().numpy())
        if not adaptive:
            return pipe.statistics.sample_compositions(sizes, np.random.default_rng(1))
        current = np.zeros((len(sizes), k_types), dtype=np.int64)
        np.add.at(current, batch.cpu().numpy(), torch.nn.functional.one_hot(h0[:, :k_types].argmax(-1), k_types).cpu().numpy())
        out = []
        for m, size in enumerate(sizes):
            rows = table[table[:, :k_types].sum(1) == size]
            dist = np.abs(rows[:, :k_types] - current[m]).sum(1)
            best = rows[dist == dist.min()]
            out.append(best[np.argmax(best[:, k_types])][:k_types])
        state["changed"] = np.abs(np.asarray(out) - current).sum(1)
        return out

    def project(h0, batch, comps):
        out = torch.zeros_like(h0)
        starts = np.concatenate([[0], np.cumsum(np.bincount(batch.cpu().numpy()))])
        score = h0[:, :k_types].float().cpu().numpy()
        for m, comp in enumerate(comps):
            lo, hi = starts[m], starts[m + 1]
            slots = np.repeat(np.arange(k_types), comp)
            rows, cols = linear_sum_assignment(-score[lo:hi][:, slots])
            types = np.empty(hi - lo, dtype=np.int64)
            types[rows] = slots[cols]
            tt = torch.from_numpy(types)
            out[lo:hi] = pipe.features.encode(tt, z[tt], dtype=h0.dtype)
        return out

    def projected(pos_t, h_t, t, batch, **kw):
        eps_pos, eps_h, *rest = network(pos_t, h_t, t, batch, **kw)
        if float(t[0]) > t_switch:
            return (eps_pos, eps_h, *rest)
        a, s = pipe.schedule.alpha_sigma(t.double())
        a, s = a.to(h_t.dtype)[batch].unsqueeze(-1), s.to(h_t.dtype)[batch].unsqueeze(-1)
        h0 = (h_t - s * eps_h) / a
        if "comps" not in state:
            state["comps"] = choose(h0, batch)
        return (eps_pos, (h_t - a * project(h0, batch, state["comps"])) / s, *rest)

    pipe.predict_noise = projected
    t0 = time.monotonic()
    arrays = pipe.sample_arrays(n, steps=steps, seed=0, batch_size=n)
    r = evaluate_molecules(molecules_from_arrays(arrays)).to_dict(per_molecule=False)
    honoured = sum(np.bincount(arrays.types[k], minlength=k_types).tolist() == list(state["comps"][k]) for k in range(n))
    print(f"t_switch {t_switch} adaptive {adaptive}: atom {100 * r['atom_stable']:.2f} mol {100 * r['mol_stable']:.2f} "
          f"valid {100 * r['validity']:.2f} V*U {100 * r['valid_and_unique']:.2f}; composition honoured {honoured}/{n}; "
          f"atoms changed by the choice (mean) {np.mean(state.get('changed', [np.nan])):.2f} ({time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
