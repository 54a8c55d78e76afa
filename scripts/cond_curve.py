"""The conditional generator's learning curve: MAE against training core-hours, from the JSON files
that scripts/eval_conditional.py writes at each mark (scripts/cond_stage.sh).

    python scripts/cond_curve.py docs/results/properties/<run>_s*.json --out docs/results/properties/<run>_curve

Writes ``OUT.csv`` (one row per file, property and guidance scale: the generator's step and training
hours, the MAE and its standard error in EDM's units, EDM's and GeoLDM's rows and the #Atoms
baseline on the same draws beside it, and the samples' stability and validity) and, with
matplotlib, ``OUT.png`` (MAE over hours, one panel per property, one line per scale, EDM's row and
#Atoms as horizontal references). Files whose evaluation did not finish contribute the cells they
hold. Bad input gives one line on stderr and exit status 2.

With two or more marks from ``--fit-from`` hours on, it also writes ``OUT_forecast.csv``: for each
property and guidance scale, the least-squares line ``MAE = a + b ln(hours)`` through those marks
(each weighted by its inverse squared standard error), the change per doubling of training hours
(``b ln 2``) with its standard error from the marks' own, and the hours at which the line reaches EDM's and GeoLDM's rows (empty where it never
does: a flat or rising line). A log-linear fit is the simplest curve that slows the way these curves
do; treat a forecast far beyond the last mark as an order of magnitude, not a date.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
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


FORECAST_FIELDS = ["property", "unit", "guidance_scale", "marks", "first_hours", "last_hours", "last_mae", "intercept",
                   "slope_per_ln_hour", "change_per_doubling", "change_per_doubling_se", "edm", "hours_to_edm", "geoldm", "hours_to_geoldm"]


def fit_log_hours(points: list[tuple[float, float, float]]) -> tuple[float, float, float | None]:
    """Weighted least squares ``mae = a + b ln(hours)`` through ``(hours, mae, se)`` points, each
    weighted by ``1 / se^2``. Returns ``(a, b, se_b)``, ``se_b`` the standard error of the slope from
    the points' own standard errors; equal weights and ``se_b = None`` where a point lacks an SE."""
    xs = [math.log(h) for h, _, _ in points]
    known = all(se is not None and se > 0 for _, _, se in points)
    ws = [1.0 / se ** 2 for _, _, se in points] if known else [1.0] * len(points)
    sw = sum(ws)
    mx = sum(w * x for w, x in zip(ws, xs)) / sw
    my = sum(w * y for w, (_, y, _) in zip(ws, points)) / sw
    sxx = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs))
    if sxx == 0:
        raise ValueError("the marks share one training time; a line needs two")
    b = sum(w * (x - mx) * (y - my) for w, x, (_, y, _) in zip(ws, xs, points)) / sxx
    return my - b * mx, b, (math.sqrt(1.0 / sxx) if known else None)


def hours_to(a: float, b: float, level: float | None) -> float | None:
    """Hours at which ``a + b ln(hours)`` reaches ``level`` (None where the line never falls to it)."""
    if level is None or b >= 0:
        return None
    power = (level - a) / b
    return math.exp(power) if power < 700 else math.inf


def forecast(rows: list[dict], fit_from: float) -> list[dict]:
    """One row per (property, scale) with at least two marks at or after ``fit_from`` hours."""
    out = []
    keys = dict.fromkeys((r["property"], r["guidance_scale"]) for r in rows)
    for name, w in keys:
        mine = sorted((r for r in rows if r["property"] == name and r["guidance_scale"] == w and r["mae"] is not None
                       and r["train_hours"] is not None and r["train_hours"] >= fit_from and r["train_hours"] > 0),
                      key=lambda r: r["train_hours"])
        if len({r["train_hours"] for r in mine}) < 2:
            continue
        a, b, se_b = fit_log_hours([(r["train_hours"], r["mae"], r["mae_se"]) for r in mine])
        last = mine[-1]
        out.append({"property": name, "unit": last["unit"], "guidance_scale": w, "marks": len(mine),
                    "first_hours": mine[0]["train_hours"], "last_hours": last["train_hours"], "last_mae": last["mae"],
                    "intercept": a, "slope_per_ln_hour": b, "change_per_doubling": b * math.log(2),
                    "change_per_doubling_se": None if se_b is None else se_b * math.log(2),
                    "edm": last["edm"], "hours_to_edm": hours_to(a, b, last["edm"]),
                    "geoldm": last["geoldm"], "hours_to_geoldm": hours_to(a, b, last["geoldm"])})
    return out


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
    p.add_argument("--out", required=True, help="output prefix: OUT.csv, OUT.png and OUT_forecast.csv")
    p.add_argument("--fit-from", type=float, default=2.0, metavar="HOURS",
                   help="fit the forecast to the marks from this many training hours on (default 2: earlier "
                        "marks barely build molecules)")
    args = p.parse_args(argv)
    if not (math.isfinite(args.fit_from) and args.fit_from >= 0):
        print(f"cond_curve.py: error: --fit-from must be a number of hours >= 0, got {args.fit_from}", file=sys.stderr)
        return 2
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
    ahead = forecast(rows, args.fit_from)
    if ahead:
        path = out.with_name(out.name + "_forecast.csv")
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=FORECAST_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(ahead)
        for r in ahead:
            edm = "never on this line" if r["hours_to_edm"] is None else f"{r['hours_to_edm']:.3g} h"
            se = "" if r["change_per_doubling_se"] is None else f" ± {r['change_per_doubling_se']:.2g}"
            print(f"  {r['property']} w={r['guidance_scale']:g}: {r['change_per_doubling']:+.3g}{se} {r['unit']} per doubling "
                  f"of hours ({r['marks']} marks, {r['first_hours']:.2f}-{r['last_hours']:.2f} h); EDM's row at {edm}")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
