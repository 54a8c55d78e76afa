"""Benchmark moldiff's denoiser against a padded, EDM-style computation of the same network.

    python scripts/bench_engine.py --threads 2 --out out/bench_engine.json

Measures, on real QM9 training molecules:
  * training iteration (forward + EDM L2 loss + backward + AdamW step), batch 64, median of --iters;
  * one reverse (ancestral) sampling step for 16 molecules, median of --iters; the step reuses the
    batch's edge list, built once per batch as moldiff's sampler does (EDM's code caches its
    adjacency per batch shape the same way);
for the EDM reference size (256 features x 9 layers) and a CPU size (128 x 6), for:
  * ``padded``: the computation EDM's code performs -- molecules padded to the largest in the
    batch, all N_max^2 pairs of every padded molecule (self-pairs and padding masked), and the
    first edge layer applied to ``[h_i, h_j, d_ij, d0_ij]`` per edge. It is re-implemented here
    with moldiff's own weights so that both give the same numbers (checked: max abs deviation
    of the outputs on real atoms is printed), i.e. the same model, two ways of computing it;
  * ``flat fp32``: moldiff (flat graph, per-node split of the first edge layer);
  * ``flat bf16``: the same under CPU bf16 autocast (AMX / AVX512-BF16);
  * ``flat bf16 compiled``: and with ``torch.compile(dynamic=True)`` (compile time reported apart).
EDM's own code, timed by the issue author on this machine type (2 threads, fp32):
256x9 14.1 s/iter and 0.80 s/step, 128x6 1.86 s/iter and 0.153 s/step; these are printed beside.

``--time-limit S`` stops a mode's timed iterations once they have taken S seconds (at least 3
iterations; the count is recorded), for CPUs where a mode is very slow (bf16 autocast without native
bf16 arithmetic); ``--train-only`` skips the reverse step. The record names the CPU's bf16-relevant
flags (``avx2``, ``avx512*``, ``amx*``) and whether moldiff counts it as having native bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import cpu_flags, cpu_model  # noqa: E402 - this script's folder
from moldiff.data.batching import MoleculeSet
from moldiff.data.qm9 import edm_split, load_qm9
from moldiff.diffusion import AncestralSampler, AtomFeatures, NoiseSchedule, add_noise, epsilon_loss
from moldiff.geometry import fully_connected_edges
from moldiff.models import DenoiserConfig, EGNNDenoiser
from moldiff.runtime import cpu_has_native_bf16

EDM_PUBLISHED = {(256, 9): (14.1, 0.80), (128, 6): (1.86, 0.153)}


# ----------------------------------------------------------------------------- padded reference
def to_dense(pos, h, batch, num_graphs):
    counts = torch.bincount(batch, minlength=num_graphs)
    nmax = int(counts.max())
    slot = torch.arange(batch.numel()) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    flat_idx = batch * nmax + slot
    mask = torch.zeros(num_graphs * nmax, dtype=pos.dtype)
    mask[flat_idx] = 1.0
    P = pos.new_zeros(num_graphs * nmax, 3)
    P[flat_idx] = pos
    H = h.new_zeros(num_graphs * nmax, h.shape[1])
    H[flat_idx] = h
    return P, H, mask, nmax, flat_idx


def padded_forward(model: EGNNDenoiser, pos, h, t, batch, num_graphs):
    """EDM's computation of the same network: dense N_max x N_max pairs per padded molecule."""
    P, H, node_mask, nmax, flat_idx = to_dense(pos, h, batch, num_graphs)
    B = num_graphs
    ar = torch.arange(nmax)
    rows = (torch.arange(B)[:, None, None] * nmax + ar[None, :, None]).expand(B, nmax, nmax).reshape(-1)
    cols = (torch.arange(B)[:, None, None] * nmax + ar[None, None, :]).expand(B, nmax, nmax).reshape(-1)
    edge_mask = (node_mask[rows] * node_mask[cols] * (rows != cols).to(P.dtype)).unsqueeze(-1)
    nm = node_mask.unsqueeze(-1)
    tt = t.to(P.dtype).repeat_interleave(nmax).unsqueeze(-1)
    x0 = P
    hh = model.embedding(torch.cat([H, tt], -1)) * nm

    def radial_diff(x):
        d = x[rows] - x[cols]
        r = (d * d).sum(-1, keepdim=True)
        return r, d / (torch.sqrt(r + 1e-8) + model.config.norm_constant)

    r0, _ = radial_diff(x0)
    x = x0
    for block in model.blocks:
        r, diff = radial_diff(x)
        ea = torch.cat([r, r0], -1)
        for gcl in block.gcls:
            inp = torch.cat([hh[rows], hh[cols], ea], -1)
            m = gcl.act(gcl.edge_out(gcl.act(gcl.edge_in.linear(inp))))
            if gcl.att is not None:
                m = m * torch.sigmoid(gcl.att(m))
            m = m * edge_mask
            agg = torch.zeros_like(hh).index_add_(0, rows, m) / gcl.normalization_factor
            hh = (hh + gcl.node_mlp(torch.cat([hh, agg], -1))) * nm
        up = block.update
        inp = torch.cat([hh[rows], hh[cols], ea], -1)
        phi = up.out(up.act(up.hidden_layer(up.act(up.edge_in.linear(inp)))))
        if up.tanh:
            phi = torch.tanh(phi) * up.coords_range
        trans = diff * phi * edge_mask
        x = (x + torch.zeros_like(x).index_add_(0, rows, trans) / up.normalization_factor) * nm
    hout = model.embedding_out(hh)[:, : model.config.num_features] * nm
    vel = (x - x0) * nm
    n_per = node_mask.view(B, nmax).sum(1, keepdim=True)
    mean = (vel.view(B, nmax, 3).sum(1) / n_per).repeat_interleave(nmax, 0)
    vel = (vel - mean) * nm
    return vel[flat_idx], hout[flat_idx]


