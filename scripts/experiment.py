"""Quality-per-CPU-hour harness: train a named variant for a fixed budget, sample, score, record.

    # train variant "baseline" for 60 minutes on one core, then sample 500 molecules (100 steps)
    python scripts/experiment.py --name baseline --config configs/qm9_small.yaml --minutes 60
    # a variant is a config plus overrides, not a code fork:
    python scripts/experiment.py --name lr1e-3 --config configs/qm9_small.yaml --minutes 60 --set optim.lr=1e-3
    # score an existing run (e.g. the long background run) without training:
    python scripts/experiment.py --name shipped-run --score-only runs/qm9_small
    # protocol B: continue a common checkpoint for a fixed budget with a variant's overrides
    # (weights, EMA and optimiser state carried over; the overrides apply from the first step):
    python scripts/experiment.py --name ft-minsnr5 --init-from runs/base_8609 --train-steps 800 \
        --set diffusion.loss_weighting=min_snr:5

Scores: EDM-protocol atom / molecule stability, validity, valid-and-unique, plus diagnostics that
move before stability does (moldiff.chemistry.diagnostics): molecules in one piece, molecules with
two atoms closer than 0.9 Å, mean fragments, per-bond-type length error against 500 training
molecules, element-frequency total variation. One row per run is appended to the table at the end
of docs/experiments.md (variant, budget, steps trained, metrics, commit) and the full numbers to
docs/results/harness/runs.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moldiff.chemistry.diagnostics import geometry_diagnostics  # noqa: E402
from moldiff.chemistry.bonds import edm_bond_matrix  # noqa: E402
from moldiff.chemistry.metrics import bond_rows_stability, evaluate_molecules  # noqa: E402
from moldiff.data.qm9 import edm_split, load_qm9  # noqa: E402
from moldiff.pipeline import load_pretrained  # noqa: E402
from moldiff.runtime import tune_allocator  # noqa: E402
from moldiff.sampling import DEFAULT_NOISE_SCALE, DEFAULT_TIME_POWER  # noqa: E402

TABLE = ROOT / "docs" / "experiments.md"
JSONL = ROOT / "docs" / "results" / "harness" / "runs.jsonl"
HEADER = (
    "| date | variant | budget | steps | train h | sampler | atom stab | mol stab | valid | V*U | one piece | close <0.9 Å | C-H err / std (Å) | commit |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def train(args, run_dir: Path) -> None:
    if args.init_from and not (run_dir / "checkpoint.pt").exists():
        src = Path(args.init_from)
        if not (src / "checkpoint.pt").is_file():
            raise SystemExit(f"--init-from: no checkpoint.pt in {src}")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "config.yaml", run_dir / "config.yaml")
        shutil.copyfile(src / "checkpoint.pt", run_dir / "checkpoint.pt")
    cmd = [sys.executable, "-m", "moldiff.cli", "train", "--config", args.config, "--run-dir", str(run_dir),
           "--threads", str(args.threads), "--set", f"train.max_minutes={args.minutes}", "--set", "train.max_steps=null",
           "--set", "train.sample_every=0"]
    if (run_dir / "checkpoint.pt").exists():
        cmd = [sys.executable, "-m", "moldiff.cli", "train", "--resume", "--run-dir", str(run_dir),
               "--threads", str(args.threads), "--set", f"train.max_minutes={args.minutes}"]
    if args.train_steps is not None:
        # A step budget (fair between variants when the machine's load varies): stop after this
        # many optimiser steps from where the run starts, whatever the clock says.
        start = int(torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["step"]) \
            if (run_dir / "checkpoint.pt").exists() else 0
        cmd += ["--set", f"train.max_steps={start + args.train_steps}", "--set", "train.max_minutes=null"]
    for s in args.set:
        cmd += ["--set", s]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def score(args, run_dir: Path) -> dict:
    torch.set_num_threads(args.threads)
    tune_allocator()  # as the `moldiff` command does
    pipe = load_pretrained(run_dir)  # a run directory (its exported EMA pipeline) or a pipeline folder
    pipe.configure_inference(precision=args.precision, compile=args.compile)
    t0 = time.monotonic()
    arrays = pipe.sample_arrays(args.samples, steps=args.steps, sampler=args.sampler, seed=args.seed, time_power=args.time_power,
                                noise_scale=args.noise_scale, composition=args.composition)
    sample_s = time.monotonic() - t0
    mols = [(arrays.symbols(k), arrays.positions[k]) for k in range(args.samples)]
    report = evaluate_molecules(mols)
    qm9 = load_qm9()
    reference = list(qm9.molecules(edm_split()["train"][:500]))
    diag = geometry_diagnostics(mols, reference)
    if arrays.bonds:
        diag.update(generated_bond_diagnostics(mols, arrays.bonds, arrays.fault_step))
    return {
        "metrics": {k: v for k, v in report.to_dict().items() if k != "per_molecule"},
        "diagnostics": diag,
        "faults": int((arrays.fault_step >= 0).sum()),
        "sample_seconds": sample_s,
        "trained": pipe.metadata,
        "last_val_loss": _last_val_loss(run_dir),
    }


def generated_bond_diagnostics(mols, bonds, fault_step) -> dict:
    """For bond-generating models: how often the generated bonds alone satisfy EDM's valence rule
    (``gen_bonds_mol_stable``), and agree exactly with EDM's distance-table bonds of the generated
    geometry (``gen_bonds_match_table``). Faulty samples count as failures."""
    stable = match = 0
    for (symbols, pos), rows, fault in zip(mols, bonds, fault_step):
        if fault >= 0:
            continue
        stable += bond_rows_stability(symbols, rows).mol_stable
        mine = np.zeros((len(symbols), len(symbols)), dtype=np.int64)
        mine[rows[:, 0], rows[:, 1]] = rows[:, 2]
        match += np.array_equal(mine + mine.T, edm_bond_matrix(symbols, pos, pair_order="index"))
    return {"gen_bonds_mol_stable": stable / len(mols), "gen_bonds_match_table": match / len(mols)}


def _last_val_loss(run_dir: Path):
    """(step, EMA validation loss) of the run's last validation row: EDM's uniform, unpaired loss on
    fixed times and noise, so comparable between variants whatever they train with."""
    log = run_dir / "log.csv"
    if not log.is_file():
        return None
    with open(log, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("val_loss")]
    return (int(rows[-1]["step"]), float(rows[-1]["val_loss"])) if rows else None


def append(args, result: dict) -> None:
    m, d, meta = result["metrics"], result["diagnostics"], result["trained"]
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    ch = f"{d.get('bond_C-H_mean_err', float('nan')):+.3f} / {d.get('bond_C-H_std', float('nan')):.3f}"
    row = (
        f"| {datetime.date.today()} | {args.name} | {args.budget_text} | {meta.get('step', '?')} | {meta.get('train_hours', '?')} "
        f"| {args.sampler} {args.steps}{'' if args.time_power == 1 else f' t^{args.time_power:g}'}"
        f"{'' if args.noise_scale == 1 else f' noise {args.noise_scale:g}'}"
        f"{'' if args.precision == 'fp32' else ' ' + args.precision}"
        f"{'' if args.composition == 'model' else ' composition ' + args.composition} | {pct(m['atom_stable'])} | {pct(m['mol_stable'])} | {pct(m['validity'])} "
        f"| {pct(m['valid_and_unique'])} | {pct(d['one_piece'])} | {pct(d['close_contact'])} | {ch} | {commit()} |\n"
    )
    if not TABLE.exists() or "| date | variant" not in TABLE.read_text():
        TABLE.parent.mkdir(parents=True, exist_ok=True)
        with open(TABLE, "a") as fh:
            fh.write("\n" + HEADER)
    with open(TABLE, "a") as fh:
        fh.write(row)
    with open(JSONL, "a") as fh:
        fh.write(json.dumps({"name": args.name, "config": args.config, "overrides": args.set, "budget": args.budget_text,
                             "samples": args.samples, "steps": args.steps, "sampler": args.sampler, "time_power": args.time_power, "noise_scale": args.noise_scale, "precision": args.precision,
                             "composition": args.composition, "commit": commit(), **result}) + "\n")
    print(row, end="")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="variant name (the run goes to runs/exp_<name>)")
    p.add_argument("--config", default="configs/qm9_small.yaml")
    p.add_argument("--set", action="append", default=[], help="config override, repeatable")
    p.add_argument("--minutes", type=float, default=60.0, help="training budget (wall clock, one core)")
    p.add_argument("--train-steps", type=int, help="budget in optimiser steps instead of minutes (from the start point)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--sampler", default="ancestral")
    p.add_argument("--time-power", type=float, default=DEFAULT_TIME_POWER,
                   help=f"sampling time grid t_k = (k/K)^P (default {DEFAULT_TIME_POWER:g}; 1 = EDM's uniform grid)")
    p.add_argument("--noise-scale", type=float, default=DEFAULT_NOISE_SCALE,
                   help=f"factor on each step's fresh noise (default {DEFAULT_NOISE_SCALE:g}; 1 = EDM's sampler)")
    p.add_argument("--precision", default="fp32", help="sampling arithmetic: fp32 (default), bf16 or auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the network for sampling (faster; same math)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--composition", choices=("model", "data"), default="model",
                   help="model (EDM): elements generated; data: compositions drawn from the training molecules "
                   "(models trained with diffusion.known_types_prob > 0)")
    p.add_argument("--score-only", help="score this run directory instead of training")
    p.add_argument("--init-from", help="start from this run directory's checkpoint (protocol B: fine-tune a common checkpoint)")
    p.add_argument("--no-record", action="store_true", help="print results without appending to docs/")
    args = p.parse_args()
    if args.score_only:
        run_dir = Path(args.score_only)
        args.budget_text = "existing run"
    else:
        run_dir = ROOT / "runs" / f"exp_{args.name}"
        args.budget_text = f"{args.minutes:g} min x {args.threads} core"
        if args.train_steps is not None:
            args.budget_text = f"{args.train_steps} steps x {args.threads} core"
        if args.init_from:
            args.budget_text = "+" + args.budget_text + f" from {Path(args.init_from).name}"
        train(args, run_dir)
    result = score(args, run_dir)
    print(json.dumps(result, indent=1, default=str))
    if not args.no_record:
        append(args, result)


if __name__ == "__main__":
    main()
