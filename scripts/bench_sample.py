"""Wall-clock time of the user's sampling command with the shipped model.

    python scripts/bench_sample.py -n 1000 --steps 50 --threads 2

Runs ``moldiff sample -n N --steps K -o <tmp> --threads T [extra args]`` as a subprocess (so
start-up, model loading, RDKit work and file writing all count) and prints the wall time next to
the time the command itself reports for denoising. ``--no-novelty`` passes that flag on (the
sessions 2-4 rows of docs/benchmarks.md); by default novelty is computed, as the plain command
does. ``--cold-cache`` gives the command an empty PyTorch Inductor cache and an empty moldiff cache
(``MOLDIFF_CACHE``): a fresh machine's first run; by default both caches are used as found.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint", help="default: the shipped model")
    p.add_argument("--cold-cache", action="store_true", help="empty torch.compile and moldiff caches (a first run)")
    p.add_argument("--no-novelty", dest="novelty", action="store_false", help="pass --no-novelty to the command")
    p.add_argument("extra", nargs="*", help="more `moldiff sample` arguments (after --)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "moldiff.cli", "sample", "-n", str(args.n), "--steps", str(args.steps),
               "-o", str(Path(tmp) / "out"), "--threads", str(args.threads), *args.extra]
        if not args.novelty:
            cmd.append("--no-novelty")
        if args.checkpoint:
            cmd += ["--checkpoint", args.checkpoint]
        t0 = time.monotonic()
        env = dict(os.environ)
        if args.cold_cache:
            env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor-cache")
            env["MOLDIFF_CACHE"] = str(Path(tmp) / "moldiff-cache")
        subprocess.run(cmd, check=True, env=env)
        wall = time.monotonic() - t0
        summary = json.loads((Path(tmp) / "out" / "samples.json").read_text())
    print(f"\n{' '.join(cmd[2:])}")
    print(f"Inductor and moldiff caches: {'cold (empty)' if args.cold_cache else 'as found'}")
    print(f"precision {summary.get('precision')}, compile {summary.get('compile')}, batch size {summary.get('batch_size')}")
    print(f"wall {wall:.1f} s; denoising {summary['seconds_sampling']:.1f} s; "
          f"validity {100 * summary['validity']:.1f}%, molecule stability {100 * summary['mol_stable']:.1f}%, "
          f"novelty {'n/a' if summary.get('novelty') is None else format(100 * summary['novelty'], '.1f') + '%'}")


if __name__ == "__main__":
    main()
