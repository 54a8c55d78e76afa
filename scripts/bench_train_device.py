"""Training steps per second of moldiff's Trainer on one device, per model size and arithmetic.

    python scripts/bench_train_device.py --device cuda --out out/gpu_check/bench_train.json

For each size (``HIDDENxLAYERS``; default the debug model 16x2, qm9_small's 128x6 and EDM's 256x9)
and mode, builds a :class:`moldiff.training.loop.Trainer` on real QM9 training molecules and times
``train_step`` (forward + loss + backward + clipping + AdamW + EMA), the GPU synchronised around the
timed steps:

* ``fp32``: fp32 with TF32 off (``torch.set_float32_matmul_precision("highest")``);
* ``tf32``: fp32 with TF32 matrix products (:func:`moldiff.runtime.allow_tf32`, what ``moldiff``
  sets on CUDA);
* ``bf16``: bf16 autocast (``train.precision=bf16``), TF32 for the rest;
* ``fp32+compile``, ``tf32+compile``, ``bf16+compile``: each with ``torch.compile``
  (``train.compile=true``; compile time is in the first step, reported apart), for the sizes in
  ``--compile-sizes`` only.

On a CPU ``tf32`` is ``fp32`` (TF32 is a GPU format); use ``scripts/bench_engine.py`` there.
``scripts/gpu_check.sh`` runs this on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

from moldiff.runtime import allow_tf32, resolve_device
from moldiff.training.config import load_config
from moldiff.training.loop import Trainer, load_training_data

MODES = ("fp32", "tf32", "bf16", "fp32+compile", "tf32+compile", "bf16+compile")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_tf32(on: bool) -> None:
    if on:
        allow_tf32()
    else:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def endless_batches(molecules, batch_size: int):
    epoch = 0
    while True:
        yield from molecules.batches(batch_size, 0, epoch)
        epoch += 1


def bench(size: str, mode: str, data, args, device: str) -> dict:
    hidden, layers = (int(x) for x in size.split("x"))
    precision = "bf16" if mode.startswith("bf16") else "fp32"
    overrides = [f"model.hidden={hidden}", f"model.n_layers={layers}", f"train.batch_size={args.batch_size}",
                 f"train.precision={precision}", f"train.compile={'true' if 'compile' in mode else 'false'}",
                 "train.val_every=0", f"data.max_train_molecules={args.molecules}"]
    set_tf32(not mode.startswith("fp32"))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(load_config(args.base_config, overrides), run_dir, data=data, log=lambda _m: None,
                          device=device)
        batches = endless_batches(trainer.data.train, args.batch_size)
        dev = trainer.device
        sync(dev)
        t0 = time.perf_counter()
        first_loss = trainer.train_step(next(batches)[1])[0]  # compilation and allocator warm-up
        sync(dev)
        first = time.perf_counter() - t0
        for _ in range(args.warmup):
            trainer.train_step(next(batches)[1])
        sync(dev)
        steps, t0 = 0, time.perf_counter()
        while steps < args.steps:
            loss = trainer.train_step(next(batches)[1])[0]
            steps += 1
            if args.time_limit and steps >= 3 and time.perf_counter() - t0 >= args.time_limit:
                break
        sync(dev)
        elapsed = time.perf_counter() - t0
    row = {"size": size, "mode": mode, "steps_timed": steps, "s_per_step": elapsed / steps,
           "steps_per_s": steps / elapsed, "first_step_s": first, "first_loss": first_loss, "last_loss": loss}
    print(f"{size:>6} {mode:<13} {row['steps_per_s']:8.2f} steps/s  {1000 * row['s_per_step']:8.1f} ms/step  "
          f"(mean of {steps}; first step {first:.1f} s; loss {first_loss:.3f} -> {loss:.3f})", flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--sizes", default="16x2,128x6,256x9")
    p.add_argument("--modes", default="fp32,tf32,bf16,tf32+compile,bf16+compile")
    p.add_argument("--compile-sizes", default="128x6", help="sizes that also run bf16+compile (compilation takes ~1 min)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=50, help="timed steps per size and mode")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after the first")
    p.add_argument("--time-limit", type=float, default=30.0, help="seconds of timed steps per size and mode (min 3 steps)")
    p.add_argument("--molecules", type=int, default=8192, help="QM9 training molecules to draw batches from")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--base-config", default="configs/debug_tiny.yaml")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    machine = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
               "cpu": platform.processor() or platform.machine(), "batch_size": args.batch_size}
    if device.startswith("cuda"):
        machine |= {"gpu": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device))}
    print(machine, flush=True)
    data = load_training_data(load_config(args.base_config, [f"data.max_train_molecules={args.molecules}"]))
    compile_sizes = set(args.compile_sizes.split(",")) if args.compile_sizes else set()
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"bench_train_device: unknown mode {mode!r}; choose from {', '.join(MODES)}")
    # Eager rows first, compiled ones (a minute of compilation each) last: a time limit on the whole
    # script cuts compiled rows, and the JSON is rewritten after every row.
    plan = [(size, mode) for size in args.sizes.split(",") for mode in modes if "compile" not in mode]
    plan += [(size, mode) for size in args.sizes.split(",") for mode in modes
             if "compile" in mode and size in compile_sizes]
    rows = []
    for size, mode in plan:
        rows.append(bench(size, mode, data, args, device))
        if args.out:
            with open(args.out, "w") as fh:
                json.dump({"machine": machine, "results": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
