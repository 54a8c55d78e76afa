"""Composition of sampled molecules against QM9's: the failure the metrics hide.

    python scripts/composition_report.py out/eval10k/samples.csv
    python scripts/composition_report.py out/a70368_300/samples.csv --own-bonds   # a bond model's own bonds

Reads the ``samples.csv`` that ``moldiff sample`` writes (formula, num_atoms, mol_stable per
molecule) and prints: the % of samples whose composition has an odd valence sum (H + N + F odd for
QM9's elements: no geometry can make such a molecule stable, see
:func:`moldiff.chemistry.elements.valence_sum_parity`), molecule stability among the even ones, and
per molecule size the mean number of hydrogens next to QM9's (all 130,831 molecules); then, from
the ``reason`` column, how many atoms of each unstable molecule are unstable and which (element,
bond-order sum minus valence) errors occur most. ``--own-bonds`` reads the verdicts on a bond
model's own bonds instead (columns ``own_bonds_mol_stable`` and ``own_bonds_reason``).
"""
from __future__ import annotations

import argparse
import csv
import re
from collections import Counter, defaultdict

import numpy as np

from moldiff.chemistry.elements import valence_sum_parity
from moldiff.chemistry.fragments import parse_formula
from moldiff.data.qm9 import load_qm9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples_csv", help="the samples.csv that `moldiff sample` wrote")
    p.add_argument("--own-bonds", action="store_true", help="stability and reasons on the model's own bonds")
    args = p.parse_args()
    with open(args.samples_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if args.own_bonds:
        if not rows or "own_bonds_reason" not in rows[0]:
            raise SystemExit(f"{args.samples_csv}: no own_bonds_reason column (not a bond model's samples, or "
                             "written before moldiff recorded it)")
        rows = [r | {"mol_stable": r["own_bonds_mol_stable"], "reason": r["own_bonds_reason"]} for r in rows]
    by_size = defaultdict(list)  # size -> (hydrogens, odd, stable)
    for r in rows:
        counts = parse_formula(r["formula"]) if r["formula"] else {}
        symbols = [e for e, c in counts.items() for _ in range(c)]
        parity = valence_sum_parity(symbols) if symbols else None
        by_size[int(r["num_atoms"])].append((counts.get("H", 0), parity == 1, r["mol_stable"] == "1"))
    data = defaultdict(list)
    for symbols, _ in load_qm9().molecules():
        data[len(symbols)].append(list(symbols).count("H"))
    allrows = np.array([x for v in by_size.values() for x in v], dtype=float)
    even = allrows[allrows[:, 1] == 0]
    print(f"# {args.samples_csv}: {len(rows)} samples" + (" (on the model's own bonds)" if args.own_bonds else ""))
    print(f"odd valence sum: {100 * allrows[:, 1].mean():.1f}% of samples (QM9: 0%)")
    print(f"molecule stability: {100 * allrows[:, 2].mean():.2f}% of all, {100 * even[:, 2].mean():.2f}% of the "
          f"{len(even)} with an even valence sum")
    print("size  samples  H mean (samples)  H mean (QM9)  odd %  stable %  stable % of even")
    for n in sorted(by_size):
        s = np.array(by_size[n], dtype=float)
        if len(s) < 20:
            continue
        ev = s[s[:, 1] == 0]
        print(f"{n:4d}  {len(s):7d}  {s[:, 0].mean():16.2f}  {np.mean(data[n]) if data[n] else float('nan'):12.2f}  "
              f"{100 * s[:, 1].mean():5.1f}  {100 * s[:, 2].mean():8.1f}  {100 * ev[:, 2].mean() if len(ev) else float('nan'):16.1f}")

    unstable_atoms(rows)


#: "C2 (bond-order sum 3, allowed 4)" in the reason column of samples.csv
UNSTABLE_ATOM = re.compile(r"([A-Z][a-z]?)\d+ \(bond-order sum (\d+), allowed (\d+)\)")


def unstable_atoms(rows) -> None:
    per_molecule, errors, lone = Counter(), Counter(), Counter()
    unstable = [r for r in rows if r["mol_stable"] != "1" and r.get("reason")]
    for r in unstable:
        found = [(el, int(total) - int(allowed)) for el, total, allowed in UNSTABLE_ATOM.findall(r["reason"])]
        per_molecule[len(found)] += 1
        errors.update(found)
        if len(found) == 1:
            lone[found[0]] += 1
    n = len(rows)
    print(f"\nunstable molecules: {len(unstable)}; by number of unstable atoms: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(per_molecule.items())[:8]))
    print("unstable atoms by (element, bond-order sum - valence): "
          + ", ".join(f"{el} {d:+d}: {c}" for (el, d), c in errors.most_common(8)))
    print("molecules with a single unstable atom, by that atom: "
          + ", ".join(f"{el} {d:+d}: {c} ({100 * c / n:.1f}% of samples)" for (el, d), c in lone.most_common(5)))


if __name__ == "__main__":
    main()
