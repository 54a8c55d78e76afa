"""One fragment, several conditioned-sampling settings: retention, validity, stability, and the
neighbour counts of the fragment atoms (issue 6's benzene case).

    python scripts/bench_fragment.py --smiles 'c1ccccc1' --num-atoms 18 -n 60 \\
        --settings 0.5:0 0.5:1 1:0 1:1 [--checkpoint qm9] [--steps 50]

Each setting is ``noise_scale:valence_guidance``; every setting samples the same ``n`` molecules'
worth of seeds (the run's seed, 20 molecules per seed by default) with the package's other
defaults (resample 10, uniform time grid), as ``moldiff sample --fragment-smiles ... --noise-scale
X --valence-guidance G`` would. "Neighbours" counts, per fragment atom, the other atoms that EDM's
table bonds to it, against its open valences (one per benzene carbon).
"""
from __future__ import annotations

import argparse
import time
from collections import Counter

import torch

from moldiff.chemistry.bonds import edm_bond_matrix
from moldiff.chemistry.metrics import evaluate_molecules
from moldiff.inpainting import Fragment, fragment_reports, inpaint_arrays
from moldiff.pipeline import load_pretrained


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smiles", default="c1ccccc1")
    p.add_argument("--num-atoms", type=int, default=18)
    p.add_argument("-n", type=int, default=60, help="molecules per setting")
    p.add_argument("--per-seed", type=int, default=20, help="molecules per seed (the CLI's -n of one run)")
    p.add_argument("--settings", nargs="+", default=["0.5:0", "0.5:1", "1:0", "1:1"])
    p.add_argument("--checkpoint", default="qm9", help="shipped model name, pipeline folder or run folder (default qm9)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pretrained(args.checkpoint)
    pipe.configure_inference(precision=args.precision, compile=False)
    frag = Fragment.from_smiles(args.smiles)
    slots = frag.open_valences()
    k = frag.num_atoms
    print(f"# fragment {args.smiles}: {k} atoms, open valences {slots.tolist()}; N = {args.num_atoms}; "
          f"checkpoint {args.checkpoint} (step {pipe.metadata.get('step', '?')}); {args.steps} steps; {args.n} molecules per setting")
    print("| noise scale | valence guidance | fragment retained | valid | molecule stable | atom stable | fragment atoms with their open valences filled | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for setting in args.settings:
        noise, guidance = (float(x) for x in setting.split(":"))
        t0 = time.monotonic()
        mols, retained, exact = [], 0, Counter()
        for seed in range(-(-args.n // args.per_seed)):
            m = min(args.per_seed, args.n - seed * args.per_seed)
            arrays = inpaint_arrays(pipe, m, fragment=frag, num_atoms=args.num_atoms, steps=args.steps, seed=seed,
                                    noise_scale=noise, valence_guidance=guidance)
            retained += sum(r.retained for r in fragment_reports(frag, arrays))
            for j in range(m):
                sym, pos = arrays.symbols(j), arrays.positions[j]
                mols.append((sym, pos))
                bonded = edm_bond_matrix(list(sym), pos) > 0
                new = bonded[:k, k:].sum(1)
                exact.update((new == slots).tolist())
        r = evaluate_molecules(mols)
        n = len(mols)
        print(f"| {noise:g} | {guidance:g} | {retained}/{n} ({100 * retained / n:.0f}%) | {100 * r.validity:.1f}% | {100 * r.mol_stable:.1f}% "
              f"| {100 * r.atom_stable:.1f}% | {100 * exact[True] / max(1, sum(exact.values())):.1f}% | {time.monotonic() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
