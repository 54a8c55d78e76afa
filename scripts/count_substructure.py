"""How often does a substructure occur in QM9? (what the model could learn about it)

    python scripts/count_substructure.py 'c1ccccc1' [--split train]

Parses the dataset's own SMILES (the GDB-17 / relaxed-geometry SMILES of qm9pack's CSVs) with
RDKit and counts molecules with a substructure match of the SMARTS, in all of QM9 or one split of
EDM's split, with the count per molecule size (atoms including hydrogens).
"""
from __future__ import annotations

import argparse
from collections import Counter

from rdkit import Chem, RDLogger

from moldiff.data.qm9 import edm_split, load_qm9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("smarts")
    p.add_argument("--split", choices=("all", "train", "valid", "test"), default="all")
    args = p.parse_args()
    RDLogger.DisableLog("rdApp.*")
    query = Chem.MolFromSmarts(args.smarts)
    if query is None:
        raise SystemExit(f"not a SMARTS: {args.smarts!r}")
    data = load_qm9()
    which = range(len(data.smiles)) if args.split == "all" else edm_split()[args.split]
    total, sizes = 0, Counter()
    for k in which:
        total += 1
        mol = Chem.MolFromSmiles(str(data.smiles[k]))
        if mol is not None and mol.HasSubstructMatch(query):
            sizes[mol.GetNumAtoms() + sum(a.GetTotalNumHs() for a in mol.GetAtoms())] += 1
    hits = sum(sizes.values())
    print(f"{args.smarts} in QM9 ({args.split}): {hits} of {total} molecules ({100 * hits / total:.2f}%)")
    print("by size (atoms with H): " + ", ".join(f"{n}: {c}" for n, c in sorted(sizes.items())))


if __name__ == "__main__":
    main()
