"""One row per `moldiff sample` output folder (or its samples.json): the EDM-protocol metrics, the
model's own-bond metrics where it has bonds, the odd-valence share from a composition report beside
it, the loop's settings and its time, as a CSV (and a Markdown table on stdout).

    python scripts/summary_table.py out/run_a out/run_b/samples.json ... --csv docs/results/<study>/table.csv

A folder's `composition.txt` (python scripts/composition_report.py FOLDER/samples.csv [--own-bonds]
> FOLDER/composition.txt) adds its odd-valence share; `--copy DIR` also copies each samples.json
(and composition.txt) into DIR as <folder name>.json / <folder name>.txt, the record the docs cite.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
from pathlib import Path

COLUMNS = ("name", "checkpoint", "n", "steps", "resample", "resample_below", "network_evaluations", "seed",
           "atom_stable", "mol_stable", "validity", "valid_and_unique", "novelty", "own_mol_stable", "own_validity",
           "odd_valence", "seconds")


def row_of(path: Path) -> dict:
    folder = path if path.is_dir() else path.parent
    summary_path = folder / "samples.json" if path.is_dir() else path
    s = json.loads(summary_path.read_text())
    own = s.get("own_bonds") or {}
    row = {"name": folder.name if path.is_dir() else path.stem, "checkpoint": s.get("checkpoint"), "n": s["n"],
           "steps": s["steps"], "resample": s.get("resample", 1), "resample_below": s.get("resample_below", 1.0),
           "network_evaluations": s.get("network_evaluations", s["steps"] + 1), "seed": s.get("seed"),
           "atom_stable": s["atom_stable"], "mol_stable": s["mol_stable"], "validity": s["validity"],
           "valid_and_unique": s["valid_and_unique"], "novelty": s.get("novelty"),
           "own_mol_stable": own.get("mol_stable"), "own_validity": own.get("validity"), "odd_valence": None,
           "seconds": s.get("seconds")}
    report = folder / "composition.txt" if path.is_dir() else path.with_suffix(".txt")
    if report.is_file():
        found = re.search(r"odd valence sum: ([\d.]+)%", report.read_text())
        row["odd_valence"] = float(found.group(1)) / 100 if found else None
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="moldiff sample output folders or samples.json files")
    p.add_argument("--csv", type=Path, help="write the rows here")
    p.add_argument("--copy", type=Path, help="copy each samples.json (and composition.txt) here, by folder name")
    args = p.parse_args()
    rows = []
    for path in args.paths:
        if not (path / "samples.json" if path.is_dir() else path).is_file():
            p.error(f"no samples.json at {path}")
        rows.append(row_of(path))
        if args.copy and path.is_dir():
            args.copy.mkdir(parents=True, exist_ok=True)
            shutil.copy(path / "samples.json", args.copy / f"{path.name}.json")
            if (path / "composition.txt").is_file():
                shutil.copy(path / "composition.txt", args.copy / f"{path.name}.txt")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)

    def pct(v):
        return "" if v is None else f"{100 * v:.1f}%"

    print("| run | steps | resample | below | calls | atom stable | mol stable | valid | V*U | novelty | own stable | own valid | odd sum | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['steps']} | {r['resample']} | {r['resample_below']:g} | {r['network_evaluations']} | "
              f"{pct(r['atom_stable'])} | {pct(r['mol_stable'])} | {pct(r['validity'])} | {pct(r['valid_and_unique'])} | "
              f"{pct(r['novelty'])} | {pct(r['own_mol_stable'])} | {pct(r['own_validity'])} | {pct(r['odd_valence'])} | "
              f"{r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
