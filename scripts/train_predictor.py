"""Train an invariant property predictor on EDM's predictor half of QM9 and score it on the generator half.

    python scripts/train_predictor.py --run-dir runs/predictor --max-minutes 600
    python scripts/train_predictor.py --run-dir runs/predictor --resume --max-minutes 600

EDM's recipe for its property classifiers (``qm9/property_prediction/main_qm9_prop.py`` and its
README): train on ``qm9_first_half`` (50,000 molecules, :func:`moldiff.data.properties.edm_halves`),
targets normalised by the mean and mean absolute deviation of the QM9 validation split, L1 loss on
the normalised targets, Adam (lr 5e-4 in EDM's README command, weight decay 1e-16), cosine decay over
1,000 epochs of batch 96, model chosen by its validation MAE, scored on ``qm9_second_half``. The
network defaults to EDM's width and depth (128 x 7). By default one network predicts all six
properties (``--properties`` picks fewer, e.g. one per run as EDM does; docs/properties.md).

The run folder holds ``checkpoint.pt`` (everything needed to resume exactly: weights, optimiser,
EMA, position in the epoch), written every ``--checkpoint-minutes`` and when the run stops;
``best/`` (the predictor with the lowest validation MAE so far, ``moldiff predict --predictor
RUN/best``); ``log.csv`` (one row per evaluation); and at the end ``results.json``: the test MAE per
property in EDM's units beside EDM's Table 3, the shuffle ("naive") baseline with this predictor, and
the data-only baselines. ``--train-limit`` / ``--valid-limit`` / ``--test-limit`` cut the sets down
for smoke tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moldiff.chemistry.elements import QM9_ELEMENTS, SYMBOL_TO_Z  # noqa: E402
from moldiff.data.batching import MoleculeSet, epoch_order  # noqa: E402
from moldiff.data.properties import (EDM_PROPERTIES, EDM_TABLE3, EDM_UNITS, AtomCountBaseline,  # noqa: E402
                                     data_baselines, edm_halves, edm_targets, mean_pair_difference, naive_mae,
                                     property_norms)
from moldiff.data.qm9 import edm_split, load_qm9  # noqa: E402
from moldiff.files import atomic_write  # noqa: E402
from moldiff.models.property import PredictorConfig, PropertyPredictor, load_predictor, save_predictor  # noqa: E402
from moldiff.runtime import resolve_device  # noqa: E402
from moldiff.training.ema import EMA  # noqa: E402

#: what a resumed run keeps from its start (the rest may change between sessions)
RECIPE = ("properties", "hidden", "layers", "pooling", "attention", "batch_size", "lr", "weight_decay", "epochs",
          "ema", "seed", "train_limit", "valid_limit", "test_limit", "eval_every", "naive_seed")
TEST_SET = "EDM's generator half of the QM9 training split (qm9_second_half, the paper's D_b)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --run-dir holds a run")
    p.add_argument("--properties", default=",".join(EDM_PROPERTIES),
                   help=f"comma list of outputs (default all six: {','.join(EDM_PROPERTIES)})")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=7)
    p.add_argument("--pooling", choices=("sum", "mean"), default="sum")
    p.add_argument("--no-attention", dest="attention", action="store_false")
    p.add_argument("--batch-size", type=int, default=96)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=1e-16)
    p.add_argument("--epochs", type=int, default=1000, help="length of the cosine learning-rate decay (EDM: 1000)")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="keep an exponential moving average of the weights and evaluate/save it (0: off, EDM)")
    p.add_argument("--seed", type=int, default=0, help="weights and batch order")
    p.add_argument("--eval-every", type=int, default=0, metavar="STEPS",
                   help="validation every STEPS steps (default 0: at the end of every epoch, as EDM)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps in all")
    p.add_argument("--max-minutes", type=float, help="stop (checkpoint, evaluate, write results) after this long")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--log-every", type=int, default=50, metavar="STEPS")
    p.add_argument("--train-limit", type=int, help="first N molecules of the predictor half only (smoke tests)")
    p.add_argument("--valid-limit", type=int, help="first N molecules of the validation split only")
    p.add_argument("--test-limit", type=int, help="first N molecules of the generator half only")
    p.add_argument("--naive-seed", type=int, default=0, help="permutation of the shuffle baseline")
    p.add_argument("--baselines-only", action="store_true",
                   help="write RUN_DIR/baselines.json (EDM's naive and #Atoms baselines from the data alone, full "
                   "halves) and stop; no training")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--cache-dir", help="QM9 cache folder (default ~/.cache/moldiff)")
    return p.parse_args(argv)


class Data:
    """The three sets as flat-graph molecule sets with their EDM targets (``(M, P)`` float64)."""

    def __init__(self, args, properties):
        qm9 = load_qm9(args.cache_dir, progress=True)
        split, halves = edm_split(len(qm9)), edm_halves()
        numbers = [SYMBOL_TO_Z[e] for e in QM9_ELEMENTS]
        cut = lambda idx, n: idx if n is None else idx[:n]  # noqa: E731
        self.indices = {"train": cut(halves.predictor, args.train_limit), "valid": cut(split["valid"], args.valid_limit),
                        "test": cut(halves.generator, args.test_limit)}
        self.sets = {k: MoleculeSet(qm9.ptr, qm9.atom_types, qm9.positions, numbers, v) for k, v in self.indices.items()}
        self.targets = {k: edm_targets(qm9, properties, v) for k, v in self.indices.items()}
        # EDM normalises by the whole validation split, whatever is trained on
        self.mean, self.mad = property_norms(edm_targets(qm9, properties, split["valid"]))
        self.num_atoms = {k: qm9.num_atoms[v] for k, v in self.indices.items()}


def predict(model, molecules: MoleculeSet, device, batch_size: int = 512) -> np.ndarray:
    """Targets ``(M, P)`` float64 predicted for every molecule of the set, in set order."""
    out = []
    for lo in range(0, len(molecules), batch_size):
        b = molecules.batch(np.arange(lo, min(lo + batch_size, len(molecules)))).to(device)
        out.append(model.predict(b.pos, b.types, b.batch, b.num_graphs).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(model.config.properties)))


def lr_at(step: int, total: int, base: float) -> float:
    """Cosine decay from ``base`` to 0 over ``total`` steps (EDM: CosineAnnealingLR over the epochs)."""
    return base * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda handle: torch.save(obj, handle), binary=True)


def write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(path, lambda handle: handle.write(text))


def mae_dict(names, pred, target) -> dict:
    return {k: float(v) for k, v in zip(names, np.abs(pred - target).mean(axis=0))}


def write_baselines(args) -> int:
    """EDM's two data-only baselines on the full halves beside its Table 3 (``--baselines-only``)."""
    qm9 = load_qm9(args.cache_dir, progress=True)
    got = data_baselines(qm9, EDM_PROPERTIES, edm_halves(edm_split(len(qm9))), seed=args.naive_seed)
    doc = {"units": EDM_UNITS, "scored_on": TEST_SET + ", 50,000 molecules",
           "naive_data_only": got["naive"], "naive_expected": got["pair"], "atoms_median": got["atoms"],
           "edm_table3": EDM_TABLE3, "naive_seed": args.naive_seed,
           "notes": "naive_data_only: the generator half's labels against a seeded shuffle of themselves (EDM shuffles "
                    "the labels and scores its classifier; exact labels stand in for the classifier here); "
                    "naive_expected: the mean |y_i - y_j| over all pairs; atoms_median: per-size median of the "
                    "predictor half. cv is EDM's target, Cv - 2.981 N.",
           "command": "python scripts/train_predictor.py --baselines-only --run-dir " + str(args.run_dir)}
    write_json(args.run_dir / "baselines.json", doc)
    print(f"{'property':>8} {'unit':>12} {'naive':>9} {'EDM':>9} {'#Atoms':>9} {'EDM':>9}")
    for k in EDM_PROPERTIES:
        print(f"{k:>8} {EDM_UNITS[k]:>12} {got['naive'][k]:9.4g} {EDM_TABLE3['Naive (upper bound)'][k]:9.4g} "
              f"{got['atoms'][k]:9.4g} {EDM_TABLE3['#Atoms'][k]:9.4g}")
    print(f"wrote {args.run_dir / 'baselines.json'}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    run_dir: Path = args.run_dir
    if args.baselines_only:
        return write_baselines(args)
    ckpt_path = run_dir / "checkpoint.pt"
    state = None
    if args.resume:
        if not ckpt_path.is_file():
            raise SystemExit(f"train_predictor: --resume: no checkpoint.pt in {run_dir}")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        for key in RECIPE:  # the run's recipe wins over the command line
            setattr(args, key, state["recipe"][key])
    elif ckpt_path.exists() and not args.overwrite:
        raise SystemExit(f"train_predictor: {run_dir} already holds a run; use --resume or --overwrite")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    properties = tuple(p.strip() for p in args.properties.split(",") if p.strip())
    unknown = [p for p in properties if p not in EDM_PROPERTIES]
    if unknown or not properties:
        raise SystemExit(f"train_predictor: unknown properties {unknown}; choose from {','.join(EDM_PROPERTIES)}")

    t_load = time.monotonic()
    data = Data(args, properties)
    print(f"data: train {len(data.sets['train'])} (predictor half), valid {len(data.sets['valid'])}, test "
          f"{len(data.sets['test'])} (generator half); loaded in {time.monotonic() - t_load:.1f} s", flush=True)

    config = PredictorConfig(
        elements=QM9_ELEMENTS, properties=properties, units=tuple(EDM_UNITS[p] for p in properties),
        target_mean=tuple(data.mean), target_mad=tuple(data.mad), hidden=args.hidden, n_layers=args.layers,
        attention=args.attention, pooling=args.pooling,
        notes={"edm_targets": True,
               "targets": "EDM's: gap/homo/lumo in meV (27.2114 eV per hartree); cv minus 2.981 cal/(mol K) per "
                          "atom, as EDM's data loader subtracts the free atoms' heat capacity",
               "normalisation": "mean and mean absolute deviation over the QM9 validation split (EDM)",
               "trained_on": "EDM's predictor half of the QM9 training split (qm9_first_half, the paper's D_a)"})
    torch.manual_seed(args.seed)
    model = PropertyPredictor(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    ema = EMA(model, args.ema) if args.ema > 0 else None
    train_set, y_train = data.sets["train"], torch.tensor(data.targets["train"], dtype=torch.float32)
    steps_per_epoch = len(train_set) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"train_predictor: {len(train_set)} training molecules, fewer than one batch of {args.batch_size}")
    total_steps = args.epochs * steps_per_epoch
    eval_every = args.eval_every or steps_per_epoch
    step = epoch = position = 0
    best = {"valid_mae_norm": math.inf, "step": None}
    elapsed_before = 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        best, elapsed_before = state["best"], state["elapsed"]
        print(f"resumed at step {step} (epoch {epoch}, batch {position}), best validation at step {best['step']}",
              flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if state is None:
        (run_dir / "log.csv").unlink(missing_ok=True)
        (run_dir / "results.json").unlink(missing_ok=True)

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def recipe():
        return {k: getattr(args, k) for k in RECIPE}

    start = time.monotonic()

    def elapsed():
        return elapsed_before + time.monotonic() - start

    def save_checkpoint():
        atomic_torch_save({"recipe": recipe(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "ema": ema.state_dict() if ema is not None else None, "step": step, "epoch": epoch,
                           "position": position, "best": best, "elapsed": elapsed()}, ckpt_path)

    last_eval = {"step": None}

    def evaluate():
        last_eval["step"] = step
        judged = ema.model if ema is not None else model
        pred = predict(judged, data.sets["valid"], device)
        err = np.abs(pred - data.targets["valid"]).mean(axis=0)
        norm = float((err / data.mad).mean())
        row = {"step": step, "epoch": epoch, "elapsed_s": round(elapsed(), 1), "valid_mae_norm": round(norm, 6),
               **{f"valid_{k}": float(v) for k, v in zip(properties, err)}}
        new_file = not (run_dir / "log.csv").exists()
        with open(run_dir / "log.csv", "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        improved = norm < best["valid_mae_norm"]
        if improved:
            best.update(valid_mae_norm=norm, step=step, valid_mae=mae_dict(properties, pred, data.targets["valid"]))
            save_predictor(run_dir / "best", judged, {"step": step, "valid_mae": best["valid_mae"]})
        print(f"validation at step {step}: mean normalised MAE {norm:.4f}"
              + (" (best so far, saved to best/)" if improved else f" (best {best['valid_mae_norm']:.4f} at step {best['step']})")
              + "; " + ", ".join(f"{k} {v:.4g} {EDM_UNITS[k]}" for k, v in zip(properties, err)), flush=True)

    def out_of_budget() -> bool:
        if stop["signal"] is not None:
            return True
        if args.max_steps is not None and step >= args.max_steps:
            return True
        return args.max_minutes is not None and elapsed() >= 60 * args.max_minutes

    last_checkpoint = time.monotonic()
    window, t_window = [], time.monotonic()
    model.train()
    done = step >= total_steps
    while not done and not out_of_budget():
        order = epoch_order(len(train_set), args.seed, epoch)
        while position < steps_per_epoch:
            which = order[position * args.batch_size:(position + 1) * args.batch_size]
            b = train_set.batch(which).to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, args.lr)
            out = model(b.pos, b.types, b.batch, b.num_graphs)
            loss = (out - model.normalize(y_train[which].to(device))).abs().mean()  # L1 on normalised targets
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update(model)
            step += 1
            position += 1
            window.append(loss.item())
            if step % args.log_every == 0:
                now = time.monotonic()
                print(f"step {step}/{total_steps} epoch {epoch} loss {np.mean(window):.4f} "
                      f"lr {optimizer.param_groups[0]['lr']:.2e} {1000 * (now - t_window) / len(window):.0f} ms/step "
                      f"elapsed {elapsed() / 60:.1f} min", flush=True)
                window, t_window = [], now
            if position == steps_per_epoch:
                epoch, position = epoch + 1, 0
            if step % eval_every == 0:
                evaluate()
                model.train()
            if time.monotonic() - last_checkpoint >= 60 * args.checkpoint_minutes:
                save_checkpoint()
                last_checkpoint = time.monotonic()
            if step >= total_steps or out_of_budget():
                break
            if position == 0:
                break  # next epoch: a new order
        done = step >= total_steps
    if last_eval["step"] != step:
        evaluate()  # the model as it stopped competes too
    save_checkpoint()
    reason = "finished" if done else (f"signal {stop['signal']}" if stop["signal"] else "budget spent")
    print(f"stopped at step {step} ({reason}) after {elapsed() / 60:.1f} min; checkpoint {ckpt_path}", flush=True)

    # ---- final scores of the best predictor on the generator half, in EDM's units
    judged, _ = load_predictor(run_dir / "best", device)
    test_y = data.targets["test"]
    pred = predict(judged, data.sets["test"], device)
    test_mae = mae_dict(properties, pred, test_y)
    naive_pred = naive_mae(pred, test_y, args.naive_seed)
    atoms = AtomCountBaseline(data.num_atoms["train"], data.targets["train"])
    atoms_mae = np.abs(atoms.predict(data.num_atoms["test"]) - test_y).mean(axis=0)
    results = {
        "properties": list(properties), "units": {k: EDM_UNITS[k] for k in properties},
        "test_set": TEST_SET, "n_train": len(data.sets["train"]), "n_valid": len(data.sets["valid"]),
        "n_test": len(test_y), "step": step, "best_step": best["step"], "epochs_done": round(step / steps_per_epoch, 3),
        "elapsed_s": round(elapsed(), 1), "stopped": reason,
        "test_mae": test_mae,
        "valid_mae": best["valid_mae"],
        "naive_with_predictor": dict(zip(properties, naive_pred.tolist())),
        "naive_data_only": dict(zip(properties, naive_mae(test_y, test_y, args.naive_seed).tolist())),
        "naive_expected": dict(zip(properties, mean_pair_difference(test_y).tolist())),
        "atoms_median": dict(zip(properties, atoms_mae.tolist())),
        "edm_table3": {row: {k: v[k] for k in properties} for row, v in EDM_TABLE3.items()},
        "recipe": recipe(), "device": device,
        "command": "python scripts/train_predictor.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    write_json(run_dir / "results.json", results)
    save_predictor(run_dir / "best", judged, {"step": best["step"], "valid_mae": best["valid_mae"], "test_mae": test_mae,
                                             "test_set": TEST_SET, "n_test": len(test_y)})
    print(f"{'property':>8} {'unit':>12} {'test MAE':>10} {'EDM lower':>10} {'#Atoms':>9} {'naive':>9}")
    for k in properties:
        print(f"{k:>8} {EDM_UNITS[k]:>12} {test_mae[k]:10.4g} {EDM_TABLE3['QM9 (lower bound)'][k]:10.4g} "
              f"{results['atoms_median'][k]:9.4g} {results['naive_with_predictor'][k]:9.4g}")
    print(f"wrote {run_dir / 'results.json'}; predictor {run_dir / 'best'} (moldiff predict FILE.sdf --predictor "
          f"{run_dir / 'best'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
