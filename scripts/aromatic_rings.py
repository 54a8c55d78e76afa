"""Flat aromatic-like six-rings: how often the data and the samples hold one, and what EDM's
stability protocol makes of molecules that do.

    python scripts/aromatic_rings.py [--data 10000] [samples.sdf ...]

A ring counts when six C/N atoms are bonded in a cycle by EDM's distance table, each C bonded to
three atoms and each N to two or three, within 0.1 Å RMS of a plane
(:func:`moldiff.chemistry.diagnostics.has_planar_six_ring`). For the first ``--data`` molecules of
EDM's QM9 training split (DFT geometries) and for each sample file: the fraction with such a ring,
and EDM-protocol atom / molecule stability and validity of the molecules with and without one.
"""
from __future__ import annotations

import argparse

from moldiff.chemistry.diagnostics import has_planar_six_ring
from moldiff.chemistry.io import read_molecules
from moldiff.chemistry.metrics import evaluate_molecules
from moldiff.data.qm9 import edm_split, load_qm9


def report(label: str, molecules: list) -> None:
    flags = [has_planar_six_ring(s, p) for s, p in molecules]
    ring = [m for m, f in zip(molecules, flags) if f]
    rest = [m for m, f in zip(molecules, flags) if not f]
    print(f"{label}: {len(molecules)} molecules, {len(ring)} with a flat six-ring ({100 * len(ring) / max(1, len(molecules)):.2f}%)")
    for name, group in (("  with the ring", ring), ("  without", rest)):
        if not group:
            print(f"{name:>16}: none")
            continue
        r = evaluate_molecules(group)
        print(f"{name:>16}: {len(group):6d}  atom stable {100 * r.atom_stable:5.1f}%  molecule stable {100 * r.mol_stable:5.1f}%"
              f"  valid {100 * r.validity:5.1f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", nargs="*", help="SDF / XYZ files of generated molecules")
    p.add_argument("--data", type=int, default=10000, help="QM9 training molecules to census (0: none)")
    args = p.parse_args()
    if args.data:
        qm9 = load_qm9()
        report(f"QM9 training split, first {args.data}", list(qm9.molecules(edm_split()["train"][: args.data])))
    for path in args.samples:
        records = read_molecules(path)
        report(path, [(r.symbols, r.positions) for r in records if r.error is None])


if __name__ == "__main__":
    main()
