"""Batches per second: moldiff's flat-array gathering against torch-geometric collation.

    python scripts/bench_batching.py --out docs/results/batching/bench.json

Batches of 64 QM9 training molecules (the EDM split, epoch order as in training), one thread:

  * ``flat``: :meth:`moldiff.data.batching.MoleculeSet.batch`, what training uses: index arithmetic
    on the store's flat arrays, positions centred per molecule;
  * ``pyg_loader``: what a PyG ``DataLoader`` does per batch: ``dataset[i]`` for each molecule of
    :class:`moldiff.data.pyg.MoleculeGraphs` (an ``InMemoryDataset`` over the same arrays; PyG caches
    each separated ``Data`` after its first access, and the warm-up pass fills that cache) and
    ``Batch.from_data_list``, then the same centring;
  * ``pyg_collate``: ``Batch.from_data_list`` of ready-made ``Data`` objects alone, then centring
    (the lower bound of any PyG path).

Each is timed with atoms only and with bond labels (``--no-bonds`` skips those; QM9's bond cache is
built on first use). Methods take turns in every round, so that load from other processes falls on
all of them alike; the median over rounds is reported, with the machine (CPU model, the flags that
matter for torch, load average) and the ratio flat / PyG.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def machine_record(threads: int) -> dict:
    """CPU model and flags, torch and torch-geometric, threads, load average (scripts/machine_info.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import machine_info

    return machine_info.machine_record(threads, libraries=("torch_geometric",))


def make_methods(qm9, indices, bonds):
    from torch_geometric.data import Batch

    from moldiff.data.batching import MoleculeSet
    from moldiff.data.pyg import MoleculeGraphs
    from moldiff.geometry import remove_mean

    z = [1, 6, 7, 8, 9]
    flat = MoleculeSet(qm9.ptr, qm9.atom_types, qm9.positions, z, indices, bonds=bonds)
    graphs = MoleculeGraphs(qm9.ptr, qm9.atom_types, qm9.positions, z, bonds=bonds)
    ready = {}

    def pyg_batch(data_list):
        batch = Batch.from_data_list(data_list)
        batch.pos = remove_mean(batch.pos, batch.batch, batch.num_graphs)
        return batch

    def run_flat(order):
        return flat.batch(order)

    def run_loader(order):
        return pyg_batch([graphs[int(i)] for i in indices[order]])

    def run_collate(order):
        return pyg_batch([ready[int(i)] for i in indices[order]])

    def warm(orders):
        for order in orders:
            for i in indices[order]:
                ready[int(i)] = graphs[int(i)]

    return {"flat": run_flat, "pyg_loader": run_loader, "pyg_collate": run_collate}, warm


def check_same(methods, order) -> None:
    """The flat batch and the PyG batch hold the same atoms in the same order."""
    a, b = methods["flat"](order), methods["pyg_loader"](order)
    assert torch.equal(a.batch, b.batch) and torch.allclose(a.pos, b.pos.to(a.pos.dtype), atol=1e-5)
    assert torch.equal(a.charges, b.z) and torch.equal(a.types, b.types)


def bench(methods, warm, n_items, batch_size, batches, rounds, seed) -> dict[str, list[float]]:
    from moldiff.data.batching import epoch_order

    epoch = epoch_order(n_items, seed, 0)
    orders = [epoch[k * batch_size : (k + 1) * batch_size] for k in range(batches)]
    warm(orders)
    for fn in methods.values():  # warm-up pass (PyG fills its per-item cache here)
        for order in orders:
            fn(order)
    check_same(methods, orders[0])
    rates: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            for order in orders:
                fn(order)
            rates[name].append(batches / (time.perf_counter() - t0))
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=200, help="batches per timed pass (default 200)")
    p.add_argument("--rounds", type=int, default=7, help="timed passes per method, interleaved (default 7)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bonds", action="store_true", help="atoms only (skip the bond-label variant)")
    p.add_argument("--out", help="write the results as JSON here (e.g. docs/results/batching/bench.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from moldiff.data.qm9 import edm_split, load_qm9

    qm9 = load_qm9()
    indices = edm_split(len(qm9))["train"]
    machine = machine_record(args.threads)
    print(machine, flush=True)
    variants = [("atoms", None)]
    if not args.no_bonds:
        from moldiff.data.qm9_bonds import load_qm9_bonds

        variants.append(("atoms+bonds", load_qm9_bonds(qm9, progress=True)))
    results = []
    for label, bonds in variants:
        methods, warm = make_methods(qm9, indices, bonds)
        rates = bench(methods, warm, len(indices), args.batch_size, args.batches, args.rounds, args.seed)
        row = {"variant": label, **{f"{name}_batches_per_s": round(statistics.median(r), 1) for name, r in rates.items()},
               "rounds": {name: [round(x, 1) for x in r] for name, r in rates.items()}}
        row["ratio_flat_over_pyg_loader"] = round(row["flat_batches_per_s"] / row["pyg_loader_batches_per_s"], 2)
        row["ratio_flat_over_pyg_collate"] = round(row["flat_batches_per_s"] / row["pyg_collate_batches_per_s"], 2)
        results.append(row)
        print(f"{label:12s} flat {row['flat_batches_per_s']:8.1f} batches/s   PyG dataset[i] + Batch.from_data_list "
              f"{row['pyg_loader_batches_per_s']:7.1f}   Batch.from_data_list alone {row['pyg_collate_batches_per_s']:7.1f}"
              f"   flat is {row['ratio_flat_over_pyg_loader']:.1f}x / {row['ratio_flat_over_pyg_collate']:.1f}x faster",
              flush=True)
    faster = all(r["ratio_flat_over_pyg_collate"] > 1 for r in results)
    print("training keeps the flat path" if faster else "PyG collation was faster here: reconsider the flat path")
    out = {"command": "python scripts/bench_batching.py " + " ".join(sys.argv[1:]), "machine": machine,
           "batch_size": args.batch_size, "batches_per_pass": args.batches, "dataset": "QM9 EDM train split",
           "results": results, "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=2)
            fh.write("\n")


if __name__ == "__main__":
    main()
