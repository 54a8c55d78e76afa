"""What torch.compile costs and gains at sampling time: the whole denoiser versus its blocks.

Each (mode, cache) cell runs in a fresh process, so Dynamo starts empty; "cold" gives that process an
empty Inductor cache directory, "warm" reuses the directory the cold run just filled (a user's second
``moldiff sample`` run). Reports the first call (tracing + compilation + one evaluation) and the
median of the following calls on the same batch, both under the sampling precision::

    python scripts/bench_compile.py --threads 2 -n 1000 --precision bf16

Modes: ``eager`` (no compilation), ``whole`` (``torch.compile(denoiser, dynamic=True)``, what
moldiff did until session 3), ``blocks`` (each equivariant block compiled, what
``MolDiffPipeline.configure_inference(compile=True)`` does now).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time


def _child(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import moldiff

    moldiff.tune_allocator()  # what the `moldiff` command does at start-up

    pipe = moldiff.load_pretrained(args.checkpoint)
    den = pipe.denoiser.eval()
    blocks = None
    if args.mode == "whole":
        net = torch.compile(den, dynamic=True)
    else:
        net = den
        if args.mode == "blocks":
            blocks = [torch.compile(b, dynamic=True) for b in den.blocks]
    gen = torch.Generator().manual_seed(0)
    sizes = torch.as_tensor(pipe.statistics.size_distribution())
    na = torch.multinomial(sizes, args.n, replacement=True, generator=gen)
    batch = torch.repeat_interleave(torch.arange(args.n), na)
    pos = torch.randn(len(batch), 3, generator=gen)
    h = torch.randn(len(batch), pipe.denoiser.config.num_features, generator=gen)
    t = torch.rand(args.n, generator=gen)
    from moldiff.geometry import fully_connected_edges

    edge_index = fully_connected_edges(batch)  # built once per batch, as the samplers do

    def call() -> float:
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            kw = {} if blocks is None else {"blocks": blocks}
            net(pos, h, t, batch, edge_index=edge_index, **kw)
        return time.perf_counter() - t0

    first = call()
    steady = float(np.median([call() for _ in range(args.repeats)]))
    print(json.dumps({"first_s": first, "steady_s": steady}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=1000, help="molecules in the batch (default 1000)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--repeats", type=int, default=5, help="steady-state calls after the first (median)")
    ap.add_argument("--checkpoint", default=None, help="pipeline folder (default: the shipped model)")
    ap.add_argument("--modes", default="eager,whole,blocks")
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # child process
    args = ap.parse_args(argv)
    if args.mode:
        _child(args)
        return 0

    import torch

    print(f"# {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), n={args.n}, "
          f"{args.precision}, steady = median of {args.repeats}")
    print("| mode | Inductor cache | first call s | steady call s | steady speed-up vs eager |")
    print("|---|---|---|---|---|")
    eager_steady = None
    for mode in args.modes.split(","):
        cache = tempfile.mkdtemp(prefix="moldiff-inductor-")
        for state in (("cold", "warm") if mode != "eager" else ("-",)):
            cmd = [sys.executable, __file__, "--mode", mode, "-n", str(args.n), "--threads", str(args.threads),
                   "--precision", args.precision, "--repeats", str(args.repeats)]
            if args.checkpoint:
                cmd += ["--checkpoint", args.checkpoint]
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if mode == "eager":
                eager_steady = r["steady_s"]
            ratio = f"{eager_steady / r['steady_s']:.2f}x" if eager_steady else "-"
            print(f"| {mode} | {state} | {r['first_s']:.1f} | {r['steady_s']:.3f} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
