"""Wall-clock time of the user's sampling command with the shipped model.

    python scripts/bench_sample.py -n 1000 --steps 50 --threads 2

Runs ``moldiff sample -n N --steps K -o <tmp> --threads T [extra args]`` as a subprocess (so
start-up, model loading, RDKit work and file writing all count) and prints the wall time next to
the time the command itself reports for denoising. ``--no-novelty`` passes that flag on (the
sessions 2-4 rows of docs/benchmarks.md); by default novelty is computed, as the plain command
does. ``--cold-cache`` gives the command an empty PyTorch Inductor cache and an empty moldiff cache
(``MOLDIFF_CACHE``): a fresh machine's first run; by default both caches are used as found.

``--record docs/results/sample_quality/bench_sample.csv --run NAME`` appends the run as one row of
that table (the study's file; docs/results/README.md lists its columns).
"""

from __future__ import annotations

import argparse
import json
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: columns of docs/results/sample_quality/bench_sample.csv
FIELDS = ["run", "model", "step", "samples", "steps", "seed", "sampler", "batch_size", "precision", "compile", "caches",
          "wall_s", "sampled_s", "denoising_s", "atom_stable_pct", "mol_stable_pct", "validity_pct",
          "uniqueness_pct", "valid_and_unique_pct", "novelty_pct", "faults", "coordinates_only", "command"]
#: the first line `moldiff sample` prints
SAMPLED = re.compile(r"sampled (\d+) molecules in ([\d.]+) s \((.*); denoising ([\d.]+) s\)")


def record_row(run: str, printed: str, summary: dict, wall: float, command: list[str], cold: bool) -> dict:
    """One row of the results table: the command's own report plus the wall time."""
    match = SAMPLED.search(printed)
    if match is None:
        raise SystemExit("--record: `moldiff sample` printed no 'sampled ...' line")
    config = Path(summary["checkpoint"]) / "config.json"
    step = json.loads(config.read_text()).get("metadata", {}).get("step", "") if config.is_file() else ""

    def pct(key: str) -> str:
        return "n/a" if summary.get(key) is None else f"{100 * summary[key]:.2f}"

    return {"run": run, "model": "given types" if summary.get("composition") == "data" else "joint", "step": step,
            "samples": summary["n"], "steps": summary["steps"], "seed": summary["seed"], "sampler": match.group(3),
            "batch_size": summary.get("batch_size"), "precision": summary.get("precision"),
            "compile": summary.get("compile"), "caches": "cold (empty)" if cold else "as found",
            "wall_s": f"{wall:.1f}", "sampled_s": match.group(2), "denoising_s": match.group(4),
            "atom_stable_pct": pct("atom_stable"), "mol_stable_pct": pct("mol_stable"), "validity_pct": pct("validity"),
            "uniqueness_pct": pct("uniqueness"), "valid_and_unique_pct": pct("valid_and_unique"),
            "novelty_pct": pct("novelty"), "faults": summary.get("n_faults"),
            "coordinates_only": summary.get("n_coordinates_only"), "command": "python -m " + " ".join(command[2:])}


def append_row(path: Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerow(row)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint", help="default: the shipped model")
    p.add_argument("--cold-cache", action="store_true", help="empty torch.compile and moldiff caches (a first run)")
    p.add_argument("--no-novelty", dest="novelty", action="store_false", help="pass --no-novelty to the command")
    p.add_argument("--record", type=Path, help="append the run as a row of this CSV (the study's results file)")
    p.add_argument("--run", help="the row's name with --record (e.g. 1000x50_s82308)")
    p.add_argument("extra", nargs="*", help="more `moldiff sample` arguments (after --)")
    args = p.parse_args()
    if args.record and not args.run:
        p.error("--record needs --run NAME")
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
        printed = subprocess.run(cmd, check=True, env=env, stdout=subprocess.PIPE, text=True).stdout
        wall = time.monotonic() - t0
        sys.stdout.write(printed)
        summary = json.loads((Path(tmp) / "out" / "samples.json").read_text())
    print(f"\n{' '.join(cmd[2:])}")
    print(f"Inductor and moldiff caches: {'cold (empty)' if args.cold_cache else 'as found'}")
    print(f"precision {summary.get('precision')}, compile {summary.get('compile')}, batch size {summary.get('batch_size')}")
    print(f"wall {wall:.1f} s; denoising {summary['seconds_sampling']:.1f} s; "
          f"validity {100 * summary['validity']:.1f}%, molecule stability {100 * summary['mol_stable']:.1f}%, "
          f"novelty {'n/a' if summary.get('novelty') is None else format(100 * summary['novelty'], '.1f') + '%'}")
    if args.record:
        append_row(args.record, record_row(args.run, printed, summary, wall, cmd, args.cold_cache))
        print(f"recorded {args.run} in {args.record}")


if __name__ == "__main__":
    main()
