"""Denoising cost per reverse step with the shipped model under each inference option, as ratios.

    python scripts/bench_sample_options.py --threads 1 -n 256 --steps 5

Times ``pipe.sample_arrays(n, steps=K)`` for fp32 / bf16 autocast, eager / ``torch.compile`` and a
few batch sizes, in one process and one after the other (so machine load affects them alike),
after one warm-up call per option (compilation is excluded; it is paid once per process and cached
on disk by PyTorch). Prints seconds per reverse step for 1,000 molecules and the speed-up over
fp32 eager at the default batch size of 256, plus the largest deviation of each option's noise
prediction from fp32 eager on one fixed batch of 64 noisy molecules at t = 0.05 and 0.5, relative to
the largest predicted value (bf16 keeps about three significant digits).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moldiff.geometry import remove_mean  # noqa: E402
from moldiff.pipeline import load_pretrained  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=256, help="molecules per timed call")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="timed calls per option (the best is kept)")
    args = p.parse_args()
    from moldiff.runtime import tune_allocator

    tune_allocator()  # what the `moldiff` command does at start-up (edge tensors without page-fault storms)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    pipe = load_pretrained()
    options = [("fp32", False, 256), ("fp32", False, 1000), ("bf16", False, 256),
               ("fp32", True, 256), ("bf16", True, 256), ("bf16", True, 64), ("bf16", True, 1000)]
    rows, ref_pred = [], None
    g = torch.Generator().manual_seed(0)
    sizes = torch.as_tensor(pipe.statistics.sample_sizes(64, np.random.default_rng(0), min_atoms=2))
    batch = torch.repeat_interleave(torch.arange(64), sizes)
    probe = (torch.randn(len(batch), 3, generator=g), torch.randn(len(batch), pipe.features.dim, generator=g))
    probe = (remove_mean(probe[0], batch, 64), probe[1], batch)
    probe_times = [torch.full((64,), 0.05), torch.full((64,), 0.5)]
    for precision, compiled, bs in options:
        pipe.configure_inference(precision=precision, compile=compiled)
        pipe.sample_arrays(min(args.n, bs), steps=1, seed=1, batch_size=bs)  # warm-up / compile
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            pipe.sample_arrays(args.n, steps=args.steps, seed=0, batch_size=bs)
            best = min(best, time.perf_counter() - t0)
        pred = np.concatenate([torch.cat(pipe.predict_noise(probe[0], probe[1], t, probe[2]), -1).numpy() for t in probe_times])
        if ref_pred is None:
            ref_pred = pred
        dev = float(np.abs(pred - ref_pred).max() / np.abs(ref_pred).max())
        per_step_1000 = best / args.steps / args.n * 1000
        rows.append((precision, compiled, bs, per_step_1000, dev))
    base = rows[0][3]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"n={args.n}, steps={args.steps}, best of {args.repeats}")
    print("| precision | compile | batch | s / step / 1000 molecules | speed-up vs fp32 eager 256 | max |eps - eps fp32 eager| / max |eps fp32| |")
    print("|---|---|---|---|---|---|")
    for precision, compiled, bs, t, dev in rows:
        print(f"| {precision} | {'yes' if compiled else 'no'} | {bs} | {t:.3f} | {base / t:.2f}x | {dev:.2e} |")


if __name__ == "__main__":
    main()