# ----------------------------------------------------------------------------- timing
def median_time(fn, iters, warmup=1, time_limit=None, min_iters=3):
    """Median seconds per call of ``iters`` calls after ``warmup``; with ``time_limit``, stop once the
    timed calls have taken that long (but not before ``min_iters``). Returns ``(median, calls timed)``."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        if time_limit is not None and len(ts) >= min_iters and sum(ts) >= time_limit:
            break
    return statistics.median(ts), len(ts)


def bench_config(hidden, layers, train_set, args):
    torch.manual_seed(0)
    cfg = DenoiserConfig(hidden=hidden, n_layers=layers)
    model = EGNNDenoiser(cfg)
    sched = NoiseSchedule.polynomial()
    feats = AtomFeatures(5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, amsgrad=True, weight_decay=1e-12)
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    batches = [train_set.batch(rng.choice(len(train_set), args.batch_size, replace=False)) for _ in range(4)]

    compiled = None

    def make_forward(mode):
        nonlocal compiled
        net = model
        if mode.endswith("compiled"):
            # dynamic=True: one graph for all batch sizes; compile time is reported separately.
            if compiled is None:  # (a compiled module has no truth value)
                compiled = torch.compile(model, dynamic=True)
            net = compiled

        def fwd(pos_t, h_t, t, b, n, edge_index=None):
            if mode == "padded":
                return padded_forward(model, pos_t, h_t, t, b, n)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in mode):
                out = net(pos_t, h_t, t, b, edge_index=edge_index)
            return out.pos.float(), out.h.float()
        return fwd

    # Same model, two computations: compare outputs on one batch in fp32.
    b = batches[0]
    h = feats.encode(b.types, b.charges)
    t = torch.rand(b.num_graphs, generator=gen)
    with torch.no_grad():
        flat = model(b.pos, h, t, b.batch)
        dense = padded_forward(model, b.pos, h, t, b.batch, b.num_graphs)
    dev = max((flat.pos - dense[0]).abs().max().item(), (flat.h - dense[1]).abs().max().item())

    results = {"hidden": hidden, "layers": layers, "max_abs_dev_flat_vs_padded": dev}
    for mode in args.modes:
        fwd = make_forward(mode)
        it = iter(range(10**9))

        def train_iter():
            bb = batches[next(it) % len(batches)]
            hh = feats.encode(bb.types, bb.charges)
            tt = torch.rand(bb.num_graphs, generator=gen, dtype=torch.float64)
            a, s = sched.alpha_sigma(tt)
            z = add_noise(bb.pos, hh, a, s, bb.batch, generator=gen)
            pp, ph = fwd(z.pos_t, z.h_t, tt.float(), bb.batch, bb.num_graphs)
            loss = epsilon_loss(pp, z.eps_pos, ph, z.eps_h, bb.batch, bb.num_graphs)
            opt.zero_grad()
            loss.backward()
            opt.step()

        iters = args.iters if mode != "padded" else args.ref_iters
        t0 = time.perf_counter()
        train_iter()  # first call: compilation (for compiled modes) and allocator warm-up
        first = time.perf_counter() - t0
        train_s, train_n = median_time(train_iter, iters, warmup=2 if mode.endswith("compiled") else 0,
                                       time_limit=args.time_limit)
        if args.train_only:
            results[mode] = {"train_s_per_iter": train_s, "train_iters_timed": train_n, "first_train_iter_s": first}
            print(f"{hidden}x{layers} {mode:>10}: train {train_s:.3f} s/iter (median of {train_n}; first {first:.1f} s)",
                  flush=True)
            continue

        sizes = train_set.num_atoms[rng.choice(len(train_set), 16, replace=False)]
        sb = torch.repeat_interleave(torch.arange(16), torch.as_tensor(sizes))
        sampler = AncestralSampler(sched)
        state = {"pos": torch.randn(len(sb), 3), "h": torch.randn(len(sb), feats.dim)}
        ts = torch.full((16,), 0.5, dtype=torch.float64)
        ss = torch.full((16,), 0.499, dtype=torch.float64)

        # The graph is fixed while a batch is denoised: moldiff's sampler builds its edges once per
        # batch (as EDM's code caches its adjacency per batch shape), so a step reuses them.
        step_edges = fully_connected_edges(sb)

        @torch.no_grad()
        def reverse_step():
            ep, eh = fwd(state["pos"], state["h"], ts.float(), sb, 16, step_edges)
            st = sampler.step(ep, eh, ts, ss, state["pos"], state["h"], sb, generator=gen)
            state["pos"], state["h"] = st.pos, st.h

        step_s, step_n = median_time(reverse_step, iters, warmup=2, time_limit=args.time_limit)
        results[mode] = {"train_s_per_iter": train_s, "train_iters_timed": train_n, "sample_s_per_step": step_s,
                         "sample_steps_timed": step_n, "first_train_iter_s": first}
        print(f"{hidden}x{layers} {mode:>10}: train {train_s:.3f} s/iter, reverse step {step_s:.4f} s", flush=True)
    edm = EDM_PUBLISHED.get((hidden, layers))
    if edm:
        results["edm_published"] = {"train_s_per_iter": edm[0], "sample_s_per_step": edm[1]}
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--ref-iters", type=int, default=5, help="iterations for the slow padded reference")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sizes", default="256x9,128x6")
    p.add_argument("--modes", default="padded,flat fp32,flat bf16,flat fp32 compiled,flat bf16 compiled")
    p.add_argument("--time-limit", type=float, help="seconds of timed iterations per mode and measurement "
                   "(at least 3 iterations; default: no limit)")
    p.add_argument("--train-only", action="store_true", help="time the training iteration only (no reverse step)")
    p.add_argument("--out", help="write results as JSON here")
    p.add_argument("--malloc-default", action="store_true", help="keep glibc's default malloc thresholds (no moldiff tuning)")
    args = p.parse_args()
    if not args.malloc_default:
        from moldiff.runtime import tune_allocator

        tune_allocator()  # what the `moldiff` command does at start-up
    args.modes = args.modes.split(",")
    torch.set_num_threads(args.threads)
    qm9 = load_qm9()
    train = MoleculeSet(qm9.ptr, qm9.atom_types, qm9.positions, [1, 6, 7, 8, 9], edm_split()["train"])
    machine = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": cpu_flags(),
        "native_bf16": cpu_has_native_bf16(),
        "malloc": "glibc default" if args.malloc_default else "moldiff-tuned (mmap/trim thresholds 1 GiB)",
    }
    print(machine, flush=True)
    out = {"machine": machine, "batch_size": args.batch_size, "iters": args.iters, "ref_iters": args.ref_iters, "results": []}
    for spec in args.sizes.split(","):
        hidden, layers = (int(x) for x in spec.split("x"))
        out["results"].append(bench_config(hidden, layers, train, args))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=2)
    if args.train_only:
        print("\nsize   mode                   train s/iter  iterations timed")
        for r in out["results"]:
            for mode in args.modes:
                print(f"{r['hidden']}x{r['layers']:<3} {mode:<22} {r[mode]['train_s_per_iter']:10.3f}   "
                      f"{r[mode]['train_iters_timed']}")
        return
    print("\nsize   mode         train s/iter  (x vs padded, x vs EDM)   step s   (x vs padded, x vs EDM)")
    for r in out["results"]:
        ref = r.get("padded")
        edm = r.get("edm_published")
        for mode in args.modes:
            m = r[mode]
            rt = f"{ref['train_s_per_iter'] / m['train_s_per_iter']:.1f}" if ref else "-"
            rs = f"{ref['sample_s_per_step'] / m['sample_s_per_step']:.1f}" if ref else "-"
            et = f"{edm['train_s_per_iter'] / m['train_s_per_iter']:.1f}" if edm else "-"
            es = f"{edm['sample_s_per_step'] / m['sample_s_per_step']:.1f}" if edm else "-"
            print(f"{r['hidden']}x{r['layers']:<3} {mode:<11} {m['train_s_per_iter']:10.3f}   ({rt:>5}, {et:>5})        "
                  f"{m['sample_s_per_step']:8.4f} ({rs:>5}, {es:>5})")
        print(f"         flat vs padded max |output difference| (fp32): {r['max_abs_dev_flat_vs_padded']:.2e}")


if __name__ == "__main__":
    main()
