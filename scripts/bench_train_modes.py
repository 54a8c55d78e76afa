"""Training-step cost of the diffusion modes at one size: plain EDM, Gaussian atoms + bond logits, and
categorical atoms / charges / bonds (diffusion.categorical), on the same QM9 batches.

After ``--warmup`` untimed optimiser steps per mode, ``--rounds`` x ``--iters`` steps
(``Trainer.train_step``: loss, backward, clipping, AdamW, EMA) are timed one at a time, the modes
taking turns step by step, so that load from other processes on the core falls on all of them
alike. Reports each mode's median seconds per step, wall clock and this process's CPU time, and
the ratios to plain EDM. Run pinned to one core, e.g.

    taskset -c 1 .venv/bin/python scripts/bench_train_modes.py --rounds 3 --iters 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from moldiff.training.config import load_config
from moldiff.training.loop import Trainer, load_training_data

BASE = ["train.precision=fp32", "train.compile=false", "train.sample_every=0", "train.device=cpu"]
MODES = {
    "edm": [],
    "bonds_logits": ["model.bond_types=4", "model.bond_output=logits"],
    "categorical_bonds": ["diffusion.categorical=true", "model.bond_types=4", "model.bond_output=logits",
                          "model.num_features=8"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/qm9_small.yaml")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = [f"model.hidden={args.hidden}", f"model.n_layers={args.layers}", f"train.batch_size={args.batch_size}"]
    data = load_training_data(load_config(args.config, BASE + size + MODES["categorical_bonds"]))  # has every label
    batches = [b for _, b in zip(range(args.warmup + args.iters), (b for _, b in data.train.batches(args.batch_size, 0, 0)))]
    trainers = {name: Trainer(load_config(args.config, BASE + size + extra), "/tmp/bench_train_modes_unused",
                              data=data, log=lambda _m: None) for name, extra in MODES.items()}
    times: dict[str, list[float]] = {name: [] for name in MODES}
    cpu: dict[str, list[float]] = {name: [] for name in MODES}
    for trainer in trainers.values():
        for batch in batches[: args.warmup]:
            trainer.train_step(batch)
    for r in range(args.rounds):
        for batch in batches[args.warmup :]:
            for name, trainer in trainers.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                trainer.train_step(batch)
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        print(f"round {r + 1}: " + "  ".join(f"{name} {statistics.median(cpu[name][-args.iters:]):.3f}"
                                             for name in MODES) + " s/step CPU (median)", flush=True)
    med = {name: statistics.median(v) for name, v in times.items()}
    med_cpu = {name: statistics.median(v) for name, v in cpu.items()}
    print(f"\nmedian s/step over {args.rounds} rounds of {args.iters} steps each ({args.hidden}x{args.layers}, "
          f"batch {args.batch_size}, fp32, {args.threads} thread):")
    for name in MODES:
        print(f"  {name:18s} wall {med[name]:.3f} (x{med[name] / med['edm']:.2f})  "
              f"CPU {med_cpu[name]:.3f} (x{med_cpu[name] / med_cpu['edm']:.2f})")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"args": vars(args), "wall_seconds_per_step": times, "cpu_seconds_per_step": cpu,
                       "median_wall": med, "median_cpu": med_cpu,
                       "wall_ratio_to_edm": {k: v / med["edm"] for k, v in med.items()},
                       "cpu_ratio_to_edm": {k: v / med_cpu["edm"] for k, v in med_cpu.items()}}, fh, indent=2)


if __name__ == "__main__":
    main()
