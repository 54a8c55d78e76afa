"""Variants of lower-temperature sampling (session 6): separate noise scales for positions and atom
features, and full noise above a switch time.

    python scripts/noise_variants_study.py CHECKPOINT|shipped SAMPLES STEPS SETTING [SETTING ...]

Each SETTING is ``lp,lh[,t_switch,hi]``: the fresh noise of every ancestral step is multiplied by
``lp`` for positions and ``lh`` for atom features; with ``t_switch`` both factors are ``hi`` at
times above it. ``0.5,0.5`` is ``moldiff sample``'s default (``noise_scale=0.5``). Every setting
samples the same molecules (seed 0: same sizes and initial noise) with the pipeline's other
defaults (time grid (k/K)^2, bf16 on CPUs that have it, compiled network) and is scored with the
EDM protocol, novelty against the QM9 training SMILES, plus ``oddparity``: the % of samples whose
composition has an odd valence sum (no geometry can make them stable). One line per setting.
The sampler is a subclass written here, swapped into the pipeline for the study only; the package's
``noise_scale`` is the ``lp = lh``, no-switch case. Results: docs/noise_variants_s42911.txt.
"""
import sys
import time

import torch

import moldiff
import moldiff.pipeline as mp
from moldiff.chemistry.elements import valence_sum_parity
from moldiff.data.qm9 import training_smiles
from moldiff.diffusion.process import centred_noise
from moldiff.diffusion.samplers import AncestralSampler, SamplerStep, _per_atom
from moldiff.pipeline import evaluate_molecules, molecules_from_arrays


class SplitNoiseSampler(AncestralSampler):
    """Ancestral steps whose fresh noise is scaled by ``lp`` (positions) and ``lh`` (features)."""

    def __init__(self, schedule, lp, lh, t_switch=None, hi=None, **kw):
        super().__init__(schedule, **kw)
        self.lp, self.lh, self.t_switch, self.hi = lp, lh, t_switch, hi

    def step(self, eps_pos, eps_h, t, s, pos_t, h_t, batch, *, generator=None):
        n = t.shape[0]
        dt = pos_t.dtype
        cz, ce, std = (_per_atom(x, batch, dt) for x in self.posterior(t, s))
        noise_pos = centred_noise(batch, n, generator=generator, dtype=dt)
        noise_h = torch.randn(h_t.shape, generator=generator, dtype=dt, device=h_t.device)
        lp, lh = self.lp, self.lh
        if self.t_switch is not None and float(t[0]) > self.t_switch:
            lp, lh = self.hi, self.hi
        pos = cz * pos_t - ce * eps_pos + lp * std * noise_pos
        h = cz * h_t - ce * eps_h + lh * std * noise_h
        pos0, h0 = self.clean_estimate(pos_t, h_t, eps_pos, eps_h, t, batch)
        return SamplerStep(pos, h, pos0, h0)


def main() -> None:
    ckpt, n, steps, settings = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    moldiff.tune_allocator()
    torch.set_num_threads(1)
    pipe = moldiff.load_pretrained(None if ckpt == "shipped" else ckpt).configure_inference("auto", compile=True)
    ref = training_smiles()
    for setting in settings:
        vals = [None if v == "-" else float(v) for v in setting.split(",")]
        lp, lh = vals[0], vals[1]
        ts = vals[2] if len(vals) > 2 else None
        hi = vals[3] if len(vals) > 3 else None
        mp.make_sampler = lambda name, schedule, **kw: SplitNoiseSampler(schedule, lp, lh, ts, hi, time_power=kw["time_power"])
        t0 = time.time()
        arr = pipe.sample_arrays(n, steps=steps, seed=0)
        mols = molecules_from_arrays(arr)
        r = evaluate_molecules(mols, reference=ref)
        odd = sum(valence_sum_parity(m.symbols) == 1 for m in mols)
        print(f"lp {lp} lh {lh} t_switch {ts} hi {hi}: atom {100*r.atom_stable:.2f} mol {100*r.mol_stable:.2f} valid {100*r.validity:.2f} "
              f"V*U {100*r.valid_and_unique:.2f} uniq {100*r.uniqueness:.2f} novel {100*r.novelty:.2f} oddparity {100*odd/n:.1f} ({time.time()-t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
