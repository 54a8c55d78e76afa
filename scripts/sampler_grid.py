"""Sampler settings study: EDM-protocol quality of one frozen model under several sampler settings.

    python scripts/sampler_grid.py --checkpoint runs/screen_categorical/snapshots/s49404 \
        --powers 2,3 --noise-scales 0.3,0.5,0.7 --steps 50 [--samples 300] [--threads 1] \
        [--out docs/results/sampler_grid/sampler_grid.jsonl]

Every (steps K, time power P, noise scale s) triple samples ``--samples`` molecules with the same
seed (the same sizes and initial noise), on the grid ``t_k = (k / K) ** P`` with each reverse step's
fresh noise multiplied by ``s`` (``P = 1, s = 1``: EDM's sampler; ``moldiff sample`` defaults to
``P = 2, s = 0.5``), in ``moldiff sample``'s inference settings for this machine (bf16 autocast and
a compiled network where the CPU supports them), and scores them with the EDM protocol, the
geometry diagnostics and, for a model that generates bonds, stability from its own bonds. One JSON
line per triple is appended to ``--out``; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moldiff.chemistry.diagnostics import geometry_diagnostics  # noqa: E402
from moldiff.chemistry.metrics import evaluate_molecules, own_bonds_mol_stable  # noqa: E402
from moldiff.pipeline import load_pretrained  # noqa: E402
from moldiff.runtime import choose_arithmetic  # noqa: E402


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def run_one(pipe, steps: int, power: float, scale: float, args) -> dict:
    t0 = time.monotonic()
    arrays = pipe.sample_arrays(args.samples, steps=steps, sampler=args.sampler, seed=args.seed,
                                time_power=power, noise_scale=scale)
    seconds = time.monotonic() - t0
    mols = [(arrays.symbols(k), arrays.positions[k]) for k in range(args.samples)]
    metrics = evaluate_molecules(mols).to_dict(per_molecule=False)
    diag = geometry_diagnostics(mols)
    return {"checkpoint": args.checkpoint, "trained": pipe.metadata, "samples": args.samples, "sampler": args.sampler,
            "steps": steps, "time_power": power, "noise_scale": scale, "seed": args.seed, "threads": args.threads,
            "precision": args.precision, "compile": args.compile,
            "sample_seconds": round(seconds, 1), "faults": int((arrays.fault_step >= 0).sum()),
            "metrics": metrics, "own_bond_mol_stable": own_bonds_mol_stable([m[0] for m in mols], arrays.bonds, arrays.fault_step), "diagnostics": diag}


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="pipeline folder, run folder or shipped model name")
    p.add_argument("--powers", default="2", help="comma-separated time powers P (default 2)")
    p.add_argument("--noise-scales", default="0.5", help="comma-separated noise scales s (default 0.5)")
    p.add_argument("--steps", default="50", help="comma-separated numbers of reverse steps K (default 50)")
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--sampler", default="ancestral")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="auto", help="as `moldiff sample` (default auto)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the network (default: where this CPU measured faster, as `moldiff sample`)")
    p.add_argument("--out", type=Path, default=ROOT / "docs/results/sampler_grid/sampler_grid.jsonl")
    args = p.parse_args(argv)
    try:
        grid = [(int(k), pw, s) for k in args.steps.split(",") for pw in floats(args.powers)
                for s in floats(args.noise_scales)]
    except ValueError as err:
        print(f"sampler_grid: error: {err}", file=sys.stderr)
        return 2
    if args.samples < 1 or not grid or any(k < 1 or pw <= 0 or s < 0 for k, pw, s in grid):
        print("sampler_grid: error: need --samples >= 1, steps >= 1, powers > 0 and noise scales >= 0", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    pipe = load_pretrained(args.checkpoint)
    arithmetic = choose_arithmetic(pipe.device, args.precision, "auto" if args.compile is None else args.compile)
    args.precision, args.compile = arithmetic.precision, arithmetic.compile  # recorded as resolved
    pipe.configure_inference(precision=args.precision, compile=args.compile)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for steps, power, scale in grid:
        row = run_one(pipe, steps, power, scale, args) | {"commit": commit}
        rows.append(row)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        m = row["metrics"]
        print(f"K={steps} P={power:g} s={scale:g}: atom {pct(m['atom_stable'])}  mol {pct(m['mol_stable'])}  "
              f"valid {pct(m['validity'])}  own bonds {pct(row['own_bond_mol_stable'])}  ({row['sample_seconds']:.0f} s)",
              flush=True)
    print("\n| steps | time power | noise scale | atom | mol | valid | V*U | own-bond mol | one piece | close < 0.9 Å | odd valence |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m, d = r["metrics"], r["diagnostics"]
        print(f"| {r['steps']} | {r['time_power']:g} | {r['noise_scale']:g} | {pct(m['atom_stable'])} | {pct(m['mol_stable'])} "
              f"| {pct(m['validity'])} | {pct(m['valid_and_unique'])} | {pct(r['own_bond_mol_stable'])} | {pct(d['one_piece'])} "
              f"| {pct(d['close_contact'])} | {pct(d['odd_valence'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
