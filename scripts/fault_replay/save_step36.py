"""Re-run the saved batch step by step; report molecules 222/223 (global 3222/3223)."""
import sys, torch, numpy as np
from moldiff.pipeline import MolDiffPipeline
from moldiff.diffusion import centred_noise, make_sampler
from moldiff.geometry import fully_connected_edges
torch.set_num_threads(1)
prec = sys.argv[1]
pipe = MolDiffPipeline.from_pretrained("moldiff/pretrained/qm9").configure_inference(prec, compile=(prec == "bf16"))
st = torch.load("logs/fault_batch3.pt", weights_only=False)
sizes = st["sizes"]
gen = torch.Generator(); gen.set_state(st["gen"])
sampler = make_sampler("ancestral", pipe.schedule, time_power=2.0, noise_scale=0.5)
n = len(sizes)
batch = torch.repeat_interleave(torch.arange(n), torch.as_tensor(sizes))
ei = fully_connected_edges(batch)
pos = centred_noise(batch, n, generator=gen, dtype=torch.float32)
h = torch.randn(batch.shape[0], pipe.features.dim, generator=gen)
times = sampler.timesteps(50)
watch = [222]
print("sizes", [int(sizes[w]) for w in watch])
with torch.no_grad():
    for i in range(38):
        t = times[i].expand(n); s = times[i + 1].expand(n)
        if i == 36:
            torch.save({'pos': pos, 'h': h, 'batch': batch, 't': t}, 'logs/state36.pt'); break
        ep, eh = pipe.predict_noise(pos, h, t, batch, edge_index=ei)
        step = sampler.step(ep, eh, t, s, pos, h, batch, generator=gen)
        for w in watch:
            m = batch == w
            print(i, w, f"t={float(times[i]):.4f} |pos|max={pos[m].abs().max():.3g} |h|max={h[m].abs().max():.3g} "
                  f"|eps_pos|max={ep[m].abs().max():.3g} |eps_h|max={eh[m].abs().max():.3g} "
                  f"|x0|max={step.pos0[m].abs().max():.3g} types={pipe.features.decode(step.h0[m])[0].tolist()}", flush=True)
        bad = ~(torch.isfinite(step.pos).all(-1) & torch.isfinite(step.h).all(-1))
        if bad.any():
            print("non-finite at step", i, "molecules", sorted(set(batch[bad].tolist())))
            pass
        pos, h = step.pos, step.h
