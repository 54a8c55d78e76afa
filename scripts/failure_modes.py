"""Why samples fail the EDM protocol: classify every unstable or invalid molecule (docs/experiments.md,
session 10).

    python scripts/failure_modes.py moldiff/pretrained/qm9 300 --composition model
    python scripts/failure_modes.py runs/qm9_given/pipeline 300 --composition data

For each molecule, with EDM's distance-table bonds: is it in one piece; its closest pair of atoms;
for each atom whose bond-order sum is not an allowed valence, whether it has too few bonds (under) or
too many (over), by element. Invalid molecules are grouped by RDKit's sanitization message (an atom
with too high an explicit valence is the usual one). Same seed, sizes and starting noise as
``moldiff sample``. One thread, bf16 where the CPU has it.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

import numpy as np
import torch
from rdkit import rdBase
from scipy.sparse.csgraph import connected_components

from moldiff.chemistry.bonds import edm_bond_matrix, pairwise_distances
from moldiff.chemistry.elements import allowed_valences
from moldiff.chemistry.rdkit import edm_mol, sanitize_error
from moldiff.pipeline import evaluate_molecules, load_pretrained, molecules_from_arrays


def n_components(bonds: np.ndarray) -> int:
    return int(connected_components(bonds > 0, directed=False)[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("n", type=int)
    p.add_argument("--composition", default=None, choices=["model", "data"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--noise-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    rdBase.DisableLog("rdApp.*")
    torch.set_num_threads(args.threads)
    pipe = load_pretrained(args.checkpoint)
    pipe.configure_inference(precision="auto")
    kwargs = {} if args.noise_scale is None else {"noise_scale": args.noise_scale}
    arrays = pipe.sample_arrays(args.n, steps=args.steps, seed=args.seed, composition=args.composition, **kwargs)
    mols = molecules_from_arrays(arrays)
    metrics = evaluate_molecules(mols)
    results = metrics.per_molecule

    pieces = Counter()
    close = 0
    under, over = Counter(), Counter()
    over_patterns = Counter()
    paired_under: list[float] = []
    crowded = 0  # over-bonded atoms with more neighbours than their largest valence
    pair_kinds = Counter()
    mols_under = mols_over = 0
    errors = Counter()
    for mol, res in zip(mols, results):
        symbols, pos = mol.symbols, np.asarray(mol.positions, dtype=np.float64)
        bonds = edm_bond_matrix(symbols, pos)
        pieces[min(n_components(bonds), 4)] += 1
        d = pairwise_distances(pos)
        np.fill_diagonal(d, np.inf)
        close += bool(d.min() < 0.9)
        sums = bonds.sum(axis=1)
        u = o = False
        for i, (s, v) in enumerate(zip(symbols, sums)):
            allowed = allowed_valences(s)
            if v in allowed:
                continue
            if v < min(allowed):
                under[s] += 1
                u = True
            else:
                over[s] += 1
                o = True
                crowded += int(np.count_nonzero(bonds[i])) > max(allowed)
                partners = sorted(f"{symbols[j]}{'-=#'[bonds[i, j] - 1]}" for j in np.nonzero(bonds[i])[0])
                over_patterns[f"{s}: " + " ".join(partners)] += 1
        mols_under += u
        mols_over += o
        low = [i for i, (s, v) in enumerate(zip(symbols, sums)) if v < min(allowed_valences(s))]
        for a in low:  # two neighbours both short of a bond: a double bond read as single?
            for b in low:
                if a < b and bonds[a, b] == 1:
                    paired_under.append(float(d[a, b]))
                    pair_kinds["".join(sorted((symbols[a], symbols[b])))] += 1
        if not res.valid:
            err = sanitize_error(edm_mol(symbols, pos, conformer=False)) or res.reason or "?"
            m = re.search(r"Explicit valence for atom # \d+ (\w+), (\d+)", err)
            errors[f"over-valent {m.group(1)} ({m.group(2)})" if m else err.split("\n")[0][:60]] += 1

    n = len(mols)
    report = metrics.to_dict(per_molecule=False)
    print(f"{args.checkpoint}, step {pipe.metadata.get('step', '?')}, composition "
          f"{args.composition or pipe.default_composition}, {n} x {args.steps} steps, seed {args.seed}")
    print(f"atom {100 * report['atom_stable']:.2f} mol {100 * report['mol_stable']:.2f} "
          f"valid {100 * report['validity']:.2f}")
    print("pieces (table bonds): " + ", ".join(f"{k if k < 4 else '4+'}: {100 * v / n:.1f}%" for k, v in sorted(pieces.items())))
    print(f"closest pair < 0.9 A: {100 * close / n:.1f}%")
    print(f"molecules with an under-bonded atom: {100 * mols_under / n:.1f}%, over-bonded: {100 * mols_over / n:.1f}%")
    print("under-bonded atoms by element: " + ", ".join(f"{k} {v}" for k, v in under.most_common()))
    print("over-bonded atoms by element: " + ", ".join(f"{k} {v}" for k, v in over.most_common()))
    if paired_under:
        q = np.percentile(paired_under, [10, 50, 90])
        print(f"single bonds joining two under-bonded atoms: {len(paired_under)} "
              f"({', '.join(f'{k} {v}' for k, v in pair_kinds.most_common(4))}); length 10/50/90%: "
              f"{q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f} A")
    print(f"over-bonded atoms with more neighbours than their valence allows: {crowded} of {sum(over.values())}")
    print("commonest over-bonded atoms (element: partners with bond order):")
    for k, v in over_patterns.most_common(8):
        print(f"  {v:4d}  {k}")
    print(f"invalid: {sum(errors.values())} ({100 * sum(errors.values()) / n:.1f}%)")
    for k, v in errors.most_common(8):
        print(f"  {v:4d}  {k}")


if __name__ == "__main__":
    main()
