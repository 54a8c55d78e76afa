"""Do sampled molecules fall apart because the model's graph does? Connected pieces along the reverse process.

A network on a sparse graph (`model.graph: knn:K` or `radius:R`) passes messages only along its
edges. If a sampled cloud splits into groups whose K nearest atoms all lie inside the group, the
groups stop seeing each other and can never be pulled back together. This script samples molecules
from a model (sizes drawn from its training set, the default sampler, seed 0) and counts, after every
reverse step, the connected pieces of the model's own graph over the current positions; at the end
it also counts the pieces of the molecule under EDM's bond table and the samples' element shares
beside the training set's (a cloud with too many hydrogens falls apart into lone atoms). For comparison it counts the
model-graph pieces of the real training molecules (``--data``: the clean positions, and the noisy
ones at the listed times).

    python scripts/graph_components.py runs/druglike_skip/pipeline --molecules 40 --data
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def pieces(edge_index: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """Connected pieces of each molecule of a batched graph: ``(B,)`` counts."""
    n = len(batch)
    adj = coo_matrix((np.ones(edge_index.shape[1]), (edge_index[0], edge_index[1])), shape=(n, n))
    _, label = connected_components(adj, directed=False)
    counts = np.zeros(int(batch.max()) + 1, dtype=np.int64)
    for b in range(len(counts)):
        counts[b] = len(np.unique(label[batch == b]))
    return counts


def bond_pieces(symbols, positions) -> int:
    """Pieces of one molecule under EDM's bond table."""
    from moldiff.chemistry.bonds import edm_bond_matrix

    bonds = edm_bond_matrix(symbols, positions) > 0
    return int(connected_components(coo_matrix(bonds), directed=False)[0])


#: EDM's bond table makes a C-H bond up to 109 pm + its 10 pm margin: a hydrogen farther than this
#: from every carbon is unbonded under the table, and its molecule counts as more than one piece
CH_REACH = 1.19


def hydrogen_reach(molecules) -> np.ndarray:
    """Distance (Å) from each hydrogen to its nearest non-hydrogen atom, over ``(symbols, positions)``
    pairs; hydrogens of molecules without a heavy atom are left out."""
    out = []
    for symbols, positions in molecules:
        symbols = np.asarray(symbols)
        heavy = symbols != "H"
        if not heavy.any() or heavy.all():
            continue
        pos = np.asarray(positions, dtype=np.float64)
        d = np.linalg.norm(pos[~heavy][:, None] - pos[heavy][None], axis=-1)
        out.append(d.min(axis=1))
    return np.concatenate(out) if out else np.zeros(0)


