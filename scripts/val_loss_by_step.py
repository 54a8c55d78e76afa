"""Validation loss of several training runs at the same optimiser steps, side by side.

Reads each run's ``log.csv`` (``moldiff train`` writes one row per validation with ``val_loss``)
and prints one row per step that every run has validated at, with each run's log hours and each
run's loss as a ratio to the first run's. Equal steps are equal data seen: when two runs differ in
architecture, this separates what a step learns from what a step costs.

    python scripts/val_loss_by_step.py runs/qm9_small/log.csv runs/screen_e3nn/log.csv \\
        --names egnn,e3nn --out docs/results/screen/e3nn_val_loss.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def read_validations(path: Path) -> dict[int, tuple[float, float]]:
    """``{step: (hours, val_loss)}`` of the rows of ``path`` that carry a validation loss."""
    out = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"step", "hours", "val_loss"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: not a moldiff training log (needs step, hours and val_loss columns)")
        for row in reader:
            if row["val_loss"]:
                out[int(row["step"])] = (float(row["hours"]), float(row["val_loss"]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+", type=Path, help="log.csv files; the first is the reference")
    ap.add_argument("--names", help="comma list, one per log (default: each log's folder name)")
    ap.add_argument("--max-step", type=int, help="only steps up to this one")
    ap.add_argument("--out", type=Path, help="also write the table as CSV")
    args = ap.parse_args(argv)
    names = args.names.split(",") if args.names else [p.parent.name for p in args.logs]
    if len(names) != len(args.logs):
        print(f"error: {len(names)} names for {len(args.logs)} logs", file=sys.stderr)
        return 2
    try:
        runs = [read_validations(p) for p in args.logs]
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    steps = sorted(set.intersection(*(set(r) for r in runs)))
    if args.max_step is not None:
        steps = [s for s in steps if s <= args.max_step]
    if not steps:
        print("error: the logs share no validated step", file=sys.stderr)
        return 2
    header = ["step"] + [f"{n}_hours" for n in names] + [f"{n}_val_loss" for n in names] + \
        [f"{n}_ratio" for n in names[1:]]
    rows = []
    for s in steps:
        ref = runs[0][s][1]
        rows.append([s] + [f"{r[s][0]:.4f}" for r in runs] + [f"{r[s][1]:.6f}" for r in runs] +
                    [f"{r[s][1] / ref:.4f}" for r in runs[1:]])
    widths = [max(len(h), 8) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as fh:
            csv.writer(fh).writerows([header] + rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
