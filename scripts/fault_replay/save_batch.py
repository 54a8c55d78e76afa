"""Replay batch 3 of `moldiff sample -n 10000 --steps 50` (shipped s64654, seed 0, bf16, compiled) and
find where molecules 3222/3223 turn non-finite."""
import sys, torch, numpy as np
from moldiff.pipeline import MolDiffPipeline
from moldiff.sampling import DEFAULT_NOISE_SCALE, DEFAULT_TIME_POWER
torch.set_num_threads(1)
pipe = MolDiffPipeline.from_pretrained("moldiff/pretrained/qm9").configure_inference("bf16", compile=True)
calls = {"k": 0}
orig = pipe._sample_batch
class Stop(Exception): pass
def patched(sizes, steps, sampler, gen, device, tick=None):
    if calls["k"] == 3:
        torch.save({"sizes": np.asarray(sizes), "gen": gen.get_state()}, "logs/fault_batch3.pt")
        raise Stop
    calls["k"] += 1
    return orig(sizes, steps, sampler, gen, device, tick)
pipe._sample_batch = patched
try:
    pipe.sample_arrays(10000, steps=50, seed=0, time_power=DEFAULT_TIME_POWER, noise_scale=DEFAULT_NOISE_SCALE)
except Stop:
    print("saved batch 3 state", flush=True)
