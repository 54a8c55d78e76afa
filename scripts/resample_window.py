"""Study: late resampling confined to a window of times, (LO, HI], instead of every step below HI.

    python scripts/resample_window.py --lo 0.05 --hi 0.2 --rounds 2 -- -n 1000 --steps 50 --seed 0 \\
        --threads 1 -o out/window_005_020

Runs ``moldiff sample`` (the arguments after ``--``) with the rule for resampling rounds
(:func:`moldiff.sampling.resample_rounds`, which the reverse loop and its count of network calls
both follow) replaced by: ``ROUNDS`` rounds for a step that starts at ``LO < t <= HI``, one
otherwise. The command's own summary and JSON then report the calls made; its
``resample``/``resample_below`` fields are not the window's (this study's rows in docs/experiments.md,
session 28, say which window each is). The package keeps one threshold: no window measured better
per network call (same section).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 usage="%(prog)s --lo LO --hi HI --rounds R -- [moldiff sample arguments]")
    ap.add_argument("--lo", type=float, required=True, help="resample steps starting above this time")
    ap.add_argument("--hi", type=float, required=True, help="... and at or below this time")
    ap.add_argument("--rounds", type=int, required=True, help="rounds of each step in the window (>= 2)")
    args = ap.parse_args(ours)
    if not (0.0 <= args.lo < args.hi <= 1.0) or args.rounds < 2:
        print("resample_window: need 0 <= lo < hi <= 1 and rounds >= 2", file=sys.stderr)
        return 2
    import moldiff.sampling as sampling
    from moldiff.cli import main as moldiff_main

    def window_rounds(starts, resample: int = 1, resample_below: float = 1.0) -> list[int]:
        if resample == 1:  # routes that ask for no resampling keep the plain loop
            return [1 for _ in starts]
        return [args.rounds if args.lo < float(t) <= args.hi else 1 for t in starts]

    sampling.resample_rounds = window_rounds
    return moldiff_main(["sample", "--resample", "2", *rest])


if __name__ == "__main__":
    sys.exit(main())
