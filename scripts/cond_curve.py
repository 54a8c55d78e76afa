"""The conditional generator's learning curve: MAE against training core-hours, from the JSON files
that scripts/eval_conditional.py writes at each mark (scripts/cond_stage.sh).

    python scripts/cond_curve.py docs/results/properties/<run>_s*.json --out docs/results/properties/<run>_curve

Writes ``OUT.csv`` (one row per file, property and guidance scale: the generator's step and training
hours, the MAE and its standard error in EDM's units, EDM's and GeoLDM's rows and the #Atoms
baseline on the same draws beside it, and the samples' stability and validity) and, with
matplotlib, ``OUT.png`` (MAE over hours, one panel per property, one line per scale, EDM's row and
#Atoms as horizontal references). Files whose evaluation did not finish contribute the cells they
hold. Bad input gives one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

FIELDS = ["generator_run", "step", "train_hours", "property", "unit", "guidance_scale", "n", "n_scored", "mae",
          "mae_se", "edm", "geoldm", "atoms_on_draws", "qm9_lower_bound", "mol_stable", "validity",
          "valid_and_unique", "steps", "source"]


def rows_of(path: Path) -> list[dict]:
    """One row per (property, scale) cell of one eval_conditional.py JSON file."""
    try:
        doc = json.loads(path.read_text())
        cells, baselines = doc["cells"], doc["baselines"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a scripts/eval_conditional.py result ({type(exc).__name__}: {exc})") from None
    if doc.get("generator_step") is None:
        raise ValueError(f"{path}: the file does not record the generator's training step (written by an older "
                         "eval_conditional.py); re-score the snapshot")
    rows = []
    for cell in cells:
        b = baselines.get(cell["property"], {})
        rows.append({
            "generator_run": doc.get("generator_run"), "step": doc["generator_step"],
            "train_hours": doc.get("generator_train_hours"), "property": cell["property"], "unit": cell["unit"],
            "guidance_scale": cell["guidance_scale"], "n": cell["n"], "n_scored": cell["n_scored"],
            "mae": cell["mae"], "mae_se": cell["mae_se"], "edm": (b.get("edm_table3") or {}).get("EDM"),
            "geoldm": b.get("geoldm"), "atoms_on_draws": b.get("atoms_on_draws"),
            "qm9_lower_bound": b.get("qm9_lower_bound"), "mol_stable": cell["mol_stable"],
            "validity": cell["validity"], "valid_and_unique": cell["valid_and_unique"], "steps": doc.get("steps"),
            "source": str(path),
        })
    return rows


def plot(rows: list[dict], out: Path) -> bool:
    """MAE against hours, one panel per property; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    props = list(dict.fromkeys(r["property"] for r in rows))
    fig, axes = plt.subplots(1, len(props), figsize=(4.2 * len(props), 3.4), squeeze=False)
    for ax, name in zip(axes[0], props):
        mine = [r for r in rows if r["property"] == name and r["mae"] is not None]
        for w in sorted({r["guidance_scale"] for r in mine}):
            pts = sorted((r["train_hours"], r["mae"]) for r in mine if r["guidance_scale"] == w)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"w = {w:g}")
        ref = next((r for r in mine if r["edm"] is not None), None)
        if ref is not None:
            ax.axhline(ref["edm"], color="k", linestyle="--", linewidth=1, label="EDM")
        atoms = [r["atoms_on_draws"] for r in mine if r["atoms_on_draws"] is not None]
        if atoms:
            ax.axhline(atoms[-1], color="grey", linestyle=":", linewidth=1, label="#Atoms")
        ax.set_title(name)
        ax.set_xlabel("conditional training, core-hours")
        ax.set_ylabel(f"MAE ({mine[0]['unit']})" if mine else "MAE")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cond_curve.py", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="eval_conditional.py JSON files, one per training mark")
    p.add_argument("--out", required=True, help="output prefix: OUT.csv and OUT.png")
    args = p.parse_args(argv)
    try:
        rows = [r for f in args.files for r in rows_of(Path(f))]
    except ValueError as exc:
        print(f"cond_curve.py: error: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print("cond_curve.py: error: the files hold no scored cells", file=sys.stderr)
        return 2
    rows.sort(key=lambda r: (r["step"], r["property"], r["guidance_scale"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    drew = plot(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.csv')} ({len(rows)} rows)" + (f" and {out.with_suffix('.png')}" if drew else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
