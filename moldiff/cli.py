"""The ``moldiff`` command: ``data``, ``evaluate``, ``train``, ``sample``.

This is the only module that reads argv and environment variables, sets global torch state
(threads, seeds) or decides how errors are shown: a bad input prints one line
``moldiff: error: ...`` and exits with status 2 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["main"]


class UsageError(Exception):
    """A problem with what the user asked for; shown as one line."""


def _progress_bar(total: int, desc: str, unit: str):
    """tqdm on a terminal, nothing in pipes and logs."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not sys.stderr.isatty(), leave=False)


def _cache_dir(args) -> str | None:
    return args.cache_dir or os.environ.get("MOLDIFF_CACHE") or None


# ---------------------------------------------------------------------------- data
def cmd_data(args) -> int:
    import numpy as np

    from moldiff.data.qm9 import QM9_PROPERTIES, edm_split, load_qm9

    if args.name != "qm9":
        raise UsageError(f"unknown dataset {args.name!r}; available: qm9")
    t0 = time.monotonic()
    qm9 = load_qm9(_cache_dir(args), progress=True)
    split = edm_split(len(qm9))
    print(f"QM9: {len(qm9)} molecules, {int(qm9.ptr[-1])} atoms (loaded in {time.monotonic() - t0:.1f} s)")
    print("EDM split: " + ", ".join(f"{k} {len(v)}" for k, v in split.items()))
    sizes = np.bincount(qm9.num_atoms)
    print("atoms per molecule (count):")
    for n in range(len(sizes)):
        if sizes[n]:
            print(f"  {n:3d} {sizes[n]:7d} {'#' * max(1, int(60 * sizes[n] / sizes.max()))}")
    counts = np.bincount(qm9.atom_types, minlength=len(qm9.elements))
    print("elements: " + ", ".join(f"{e} {c} ({100 * c / counts.sum():.2f}%)" for e, c in zip(qm9.elements, counts)))
    print("properties: " + ", ".join(f"{k} [{u}]" for k, (_, u) in QM9_PROPERTIES.items()))
    return 0


# ---------------------------------------------------------------------------- evaluate
def _dataset_molecules(spec: str, cache_dir):
    from moldiff.data.qm9 import edm_split, load_qm9

    name, _, split_name = spec.partition(":")
    if name != "qm9":
        raise UsageError(f"unknown dataset {name!r} in {spec!r}; use qm9:train, qm9:valid or qm9:test")
    qm9 = load_qm9(cache_dir, progress=True)
    split = edm_split(len(qm9))
    if split_name not in split:
        raise UsageError(f"unknown split {split_name!r}; use qm9:train, qm9:valid or qm9:test")
    return list(qm9.molecules(split[split_name])), qm9


def cmd_evaluate(args) -> int:
    from moldiff.chemistry.io import read_molecules
    from moldiff.chemistry.metrics import evaluate_molecules, format_table
    from moldiff.data.qm9 import training_smiles

    if (args.path is None) == (args.dataset is None):
        raise UsageError("give a file to evaluate or --dataset (e.g. --dataset qm9:test), not both")
    qm9 = None
    if args.dataset:
        molecules, qm9 = _dataset_molecules(args.dataset, _cache_dir(args))
        unreadable = []
        source = args.dataset
    else:
        records = read_molecules(args.path)
        molecules = [(r.symbols, r.positions) for r in records if r.error is None]
        unreadable = [r for r in records if r.error is not None]
        source = str(args.path)
    reference = None
    if args.novelty:
        reference = training_smiles(_cache_dir(args), data=qm9, workers=args.workers)
    t0 = time.monotonic()
    if molecules:
        report = evaluate_molecules(molecules, reference=reference, workers=args.workers)
        summary = report.to_dict()
    else:
        report, summary = None, {}
    # Records that could not be read count as invalid, unstable molecules of the set.
    if unreadable:
        summary = _add_unreadable(summary, report, len(unreadable))
    elapsed = time.monotonic() - t0
    print(f"evaluated {source}: {summary.get('n', 0)} molecules in {elapsed:.1f} s (EDM protocol)")
    if report is not None and not unreadable:
        print(format_table(report))
    else:
        for k in ("n", "atom_stable", "mol_stable", "validity", "uniqueness", "valid_and_unique", "novelty"):
            v = summary.get(k)
            print(f"{k:>18}: " + ("n/a" if v is None else (f"{100 * v:.2f}%" if k != "n" else str(v))))
    for r in unreadable[:10]:
        print(f"unreadable record {r.name}: {r.error}")
    if args.json:
        from moldiff.chemistry.io import write_json

        write_json(args.json, {k: v for k, v in summary.items() if k != "per_molecule"} | {"source": source})
    return 0


