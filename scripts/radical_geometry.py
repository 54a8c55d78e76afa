"""Where the lone unstable carbon of a sample sits (session 7): planar or pyramidal, bonded to what.

    python scripts/radical_geometry.py out/eval10k_s6/samples.csv out/eval10k_s6/samples.sdf

Of the molecules ``moldiff sample`` wrote whose only unstable atom is a carbon with bond-order sum 3
(EDM table), it reports the carbon's number of bonded neighbours, the sum of the three bond angles
when it has three (360 degrees: planar, sp2-like; ~328: tetrahedral, a missing hydrogen), and its
most common neighbour sets (element + EDM bond order). A planar carbon with three single bonds is
an sp2 centre without a double-bond partner: the molecule's sp2 atoms cannot pair up.
"""
from __future__ import annotations

import csv
import re
import sys
from collections import Counter

import numpy as np
from rdkit import Chem

from moldiff.chemistry.bonds import edm_bond_matrix

UNSTABLE_ATOM = re.compile(r"([A-Z][a-z]?)(\d+) \(bond-order sum (\d+), allowed (\d+)\)")


def main() -> None:
    rows = list(csv.DictReader(open(sys.argv[1], newline="")))
    records = Chem.SDMolSupplier(sys.argv[2], sanitize=False, removeHs=False)
    degree, neighbours, angle_sums = Counter(), Counter(), []
    for row, mol in zip(rows, records):
        if row["mol_stable"] == "1" or mol is None:
            continue
        found = UNSTABLE_ATOM.findall(row["reason"])
        if len(found) != 1 or found[0][0] != "C" or int(found[0][2]) != 3:
            continue
        i = int(found[0][1])
        symbols = [a.GetSymbol() for a in mol.GetAtoms()]
        pos = mol.GetConformer().GetPositions()
        orders = edm_bond_matrix(symbols, pos)
        bonded = np.nonzero(orders[i])[0]
        degree[len(bonded)] += 1
        neighbours["".join(sorted(f"{symbols[j]}{'-=#'[int(orders[i, j]) - 1]}" for j in bonded))] += 1
        if len(bonded) == 3:
            v = pos[bonded] - pos[i]
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            angle_sums.append(sum(np.degrees(np.arccos(np.clip(v[p] @ v[q], -1.0, 1.0))) for p, q in ((0, 1), (0, 2), (1, 2))))
    a = np.array(angle_sums)
    total = sum(degree.values())
    print(f"# {sys.argv[1]}: {len(rows)} samples; {total} whose only unstable atom is a carbon with bond-order sum 3")
    print("bonded neighbours: " + ", ".join(f"{k}: {v}" for k, v in sorted(degree.items())))
    if len(a):
        print(f"with three neighbours, sum of bond angles: median {np.median(a):.1f} deg; planar (> 350) {100 * (a > 350).mean():.1f}%, "
              f"pyramidal (< 340) {100 * (a < 340).mean():.1f}%")
    print("neighbour sets: " + ", ".join(f"{k}: {v}" for k, v in neighbours.most_common(8)))


if __name__ == "__main__":
    main()
