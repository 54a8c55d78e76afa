"""A/B of one code change in the training step: the edge layer's bias added in fp32 (before) or in
the product's dtype (now, as ``nn.Linear`` under autocast), 128x6, bf16 autocast, batch 64.

    python scripts/ab_edge_bias.py --threads 1 --rounds 30

Both variants run in one process on the same model, optimizer and batches, alternating per
iteration (and alternating which goes first), so the machine's drift hits both alike; prints the
median seconds per training iteration of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import moldiff
from moldiff.data.batching import MoleculeSet
from moldiff.data.qm9 import edm_split, load_qm9
from moldiff.diffusion import AtomFeatures, NoiseSchedule, add_noise, epsilon_loss
from moldiff.models import DenoiserConfig, EGNNDenoiser
from moldiff.models.egnn import EdgeInputLinear


def fp32_bias_forward(self, h, edge_index, edge_attr):
    """The previous EdgeInputLinear.forward: bias added in fp32, promoting the edge tensor."""
    w = self.linear.weight
    hid = self.hidden
    out = w.shape[0]
    both = h @ torch.cat([w[:, :hid], w[:, hid : 2 * hid]], 0).T
    a = both[:, :out] + self.linear.bias
    row, col = edge_index
    gathered = torch.index_select(a, 0, row) + torch.index_select(both[:, out:], 0, col)
    return torch.addmm(gathered, edge_attr, w[:, 2 * hid :].T)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    moldiff.tune_allocator()
    torch.set_num_threads(args.threads)
    qm9 = load_qm9()
    train = MoleculeSet(qm9.ptr, qm9.atom_types, qm9.positions, [1, 6, 7, 8, 9], edm_split()["train"])
    torch.manual_seed(0)
    model = EGNNDenoiser(DenoiserConfig(hidden=128, n_layers=6))
    sched, feats = NoiseSchedule.polynomial(), AtomFeatures(5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, amsgrad=True, weight_decay=1e-12)
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    batches = [train.batch(rng.choice(len(train), 64, replace=False)) for _ in range(4)]

    def train_iter(bb):
        hh = feats.encode(bb.types, bb.charges)
        tt = torch.rand(bb.num_graphs, generator=gen, dtype=torch.float64)
        a, s = sched.alpha_sigma(tt)
        z = add_noise(bb.pos, hh, a, s, bb.batch, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(z.pos_t, z.h_t, tt.float(), bb.batch)
        loss = epsilon_loss(out.pos.float(), z.eps_pos, out.h.float(), z.eps_h, bb.batch, bb.num_graphs)
        opt.zero_grad()
        loss.backward()
        opt.step()

    variants = {"bias in fp32 (before)": fp32_bias_forward, "bias in product dtype (now)": EdgeInputLinear.forward}
    for bb in batches:
        train_iter(bb)  # warm-up
    times = {k: [] for k in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 else list(variants)[::-1]
        for name in order:
            EdgeInputLinear.forward = variants[name]
            t0 = time.perf_counter()
            train_iter(batches[r % len(batches)])
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"# 128x6, bf16 autocast, batch 64, {args.threads} thread(s), median of {args.rounds}, torch {torch.__version__}")
    for k, v in med.items():
        print(f"{k}: {v:.3f} s/iter")
    before, now = med.values()
    print(f"speed-up: {before / now:.2f}x")


if __name__ == "__main__":
    main()