def _add_unreadable(summary: dict, report, n_bad: int) -> dict:
    n_ok = summary.get("n", 0)
    n = n_ok + n_bad
    out = {k: v for k, v in summary.items() if k != "per_molecule"}
    out["n"] = n
    out["n_unreadable"] = n_bad
    if report is None:
        out.update(atom_stable=0.0, mol_stable=0.0, validity=0.0, uniqueness=0.0, valid_and_unique=0.0, novelty=None)
        return out
    out["mol_stable"] = report.mol_stable * n_ok / n
    out["validity"] = report.validity * n_ok / n
    out["valid_and_unique"] = report.valid_and_unique * n_ok / n
    return out


# ---------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    import torch

    from moldiff.training.config import load_config
    from moldiff.training.loop import Trainer

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    run_dir = Path(args.run_dir)
    if args.resume:
        saved = run_dir / "config.yaml"
        if not (run_dir / "checkpoint.pt").is_file():
            raise UsageError(f"--resume: no checkpoint.pt in {run_dir}")
        cfg = load_config(saved, args.set)
    else:
        if args.config is None:
            raise UsageError("give --config configs/<name>.yaml (or --resume with --run-dir)")
        if (run_dir / "checkpoint.pt").exists() and not args.overwrite:
            raise UsageError(f"{run_dir} already holds a run; use --resume to continue it or --overwrite")
        cfg = load_config(args.config, args.set)
    torch.set_num_threads(args.threads or cfg.train.num_threads)
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("train.device is cuda but no CUDA GPU is available")
    if world_size > 1:
        backend = "nccl" if cfg.train.device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        if cfg.train.device.startswith("cuda"):
            cfg.train.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    evaluate = _sampled_metrics if cfg.train.sample_every else None
    trainer = Trainer(cfg, run_dir, rank=rank, world_size=world_size, evaluate=evaluate,
                      log=lambda m: print(m, flush=True))
    if args.resume:
        trainer.resume()
    trainer.train()
    if world_size > 1:
        torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"checkpoint: {run_dir / 'checkpoint.pt'}; sampling pipeline: {run_dir / 'pipeline'}")
    return 0


def _sampled_metrics(pipe, cfg) -> dict:
    from moldiff.chemistry.metrics import evaluate_molecules

    t = cfg.train
    arrays = pipe.sample_arrays(t.sample_n, steps=t.sample_steps, sampler=t.sample_sampler, seed=0)
    mols = [(arrays.symbols(k), arrays.positions[k]) for k in range(t.sample_n)]
    return evaluate_molecules(mols).to_dict()


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moldiff", description="E(3)-equivariant diffusion for 3D molecules")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="build the processed dataset cache and print a summary")
    d.add_argument("name", nargs="?", default="qm9")
    d.add_argument("--cache-dir", help="processed-data cache (default ~/.cache/moldiff or $MOLDIFF_CACHE)")
    d.set_defaults(func=cmd_data)

    e = sub.add_parser("evaluate", help="EDM-protocol metrics for an SDF/XYZ file or a dataset split")
    e.add_argument("path", nargs="?", help="molecules to score (.sdf or .xyz)")
    e.add_argument("--dataset", help="score real molecules instead, e.g. qm9:test")
    e.add_argument("--json", help="also write the metrics as JSON here")
    e.add_argument("--no-novelty", dest="novelty", action="store_false", help="skip novelty (no training-set reference)")
    e.add_argument("--workers", type=int, default=1, help="processes for RDKit work (default 1)")
    e.add_argument("--cache-dir")
    e.set_defaults(func=cmd_evaluate)

    t = sub.add_parser("train", help="train a model (torchrun-compatible for multi-process DDP)")
    t.add_argument("--config", help="YAML config, e.g. configs/qm9_small.yaml")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. --set optim.lr=3e-4")
    t.add_argument("--run-dir", required=True, help="where checkpoints and logs go")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    t.add_argument("--overwrite", action="store_true", help="start afresh even if --run-dir holds a run")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: train.num_threads)")
    t.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("moldiff: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user; --debug for developers
        if args.debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        known = isinstance(exc, (UsageError, ValueError, FileNotFoundError, PermissionError, OSError))
        prefix = "error" if known else f"internal error ({type(exc).__name__}; rerun with --debug)"
        print(f"moldiff: {prefix}: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
