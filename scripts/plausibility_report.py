"""Physical plausibility of molecule sets, measured as a user measures it (issue 22, docs/plausibility.md).

For each set, runs ``moldiff evaluate SET --posebusters --relax mmff --workers W --subsample N`` (the
command a user types, through ``moldiff.cli.main``), times it, and keeps its JSON and per-molecule CSV;
then writes one summary JSON (pass rate of every PoseBusters check, strain and RMSD statistics, wall
time, machine) and two plots: pass rate per check (grouped bars, one colour per set) and the strain
energy distribution (cumulative, log axis).

    python scripts/plausibility_report.py --workers 2 --n 1000 \\
        qm9_test=qm9:test shipped_qm9=SAMPLES.sdf --out DIR

A set is NAME=qm9:SPLIT (real molecules) or NAME=FILE.sdf. The wall time of each set is the speed
benchmark of issue 22 (1,000 molecules checked and relaxed on a 2-core machine).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def machine() -> dict:
    """CPU model and flags, cores, load average (scripts/machine_info.py)."""
    import machine_info

    return machine_info.machine_record()


def evaluate_set(name: str, spec: str, n: int, workers: int, forcefield: str, out: Path, seed: int,
                 conformers: int = 50) -> dict:
    """One ``moldiff evaluate`` run; returns its JSON summary plus wall time and the command."""
    from moldiff.cli import main

    csv_path, json_path = out / f"{name}.csv", out / f"{name}.json"
    at_start = machine()  # the load average says whether the wall time was measured on an idle machine
    with tempfile.TemporaryDirectory() as tmp:
        argv = (["evaluate", "--dataset", spec] if spec.startswith("qm9:") else ["evaluate", spec])
        argv += ["--subsample", str(n), "--seed", str(seed), "--posebusters", "--relax", forcefield,
                 "--workers", str(workers), "--pb-conformers", str(conformers), "--no-novelty", "--csv", str(csv_path), "--json", str(json_path),
                 "--relaxed-sdf", str(Path(tmp) / "relaxed.sdf")]
        t0 = time.monotonic()
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = main(argv)
        seconds = time.monotonic() - t0
    print(buffer.getvalue())
    if code != 0:
        raise SystemExit(f"moldiff {' '.join(argv)} exited with {code}")
    result = json.loads(json_path.read_text())
    strains = [float(r) for r in _column(csv_path, "relax_strain") if r not in ("", "None")]
    return {"command": "moldiff " + " ".join(a for a in argv if "relaxed.sdf" not in a and a != "--relaxed-sdf"),
            "seconds": round(seconds, 1), "workers": workers, "machine": at_start, "summary": result,
            "strain_values": strains}


def _column(path: Path, name: str) -> list[str]:
    import csv

    with path.open() as f:
        return [row.get(name, "") for row in csv.DictReader(f)]


def plot(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    checks = list(dict.fromkeys(c for r in results.values() for c in r["summary"]["posebusters"]["checks"]))
    labels = [*checks, "all checks"]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        pb = results[name]["summary"]["posebusters"]
        values = [100 * pb["checks"].get(c, 0) for c in checks] + [100 * pb["all"]]
        ax.bar(np.arange(len(labels)) + (k - (len(names) - 1) / 2) * width, values, width,
               label=f"{name} ({pb['n']} valid molecules)")
    ax.set_xticks(np.arange(len(labels)), [l.replace("_", " ") for l in labels], rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("pass rate (%)")
    ax.set_ylim(0, 105)
    conformers = {r["summary"]["posebusters"].get("energy_conformers", 50) for r in results.values()}
    energy = ("internal energy not checked" if conformers == {0} else
              "internal energy against " + " / ".join(str(c) for c in sorted(conformers)) + " conformers")
    ax.set_title(f"PoseBusters molecule checks (config 'mol'; {energy}), geometries as generated", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.55), ncol=len(names))
    fig.tight_layout()
    bars = out / "posebusters_pass_rates.png"
    fig.savefig(bars, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in names:
        s = np.sort(np.asarray(results[name]["strain_values"]))
        if len(s):
            rx = results[name]["summary"]["relax"]["strain_kcal_mol"]
            ax.step(np.maximum(s, 1e-2), np.arange(1, len(s) + 1) / len(s), where="post",
                    label=f"{name}: median {rx['median']:.1f}, 90th pct {rx['p90']:.1f}")
    ax.set_xscale("log")
    ax.set_xlabel("strain energy, MMFF94 (kcal/mol): as generated minus relaxed")
    ax.set_ylabel("fraction of relaxed molecules")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    cdf = out / "strain_energy.png"
    fig.savefig(cdf, dpi=110)
    plt.close(fig)
    return [bars, cdf]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sets", nargs="*", metavar="NAME=SPEC", help="NAME=qm9:SPLIT or NAME=FILE.sdf (none with --keep-previous: redraw)")
    p.add_argument("--n", type=int, default=1000, help="molecules per set (a seeded random subset; default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--forcefield", choices=("mmff", "uff"), default="mmff")
    p.add_argument("--pb-conformers", type=int, default=50, metavar="K",
                   help="conformers in PoseBusters' internal-energy ensemble (default 50, its mol configuration)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the JSON, CSV and plots")
    p.add_argument("--keep-previous", action="store_true",
                   help="keep the sets already in OUT/summary.json (measure one set per call, e.g. one on an idle machine)")
    args = p.parse_args(argv)
    if not args.sets and not args.keep_previous:
        p.error("name at least one set (or --keep-previous to redraw the sets measured before)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    previous = out / "summary.json"
    if args.keep_previous and previous.exists():  # sets measured in an earlier call stay in the summary and plots
        for name, r in json.loads(previous.read_text())["sets"].items():
            strains = [float(v) for v in _column(out / f"{name}.csv", "relax_strain") if v not in ("", "None")]
            results[name] = r | {"strain_values": strains}
    for item in args.sets:
        name, _, spec = item.partition("=")
        if not name or not spec:
            p.error(f"sets are NAME=SPEC, got {item!r}")
        results[name] = evaluate_set(name, spec, args.n, args.workers, args.forcefield, out, args.seed, args.pb_conformers)
    pngs = plot(results, out)
    record = {"n": args.n, "seed": args.seed, "forcefield": args.forcefield,
              "sets": {k: {kk: vv for kk, vv in v.items() if kk != "strain_values"} for k, v in results.items()},
              "plots": [str(p) for p in pngs]}
    (out / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    print("| set | molecules | valid | PoseBusters all | strain median | strain 90th pct | seconds (workers) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        s = r["summary"]
        rx = s["relax"]["strain_kcal_mol"]
        print(f"| {name} | {s['n']} | {100 * s['validity']:.1f}% | {100 * s['posebusters']['all']:.1f}% | "
              f"{rx['median']:.2f} | {rx['p90']:.2f} | {r['seconds']} ({r['workers']}) |")
    print(f"wrote {out / 'summary.json'}, {', '.join(map(str, pngs))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
