"""Score a property-conditional generator as EDM does (Table 3 of Hoogeboom et al. 2022): the MAE
between the property asked for and a property predictor's estimate for the molecule generated.

    python scripts/eval_conditional.py --generator runs/conditional --predictor runs/predictor/best \\
        --property all --guidance 0,1,2,4 --out out/evalcond.json

For each property (one conditioned at a time, the others dropped) and each guidance scale ``w``:

1. Draw ``n`` (value, atom count) pairs jointly, with replacement, from the generator's own training
   molecules: EDM's generator half of the QM9 training split (``qm9_second_half``). EDM draws N from
   that half's size histogram and then the value from a 1,000-bin histogram of the values of
   molecules of that size, uniformly within the bin (``DistributionProperty`` in ``qm9/models.py``);
   drawing whole molecules gives the same joint distribution without the bin's jitter. The pairs are
   drawn once per property, so every scale is scored on the same targets.
2. Sample one molecule per pair: ``pipe.sample(n, condition={prop: values}, num_atoms=sizes,
   guidance_scale=w, seed=SEED)``. The same seed at every scale (common random numbers), so
   ``w = 0`` is exactly the model's unconditional mode at those sizes.
3. Predict the property of every generated molecule with the predictor, valid or not, as EDM does
   (``eval_conditional_qm9.py``, task ``edm``, scores every sample: its classifier reads the argmax
   element one-hot and the coordinates, and no validity filter is applied). A sample with
   non-finite coordinates (a numerical fault) cannot be read by any predictor; EDM has no path for
   it. Here such samples are left out of the MAE and counted (``n_unscored``).
4. MAE in EDM's units (Bohr^3, meV, D, cal/(mol K); Cv as EDM's target, less 2.981 per atom,
   which does not change an error), its standard error, and the EDM metrics of the same samples
   (molecule and atom stability, validity, uniqueness).

Beside each property: EDM's Table 3 rows, GeoLDM's row, the data-only Naive and #Atoms baselines
(:func:`moldiff.data.properties.data_baselines`, full halves), #Atoms scored on the very pairs drawn,
and the QM9 lower bound when the predictor folder records its test MAE (scripts/train_predictor.py).

Where this differs from EDM: EDM trains one generator per property; a moldiff generator may be one
network for several properties, conditioned here on one with the rest dropped (its training shows it
that case, ``diffusion.property_dropout``). EDM samples 100 batches of 100 (its README command;
``--iterations 100 --batch_size 100``, which by an off-by-one runs 101 batches) with its 1,000-step
sampler; ``-n`` defaults to 10,000 and ``--steps`` to 1,000, the continuous-time sampler taking any
number. The predictor may be one network for six properties (docs/properties.md, section 3).

The JSON (``--out``) is rewritten after every (property, scale) cell, so a stopped run keeps what it
measured; ``complete`` says whether every cell is in. Bad input gives one line on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from moldiff.data.properties import (EDM_PROPERTIES, EDM_TABLE3, EDM_UNITS, AtomCountBaseline,  # noqa: E402
                                     PropertyConditioning, canonical_property)

#: GeoLDM's conditional MAE (Xu et al., ICML 2023, Table 3) in :data:`EDM_UNITS`, as issue 21 quotes it.
GEOLDM_TABLE3: dict[str, float] = dict(zip(EDM_PROPERTIES, (2.37, 587, 340, 522, 1.108, 1.025)))
#: Molecules per property in EDM's evaluation (README: ``--iterations 100 --batch_size 100``).
EDM_SAMPLES = 10_000
#: EDM's sampler: every one of its 1,000 diffusion steps.
EDM_STEPS = 1000
PROG = "eval_conditional"


class UsageError(Exception):
    """A bad input: reported as one line on stderr, exit status 2."""


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (checked further by :func:`check_args`)."""
    p = argparse.ArgumentParser(prog="eval_conditional.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--generator", required=True, metavar="DIR",
                   help="a property-conditional pipeline folder or `moldiff train` run folder")
    p.add_argument("--predictor", required=True, metavar="DIR",
                   help="a property predictor folder (scripts/train_predictor.py: RUN/best) or a shipped "
                        "predictor's name (qm9-props)")
    p.add_argument("--property", action="append", metavar="NAME",
                   help=f"property to condition on, one at a time: {', '.join(EDM_PROPERTIES)} or all; repeat "
                        "or give a comma list")
    p.add_argument("--guidance", default="0,1,2,4", metavar="W,W,...",
                   help="comma list of guidance scales >= 0 (0: the unconditional mode, 1: the plain conditional "
                        "model; default 0,1,2,4)")
    p.add_argument("-n", type=int, default=EDM_SAMPLES,
                   help=f"molecules per property and scale (default {EDM_SAMPLES:,}, EDM's)")
    p.add_argument("--steps", type=int, default=EDM_STEPS, help=f"reverse steps (default {EDM_STEPS}, EDM's)")
    p.add_argument("--seed", type=int, default=0, help="draws of the (value, N) pairs and the sampling noise")
    p.add_argument("--resample", type=int, default=None, metavar="R",
                   help="late resampling rounds (default: moldiff sample's; 1 for the loop without it, as marks "
                   "before session 27 ran)")
    p.add_argument("--resample-below", type=float, default=None, metavar="T",
                   help="resample the steps that start at t <= T (default: moldiff sample's)")
    p.add_argument("--batch-size", type=int, default=1000, help="molecules denoised together")
    p.add_argument("--out", metavar="FILE.json", help="results, rewritten after every cell")
    p.add_argument("--per-molecule", action="store_true",
                   help="also store each cell's molecules in the JSON: N, target, prediction, valid, stable, "
                        "formula, radius (the farthest atom from the centroid, Å)")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="auto",
                   help="the generator's arithmetic (auto: bf16 where it is native)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--cache-dir", help="QM9 cache folder (default ~/.cache/moldiff)")
    return p.parse_args(argv)


