"""The first noise-scale probe (session 5), run before ``noise_scale`` existed: it multiplies the
ancestral posterior std by lambda by patching ``AncestralSampler.posterior``, the same arithmetic as
``noise_scale=lambda`` now. Kept as run; use scripts/noise_scale_study.py for new measurements.

    python scripts/noise_scale_probe.py shipped 1.0,0.8,0.6
    python scripts/noise_scale_probe.py shipped 0.4,0.5,0.2
"""
import sys, time, torch
import moldiff
from moldiff.diffusion.samplers import AncestralSampler
from moldiff.pipeline import molecules_from_arrays
from moldiff.chemistry.metrics import evaluate_molecules
moldiff.tune_allocator(); torch.set_num_threads(1)
pipe = moldiff.load_pretrained(None if sys.argv[1] == "shipped" else sys.argv[1]).configure_inference("bf16", compile=True)
orig = AncestralSampler.posterior
for lam in [float(x) for x in sys.argv[2].split(",")]:
    def post(self, t, s, lam=lam):
        cz, ce, std = orig(self, t, s)
        return cz, ce, std * lam
    AncestralSampler.posterior = post
    t0 = time.time()
    arr = pipe.sample_arrays(1000, steps=50, seed=0)
    r = evaluate_molecules(molecules_from_arrays(arr)).to_dict(per_molecule=False)
    print(f"lambda {lam}: atom {r['atom_stable']:.4f} mol {r['mol_stable']:.4f} valid {r['validity']:.4f} uniq {r['uniqueness']:.4f} ({time.time()-t0:.0f} s)", flush=True)
