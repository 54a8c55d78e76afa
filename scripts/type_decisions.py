"""When does a sample's composition get decided? (session 6)

    python scripts/type_decisions.py SAMPLES STEPS

Runs ``moldiff sample``'s default sampler (ancestral, time grid (k/K)^2, noise scale 0.5) on the
shipped model for SAMPLES molecules, and at each reverse step takes the element each atom would have
in the network's clean-sample estimate (argmax of the type one-hot). Prints, every few steps, the %
of atoms whose element differs from the final one, the % of molecules whose composition parity
(valence sum, :func:`moldiff.chemistry.elements.valence_sum_parity`) differs from the final one,
and the % of estimates with an odd valence sum. Results: docs/type_decisions_s42911.txt.
"""
import sys, torch, numpy as np
import moldiff
from moldiff.diffusion import make_sampler, centred_noise
from moldiff.chemistry.elements import allowed_valences
from moldiff.geometry import fully_connected_edges
torch.set_num_threads(1)
pipe = moldiff.load_pretrained(None).configure_inference("auto", compile=True)
n, steps = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
sizes = pipe.statistics.sample_sizes(n, rng, min_atoms=2)
sampler = make_sampler("ancestral", pipe.schedule, time_power=2.0, noise_scale=0.5)
gen = torch.Generator().manual_seed(1)
batch = torch.repeat_interleave(torch.arange(n), torch.as_tensor(sizes))
edge_index = fully_connected_edges(batch)
dtype = next(pipe.denoiser.parameters()).dtype
pos = centred_noise(batch, n, generator=gen, dtype=dtype)
h = torch.randn(batch.shape[0], pipe.features.dim, generator=gen, dtype=dtype)
times = sampler.timesteps(steps)
val = torch.tensor([min(allowed_valences(e)) for e in pipe.elements])  # one valence parity per element
hist = []
with torch.no_grad():
    for i in range(steps):
        t = times[i].expand(n); s = times[i + 1].expand(n)
        ep, eh = pipe.predict_noise(pos, h, t, batch, edge_index=edge_index)
        st = sampler.step(ep, eh, t, s, pos, h, batch, generator=gen)
        types = st.h0[:, :5].argmax(1)
        hist.append((float(times[i]), types.clone()))
        pos, h = st.pos, st.h
    t0 = times[-1].expand(n)
    ep, eh = pipe.predict_noise(pos, h, t0, batch, edge_index=edge_index)
    _, hf = sampler.clean_estimate(pos, h, ep, eh, t0, batch)
final = hf[:, :5].argmax(1)
par = lambda ty: torch.zeros(n, dtype=torch.long).index_add_(0, batch, val[ty]) % 2
pf = par(final)
print("final odd parity", pf.float().mean().item())
for t, ty in hist[::max(1, steps // 25)]:
    print(f"t={t:.3f} atoms differing from final {100*(ty != final).float().mean():.1f}%  parity differs {100*(par(ty) != pf).float().mean():.1f}%  odd {100*par(ty).float().mean():.1f}%")
