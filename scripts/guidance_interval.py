"""Study: classifier-free guidance only on a window of times, (LO, HI]; the plain conditional model elsewhere.

    python scripts/guidance_interval.py --lo 0.2 --hi 1 -- --generator runs/cond_categorical/snapshots/s74430 \\
        --predictor qm9-props --property gap,homo,cv --guidance 2,4 -n 300 --steps 50 --threads 1 \\
        --out docs/results/properties/guidance_interval/s74430_lo0.2_hi1.json

Runs ``scripts/eval_conditional.py`` (the arguments after ``--``) with
:func:`moldiff.sampling.guided_noise` replaced by: the scale asked for at a network call whose time
is in ``(LO, HI]``, and scale 1 (one call, the plain conditional prediction) at any other time; scale
0 (the unconditional cells) is left alone. The window goes into the output JSON (``guidance_interval``),
and its ``command`` names this script. Kynkäänniemi et al. (NeurIPS 2024, "Applying guidance in a
limited interval improves sample and distribution quality in diffusion models") found guidance
harmful at high noise and useless at low noise for images; this asks whether guidance late in
the reverse process (``LO > 0``), where the bonds and elements are settled, costs validity without
moving the property. The package keeps guidance on every step: no window measured better
(docs/experiments.md, session 29).
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 usage="%(prog)s --lo LO --hi HI -- [scripts/eval_conditional.py arguments]")
    ap.add_argument("--lo", type=float, required=True, help="guide the calls at times above this ...")
    ap.add_argument("--hi", type=float, required=True, help="... and at or below this one")
    args = ap.parse_args(ours)
    if not 0.0 <= args.lo < args.hi <= 1.0:
        print(f"guidance_interval: need 0 <= lo < hi <= 1, got lo {args.lo} and hi {args.hi}", file=sys.stderr)
        return 2
    import moldiff.sampling as sampling

    guided = sampling.guided_noise

    def windowed(pipe, pos_t, h_t, t, batch, context, guidance_scale=None, **extra):
        inside = args.lo < float(t.reshape(-1)[0]) <= args.hi  # every molecule of a batch shares its time
        if guidance_scale not in (None, 0) and not inside:
            guidance_scale = 1.0
        return guided(pipe, pos_t, h_t, t, batch, context, guidance_scale, **extra)

    sampling.guided_noise = windowed
    try:
        saved = sys.argv
        sys.argv = [str(ROOT / "scripts" / "eval_conditional.py"), *rest]
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as done:
            code = int(done.code or 0) if not isinstance(done.code, str) else 2
        finally:
            sys.argv = saved
    finally:
        sampling.guided_noise = guided
    out = Path(rest[rest.index("--out") + 1]) if "--out" in rest[:-1] else None
    if code == 0 and out is not None and out.exists():
        doc = json.loads(out.read_text())
        doc["guidance_interval"] = [args.lo, args.hi]
        doc["command"] = f"python scripts/guidance_interval.py --lo {args.lo:g} --hi {args.hi:g} -- " + " ".join(rest)
        out.write_text(json.dumps(doc, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
