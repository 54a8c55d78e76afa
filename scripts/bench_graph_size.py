"""Cost of the denoiser against molecule size: the full graph against radius and k-nearest-neighbour graphs.

    python scripts/bench_graph_size.py --out docs/results/graph_size/bench.json

For each molecule size N (default 20, 40, 60, 80, 100, 150 atoms) a batch holds ``--atoms`` atoms in
all (default 1,200: 60 molecules of 20 atoms ... 8 of 150), so that every size does the same work per
atom on a linear-cost graph and the timings compare. Molecules are random but molecule-like point
clouds (:func:`molecule_like`): each atom is bonded 1.1-1.5 Å from an earlier atom with fewer than
four bonds and stays at least 1.9 Å from every other atom. At 40 atoms this packs like drug-like
molecules with hydrogens: ~18 atoms within 5 Å of an atom (``--reference-sdf`` measures a real set).

Timed for ``model.graph`` = full, radius:5 and knn:16 (``--graphs``), EGNN ``hidden=128,
n_layers=6`` (``--hidden``, ``--layers``), fp32, ``--threads`` threads (default 1):

  * ``train``: one training iteration, forward + backward + AdamW step, on noisy inputs
    ``alpha_t x + sigma_t eps`` with t uniform per molecule (seeded, the same for every graph):
    the network sees these positions, so a radius graph is as dense as they are;
  * ``forward_clean`` / ``forward_noise``: one forward pass without gradients on the clean clouds
    (t = 0: the last steps of sampling) and on pure noise (t = 1: the first steps).

A sparse graph's time includes building it from the positions (per call, as in the denoiser).
Graphs take turns inside every round, so load from other processes falls on all of them alike; the
median over ``--rounds`` is reported per molecule, with the edges per atom each graph had, the CPU
(model, flags that matter for torch) and the load average. The summary gives, for each sparse graph
and each timing, the size from which it is cheaper than the full graph.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_SIZES = (20, 40, 60, 80, 100, 150)
DEFAULT_GRAPHS = ("full", "radius:5", "knn:16")
TIMINGS = ("train", "forward_clean", "forward_noise")


def machine_record(threads: int) -> dict:
    """CPU model and flags, torch, threads, load average (scripts/machine_info.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import machine_info

    return machine_info.machine_record(threads)


def molecule_like(n: int, rng: np.random.Generator, bond=(1.1, 1.5), min_distance: float = 1.9,
                  max_bonds: int = 4) -> np.ndarray:
    """``(n, 3)`` positions (Å) grown as a random tree: each new atom sits 1.1-1.5 Å from a random
    earlier atom with fewer than ``max_bonds`` bonds, in a random direction, and no closer than
    ``min_distance`` to any other atom (rejected and drawn again otherwise). Centred."""
    pos = np.zeros((n, 3))
    bonds = np.zeros(n, dtype=int)
    k = 1
    while k < n:
        parent = rng.choice(np.flatnonzero(bonds[:k] < max_bonds))
        direction = rng.normal(size=3)
        candidate = pos[parent] + rng.uniform(*bond) * direction / np.linalg.norm(direction)
        distance = np.linalg.norm(pos[:k] - candidate, axis=1)
        distance[parent] = np.inf
        if distance.min() >= min_distance:
            pos[k] = candidate
            bonds[parent] += 1
            bonds[k] = 1
            k += 1
    return pos - pos.mean(0)


def packing(pos: np.ndarray) -> tuple[float, float]:
    """Mean number of other atoms within 5 Å of an atom, and the radius of gyration (Å)."""
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    n = len(pos)
    return float(((d < 5.0).sum() - n) / n), float(np.sqrt(((pos - pos.mean(0)) ** 2).sum(1).mean()))


def reference_packing(path: str) -> dict:
    """:func:`packing` of the molecules of an SD file, grouped by atom count into bins of 20."""
    from rdkit import Chem

    bins: dict[int, list[tuple[float, float]]] = {}
    for mol in Chem.SDMolSupplier(path, removeHs=False):
        if mol is None or mol.GetNumConformers() == 0:
            continue
        pos = mol.GetConformer().GetPositions()
        bins.setdefault(20 * ((len(pos) + 10) // 20), []).append(packing(pos))
    return {f"{b - 10}-{b + 9}": {"molecules": len(v), "neighbours_within_5A": round(float(np.mean([x[0] for x in v])), 2),
                                  "radius_of_gyration_A": round(float(np.mean([x[1] for x in v])), 2)}
            for b, v in sorted(bins.items())}


def make_batch(size: int, atoms: int, seed: int):
    """A batch of ``atoms // size`` molecule-like clouds: clean and noisy inputs for the network."""
    from moldiff.diffusion.process import centred_noise
    from moldiff.diffusion.schedules import NoiseSchedule

    rng = np.random.default_rng([seed, size])
    count = max(1, atoms // size)
    clouds = [molecule_like(size, rng) for _ in range(count)]
    pos = torch.tensor(np.concatenate(clouds), dtype=torch.float32)
    batch = torch.repeat_interleave(torch.arange(count), size)
    types = torch.as_tensor(rng.choice(5, p=[0.5, 0.35, 0.07, 0.07, 0.01], size=len(pos)))
    h = torch.cat([0.25 * torch.nn.functional.one_hot(types, 5).float(),
                   torch.tensor([1.0, 6, 7, 8, 9])[types].unsqueeze(-1) / 10], -1)  # EDM's scaling
    g = torch.Generator().manual_seed(seed + size)
    t = torch.rand(count, generator=g)
    alpha, sigma = (x.float()[batch].unsqueeze(-1) for x in NoiseSchedule("polynomial").alpha_sigma(t.double()))
    eps_pos = centred_noise(batch, count, generator=g)
    eps_h = torch.randn(h.shape, generator=g)
    return {"batch": batch, "count": count, "t": t, "pos_t": alpha * pos + sigma * eps_pos,
            "h_t": alpha * h + sigma * eps_h, "eps_pos": eps_pos, "eps_h": eps_h, "clean": (pos, h),
            "noise": (centred_noise(batch, count, generator=g), torch.randn(h.shape, generator=g)),
            "packing": [packing(c) for c in clouds]}


def build(graph: str, hidden: int, layers: int, seed: int):
    from moldiff.models import DenoiserConfig, build_denoiser

    torch.manual_seed(seed)  # the same weights for every graph
    model = build_denoiser(DenoiserConfig(num_features=6, hidden=hidden, n_layers=layers, graph=graph))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def timed_calls(model, optimizer, data) -> dict:
    """One call of each timing on ``data``; returns ``{timing: seconds}``."""
    batch, count = data["batch"], data["count"]
    out = {}
    model.train()
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    pred = model(data["pos_t"], data["h_t"], data["t"], batch)
    loss = (pred.pos - data["eps_pos"]).square().mean() + (pred.h - data["eps_h"]).square().mean()
    loss.backward()
    optimizer.step()
    out["train"] = time.perf_counter() - t0
    model.eval()
    for name, t_value in (("forward_clean", 0.0), ("forward_noise", 1.0)):
        pos, h = data[name.split("_")[1]]
        t = torch.full((count,), t_value)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(pos, h, t, batch)
        out[name] = time.perf_counter() - t0
    return out


def edges_per_atom(graph: str, data) -> dict:
    from moldiff.geometry import graph_edges

    n = data["batch"].numel()
    return {"train": round(graph_edges(graph, data["pos_t"], data["batch"]).shape[1] / n, 2),
            "clean": round(graph_edges(graph, data["clean"][0], data["batch"]).shape[1] / n, 2),
            "noise": round(graph_edges(graph, data["noise"][0], data["batch"]).shape[1] / n, 2)}


def crossover(rows: list[dict], graph: str, timing: str) -> dict:
    """The smallest measured size from which ``graph`` is cheaper than the full graph at every larger
    measured size, with the size below it (the crossover lies between the two)."""
    sizes = sorted({r["atoms_per_molecule"] for r in rows})
    cost = {(r["graph"], r["atoms_per_molecule"]): r[f"{timing}_ms_per_molecule"] for r in rows}
    cheaper = [cost[(graph, n)] < cost[("full", n)] for n in sizes]
    if not cheaper[-1]:
        return {"cheaper_from": None, "note": f"not cheaper at any measured size up to {sizes[-1]}"}
    k = len(sizes) - 1
    while k > 0 and cheaper[k - 1]:
        k -= 1
    return {"cheaper_from": sizes[k], "not_cheaper_at": sizes[k - 1] if k > 0 else None,
            "ratio_at_largest": round(cost[(graph, sizes[-1])] / cost[("full", sizes[-1])], 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="atoms per molecule (default %(default)s)")
    p.add_argument("--graphs", default=",".join(DEFAULT_GRAPHS), help="model.graph values (default %(default)s)")
    p.add_argument("--atoms", type=int, default=1200, help="atoms per batch, all sizes (default %(default)s)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds, graphs interleaved (default %(default)s)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-sdf", metavar="FILE", help="also measure the packing of real molecules (an SD "
                   "file with hydrogens, e.g. from scripts/build_druglike.py) to compare with the clouds")
    p.add_argument("--out", help="write the results as JSON here (e.g. docs/results/graph_size/bench.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.sizes.split(",")]
    graphs = args.graphs.split(",")
    if "full" not in graphs:
        graphs.insert(0, "full")
    from moldiff.geometry import parse_graph

    for g in graphs:
        parse_graph(g)
    machine = machine_record(args.threads)
    print(machine, flush=True)
    started = time.monotonic()
    data = {n: make_batch(n, args.atoms, args.seed) for n in sizes}
    models = {g: build(g, args.hidden, args.layers, args.seed) for g in graphs}
    times = {(g, n, k): [] for g in graphs for n in sizes for k in TIMINGS}
    for n in sizes:  # warm-up: allocator, first-call costs
        for g in graphs:
            timed_calls(*models[g], data[n])
    for r in range(args.rounds):
        for n in sizes:
            for g in graphs:
                for k, v in timed_calls(*models[g], data[n]).items():
                    times[(g, n, k)].append(v)
        print(f"round {r + 1}/{args.rounds} done ({time.monotonic() - started:.0f} s)", flush=True)
    rows = []
    for n in sizes:
        count = data[n]["count"]
        pack = np.array(data[n]["packing"]).mean(0)
        for g in graphs:
            row = {"atoms_per_molecule": n, "molecules_per_batch": count, "graph": g,
                   "edges_per_atom": edges_per_atom(g, data[n]),
                   "cloud_neighbours_within_5A": round(float(pack[0]), 2),
                   "cloud_radius_of_gyration_A": round(float(pack[1]), 2)}
            for k in TIMINGS:
                row[f"{k}_ms_per_molecule"] = round(1000 * statistics.median(times[(g, n, k)]) / count, 2)
                row[f"{k}_rounds_s"] = [round(x, 4) for x in times[(g, n, k)]]
            rows.append(row)
    summary = {g: {k: crossover(rows, g, k) for k in TIMINGS} for g in graphs if g != "full"}
    head = f"{'N':>4} {'B':>3}  {'graph':<10} {'edges/atom train|t=0|t=1':>26}  " + "  ".join(f"{k + ' ms/mol':>20}" for k in TIMINGS)
    print(head)
    for row in rows:
        e = row["edges_per_atom"]
        print(f"{row['atoms_per_molecule']:>4} {row['molecules_per_batch']:>3}  {row['graph']:<10} "
              f"{e['train']:>8.1f}|{e['clean']:>7.1f}|{e['noise']:>7.1f}  "
              + "  ".join(f"{row[f'{k}_ms_per_molecule']:>20.2f}" for k in TIMINGS))
    for g, per in summary.items():
        print(f"{g}: " + "; ".join(f"{k} cheaper than full from N = {v['cheaper_from']}"
                                   + (f" (not at {v['not_cheaper_at']})" if v.get("not_cheaper_at") else "")
                                   if v["cheaper_from"] else f"{k}: {v['note']}" for k, v in per.items()))
    out = {"command": "python scripts/bench_graph_size.py " + " ".join(sys.argv[1:]), "machine": machine,
           "settings": {"atoms_per_batch": args.atoms, "hidden": args.hidden, "n_layers": args.layers,
                        "rounds": args.rounds, "seed": args.seed, "precision": "fp32", "schedule": "polynomial"},
           "rows": rows, "crossover": summary, "wall_s": round(time.monotonic() - started, 1),
           "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    if args.reference_sdf:
        out["reference_packing"] = {"file": args.reference_sdf, "by_atoms": reference_packing(args.reference_sdf)}
        print("real molecules:", out["reference_packing"]["by_atoms"])
    if args.out:
        from moldiff.files import atomic_write

        atomic_write(args.out, lambda fh: fh.write(json.dumps(out, indent=2) + "\n"))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
