"""Speed of the two denoiser families, EGNN (``arch=egnn``) and e3nn (``arch=e3nn``), at one size.

    taskset -c 1 .venv/bin/python scripts/bench_denoisers.py --out docs/results/denoisers/bench.json

For each variant (EGNN and the e3nn model at ``--hidden`` x ``--layers``, 128 x 6 = configs/qm9_small.yaml,
plus any ``--variant NAME:key=value,...`` of DenoiserConfig fields), times
  * a training iteration: forward, EDM's L2 loss on the noise of positions and features, backward,
    AdamW step, on a batch of ``--batch-size`` molecules;
  * a reverse step: one forward pass without gradients (eval mode) on the same batch, the cost that
    dominates sampling.
Batches are real QM9 training molecules (``--data qm9``, the EDM split, noised at random times) or
random molecules of ``--atoms`` atoms each (``--data random``, no data needed). The variants take
turns iteration by iteration, so that load from other processes falls on all alike; reported are
medians of wall-clock and of this process's CPU time (the CPU time is the fairer figure on a shared
core). fp32, eager, ``--threads`` threads (default 1). The JSON records the machine (CPU model, the
bf16-relevant flags, torch and e3nn versions), the arguments, parameter counts and every timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent


def machine(threads: int) -> dict:
    """CPU model and flags, thread count, torch and e3nn versions (scripts/machine_info.py)."""
    sys.path.insert(0, str(SCRIPTS))
    import machine_info

    return machine_info.machine_record(threads, libraries=("e3nn",))


def parse_variant(spec: str) -> tuple[str, dict]:
    """``"name:key=value,key=value"`` -> ``(name, {key: value})`` (values read as YAML scalars)."""
    import yaml

    name, _, rest = spec.partition(":")
    sets = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"bad --variant item {item!r}: expected key=value")
        sets[key.strip()] = yaml.safe_load(value)
    return name, sets


def make_batches(args) -> list[tuple]:
    """``(pos_t, h_t, t, batch, edge_index, eps_pos, eps_h)`` per iteration, float32."""
    from moldiff.diffusion import AtomFeatures, NoiseSchedule, add_noise
    from moldiff.geometry import fully_connected_edges, remove_mean

    g = torch.Generator().manual_seed(0)
    features = AtomFeatures(num_types=5, include_charges=True)
    schedule = NoiseSchedule.polynomial()
    count = args.warmup + args.iters
    out = []
    if args.data == "qm9":
        from moldiff.data.batching import MoleculeSet
        from moldiff.data.qm9 import edm_split, load_qm9

        qm9 = load_qm9()
        train = MoleculeSet(qm9.ptr, qm9.atom_types, qm9.positions, [1, 6, 7, 8, 9], edm_split()["train"])
        source = (b for _, b in zip(range(count), (b for _, b in train.batches(args.batch_size, 0, 0))))
        for b in source:
            num = b.num_graphs
            h0 = features.encode(b.types, b.charges)
            pos0 = remove_mean(b.pos.float(), b.batch, num)
            t = torch.rand(num, generator=g)
            alpha, sigma = schedule.alpha_sigma(t)
            noisy = add_noise(pos0, h0, alpha, sigma, b.batch, generator=g)
            out.append((noisy.pos_t, noisy.h_t, t, b.batch, fully_connected_edges(b.batch), noisy.eps_pos, noisy.eps_h))
    else:
        batch = torch.repeat_interleave(torch.arange(args.batch_size), args.atoms)
        edge_index = fully_connected_edges(batch)
        n = batch.shape[0]
        for _ in range(count):
            pos = remove_mean(torch.randn(n, 3, generator=g), batch, args.batch_size)
            h = torch.randn(n, features.dim, generator=g)
            eps_pos = remove_mean(torch.randn(n, 3, generator=g), batch, args.batch_size)
            out.append((pos, h, torch.rand(args.batch_size, generator=g), batch, edge_index, eps_pos,
                        torch.randn(n, features.dim, generator=g)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--atoms", type=int, default=18, help="atoms per molecule with --data random")
    ap.add_argument("--data", choices=["qm9", "random"], default="qm9")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                    help="an extra model: DenoiserConfig fields over the base size, e.g. e3nn_l2:arch=e3nn,e3nn_lmax=2")
    ap.add_argument("--out", default="docs/results/denoisers/bench.json", help="write the results as JSON here")
    args = ap.parse_args()

    from moldiff.diffusion import epsilon_loss
    from moldiff.models import DenoiserConfig, build_denoiser

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    variants = {"egnn": {"arch": "egnn"}, "e3nn": {"arch": "e3nn"}}
    variants.update(parse_variant(v) for v in args.variant)
    models = {name: build_denoiser(DenoiserConfig(**{"hidden": args.hidden, "n_layers": args.layers, **sets}))
              for name, sets in variants.items()}
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    info = machine(args.threads)
    print(info, flush=True)
    batches = make_batches(args)
    timings = {name: {k: [] for k in ("train_wall", "train_cpu", "step_wall", "step_cpu")} for name in models}

    def train_iter(name, b):
        pos_t, h_t, t, batch, edge_index, eps_pos, eps_h = b
        model, opt = models[name], optims[name]
        model.train()
        opt.zero_grad(set_to_none=True)
        out = model(pos_t, h_t, t, batch, edge_index=edge_index)
        loss = epsilon_loss(out.pos, eps_pos, out.h, eps_h, batch, t.shape[0])
        loss.backward()
        opt.step()

    @torch.no_grad()
    def reverse_step(name, b):
        pos_t, h_t, t, batch, edge_index = b[:5]
        models[name].eval()
        models[name](pos_t, h_t, t, batch, edge_index=edge_index)

    for i, b in enumerate(batches):
        for name in models:
            for kind, fn in (("train", train_iter), ("step", reverse_step)):
                wall, cpu = time.perf_counter(), time.process_time()
                fn(name, b)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if i >= args.warmup:
                    timings[name][f"{kind}_wall"].append(wall)
                    timings[name][f"{kind}_cpu"].append(cpu)
        if i >= args.warmup:
            print(f"iter {i - args.warmup + 1}/{args.iters}: " + "  ".join(
                f"{name} {timings[name]['train_cpu'][-1]:.3f}/{timings[name]['step_cpu'][-1]:.3f}" for name in models)
                + " s CPU (train/step)", flush=True)
    median = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in timings.items()}
    atoms = sum(int(b[3].shape[0]) for b in batches) / len(batches)
    print(f"\n{args.hidden} x {args.layers}, batch {args.batch_size} ({args.data}, {atoms:.0f} atoms mean), fp32 eager, "
          f"{args.threads} thread(s); median over {args.iters} iterations, seconds")
    print(f"{'model':12s} {'params':>9s} {'train CPU':>10s} {'train wall':>10s} {'step CPU':>9s} {'step wall':>9s}"
          f" {'train x egnn':>12s} {'step x egnn':>11s}")
    base = median["egnn"]
    for name, m in median.items():
        print(f"{name:12s} {params[name]:9d} {m['train_cpu']:10.3f} {m['train_wall']:10.3f} {m['step_cpu']:9.3f} "
              f"{m['step_wall']:9.3f} {m['train_cpu'] / base['train_cpu']:12.2f} {m['step_cpu'] / base['step_cpu']:11.2f}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"machine": info, "args": vars(args), "mean_atoms_per_batch": atoms,
                  "configs": {name: models[name].config.to_dict() for name in models}, "parameters": params,
                  "median_seconds": median, "seconds": timings}
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
