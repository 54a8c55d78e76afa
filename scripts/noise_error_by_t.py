"""How well a checkpoint predicts the noise on real validation molecules, time by time.

Noises the first ``--molecules`` validation molecules of the run's dataset at each time (seed 0) and
prints the mean squared error of the predicted coordinate noise and feature noise per dimension,
beside the rms size of the clean positions and of the clean estimate ``(x_t - sigma eps_hat) /
alpha``. A zero guess of the coordinates' noise scores ``(N - 1) / N``, about 0.97 for drug-like
molecules; a trained model scores far below it at small t (docs/drug_sized.md).

    python scripts/noise_error_by_t.py runs/druglike_skip/checkpoint.pt --weights ema
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

TIMES = (0.95, 0.8, 0.6, 0.4, 0.2, 0.05)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="checkpoint.pt of a `moldiff train` run (its config names the dataset)")
    ap.add_argument("--weights", choices=("model", "ema"), default="ema", help="raw or EMA weights (default ema)")
    ap.add_argument("--molecules", type=int, default=16, help="validation molecules (default 16)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from moldiff.geometry import remove_mean
    from moldiff.pipeline import MolDiffPipeline
    from moldiff.training.config import RunConfig
    from moldiff.training.loop import load_training_data

    state = torch.load(args.checkpoint, weights_only=False, map_location="cpu")
    pipe = MolDiffPipeline.from_config(state["pipeline_config"])
    pipe.denoiser.load_state_dict(state[args.weights])
    pipe.denoiser.double().eval()
    data = load_training_data(RunConfig.from_dict(state["config"]))
    b = data.valid.batch(np.arange(min(args.molecules, len(data.valid))))
    x0 = remove_mean(b.pos.double(), b.batch, b.num_graphs)
    h0 = pipe.features.encode(b.types, b.charges, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    print(f"{args.checkpoint} ({args.weights}, step {state['step']}): {b.num_graphs} validation molecules, "
          f"{b.batch.numel()} atoms, rms clean positions {x0.square().mean().sqrt().item():.3f} Å")
    for tk in TIMES:
        t = torch.full((b.num_graphs,), tk, dtype=torch.float64)
        alpha, sigma = (v[b.batch].unsqueeze(-1) for v in pipe.schedule.alpha_sigma(t))
        eps_pos = remove_mean(torch.randn(x0.shape, generator=g, dtype=torch.float64), b.batch, b.num_graphs)
        eps_h = torch.randn(h0.shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            pred_pos, pred_h = pipe.predict_noise(alpha * x0 + sigma * eps_pos, alpha * h0 + sigma * eps_h, t, b.batch)
        x0_hat = x0 + sigma / alpha * (eps_pos - pred_pos)  # (x_t - sigma eps_hat) / alpha
        print(f"  t = {tk:.2f}: noise MSE positions {(pred_pos - eps_pos).square().mean().item():.4f}, "
              f"features {(pred_h - eps_h).square().mean().item():.4f}; rms clean estimate "
              f"{x0_hat.square().mean().sqrt().item():.3f} Å")
    return 0


if __name__ == "__main__":
    sys.exit(main())