def parse_properties(given: list[str] | None) -> tuple[str, ...]:
    """The properties asked for, in EDM's column order: names (repeated or comma lists) or ``all``."""
    if not given:
        raise UsageError(f"give --property NAME ({', '.join(EDM_PROPERTIES)} or all)")
    names = []
    for item in given:
        for word in str(item).split(","):
            word = word.strip()
            if not word:
                continue
            if word.lower() == "all":
                names.extend(EDM_PROPERTIES)
                continue
            try:
                names.append(canonical_property(word))
            except ValueError:
                raise UsageError(f"--property: unknown property {word!r}; choose from {', '.join(EDM_PROPERTIES)} "
                                 "or all") from None
    if not names:
        raise UsageError(f"give --property NAME ({', '.join(EDM_PROPERTIES)} or all)")
    return tuple(k for k in EDM_PROPERTIES if k in names)


def parse_scales(text: str) -> tuple[float, ...]:
    """Guidance scales from a comma list: finite numbers >= 0, duplicates dropped, order kept."""
    scales = []
    for word in str(text).split(","):
        word = word.strip()
        try:
            w = float(word)
        except ValueError:
            raise UsageError(f"--guidance: {word!r} is not a number; give scales >= 0 such as 0,1,2,4") from None
        if not (math.isfinite(w) and w >= 0):
            raise UsageError(f"--guidance: scales must be numbers >= 0, got {word}")
        if w not in scales:
            scales.append(w)
    return tuple(scales)


def check_args(args) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Everything that needs no model: one-line :class:`UsageError` for bad values."""
    properties = parse_properties(args.property)
    scales = parse_scales(args.guidance)
    for name in ("n", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if not args.out:
        raise UsageError("give --out FILE.json (rewritten after every property and scale)")
    if Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: it is a folder; give a file name")
    return properties, scales


def load_generator(path: str, properties, device: str, precision: str):
    """The conditional pipeline at ``path``, checked: conditioned on every property asked for and
    trained on EDM's generator half (EDM's ``eval_conditional_qm9.py`` asserts ``qm9_second_half``)."""
    from moldiff.pipeline import load_pretrained

    try:
        pipe = load_pretrained(path, device=device)
    except ValueError as exc:  # CheckpointError, unknown device
        raise UsageError(f"--generator: {exc}") from None
    conditioning = pipe.conditioning
    if conditioning is None:
        raise UsageError(f"--generator {path}: not a property-conditional model (trained without model.properties)")
    missing = [k for k in properties if k not in conditioning.names]
    if missing:
        raise UsageError(f"--generator {path} conditions on {', '.join(conditioning.names)} only; it cannot condition "
                         f"on {', '.join(missing)}")
    if conditioning.subset != "generator":
        raise UsageError(f"--generator {path} was trained on the {conditioning.subset!r} molecules; EDM's protocol "
                         "scores a generator trained on the generator half (data.train_half=generator)")
    pipe.configure_inference(precision=precision)
    return pipe


def load_scorer(path: str, properties, elements, device: str):
    """The predictor at ``path`` with its metadata, checked: it predicts every property asked for, in
    EDM's target units, and knows every element the generator can place."""
    from moldiff.models.property import PredictorError, load_predictor
    from moldiff.prediction import resolve_predictor

    try:
        model, meta = load_predictor(resolve_predictor(path), device)
    except PredictorError as exc:
        raise UsageError(f"--predictor: {exc}") from None
    cfg = model.config
    missing = [k for k in properties if k not in cfg.properties]
    if missing:
        raise UsageError(f"--predictor {path} predicts {', '.join(cfg.properties)} only, not {', '.join(missing)}")
    if not cfg.notes.get("edm_targets"):
        raise UsageError(f"--predictor {path} does not predict EDM's targets (config notes lack edm_targets; train "
                         "it with scripts/train_predictor.py)")
    for k in properties:
        unit = cfg.units[cfg.properties.index(k)]
        if unit != EDM_UNITS[k]:
            raise UsageError(f"--predictor {path}: {k} is in {unit!r}, EDM's unit is {EDM_UNITS[k]!r}")
    unknown = [e for e in elements if e not in cfg.elements]
    if unknown:
        raise UsageError(f"--predictor {path} does not know element(s) {', '.join(unknown)} that the generator "
                         f"places (it knows {', '.join(cfg.elements)})")
    return model, meta


