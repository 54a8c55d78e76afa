"""Write the novelty reference shipped in the package: ``moldiff/data/qm9_train_smiles.json.gz``.

    python scripts/build_novelty_reference.py [--workers 2] [--cache-dir DIR]

It holds the canonical SMILES of the EDM training split of QM9, built exactly as
``moldiff.data.qm9.training_smiles`` builds its on-disk cache (EDM's bond table, sanitized, largest
fragment), and the RDKit version that canonicalised them. ``moldiff sample`` uses it for novelty
when the installed RDKit is that same version, so a fresh install computes novelty without the
one-minute build; with any other RDKit version it builds (and caches) the reference as before.
Re-run this script when the pinned or current RDKit release changes. The build ignores any shipped
file and reuses the cache folder's reference when one exists.
"""

from __future__ import annotations

import argparse
import os
import time

from moldiff.data.qm9 import SHIPPED_REFERENCE, shipped_training_smiles, training_smiles, write_shipped_training_smiles


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=1, help="processes for the RDKit pass (default 1)")
    p.add_argument("--cache-dir", help="moldiff cache folder (default ~/.cache/moldiff or $MOLDIFF_CACHE)")
    p.add_argument("--out", default=str(SHIPPED_REFERENCE))
    args = p.parse_args()
    t0 = time.monotonic()
    smiles = training_smiles(args.cache_dir or os.environ.get("MOLDIFF_CACHE"), workers=args.workers, use_shipped=False)
    write_shipped_training_smiles(smiles, args.out)
    assert shipped_training_smiles(args.out) == set(smiles)
    print(f"wrote {args.out}: {len(smiles)} SMILES in {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    main()
