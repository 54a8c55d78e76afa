"""What compiling the bond head gains at sampling time, on a shipped bond model.

    python scripts/bench_bond_head.py --checkpoint qm9-bonds -n 1000 --threads 1

One process, one batch of ``n`` molecules of the dataset's mean size (18 atoms for QM9) at t = 0.1,
the blocks compiled (what ``moldiff sample`` runs); the network evaluation
(``MolDiffPipeline.predict_noise``) is timed with the bond head eager and compiled, alternating
call by call (``--repeats`` each after two warm-up calls), so that a busy machine slows both alike.
Prints the medians, their ratio, and the head alone; ``--json`` appends one record to a file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="qm9-bonds")
    ap.add_argument("-n", type=int, default=1000, help="molecules in the batch")
    ap.add_argument("--atoms", type=int, default=18, help="atoms per molecule")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--json", type=Path, help="append the result to this JSON-lines file")
    args = ap.parse_args(argv)
    import torch

    from machine_info import machine_record
    from moldiff.geometry import fully_connected_edges
    from moldiff.pipeline import load_pretrained

    torch.set_num_threads(args.threads)
    pipe = load_pretrained(args.checkpoint).configure_inference(precision=args.precision, compile=True)
    if pipe.bond_types == 0:
        print(f"bench_bond_head: {args.checkpoint} has no bond head", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    batch = torch.arange(args.n).repeat_interleave(args.atoms)
    edges = fully_connected_edges(batch)
    pos = torch.randn(batch.numel(), 3, generator=g)
    h = torch.nn.functional.one_hot(torch.randint(0, pipe.features.num_types, (batch.numel(),), generator=g),
                                    pipe.features.dim).float()
    e = torch.nn.functional.one_hot(torch.zeros(edges.shape[1], dtype=torch.long), pipe.bond_types).float()
    t = torch.full((args.n,), 0.1)
    compiled = pipe._compiled_head

    def timed(head) -> float:
        object.__setattr__(pipe, "_compiled_head", head)
        start = time.perf_counter()
        pipe.predict_noise(pos, h, t, batch, edge_index=edges, e_t=e)
        return time.perf_counter() - start

    eager, comp = [], []
    with torch.no_grad():
        for _ in range(2):
            timed(None), timed(compiled)
        for _ in range(args.repeats):
            eager.append(timed(None))
            comp.append(timed(compiled))
        hidden = torch.randn(batch.numel(), pipe.denoiser.config.hidden, generator=g)
        radial = torch.rand(edges.shape[1], 1, generator=g)
        alone = {}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            for name, head in (("eager", pipe.denoiser.bond_head), ("compiled", compiled)):
                head(hidden, edges, radial, e)
                start = time.perf_counter()
                for _ in range(args.repeats):
                    head(hidden, edges, radial, e)
                alone[name] = (time.perf_counter() - start) / args.repeats
    record = {"checkpoint": args.checkpoint, "molecules": args.n, "atoms": args.atoms, "edges": int(edges.shape[1]),
              "threads": args.threads, "precision": args.precision, "repeats": args.repeats,
              "step_eager_head_s": statistics.median(eager), "step_compiled_head_s": statistics.median(comp),
              "ratio": statistics.median(comp) / statistics.median(eager),
              "head_alone_eager_s": alone["eager"], "head_alone_compiled_s": alone["compiled"],
              "machine": machine_record(args.threads)}
    print(f"{args.n} molecules x {args.atoms} atoms ({record['edges']} edges), {args.threads} thread(s), "
          f"{args.precision}: network call {record['step_eager_head_s']:.3f} s with the head eager, "
          f"{record['step_compiled_head_s']:.3f} s compiled (x{record['ratio']:.3f}); the head alone "
          f"{alone['eager']:.3f} -> {alone['compiled']:.3f} s")
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
