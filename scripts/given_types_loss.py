"""Noise error of the positions on 256 QM9 validation molecules at fixed t, with the atom types
noised as in EDM's joint model ("joint") or given clean ("given"), for each pipeline named
(docs/experiments.md, session 9). Mean over atoms of |eps - eps_hat|^2 (3 coordinates); same noise.

    python scripts/given_types_loss.py moldiff/pretrained/qm9 runs/ft_known/pipeline
"""

from __future__ import annotations

import sys

import torch

from moldiff.diffusion import add_noise
from moldiff.pipeline import MolDiffPipeline
from moldiff.training.config import RunConfig
from moldiff.training.loop import load_training_data


def main() -> None:
    torch.set_num_threads(1)
    _, batch = next(iter(load_training_data(RunConfig()).valid.batches(256, 0, 0, 0)))
    for path in sys.argv[1:]:
        pipe = MolDiffPipeline.from_pretrained(path)
        pipe.denoiser.eval()
        h = pipe.features.encode(batch.types, batch.charges)
        cells = []
        for tv in (0.1, 0.3, 0.5, 0.7, 0.9):
            t = torch.full((batch.num_graphs,), tv, dtype=torch.float64)
            a, s = pipe.schedule.alpha_sigma(t)
            pos_t, h_t, eps_pos, _ = add_noise(batch.pos, h, a, s, batch.batch, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                joint, _ = pipe.predict_noise(pos_t, h_t, t.float(), batch.batch)
                given, _ = pipe.predict_noise(pos_t, h, t.float(), batch.batch)
            cells.append(f"t={tv}: joint {((joint - eps_pos) ** 2).sum(-1).mean():.3f} given {((given - eps_pos) ** 2).sum(-1).mean():.3f}")
        print(f"{path} (step {pipe.metadata.get('step', '?')}): " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
