"""How well a training checkpoint's denoiser returns its input as the noise at high t.

At t = 1 EDM's polynomial schedule has alpha = 0.0032, so the noise to predict is the input itself,
and the first reverse step multiplies the prediction's error by 1 / a_ts (24 for 50 steps on the t^2
grid). This prints alpha at t = 1, the factor for 50 and 20 steps, and the rms of ``eps_hat - z`` for positions and features on random centred clouds
(16 molecules of ``--atoms`` atoms, seed 0) at t = 1, 0.95 and 0.9, with the raw or the EMA weights.

    python scripts/t1_noise_error.py runs/druglike_small/checkpoint.pt --weights ema
    python scripts/t1_noise_error.py runs/qm9_small/checkpoint.pt --weights ema --atoms 40
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="checkpoint.pt files of `moldiff train` runs")
    ap.add_argument("--weights", choices=("model", "ema"), default="ema", help="raw or EMA weights (default ema)")
    ap.add_argument("--atoms", type=int, default=40, help="atoms per cloud (default 40)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from moldiff.geometry import remove_mean
    from moldiff.pipeline import MolDiffPipeline
    from moldiff.sampling import DEFAULT_TIME_POWER

    for path in args.checkpoints:
        state = torch.load(path, weights_only=False, map_location="cpu")
        pipe = MolDiffPipeline.from_config(state["pipeline_config"])
        net, cfg = pipe.denoiser, pipe.denoiser.config
        net.load_state_dict(state[args.weights])
        net.eval()
        alpha_1 = float(pipe.schedule.alpha_sigma(torch.ones(1, dtype=torch.float64))[0])
        factors = []
        for steps in (50, 20):  # the first reverse step of the default grid t_k = (k / K)^P
            second = torch.tensor([((steps - 1) / steps) ** DEFAULT_TIME_POWER], dtype=torch.float64)
            alpha_2 = float(pipe.schedule.alpha_sigma(second)[0])
            factors.append(f"{steps} steps: alpha {alpha_2:.4f} at the second time, 1 / a_ts = {alpha_2 / alpha_1:.1f}")
        print(f"{path}: alpha at t = 1 is {alpha_1:.4f}; " + "; ".join(factors))
        g = torch.Generator().manual_seed(0)
        batch = torch.repeat_interleave(torch.arange(16), args.atoms)
        z = remove_mean(torch.randn(len(batch), 3, generator=g), batch, 16)
        h = torch.randn(len(batch), cfg.num_features, generator=g)
        for t in (1.0, 0.95, 0.9):
            with torch.no_grad():  # through the pipeline: a model's Gaussian skips are part of its prediction
                eps_pos, eps_h = pipe.predict_noise(z, h, torch.full((16,), t), batch)
            print(f"{path} ({args.weights}, step {state['step']}, graph {cfg.graph}) t={t}: "
                  f"rms(eps_pos - z) = {float((eps_pos - z).pow(2).mean().sqrt()):.3f}, "
                  f"rms(eps_h - h) = {float((eps_h - h).pow(2).mean().sqrt()):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