def draw_pool(conditioning: PropertyConditioning, qm9, generator_half: np.ndarray, name: str):
    """The pairs a draw comes from: the generator's training molecules, ``(values in the condition's
    unit, sizes, EDM targets, source)``. The pipeline keeps its training molecules' values as float16;
    when they are the first molecules of EDM's generator half (as ``moldiff train`` takes them) the
    exact values are read back from QM9, otherwise the float16 table is used."""
    k = conditioning.names.index(name)
    m = len(conditioning.reference_sizes)
    table = conditioning.reference_values[:, k].astype(np.float64)
    sizes = conditioning.reference_sizes.astype(np.int64)
    if m <= len(generator_half):
        from moldiff.data.properties import edm_targets

        rows = generator_half[:m]
        if np.array_equal(qm9.num_atoms[rows].astype(np.int64), sizes):
            targets = edm_targets(qm9, (name,), rows)
            values = PropertyConditioning._to_condition_units((name,), targets, sizes)[:, 0]
            if np.array_equal(values.astype(np.float16), conditioning.reference_values[:, k]):
                values = np.clip(values, conditioning.low[k], conditioning.high[k])
                return values, sizes, targets[:, 0], "exact: QM9 values of the generator's training molecules"
    values = np.clip(table, conditioning.low[k], conditioning.high[k])
    one = np.zeros((m, len(conditioning.names)))
    one[:, k] = values
    targets = conditioning.targets(one, sizes)[:, k]
    return values, sizes, targets, ("float16 table of the generator's training molecules (not found in QM9's "
                                    "generator half)")


def predict(model, meta, molecules, name: str) -> np.ndarray:
    """The predictor's estimate of ``name`` (EDM's target and unit) for each molecule; NaN where the
    coordinates are not finite (a numerical fault) or there are no atoms."""
    from moldiff.prediction import LoadedPredictor, estimate

    scorer = LoadedPredictor("--predictor", model, meta)
    return estimate(scorer, molecules)[:, scorer.properties.index(name)]


def formula(symbols) -> str:
    """Element counts in Hill order (C, H, then alphabetical), e.g. ``C2H6O``."""
    counts = {e: list(symbols).count(e) for e in set(symbols)}
    first = [e for e in ("C", "H") if e in counts] if "C" in counts else []
    order = first + sorted(e for e in counts if e not in first)
    return "".join(f"{e}{counts[e] if counts[e] > 1 else ''}" for e in order)


def radius(positions) -> float | None:
    """The largest distance of an atom from the molecule's centroid (Å); None where not finite."""
    xyz = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if not len(xyz) or not np.isfinite(xyz).all():
        return None
    return float(np.linalg.norm(xyz - xyz.mean(axis=0), axis=1).max())


def write_json(path: Path, doc: dict) -> None:
    """``doc`` to ``path`` atomically (a reader sees the old file or the new one)."""
    from moldiff.files import atomic_write

    text = json.dumps(doc, indent=2) + "\n"
    atomic_write(path, lambda handle: handle.write(text))


