"""Time the EDM-protocol evaluation of 10,000 molecules (novelty reference cached).

    python scripts/bench_evaluate.py -n 10000 --workers 1

Molecules: the first N of the QM9 test split followed by the validation split (real geometries,
~18 atoms each). Loading the cached novelty reference is timed separately; building it once
(first use, ~45 s per core) is not part of the measurement.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moldiff.chemistry.metrics import evaluate_molecules, format_table  # noqa: E402
from moldiff.data.qm9 import edm_split, load_qm9, training_smiles  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    qm9 = load_qm9()
    training_smiles()  # make sure the cache exists before timing
    split = edm_split()
    which = np.concatenate([split["test"], split["valid"]])[: args.n]
    molecules = list(qm9.molecules(which))
    t0 = time.perf_counter()
    reference = training_smiles()
    t1 = time.perf_counter()
    report = evaluate_molecules(molecules, reference=reference, workers=args.workers)
    t2 = time.perf_counter()
    print(format_table(report))
    print(f"\n{args.n} molecules, workers={args.workers}: load novelty reference {t1 - t0:.2f} s, "
          f"evaluate {t2 - t1:.2f} s, total {t2 - t0:.2f} s")


if __name__ == "__main__":
    main()
