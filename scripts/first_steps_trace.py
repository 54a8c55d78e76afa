"""Follow the reverse process of a training checkpoint step by step: does the cloud stay bounded?

For each checkpoint it samples ``--molecules`` molecules of ``--atoms`` atoms with the default
sampler (ancestral, t_k = (k / K)^2, noise scale 0.5; ``--steps`` steps, seed 0) and prints the rms
of the positions (Å, per coordinate) and of the element features after each of the first
``--show`` steps and at the end. With noise scale 0.5 a healthy run has positions near 0.5 after
the first step and ends near the data's spread (QM9 1.40 Å, the drug-like set 2.56 Å); a run that
blows up grows by orders of magnitude within a few steps (docs/drug_sized.md).

    python scripts/first_steps_trace.py runs/druglike_small/checkpoint.pt --weights ema
"""

from __future__ import annotations

import argparse
import math
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="checkpoint.pt files of `moldiff train` runs")
    ap.add_argument("--weights", choices=("model", "ema"), default="ema", help="raw or EMA weights (default ema)")
    ap.add_argument("--atoms", type=int, default=40, help="atoms per molecule (default 40)")
    ap.add_argument("--molecules", type=int, default=8, help="molecules (default 8)")
    ap.add_argument("--steps", type=int, default=50, help="reverse steps (default 50)")
    ap.add_argument("--show", type=int, default=4, help="steps printed from the start (default 4)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from moldiff.diffusion import make_sampler
    from moldiff.pipeline import MolDiffPipeline
    from moldiff.sampling import DEFAULT_NOISE_SCALE, DEFAULT_TIME_POWER, SamplingHook, denoise_batch

    class Trace(SamplingHook):
        def __init__(self):
            self.rows = []

        def after_step(self, ctx, state, s, final=False):
            pos, h = state.pos.double(), state.h.double()
            self.rows.append((float(s.flatten()[0]), pos.square().mean().sqrt().item(), h.square().mean().sqrt().item()))

    for path in args.checkpoints:
        state = torch.load(path, weights_only=False, map_location="cpu")
        pipe = MolDiffPipeline.from_config(state["pipeline_config"])
        pipe.denoiser.load_state_dict(state[args.weights])
        pipe.denoiser.eval()
        cfg = pipe.denoiser.config
        sampler = make_sampler("ancestral", pipe.schedule, time_power=DEFAULT_TIME_POWER, noise_scale=DEFAULT_NOISE_SCALE)
        trace = Trace()
        with torch.no_grad():
            denoise_batch(pipe, [args.atoms] * args.molecules, args.steps, sampler, torch.Generator().manual_seed(0),
                          hooks=[trace])
        skips = f"centre_skip={bool(getattr(cfg, 'centre_skip', False))} pos_skip_std={getattr(cfg, 'pos_skip_std', 0.0)} " \
                f"h_skip={bool(getattr(cfg, 'h_skip', False))}"
        print(f"{path} ({args.weights}, step {state['step']}, graph {cfg.graph}, {skips}); "
              f"{args.molecules} x {args.atoms} atoms, {args.steps} steps")
        shown = trace.rows[: args.show] + [("end",) + trace.rows[-1][1:]]
        for s, p, h in shown:
            at = f"t = {s:.4f}" if s != "end" else "final"
            print(f"  {at:>10}: rms positions {p:.3g} Å, rms features {h:.3g}"
                  + ("" if math.isfinite(p) and math.isfinite(h) else "  (non-finite)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
