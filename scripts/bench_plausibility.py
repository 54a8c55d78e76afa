"""CPU cost of the plausibility passes per molecule (issue 22, part 5), measured in one process.

PoseBusters' molecule checks (with the internal-energy ensemble of its ``mol`` configuration, 50
conformers; with 10, ``--pb-conformers 10``; and without that check, ``--pb-conformers 0``), MMFF94
relaxation, and both (what ``--posebusters --relax mmff`` runs, the relaxed molecule checked again) on
a seeded sample of QM9 test molecules, one molecule at a time, PoseBusters' per-molecule ensemble cache
emptied before each mode, timed with ``time.process_time`` (CPU seconds of this process, so a busy machine inflates the
wall time but hardly the figure) and with the wall clock. The passes are independent per molecule,
so ``--workers W`` divides the wall time of a large set by about W on a machine with W free cores;
the projection printed for 1,000 molecules on 2 cores is that division, labelled as such.

    python scripts/bench_plausibility.py --n 60 --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: name -> (PoseBusters checks, force field, conformers in the internal-energy ensemble)
MODES = {
    "posebusters": (True, None, 50),
    "posebusters_energy10": (True, None, 10),
    "posebusters_no_energy": (True, None, 0),
    "relax_mmff": (False, "mmff", 50),
    "posebusters+relax_mmff": (True, "mmff", 50),
    "posebusters_energy10+relax_mmff": (True, "mmff", 10),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=60, help="QM9 test molecules (seeded random choice; default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the measurements (rewritten after every mode)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of modes to time (default all: {', '.join(MODES)})")
    args = p.parse_args(argv)
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        p.error(f"unknown mode(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")

    from machine_info import machine_record
    from posebusters.modules.energy_ratio import get_energies

    from moldiff.chemistry.plausibility import assess_plausibility
    from moldiff.chemistry.report import assess_sample
    from moldiff.data.qm9 import edm_split, load_qm9

    qm9 = load_qm9()
    test = edm_split(len(qm9))["test"]
    pick = np.sort(np.random.default_rng(args.seed).choice(len(test), args.n, replace=False))
    mols = [assess_sample(*qm9.molecule(int(test[k]))).mol for k in pick]
    mols = [(i, m) for i, m in enumerate(mols) if m is not None]
    assess_plausibility(mols[:2], checks=True, forcefield="mmff")  # imports and first-call costs out of the timing
    record = {"machine": machine_record(), "n": len(mols), "seed": args.seed, "modes": {}}
    print(f"{len(mols)} QM9 test molecules, one process; machine: {record['machine']}")
    print(f"{'mode':>24}  {'CPU s/mol':>9}  {'wall s/mol':>10}  {'1,000 on 2 free cores (projected)':>34}")
    for name in args.modes.split(","):
        checks, forcefield, conformers = MODES[name]
        get_energies.cache_clear()  # PoseBusters caches each molecule's ensemble: no mode reuses another's
        c0, w0 = time.process_time(), time.perf_counter()
        assess_plausibility(mols, checks=checks, forcefield=forcefield, energy_conformers=conformers)
        cpu, wall = (time.process_time() - c0) / len(mols), (time.perf_counter() - w0) / len(mols)
        projected = 1000 * cpu / 2 / 60
        record["modes"][name] = {"energy_conformers": conformers if checks else None,
                                 "cpu_s_per_molecule": round(cpu, 4), "wall_s_per_molecule": round(wall, 4),
                                 "projected_minutes_1000_on_2_cores": round(projected, 2)}
        print(f"{name:>24}  {cpu:9.3f}  {wall:10.3f}  {projected:31.1f} min", flush=True)
        record["load_average_after"] = os.getloadavg()
        if args.out:  # after every mode, so a run stopped early keeps what it measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
