"""Clean-bond accuracy of a bond model on 32 validation molecules noised to fixed t (docs/experiments.md,
session 8): python scripts/bond_probe.py runs/exp_ft-bonds4  (or runs/exp_ft-bonds4-logits)."""
import torch, numpy as np
from moldiff.pipeline import MolDiffPipeline
from moldiff.training.config import load_config
from moldiff.training.loop import load_training_data, edge_bond_orders
from moldiff.diffusion import add_noise, symmetric_edge_noise
from moldiff.geometry import fully_connected_edges, reverse_edges
torch.set_num_threads(2)
import sys
p = MolDiffPipeline.from_pretrained(sys.argv[1] + "/pipeline")
data = load_training_data(load_config(sys.argv[1] + "/config.yaml"))
_, b = next(iter(data.valid.batches(32, 0, 0)))
g = torch.Generator().manual_seed(0)
n = b.batch.shape[0]; ei = fully_connected_edges(b.batch); rev = reverse_edges(ei, n); eb = b.batch[ei[0]]
lab = edge_bond_orders(b.bonds, ei, n)
e = p.bond_features.encode(lab)
h = p.features.encode(b.types, b.charges)
with torch.no_grad():
  for tv in [0.02, 0.1, 0.3, 0.5, 0.7, 0.9]:
    t = torch.full((b.num_graphs,), tv, dtype=torch.float64)
    a, s = p.schedule.alpha_sigma(t)
    z = add_noise(b.pos, h, a, s, b.batch, generator=g)
    eps_e = symmetric_edge_noise(rev, 4, generator=g)
    ae, se = a.float()[eb].unsqueeze(-1), s.float()[eb].unsqueeze(-1)
    e_t = ae * e + se * eps_e
    ep, eh, ee = p.predict_noise(z.pos_t, z.h_t, t.float(), b.batch, edge_index=ei, e_t=e_t)
    e0 = (e_t - se * ee) / ae
    pred = e0.argmax(-1)
    bonded = lab > 0
    print(f"t={tv}: acc all {(pred==lab).float().mean():.3f}, on bonds {(pred[bonded]==lab[bonded]).float().mean():.3f}, "
          f"false bonds {(pred[~bonded]>0).float().mean():.4f}, eps mse {((ee-eps_e)**2).mean():.4f}, naive e_t argmax acc on bonds {(e_t.argmax(-1)[bonded]==lab[bonded]).float().mean():.3f}")