def baselines_for(name: str, data_only: dict, meta: dict, atoms_on_draws: float) -> dict:
    """The reference rows of one property, in :data:`EDM_UNITS`."""
    lower = (meta.get("test_mae") or {}).get(name)
    return {
        "naive_data_only": data_only["naive"][name],
        "naive_expected": data_only["pair"][name],
        "atoms_median": data_only["atoms"][name],
        "atoms_on_draws": atoms_on_draws,
        "qm9_lower_bound": lower,
        "qm9_lower_bound_on": (f"{meta.get('test_set')}, {meta.get('n_test'):,} molecules"
                               if lower is not None and meta.get("n_test") else None),
        "edm_table3": {row: values[name] for row, values in EDM_TABLE3.items()},
        "geoldm": GEOLDM_TABLE3[name],
    }


def format_table(doc: dict) -> str:
    """The cells as a text table, property by property, the baselines under each."""
    header = (f"{'property':>8} {'unit':>11} {'w':>5} {'MAE':>9} {'+-se':>7} {'mol stab':>8} {'valid':>6} "
              f"{'unique':>6} {'scored':>11}")
    lines = [header]
    for name in doc["properties"]:
        for cell in (c for c in doc["cells"] if c["property"] == name):
            mae = "nan" if cell["mae"] is None else f"{cell['mae']:.4g}"
            se = "" if cell["mae_se"] is None else f"{cell['mae_se']:.2g}"
            lines.append(f"{name:>8} {EDM_UNITS[name]:>11} {cell['guidance_scale']:>5g} {mae:>9} {se:>7} "
                         f"{cell['mol_stable']:8.3f} {cell['validity']:6.3f} {cell['uniqueness']:6.3f} "
                         f"{cell['n_scored']:>5}/{cell['n']:<5}")
        b = doc["baselines"].get(name)
        if b:
            edm = b["edm_table3"]
            lower = "not recorded" if b["qm9_lower_bound"] is None else f"{b['qm9_lower_bound']:.4g}"
            lines.append(f"{'':>8} Naive {b['naive_data_only']:.4g} (EDM {edm['Naive (upper bound)']:g}); #Atoms "
                         f"{b['atoms_median']:.4g} (EDM {edm['#Atoms']:g}; on these draws {b['atoms_on_draws']:.4g}); "
                         f"EDM {edm['EDM']:g}; GeoLDM {b['geoldm']:g}; QM9 lower bound {lower} "
                         f"(EDM {edm['QM9 (lower bound)']:g})")
    return "\n".join(lines)


