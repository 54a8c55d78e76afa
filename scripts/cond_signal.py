"""How much a property-conditional model reads its condition, from its denoising loss alone.

For a run of a property-conditional config (``model.properties``), the EMA weights of its
``checkpoint.pt`` (or of ``--checkpoint``) denoise validation molecules at the same times and the
same noise under several contexts:

* ``none``: every property hidden (the unconditional model of classifier-free guidance);
* ``all``: every property given its true value;
* per property ``p``: ``p`` alone given its true value, and ``p`` alone given the value of another
  validation molecule (a fixed random permutation of the set).

The row of ``p`` reports ``gain = (loss(p shuffled) - loss(p true)) / loss(none)`` in percent: the
share of the denoising loss that knowing the molecule's own value of ``p``, rather than some
molecule's, removes. Zero means the network does not use ``p`` (a model whose context weights are
still zero scores exactly zero); sampling-based MAE (``scripts/eval_conditional.py``) needs the gain
to be well above its standard error before guidance can do anything. The standard error comes
from the paired per-batch differences. It costs a few hundred forward passes, no sampling, so it
can follow a run between its sampled marks.

    python scripts/cond_signal.py runs/conditional_small --molecules 1024 --repeats 2 \\
        --out docs/results/properties/conditional_small_signal.csv

``--out`` appends one row per property (and one for ``all``) with the run's step and hours.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
from pathlib import Path

FIELDS = ["run", "step", "hours", "context", "molecules", "repeats", "loss_none", "loss_true",
          "loss_shuffled", "gain_pct", "gain_se_pct", "checkpoint"]


def contexts_for(conditioning, targets, perm_targets):
    """``{name: (B, 2P) context}`` for one batch: none, all, and each property true / shuffled alone."""
    import torch

    from moldiff.training.loop import property_context

    p = targets.shape[1]
    full = property_context(conditioning, targets)
    shuffled = property_context(conditioning, perm_targets)
    out = {"none": torch.zeros_like(full), "all": full}
    for k, name in enumerate(conditioning.names):
        for tag, src in (("true", full), ("shuffled", shuffled)):
            ctx = torch.zeros_like(full)
            ctx[:, k] = src[:, k]
            ctx[:, p + k] = 1.0
            out[f"{name}:{tag}"] = ctx
    return out


def measure(trainer, molecules: int, repeats: int, batch_size: int = 64, seed: int = 0) -> dict:
    """Mean losses per context over ``molecules`` validation molecules x ``repeats`` draws of time
    and noise, and per-batch values for the paired standard errors."""
    import numpy as np
    import torch

    from moldiff.pipeline import MolDiffPipeline
    from moldiff.training.loop import diffusion_loss

    cfg, data = trainer.cfg, trainer.data
    conditioning = data.conditioning
    if conditioning is None or not cfg.model.properties:
        raise ValueError("this run is not property-conditional (model.properties is empty)")
    model = trainer.ema.model if trainer.ema is not None else trainer.model
    model.eval()
    pipe = MolDiffPipeline(model, trainer.pipe.schedule, trainer.pipe.features, trainer.pipe.statistics,
                           trainer.pipe.atomic_numbers)
    batches = []  # whole batches of the validation split, until ``molecules`` are covered
    for _b, batch in data.valid.batches(batch_size, seed=0, epoch=0, drop_last=False):
        batches.append(batch)
        if sum(x.num_graphs for x in batches) >= molecules:
            break
    n = sum(x.num_graphs for x in batches)
    if n < 2:
        raise ValueError("need at least two validation molecules")
    all_targets = torch.cat([x.targets for x in batches]).to(torch.float64)
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(n))
    perm_all = all_targets[perm]
    per_batch: dict[str, list[float]] = {}
    weights: list[int] = []
    gen = torch.Generator()
    gen.manual_seed(12345 + seed)
    with torch.no_grad():
        for _r in range(repeats):
            start = 0
            for batch in batches:
                m = batch.num_graphs
                ctxs = contexts_for(conditioning, all_targets[start:start + m], perm_all[start:start + m])
                t = torch.rand(m, generator=gen, dtype=torch.float64)
                state = gen.get_state()
                for name, ctx in ctxs.items():
                    gen.set_state(state)  # the same noise under every context
                    loss = float(diffusion_loss(pipe, batch, t, gen, bond_weight=0.0, context=ctx))
                    if not math.isfinite(loss):
                        raise ValueError(f"non-finite denoising loss ({loss}) under context {name!r}: "
                                         "the checkpoint's weights or the data are broken")
                    per_batch.setdefault(name, []).append(loss)
                weights.append(m)
                start += m
    w = np.asarray(weights, dtype=np.float64)
    vals = {k: np.asarray(v) for k, v in per_batch.items()}
    mean = {k: float((v * w).sum() / w.sum()) for k, v in vals.items()}
    return {"mean": mean, "per_batch": vals, "weights": w, "names": list(conditioning.names),
            "molecules": n}


def gain_rows(result: dict) -> list[dict]:
    """One row per property (true against shuffled) and one for ``all`` (all true against none)."""
    mean, vals, w = result["mean"], result["per_batch"], result["weights"]
    base = mean["none"]

    def paired(a: str, b: str) -> tuple[float, float]:
        d = vals[a] - vals[b]
        mu = float((d * w).sum() / w.sum())
        if len(d) < 2:
            return mu, float("nan")
        var = float((w * (d - mu) ** 2).sum() / w.sum())
        return mu, math.sqrt(var / (len(d) - 1))

    rows = []
    for name in result["names"]:
        diff, se = paired(f"{name}:shuffled", f"{name}:true")
        rows.append({"context": name, "loss_true": mean[f"{name}:true"], "loss_shuffled": mean[f"{name}:shuffled"],
                     "gain_pct": 100 * diff / base, "gain_se_pct": 100 * se / base})
    diff, se = paired("none", "all")
    rows.append({"context": "all", "loss_true": mean["all"], "loss_shuffled": float("nan"),
                 "gain_pct": 100 * diff / base, "gain_se_pct": 100 * se / base})
    for row in rows:
        row["loss_none"] = base
    return rows


def load_trainer(run_dir: Path, checkpoint: Path | None, threads: int):
    """A trainer of the run's configuration, in fp32 and eager, holding the checkpoint's weights; it
    lives in a temporary folder, so the run's own files are only read."""
    import torch

    from moldiff.training.config import load_config
    from moldiff.training.loop import Trainer

    torch.set_num_threads(threads)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (give the folder of a `moldiff train` run)")
    ckpt = checkpoint or run_dir / "checkpoint.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint")
    cfg = load_config(cfg_path, ["train.precision=fp32", "train.compile=false", "train.device=cpu",
                                 "train.tensorboard=false", "train.init_from=null"])
    if not cfg.model.properties:
        raise ValueError(f"{run_dir}: this run is not property-conditional (model.properties is empty)")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    with tempfile.TemporaryDirectory(prefix="cond_signal_") as tmp:  # nothing is written there
        trainer = Trainer(cfg, tmp, log=lambda _msg: None, device="cpu")
    trainer.load_state_dict(state)
    return trainer, ckpt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a `moldiff train` run of a property-conditional config")
    ap.add_argument("--checkpoint", type=Path, help="another checkpoint.pt of the same run (default RUN/checkpoint.pt)")
    ap.add_argument("--molecules", type=int, default=1024, help="validation molecules (default 1024)")
    ap.add_argument("--repeats", type=int, default=2, help="draws of time and noise per molecule (default 2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="append the rows to this CSV")
    args = ap.parse_args(argv)
    if args.molecules < 2 or args.repeats < 1 or args.threads < 1:
        ap.error("--molecules must be >= 2, --repeats and --threads >= 1")
    try:
        trainer, ckpt = load_trainer(args.run_dir, args.checkpoint, args.threads)
        result = measure(trainer, args.molecules, args.repeats, seed=args.seed)
    except (FileNotFoundError, ValueError) as err:
        print(f"cond_signal.py: error: {err}", file=sys.stderr)
        return 2
    rows = gain_rows(result)
    meta = {"run": trainer.cfg.name, "step": trainer.step, "hours": round(trainer.hours, 4),
            "molecules": result["molecules"], "repeats": args.repeats, "checkpoint": str(ckpt)}
    print(f"{meta['run']} step {meta['step']} ({meta['hours']} h), {meta['molecules']} validation molecules "
          f"x {args.repeats}: loss with nothing given {rows[0]['loss_none']:.6f}")
    print(f"{'context':>8} {'loss true':>10} {'shuffled':>10} {'gain %':>8} {'se %':>6}")
    for row in rows:
        print(f"{row['context']:>8} {row['loss_true']:10.6f} {row['loss_shuffled']:10.6f} "
              f"{row['gain_pct']:8.3f} {row['gain_se_pct']:6.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        new = not args.out.is_file() or args.out.stat().st_size == 0
        with open(args.out, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow({**meta, **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
