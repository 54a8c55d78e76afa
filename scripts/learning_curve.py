"""Learning curve of a training run: EDM-protocol quality of pipeline snapshots vs training hours.

    python scripts/learning_curve.py runs/qm9_small/snapshots/* runs/qm9_small/pipeline \
        --samples 500 --steps 100 --out docs/results/learning_curve/learning_curve

Each argument is a checkpoint folder (config.json + model.pt; `moldiff train` writes one to
RUN/pipeline at every checkpoint, and copies kept along the way are snapshots) or a run folder.
The snapshots are local: run pipelines are never committed (.gitignore), and the committed curve
keeps each point's step and training hours. For each it samples
``--samples`` molecules and scores them (atom / molecule stability, validity, valid-and-unique,
molecules in one piece). Writes OUT.csv (appending rows for folders not yet in it) and OUT.png
(molecule stability and validity against training hours).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moldiff.chemistry.diagnostics import geometry_diagnostics  # noqa: E402
from moldiff.chemistry.metrics import evaluate_molecules, own_bonds_mol_stable  # noqa: E402
from moldiff.pipeline import load_pretrained  # noqa: E402

FIELDS = ["checkpoint", "step", "train_hours", "samples", "steps", "sampler", "atom_stable", "mol_stable",
          "validity", "valid_and_unique", "one_piece", "close_contact", "sample_seconds", "odd_valence",
          "planar_six_ring", "gen_bonds_mol_stable"]


def score(folder: Path, args) -> dict:
    pipe = load_pretrained(folder)
    t0 = time.monotonic()
    arrays = pipe.sample_arrays(args.samples, steps=args.steps, sampler=args.sampler, seed=args.seed,
                                time_power=args.time_power, noise_scale=args.noise_scale)
    seconds = time.monotonic() - t0
    mols = [(arrays.symbols(k), arrays.positions[k]) for k in range(args.samples)]
    rep = evaluate_molecules(mols)
    diag = geometry_diagnostics(mols)
    return {"checkpoint": str(folder), "step": pipe.metadata.get("step"), "train_hours": pipe.metadata.get("train_hours"),
            "samples": args.samples, "steps": args.steps, "sampler": args.sampler,
            "atom_stable": f"{rep.atom_stable:.4f}", "mol_stable": f"{rep.mol_stable:.4f}", "validity": f"{rep.validity:.4f}",
            "valid_and_unique": f"{rep.valid_and_unique:.4f}", "one_piece": f"{diag['one_piece']:.4f}",
            "close_contact": f"{diag['close_contact']:.4f}", "sample_seconds": f"{seconds:.1f}",
            "odd_valence": f"{diag['odd_valence']:.4f}", "planar_six_ring": f"{diag['planar_six_ring']:.4f}",
            "gen_bonds_mol_stable": own_bond_column(mols, arrays)}


def own_bond_column(mols, arrays) -> str:
    """Molecule stability from the generated bonds (:func:`own_bonds_mol_stable`), "" for models without bonds."""
    stable = own_bonds_mol_stable([symbols for symbols, _ in mols], arrays.bonds, arrays.fault_step)
    return "" if stable is None else f"{stable:.4f}"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: float(r["train_hours"]))
    hours = [float(r["train_hours"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("mol_stable", "molecule stability"), ("validity", "validity"), ("atom_stable", "atom stability")):
        ax.plot(hours, [100 * float(r[key]) for r in rows], marker="o", label=label)
    ax.set_xlabel("training hours (one CPU core)")
    ax.set_ylabel("% of samples (EDM protocol)")
    ax.set_ylim(0, 100)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend()
    n = rows[-1]["samples"] if rows else "?"
    ax.set_title(f"{n} samples, {rows[-1]['sampler'] if rows else ''} {rows[-1]['steps'] if rows else ''} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--sampler", default="ancestral")
    p.add_argument("--time-power", type=float, default=1.0,
                   help="sampling time grid (default 1, the uniform grid every committed point used, so the curve stays comparable)")
    p.add_argument("--noise-scale", type=float, default=1.0,
                   help="factor on each step's fresh noise (default 1, EDM's sampler, as every committed point used)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/results/learning_curve/learning_curve", help="OUT.csv and OUT.png")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out_csv, out_png = Path(args.out + ".csv"), Path(args.out + ".png")
    rows = list(csv.DictReader(open(out_csv))) if out_csv.exists() else []
    done = {(r["checkpoint"], r["step"]) for r in rows}
    for folder in map(Path, args.checkpoints):
        meta_step = str(load_pretrained(folder).metadata.get("step"))
        if (str(folder), meta_step) in done:
            continue
        row = score(folder, args)
        print(row, flush=True)
        rows.append(row)
    with open(out_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, restval="")  # rows older than a field leave it empty
        w.writeheader()
        w.writerows(rows)
    plot(rows, out_png)
    print(f"wrote {out_csv} and {out_png}")


if __name__ == "__main__":
    main()