def reach_line(d: np.ndarray) -> str:
    p10, p50, p90 = np.percentile(d, [10, 50, 90])
    return (f"p10 {p10:.3f}, median {p50:.3f}, p90 {p90:.3f} Å; beyond {CH_REACH} Å: {np.mean(d > CH_REACH):.1%} "
            f"of {len(d)} hydrogens")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a pipeline folder, or a training run's checkpoint.pt (EMA weights)")
    ap.add_argument("--molecules", type=int, default=40, help="molecules sampled (default 40)")
    ap.add_argument("--steps", type=int, default=50, help="reverse steps (default 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", action="store_true", help="also count the pieces of real validation molecules")
    ap.add_argument("--data-times", default="0,0.1,0.3,0.5,0.8,1", help="noise times for --data (default 0,0.1,0.3,0.5,0.8,1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from moldiff.diffusion import make_sampler
    from moldiff.geometry import graph_edges
    from moldiff.pipeline import MolDiffPipeline, load_pretrained
    from moldiff.sampling import DEFAULT_NOISE_SCALE, DEFAULT_TIME_POWER, SamplingHook, denoise_batch

    state = None
    if args.model.endswith(".pt"):
        state = torch.load(args.model, weights_only=False, map_location="cpu")
        pipe = MolDiffPipeline.from_config(state["pipeline_config"])
        pipe.denoiser.load_state_dict(state["ema"])
        step = state["step"]
    else:
        pipe = load_pretrained(args.model, device="cpu")
        step = pipe.metadata.get("step", "?")
    pipe.denoiser.eval()
    spec = pipe.denoiser.config.graph

    class Count(SamplingHook):
        def __init__(self):
            self.rows = []

        def after_step(self, ctx, state, s, final=False):
            e = graph_edges(spec, state.pos.float(), ctx.batch).cpu().numpy()
            self.rows.append((float(s.flatten()[0]), pieces(e, ctx.batch.cpu().numpy())))

    rng = np.random.default_rng(args.seed)
    sizes = pipe.statistics.sample_sizes(args.molecules, rng, min_atoms=2)
    sampler = make_sampler("ancestral", pipe.schedule, time_power=DEFAULT_TIME_POWER, noise_scale=DEFAULT_NOISE_SCALE)
    hook = Count()
    with torch.no_grad():
        res = denoise_batch(pipe, sizes, args.steps, sampler, torch.Generator().manual_seed(args.seed), hooks=[hook])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    symbols = [pipe.elements[int(k)] for k in res[1]]
    bonds = np.array([bond_pieces(symbols[a:b], res[0][a:b]) for a, b in zip(offsets[:-1], offsets[1:])])
    graph_end = hook.rows[-1][1]

    print(f"{args.model} (step {step}, graph {spec}); {args.molecules} molecules of {sizes.min()}-{sizes.max()} atoms "
          f"(mean {sizes.mean():.1f}), {args.steps} steps, seed {args.seed}")
    print("model graph over the sampled positions: share of molecules in more than one piece, mean pieces")
    marks = sorted({0, len(hook.rows) // 4, len(hook.rows) // 2, 3 * len(hook.rows) // 4, len(hook.rows) - 2, len(hook.rows) - 1})
    for k in marks:
        s, c = hook.rows[k]
        print(f"  after the step to t = {s:.4f}: {np.mean(c > 1):6.1%} split, mean {c.mean():.2f} pieces")
    first = [next((r[0] for r in hook.rows if r[1][b] > 1), None) for b in range(len(sizes))]
    split_t = [t for t in first if t is not None]
    if split_t:
        print(f"  molecules whose graph ever split: {len(split_t)} of {len(sizes)}; first split at t = "
              f"{np.median(split_t):.3f} (median), {max(split_t):.3f} (earliest)")
    print("final molecules (EDM's bond table): "
          f"{np.mean(bonds == 1):.1%} in one piece, mean {bonds.mean():.2f} pieces")
    shares = np.bincount(res[1], minlength=len(pipe.elements)) / len(res[1])
    data_shares = pipe.statistics.element_frequencies()
    print("  element shares, samples (training set): " + ", ".join(
        f"{e} {shares[k]:.1%} ({data_shares.get(e, 0.0):.1%})" for k, e in enumerate(pipe.elements)))
    mols = [(symbols[a:b], res[0][a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    print("  hydrogen to its nearest heavy atom, samples: " + reach_line(hydrogen_reach(mols)))
    both = np.mean((bonds > 1) & (graph_end > 1))
    print(f"  split by bonds: {np.mean(bonds > 1):.1%}; of those, model graph split too: "
          f"{both / max(np.mean(bonds > 1), 1e-12):.1%}; model graph split but bonds whole: {np.mean((bonds == 1) & (graph_end > 1)):.1%}")

    if args.data:
        if state is None:
            raise SystemExit("--data needs a training run's checkpoint.pt (its config names the dataset)")
        from moldiff.geometry import remove_mean
        from moldiff.training.config import RunConfig
        from moldiff.training.loop import load_training_data

        data = load_training_data(RunConfig.from_dict(state["config"]))
        b = data.valid.batch(np.arange(min(args.molecules, len(data.valid))))
        x0 = remove_mean(b.pos.float(), b.batch, b.num_graphs)
        gen = torch.Generator().manual_seed(args.seed)
        print(f"{b.num_graphs} real validation molecules, model graph over clean and noised positions "
              "(EDM's forward process):")
        for tk in [float(x) for x in args.data_times.split(",")]:
            t = torch.full((b.num_graphs,), tk)
            alpha, sigma = (v[b.batch].unsqueeze(-1).float() for v in pipe.schedule.alpha_sigma(t))
            eps = remove_mean(torch.randn(x0.shape, generator=gen), b.batch, b.num_graphs)
            c = pieces(graph_edges(spec, alpha * x0 + sigma * eps, b.batch).numpy(), b.batch.numpy())
            print(f"  t = {tk:.2f}: {np.mean(c > 1):6.1%} split, mean {c.mean():.2f} pieces")
        sizes_v = np.bincount(b.batch.numpy())
        cut = np.concatenate([[0], np.cumsum(sizes_v)])
        real = [([pipe.elements[int(k)] for k in b.types[lo:hi]], b.pos[lo:hi].numpy()) for lo, hi in zip(cut[:-1], cut[1:])]
        print("  hydrogen to its nearest heavy atom, real molecules: " + reach_line(hydrogen_reach(real)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
