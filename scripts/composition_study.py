"""Sample one model with its elements generated (``composition="model"``, EDM) and/or given from the
training data (``composition="data"``) and score both by the EDM protocol (docs/experiments.md,
session 9).

    python scripts/composition_study.py runs/ft_known/pipeline 300 model:0.5:2:50 data:0.5:2:50
    python scripts/composition_study.py runs/ft_known/pipeline 300 data:0.5:2:50 --weights runs/ft_known/checkpoint.pt
    python scripts/composition_study.py moldiff/pretrained/qm9 300 data:0.5:2:50 --zero-shot

Each spec is ``composition:noise_scale:time_power:steps``. ``--weights CHECKPOINT`` scores a training
checkpoint's raw (non-EMA) weights with the pipeline's configuration. ``--zero-shot`` lets a model
never trained with given types (``diffusion.known_types_prob = 0``) sample ``composition="data"``,
with the QM9 training compositions: the starting point of a fine-tune. Same seed, same sizes and
starting noise in every row. One thread, bf16 where the CPU has it.
"""

from __future__ import annotations

import argparse
import time

import torch

from moldiff.chemistry.elements import valence_sum_parity
from moldiff.pipeline import evaluate_molecules, load_pretrained, molecules_from_arrays


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("n", type=int)
    p.add_argument("specs", nargs="+", help="composition:noise_scale:time_power:steps")
    p.add_argument("--weights", help="a training checkpoint.pt whose raw weights replace the pipeline's")
    p.add_argument("--zero-shot", action="store_true", help="allow composition=data on a model not trained for it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pretrained(args.checkpoint)
    if args.weights:
        pipe.denoiser.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=False)["model"])
    if args.zero_shot:
        if not pipe.statistics.formula_counts:
            from moldiff.training.config import RunConfig
            from moldiff.training.loop import load_training_data

            pipe.statistics = load_training_data(RunConfig()).statistics
        pipe.metadata.setdefault("known_types_prob", 1e-9)  # not trained for it: measured, not shipped
    pipe.configure_inference(precision="auto")
    print(f"{args.checkpoint} (weights: {args.weights or 'EMA'}), step {pipe.metadata.get('step', '?')}, "
          f"known_types_prob {pipe.metadata.get('known_types_prob', 0)}, {args.n} samples, seed {args.seed}")
    for spec in args.specs:
        composition, noise, power, steps = spec.split(":")
        t0 = time.monotonic()
        arrays = pipe.sample_arrays(args.n, steps=int(steps), seed=args.seed, composition=composition,
                                    noise_scale=float(noise), time_power=float(power))
        mols = molecules_from_arrays(arrays)
        r = evaluate_molecules(mols).to_dict(per_molecule=False)
        odd = sum(valence_sum_parity(m.symbols) == 1 for m in mols) / len(mols)
        print(f"{spec}: atom {100 * r['atom_stable']:.2f} mol {100 * r['mol_stable']:.2f} valid {100 * r['validity']:.2f} "
              f"V*U {100 * r['valid_and_unique']:.2f} odd valence {100 * odd:.1f}% faults {int((arrays.fault_step >= 0).sum())} "
              f"({time.monotonic() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