def run(args, argv) -> int:
    """The evaluation after the arguments passed :func:`check_args`."""
    properties, scales = check_args(args)
    t_start = time.monotonic()
    import torch

    from machine_info import machine_record
    from moldiff.data.properties import data_baselines, edm_halves, edm_targets
    from moldiff.data.qm9 import edm_split, load_qm9
    from moldiff.molecules import evaluate_molecules
    from moldiff.runtime import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise UsageError(f"--device: {exc}") from None
    pipe = load_generator(args.generator, properties, device, args.precision)
    model, meta = load_scorer(args.predictor, properties, pipe.elements, device)
    t_models = time.monotonic()

    qm9 = load_qm9(args.cache_dir)
    halves = edm_halves(edm_split(len(qm9)))
    data_only = data_baselines(qm9, properties, halves, seed=0)
    atoms = AtomCountBaseline(qm9.num_atoms[halves.predictor], edm_targets(qm9, properties, halves.predictor))
    t_data = time.monotonic()

    out = Path(args.out)
    conditioning = pipe.conditioning
    from moldiff.pipeline import SampleRequest

    late = SampleRequest(1, resample=args.resample, resample_below=args.resample_below).resolved(pipe)  # the loop's rounds
    doc = {
        "script": "scripts/eval_conditional.py",
        "command": "python scripts/eval_conditional.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_record(torch.get_num_threads()),
        "device": device, "precision": pipe.inference_precision,
        "generator": str(args.generator), "generator_properties": list(conditioning.names),
        "generator_run": pipe.metadata.get("run_name"),
        "generator_step": pipe.metadata.get("step"), "generator_train_hours": pipe.metadata.get("train_hours"),
        "generator_training_molecules": len(conditioning.reference_sizes),
        "predictor": str(args.predictor), "predictor_properties": list(model.config.properties),
        "predictor_metadata": {k: meta[k] for k in ("step", "test_mae", "test_set", "n_test") if k in meta},
        "properties": list(properties), "guidance_scales": list(scales),
        "units": {k: EDM_UNITS[k] for k in properties},
        "n": args.n, "steps": args.steps, "seed": args.seed, "batch_size": args.batch_size,
        "resample": late.resample, "resample_below": late.resample_below,
        "protocol": "EDM's (Hoogeboom et al. 2022, Table 3): (value, N) pairs drawn jointly from the generator's "
                    "training molecules (EDM's generator half), one property conditioned at a time, one molecule "
                    "per pair, every molecule scored by the predictor valid or not; MAE in EDM's units (cv: "
                    "EDM's target, Cv - 2.981 N). Samples with non-finite coordinates are left out of the MAE and "
                    "counted (n_unscored). See the script's docstring for the deviations.",
        "baselines": {}, "draws": {}, "cells": [], "complete": False,
        "timings": {"load_models_s": round(t_models - t_start, 2),
                    "load_data_and_baselines_s": round(t_data - t_models, 2)},
    }
    pool = len(conditioning.reference_sizes)
    print(f"generator {args.generator} ({', '.join(conditioning.names)}; {pool:,} training molecules), predictor "
          f"{args.predictor}; {args.n} molecules x {len(scales)} scales x {len(properties)} properties, "
          f"{args.steps} steps, {device} {pipe.inference_precision}", flush=True)
    for name in properties:
        values, sizes, targets, source = draw_pool(conditioning, qm9, halves.generator, name)
        rng = np.random.default_rng([args.seed, EDM_PROPERTIES.index(name)])
        pick = rng.integers(len(sizes), size=args.n)
        v, n_atoms, y = values[pick], sizes[pick], targets[pick]
        column = properties.index(name)
        atoms_mae = float(np.abs(atoms.predict(n_atoms)[:, column] - y).mean())
        doc["baselines"][name] = baselines_for(name, data_only, meta, atoms_mae)
        doc["draws"][name] = {"source": source, "pool": len(sizes), "mean_target": float(y.mean()),
                              "mean_num_atoms": float(n_atoms.mean())}
        for w in scales:
            t0 = time.monotonic()
            mols = pipe.sample(args.n, condition={name: v.tolist()}, num_atoms=n_atoms.tolist(), guidance_scale=w,
                               steps=args.steps, seed=args.seed, batch_size=args.batch_size, resample=args.resample,
                               resample_below=args.resample_below)
            t1 = time.monotonic()
            pred = predict(model, meta, mols, name)
            t2 = time.monotonic()
            scored = np.isfinite(pred)
            err = np.abs(pred - y)[scored]
            report = evaluate_molecules(mols)
            valid = np.array([m.valid for m in mols])
            cell = {
                "property": name, "guidance_scale": w, "unit": EDM_UNITS[name], "n": args.n,
                "n_scored": int(scored.sum()), "n_unscored": int((~scored).sum()),
                "mae": float(err.mean()) if len(err) else None,
                "mae_se": float(err.std(ddof=1) / math.sqrt(len(err))) if len(err) > 1 else None,
                "mae_valid_only": float(np.abs(pred - y)[scored & valid].mean()) if (scored & valid).any() else None,
                "mol_stable": report.mol_stable, "atom_stable": report.atom_stable, "validity": report.validity,
                "uniqueness": report.uniqueness, "valid_and_unique": report.valid_and_unique,
                "sample_and_interpret_s": round(t1 - t0, 2), "predict_s": round(t2 - t1, 2),
            }
            if args.per_molecule:
                cell["molecules"] = {"num_atoms": n_atoms.tolist(), "target": y.tolist(),
                                     "predicted": [None if not np.isfinite(p) else float(p) for p in pred],
                                     "valid": valid.tolist(), "mol_stable": [bool(m.mol_stable) for m in mols],
                                     "formula": [formula(m.symbols) for m in mols],
                                     "radius": [radius(m.positions) for m in mols]}
            doc["cells"].append(cell)
            doc["timings"]["elapsed_s"] = round(time.monotonic() - t_start, 2)
            write_json(out, doc)
            mae = "nan" if cell["mae"] is None else f"{cell['mae']:.4g}"
            print(f"{name} w={w:g}: MAE {mae} {EDM_UNITS[name]} over {cell['n_scored']}/{args.n} "
                  f"(#Atoms on these draws {atoms_mae:.4g}, EDM {EDM_TABLE3['EDM'][name]:g}); mol stable "
                  f"{report.mol_stable:.3f}, valid {report.validity:.3f}, unique {report.uniqueness:.3f}; "
                  f"{t1 - t0:.1f} s sampling, {t2 - t1:.1f} s predicting", flush=True)
    doc["complete"] = True
    doc["timings"]["elapsed_s"] = round(time.monotonic() - t_start, 2)
    write_json(out, doc)
    print(format_table(doc))
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    """Parse, evaluate, write ``--out``; 0 on success, 2 with one line on stderr for bad input."""
    args = parse_args(argv)
    try:
        return run(args, argv)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
