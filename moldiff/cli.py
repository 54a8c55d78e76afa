"""The ``moldiff`` command: ``data``, ``evaluate``, ``train``, ``sample``.

This is the only module that reads argv and environment variables, sets global torch state
(threads, seeds) or decides how errors are shown: a bad input prints one line
``moldiff: error: ...`` and exits with status 2 (``--debug`` shows the traceback instead). A reader
that closes the pipe early (``moldiff data | head -3``) ends the command quietly with status 141.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from moldiff.runtime import tune_allocator

__all__ = ["main"]


class UsageError(Exception):
    """A problem with what the user asked for; shown as one line."""


class _LogLines:
    """A file for tqdm that turns its carriage-return redraws into whole lines (logs and pipes)."""

    def write(self, text: str) -> None:
        text = text.strip("\r\n ")
        if text:
            sys.stderr.write(text + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


#: Seconds between progress lines when stderr is not a terminal (nothing for shorter work).
LOG_PROGRESS_SECONDS = 60.0


def _progress_bar(total: int | None, desc: str, unit: str, enabled: bool = True, log_lines: bool = True):
    """tqdm on a terminal; in pipes and logs (with ``log_lines``) one plain line a minute once the work
    has run a minute, so long jobs show progress and short ones print nothing; nothing when not ``enabled``."""
    from tqdm import tqdm

    if sys.stderr.isatty() or not enabled:
        return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)
    return tqdm(total=total, desc=desc, unit=unit, disable=not log_lines, leave=False, file=_LogLines(), ascii=True,
                mininterval=LOG_PROGRESS_SECONDS, maxinterval=LOG_PROGRESS_SECONDS, delay=LOG_PROGRESS_SECONDS,
                dynamic_ncols=False, ncols=100)


def _cache_dir(args) -> str | None:
    return args.cache_dir or os.environ.get("MOLDIFF_CACHE") or None


# ---------------------------------------------------------------------------- data
def cmd_data(args) -> int:
    import numpy as np

    from moldiff.data.qm9 import QM9_PROPERTIES, edm_split, load_qm9

    if args.name.lower().endswith(".sdf") and args.file is None:  # `moldiff data FILE.sdf`
        args.name, args.file = "sdf", args.name
    if args.name == "sdf":
        return _cmd_data_sdf(args)
    if args.name != "qm9":
        raise UsageError(f"unknown dataset {args.name!r}; available: qm9, sdf FILE.sdf")
    given = [flag for flag, value in (("FILE", args.file), ("--name", args.dataset_name), ("--max-atoms", args.max_atoms),
                                      ("--elements", args.elements), ("--split", args.split), ("--seed", args.seed),
                                      ("--group-by", args.group_by)) if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: only for `moldiff data sdf FILE.sdf`")
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
    _print_coordinate_spread(qm9.ptr, qm9.positions, split["train"])
    return 0


def _print_coordinate_spread(ptr, positions, train) -> None:
    """The training molecules' coordinate spread, the ``model.pos_skip_std`` of a model of that set."""
    from moldiff.data.statistics import coordinate_spread

    print(f"coordinate spread of the training molecules: {coordinate_spread(ptr, positions, train):.2f} Å "
          "(per-coordinate standard deviation about each centroid; model.pos_skip_std for this set)")


def _cmd_data_sdf(args) -> int:
    """``moldiff data sdf FILE.sdf``: read the file into a cached training set and print its report."""
    from moldiff.data.sdf import DEFAULT_MAX_ATOMS, SDFOptions, build_sdf_dataset, sdf_cache_path

    if args.file is None:
        raise UsageError("moldiff data sdf: give the .sdf file to read")
    options = SDFOptions(
        max_atoms=args.max_atoms if args.max_atoms is not None else DEFAULT_MAX_ATOMS,
        elements=args.elements, split=args.split, seed=args.seed or 0, group_by=args.group_by or "smiles")
    t0 = time.monotonic()
    data = build_sdf_dataset(args.file, name=args.dataset_name, cache_dir=_cache_dir(args), options=options,
                             progress=True)
    for line in data.report.lines():
        print(line)
    train = data.split_indices("train")
    if len(train):
        _print_coordinate_spread(data.ptr, data.positions, train)
    state = "loaded from" if data.from_cache else "written to"
    print(f"dataset {data.name!r} {state} {sdf_cache_path(data.name, _cache_dir(args))} "
          f"({time.monotonic() - t0:.1f} s); train on it with `moldiff train --data {data.name}`")
    return 0


# ---------------------------------------------------------------------------- plausibility
def _check_plausibility_args(args) -> None:
    """``--posebusters`` / ``--relax`` / ``--workers``: fail before any work (nothing written)."""
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    if args.pb_conformers < 0:
        raise UsageError(f"--pb-conformers must be at least 0, got {args.pb_conformers}")
    if args.posebusters:
        from moldiff.chemistry.plausibility import MissingExtraError, require_posebusters

        try:
            require_posebusters()
        except MissingExtraError as exc:
            raise UsageError(f"--posebusters: {exc}") from None


def _plausibility(items: list, args) -> tuple[dict, dict]:
    """PoseBusters checks and/or relaxation of ``(index, molecule)`` items (the valid molecules):
    ``({index: Plausibility}, summary)``; ``({}, {})`` when neither was asked for."""
    if not (args.posebusters or args.relax):
        return {}, {}
    from moldiff.chemistry.plausibility import assess_plausibility, summarize_plausibility

    what = " + ".join(x for x in ("PoseBusters" if args.posebusters else "", args.relax and "relaxation") if x)
    with _progress_bar(len(items), what, "mol") as bar:
        results = assess_plausibility(items, checks=args.posebusters, forcefield=args.relax, workers=args.workers,
                                      progress=bar.update, energy_conformers=args.pb_conformers)
    return {r.index: r for r in results}, summarize_plausibility(results, checks=args.posebusters, forcefield=args.relax,
                                                                 energy_conformers=args.pb_conformers)


def _relaxed_records(results: dict, tags: dict) -> list:
    """SD records of the relaxed molecules (index order), tagged with what relaxation did."""
    records = []
    for index in sorted(results):
        r = results[index].relaxation
        if r is None or r.mol is None:
            continue
        mol = r.mol
        mol.SetProp("_Name", f"moldiff relaxed {index}")
        for key, value in {"index": index, **tags.get(index, {}), "forcefield": r.forcefield,
                           "energy_raw": f"{r.energy_raw:.4f}", "energy_relaxed": f"{r.energy_relaxed:.4f}",
                           "strain_kcal_mol": f"{r.strain:.4f}", "rmsd_heavy": f"{r.rmsd:.4f}",
                           "converged": int(bool(r.converged))}.items():
            mol.SetProp(key, str(value))
        records.append(mol)
    return records


def _add_plausibility_options(parser) -> None:
    g = parser.add_argument_group("physical plausibility (docs/plausibility.md)")
    g.add_argument("--posebusters", action="store_true",
                   help="run PoseBusters' molecule checks on every valid molecule (optional extra: pip install moldiff[checks])")
    g.add_argument("--relax", choices=("mmff", "uff"), help="relax valid molecules with an RDKit force field; report "
                   "heavy-atom RMSD moved and strain energy, write the relaxed coordinates to their own SDF")
    g.add_argument("--pb-conformers", type=int, default=50, metavar="K",
                   help="conformers in PoseBusters' internal-energy reference ensemble (default 50, PoseBusters' "
                   "mol configuration; fewer is faster, 0 leaves the internal-energy check out)")


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


def _own_bonds_summary(records, charged: bool = False) -> dict | None:
    """Stability and validity of an SDF's molecules under the file's own bonds and formal charges
    (:func:`moldiff.chemistry.metrics.own_bonds_result`), over all readable records (records without
    a usable bond block count as neither); ``None`` when no record has one. ``charged`` adds
    ``mol_stable_charged``: the charge-aware rule on the same bonds and charges."""
    readable = [r for r in records if r.error is None]
    if not any(r.bonds is not None for r in readable):
        return None
    from moldiff.chemistry.metrics import own_bonds_result

    verdicts = [own_bonds_result(r.symbols, r.positions, r.bonds, r.formal_charges) for r in readable if r.bonds is not None]
    out = {"n": len(readable), "with_bonds": len(verdicts),
           "validity": sum(v.valid for v in verdicts) / len(readable),
           "mol_stable": sum(v.mol_stable for v in verdicts) / len(readable)}
    if charged:
        out["mol_stable_charged"] = sum(bool(v.mol_stable_charged) for v in verdicts) / len(readable)
    out["protocol"] = "the file's own bonds and formal charges: RDKit sanitization, EDM's valence rule"
    return out


def _charged_summary(summary: dict, charged, charges_source: str, n_unreadable: int) -> dict:
    """``summary`` with the charge-aware stability keys placed right after EDM's ``mol_stable``
    (unreadable records count as unstable, as they do for EDM's numbers)."""
    n_ok = charged.n
    scale = n_ok / (n_ok + n_unreadable)
    extra = {"atom_stable_charged": charged.atom_stable, "mol_stable_charged": charged.mol_stable * scale,
             "charged_stability": {"bonds": charged.bonds, "charges": charges_source,
                                   "n_with_charges": charged.n_charged, "table": "moldiff.chemistry.elements."
                                   "CHARGED_VALENCE (after MiDi's allowed_bonds; neutral atoms: EDM's valences)"}}
    out = {}
    for key, value in summary.items():
        out[key] = value
        if key == "mol_stable":
            out |= extra
    return out if "mol_stable" in summary else summary | extra


def cmd_evaluate(args) -> int:
    from moldiff.chemistry.io import read_molecules
    from moldiff.chemistry.metrics import evaluate_molecules, format_table
    from moldiff.data.qm9 import training_smiles

    if (args.path is None) == (args.dataset is None):
        raise UsageError("give a file to evaluate or --dataset (e.g. --dataset qm9:test), not both")
    _check_plausibility_args(args)
    if args.subsample is not None and args.subsample <= 0:
        raise UsageError(f"--subsample must be a positive number of molecules, got {args.subsample}")
    relaxed_sdf = None
    if args.relax:
        if args.relaxed_sdf:
            relaxed_sdf = Path(args.relaxed_sdf)
        elif args.path:
            relaxed_sdf = Path(args.path).with_name(f"{Path(args.path).stem}_relaxed.sdf")
    elif args.relaxed_sdf:
        raise UsageError("--relaxed-sdf goes with --relax mmff or --relax uff")
    qm9 = None
    charges: list = []  # per molecule: formal charges from the file, or None (all neutral)
    if args.dataset:
        molecules, qm9 = _dataset_molecules(args.dataset, _cache_dir(args))
        charges = [None] * len(molecules)
        unreadable = []
        source = args.dataset
        names = [f"{args.dataset} {k}" for k in range(len(molecules))]
        indices = list(range(len(molecules)))
    else:
        records = read_molecules(args.path)
        molecules = [(r.symbols, r.positions) for r in records if r.error is None]
        charges = [r.formal_charges for r in records if r.error is None]
        names = [r.name for r in records if r.error is None]
        indices = [k for k, r in enumerate(records) if r.error is None]  # record numbers in the file
        unreadable = [r for r in records if r.error is not None]
        source = str(args.path)
    if args.subsample is not None and args.subsample < len(molecules):  # a seeded subset, in file/split order
        import numpy as np

        pick = np.sort(np.random.default_rng(args.seed).choice(len(molecules), args.subsample, replace=False)).tolist()
        molecules, names, indices = [molecules[k] for k in pick], [names[k] for k in pick], [indices[k] for k in pick]
        charges = [charges[k] for k in pick]
        if args.path:
            chosen = set(indices)
            records = [r for k, r in enumerate(records) if k in chosen or r.error is not None]
        source += f" (random {args.subsample}, seed {args.seed})"
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
    charged = None
    if args.charged_stability and molecules:
        from moldiff.chemistry.metrics import evaluate_charged_stability

        charged = evaluate_charged_stability([(s, p, q) for (s, p), q in zip(molecules, charges)], workers=args.workers)
        charges_source = ("formal charges from the file" if any(q is not None for q in charges)
                          else "none in the input: every atom neutral")
        summary = _charged_summary(summary, charged, charges_source, len(unreadable))
    elapsed = time.monotonic() - t0
    print(f"evaluated {source}: {summary.get('n', 0)} molecules in {elapsed:.1f} s (EDM protocol)")
    if report is not None and not unreadable:
        print(format_table(report, charged=charged))
    else:
        keys = [k for k in ("n", "atom_stable", "mol_stable", "atom_stable_charged", "mol_stable_charged", "validity",
                            "uniqueness", "valid_and_unique", "novelty") if k in summary or not k.endswith("_charged")]
        width = max(18, *map(len, keys))
        for k in keys:
            v = summary.get(k)
            print(f"{k:>{width}}: " + ("n/a" if v is None else (f"{100 * v:.2f}%" if k != "n" else str(v))))
    if molecules:
        from moldiff.chemistry.diagnostics import geometry_diagnostics

        diag = geometry_diagnostics(molecules)
        summary["diagnostics"] = {k: diag[k] for k in ("one_piece", "mean_fragments", "close_contact", "odd_valence", "planar_six_ring")}
        of = " of the readable ones" if unreadable else ""
        print(f"diagnostics{of}: {100 * diag['one_piece']:.2f}% in one piece, {100 * diag['close_contact']:.2f}% with atoms "
              f"closer than 0.9 Å, {100 * diag['odd_valence']:.2f}% with an odd valence sum (no geometry makes those stable), "
              f"{100 * diag['planar_six_ring']:.2f}% with a flat aromatic-like six-ring (QM9: 3%)")
    if charged is not None:
        print(_charged_line(summary, charged.n_charged))
    for r in unreadable[:10]:
        print(f"unreadable record {r.name}: {r.error}")
    own = _own_bonds_summary(records if args.dataset is None else [], charged=args.charged_stability)
    if own is not None:
        summary["own_bonds"] = own
        with_charges = _own_charged_clause(own)
        print(f"with the file's own bonds ({own['with_bonds']} of {own['n']} records carry a bond block of single, "
              f"double and triple bonds): molecule stable {100 * own['mol_stable']:.2f}%{with_charges}, "
              f"valid {100 * own['validity']:.2f}% (the table above: EDM's distance-table bonds)")
    per_molecule = report.per_molecule if report is not None else []
    valid = [(indices[k], molecules[k]) for k, res in enumerate(per_molecule) if res.valid]
    plausible, plausibility = _plausibility(valid, args)
    if plausibility:
        from moldiff.chemistry.plausibility import format_plausibility

        print(format_plausibility(plausibility))
        summary |= plausibility
    from moldiff.chemistry.io import write_csv, write_json, write_sdf

    if relaxed_sdf is not None:
        smiles = {indices[k]: res.smiles for k, res in enumerate(per_molecule)}
        relaxed = _relaxed_records(plausible, {i: {"SMILES": smiles[i]} for i in plausible})
        write_sdf(relaxed_sdf, relaxed)
        print(f"wrote {relaxed_sdf} ({len(relaxed)} relaxed molecules; indices are record numbers from 0)")
    if args.csv:
        rows = []
        for k, res in enumerate(per_molecule):
            row = {"index": indices[k], "name": names[k], "SMILES": res.smiles, "valid": int(res.valid),
                   "mol_stable": int(res.mol_stable), "reason": res.reason}
            if charged is not None:
                row = ({key: value for key, value in row.items() if key != "reason"}
                       | {"mol_stable_charged": int(charged.per_molecule[k].mol_stable), "reason": res.reason})
            if indices[k] in plausible:
                row.update(plausible[indices[k]].row(checks=args.posebusters))
            rows.append(row)
        write_csv(args.csv, rows)
    if args.json:
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
    if args.init_from is not None:
        if args.resume:
            raise UsageError("--init-from starts a new run from another model's weights; not with --resume")
        cfg.train.init_from = args.init_from
    if args.data is not None:
        wanted = _dataset_spec(args.data)
        if args.resume and wanted != cfg.data.dataset:
            raise UsageError(f"--data {args.data}: this run trains on {cfg.data.dataset}; a resumed run keeps its data")
        cfg.data.dataset = wanted
    torch.set_num_threads(args.threads or cfg.train.num_threads)
    data = _own_training_data(cfg, run_dir if args.resume else None) if cfg.data.dataset != "qm9" else None  # QM9: the Trainer loads it
    # train.device "auto" (the default) is a CUDA GPU when torch sees one; the configuration keeps
    # what it says, so a run resumed on another machine is resolved afresh.
    device = _check_device(cfg.train.device, option="train.device")
    if world_size > 1:
        if device.startswith("cuda"):
            # One GPU per process. NCCL binds each process to its current device: select it before
            # the process group starts (otherwise every rank would talk through cuda:0).
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if local_rank >= torch.cuda.device_count():
                raise UsageError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are "
                                 "visible; start at most one process per GPU")
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        backend = "nccl" if device.startswith("cuda") else "gloo"
        # Rank 0 alone samples for the periodic metrics check while the others wait at the next
        # collective: allow that well beyond the default timeout (10 min for NCCL).
        import datetime

        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
    evaluate = _sampled_metrics if cfg.train.sample_every else None
    trainer = Trainer(cfg, run_dir, data=data, rank=rank, world_size=world_size, evaluate=evaluate,
                      log=lambda m: print(m, flush=True), device=device)
    if args.resume:
        trainer.resume()
    elif cfg.train.init_from:
        trainer.warm_start(cfg.train.init_from)
    total = cfg.train.max_steps - trainer.step if cfg.train.max_steps is not None else None
    with _progress_bar(total, "training", "step", enabled=rank == 0, log_lines=False) as bar:  # the log has lines
        trainer.train(progress=lambda step, loss: bar.set_postfix(loss=f"{loss:.4f}", refresh=False) or bar.update(1))
    if world_size > 1:
        torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"checkpoint: {run_dir / 'checkpoint.pt'}; sampling pipeline: {run_dir / 'pipeline'}")
    # Stopped by SIGTERM/SIGINT before its step or time limit: the checkpoint is saved, but the run is
    # not finished; exit as the shell reports a signal (128 + its number), so that `train && score`
    # chains and `set -e` scripts stop there instead of scoring an unfinished model.
    return 0 if trainer.stopped_by is None else 128 + int(trainer.stopped_by)


def _dataset_spec(spec: str) -> str:
    """``data.dataset`` as saved in a run: qm9, an .sdf file as an absolute path (so that the run
    resumes from any folder), or a dataset name."""
    from moldiff.data.sdf import is_sdf_spec

    return str(Path(spec).expanduser().resolve()) if is_sdf_spec(spec) else spec


def _own_training_data(cfg, resumed_run: Path | None):
    """The training data of a run on an SDF dataset (``data.dataset``: a .sdf file or a name from
    ``moldiff data sdf``). ``model.num_features`` follows the dataset's vocabulary in a new run (the
    YAML configs size it for QM9's five elements); a resumed run (``resumed_run``: its folder) must
    find the vocabulary it was trained with."""
    import json
    from dataclasses import replace

    from moldiff.diffusion import AtomFeatures
    from moldiff.training.loop import categorical_features, load_training_data

    resume = resumed_run is not None
    if not resume:
        cfg.data.dataset = _dataset_spec(cfg.data.dataset)
    loading = cfg
    if cfg.data.cache_dir is None and os.environ.get("MOLDIFF_CACHE"):  # as `moldiff data` does; not saved in the run
        loading = replace(cfg, data=replace(cfg.data, cache_dir=os.environ["MOLDIFF_CACHE"]))
    data = load_training_data(loading)
    if cfg.diffusion.categorical:
        width = categorical_features(cfg, data.statistics).dim
    else:
        width = AtomFeatures(num_types=len(data.elements), include_charges=cfg.data.include_charges).dim
    saved = resumed_run / "pipeline" / "config.json" if resume else None
    if saved is not None and saved.is_file():
        before = tuple(json.loads(saved.read_text())["statistics"]["elements"])
        if before != tuple(data.elements):
            raise UsageError(f"{cfg.data.dataset} now has elements {','.join(data.elements)}, but this run was trained "
                             f"on {','.join(before)}: the data changed since the run started")
    if cfg.model.num_features != width:
        if resume:
            raise UsageError(f"{cfg.data.dataset} now has {len(data.elements)} elements ({','.join(data.elements)}), "
                             f"{width} feature channels, but this run's model has model.num_features="
                             f"{cfg.model.num_features}: the data changed since the run started")
        print(f"model.num_features={width} for the dataset's {len(data.elements)} elements", flush=True)
        cfg.model.num_features = width
    print(f"data: {cfg.data.dataset}, elements {','.join(data.elements)}, {len(data.train)} training and "
          f"{len(data.valid)} validation conformers", flush=True)
    return data


def _sampled_metrics(pipe, cfg) -> dict:
    from moldiff.chemistry.metrics import evaluate_molecules

    t = cfg.train
    arrays = pipe.sample_arrays(t.sample_n, steps=t.sample_steps, sampler=t.sample_sampler, seed=0)
    from moldiff.chemistry.diagnostics import geometry_diagnostics

    mols = [(arrays.symbols(k), arrays.positions[k]) for k in range(t.sample_n)]
    metrics = evaluate_molecules(mols).to_dict()
    metrics["one_piece"] = geometry_diagnostics(mols)["one_piece"]
    return metrics


# ---------------------------------------------------------------------------- sample
_OUTPUT_KINDS = ("sdf", "csv", "png", "json")
_PREVIEW_MOLECULES = 16


def _output_files(spec: str) -> tuple[Path, dict[str, Path]]:
    """(folder, {kind: path}) for ``-o``: ``x/name.sdf`` -> ``x/name.{sdf,csv,png,json}``; a path
    without ``.sdf`` (or an existing folder) is a folder holding ``samples.{sdf,csv,png,json}``."""
    path = Path(spec).expanduser()
    as_folder = spec.endswith(("/", os.sep)) or path.is_dir()
    if path.suffix.lower() == ".sdf" and not as_folder:
        folder = path.parent
        files = {kind: path.with_suffix(f".{kind}") for kind in _OUTPUT_KINDS}
        files["sdf"] = path
    elif path.suffix == "" or as_folder:
        folder = path
        files = {kind: path / f"samples.{kind}" for kind in _OUTPUT_KINDS}
    else:
        raise UsageError(f"-o {spec}: give a .sdf file (e.g. out/samples.sdf) or a folder (e.g. out/samples)")
    return folder, files


def _check_writable(folder: Path, files: dict[str, Path]) -> None:
    """Fail before sampling if the outputs cannot be written; creates nothing."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot write to {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {folder}: no write permission in {existing}")
    try:  # the real test (read-only filesystems, ACLs): a nameless file that vanishes on close
        import tempfile

        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    for path in files.values():
        if path.is_dir():
            raise UsageError(f"cannot write {path}: it is a folder")


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; return the ones created, deepest first."""
    created = []
    current = folder
    while not current.exists():
        created.append(current)
        current = current.parent
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _write_outputs(folder: Path, files: dict[str, Path], writers: dict) -> None:
    """All-or-nothing: write every file under a temporary name, then rename them into place.

    On any failure the temporary files (and folders this call created) are removed and earlier
    outputs stay as they were.
    """
    import uuid

    created = _make_folders(folder)
    token = uuid.uuid4().hex[:12]
    partial = {kind: path.with_name(f".{path.name}.{token}.part") for kind, path in files.items()}
    try:
        for kind, write in writers.items():
            write(partial[kind])
        for kind, path in files.items():
            os.replace(partial[kind], path)
    except BaseException:
        for tmp in partial.values():
            tmp.unlink(missing_ok=True)
        for directory in created:
            try:
                directory.rmdir()
            except OSError:
                break
        raise


def _check_sampler_name(name: str) -> None:
    from moldiff.diffusion.samplers import SAMPLERS

    base, colon, arg = name.partition(":")
    if base not in SAMPLERS:
        raise UsageError(f"unknown sampler {name!r}; choose ancestral, ddim or ddim:<eta> (e.g. ddim:0.5)")
    if colon:
        try:
            eta = float(arg)
        except ValueError:
            raise UsageError(f"sampler {name!r}: eta must be a number, e.g. ddim:0.5") from None
        if base != "ddim" or not 0.0 <= eta <= 1.0:
            raise UsageError(f"sampler {name!r}: only ddim takes an argument, eta in [0, 1] (e.g. ddim:0.5)")


def _check_device(device: str, option: str = "--device") -> str:
    """The device a command runs on: ``device`` checked, ``auto`` resolved (a CUDA GPU when torch sees
    one, else the CPU). For a CUDA device this also lets fp32 matrix products run in TF32
    (:func:`moldiff.runtime.allow_tf32`): global torch state, which only the CLI sets."""
    import re

    from moldiff.runtime import DEVICE_PATTERN, allow_tf32, resolve_device

    if not re.fullmatch(DEVICE_PATTERN, device):
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if device == "cpu":  # no torch import: the cheap checks stay cheap
        return device
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"{option} {device}: no CUDA GPU is available (torch.cuda.is_available() is False)")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(f"{option} {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    resolved = resolve_device(device)
    if resolved.startswith("cuda"):
        allow_tf32()
    return resolved


def _sample_tags(m, k: int, run: dict) -> dict:
    """SD tags of sampled molecule ``k``: its verdicts and ``run``'s settings (sampler, steps, ...)."""
    import numpy as np

    reason = m.reason
    if m.mol is None and not np.isfinite(m.positions).all():
        reason = f"{reason} (non-finite coordinates written as 0)"
    return {
        "index": k,
        "SMILES": m.smiles,
        "valid": m.valid,
        "mol_stable": m.mol_stable,
        "num_atoms": m.num_atoms,
        "n_stable_atoms": m.n_stable_atoms,
        "rdkit_SMILES": m.rdkit_smiles,
        "bonds": m.bonds,
        **run,
        "reason": reason,
    } | ({} if m.fragment_retained is None else {"fragment_retained": m.fragment_retained, "fragment_rmsd": m.fragment_rmsd}) \
      | ({} if m.own_valid is None else {"own_bonds_valid": m.own_valid, "own_bonds_mol_stable": m.own_mol_stable,
                                          "own_bonds_SMILES": m.own_smiles, "own_bonds_reason": m.own_reason})


def cmd_nll(args) -> int:
    """EDM's test NLL: the variational bound on -log p(x, h, N), averaged over dataset molecules."""
    if args.n is not None and args.n <= 0:
        raise UsageError(f"-n must be a positive number of molecules, got {args.n}")
    if args.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    if args.threads is not None and args.threads <= 0:
        raise UsageError(f"--threads must be positive, got {args.threads}")
    if args.json:
        _check_writable(Path(args.json).parent, {"json": Path(args.json)})
    args.device = _check_device(args.device)
    import numpy as np
    import torch

    from moldiff.chemistry.elements import QM9_ELEMENTS, SYMBOL_TO_Z
    from moldiff.data.batching import MoleculeSet
    from moldiff.data.qm9 import edm_split, load_qm9
    from moldiff.pipeline import NLL_MODEL, PRETRAINED_DIR, CheckpointError, load_pretrained, resolve_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    name, _, split_name = args.dataset.partition(":")
    if name != "qm9" or split_name not in ("train", "valid", "test"):
        raise UsageError(f"unknown dataset {args.dataset!r}; use qm9:test, qm9:valid or qm9:train")
    try:  # no checkpoint: qm9, whose bound is EDM's quantity (the default model's bounds bonds too)
        checkpoint = resolve_checkpoint(NLL_MODEL if args.checkpoint is None else args.checkpoint)
    except CheckpointError:
        raise UsageError(f"no pretrained model is shipped in {PRETRAINED_DIR} yet; give --checkpoint DIR") from None
    pipe = load_pretrained(checkpoint, device=args.device)
    if tuple(pipe.elements) != tuple(QM9_ELEMENTS):
        raise UsageError(f"this model's elements {list(pipe.elements)} are not QM9's {list(QM9_ELEMENTS)}")
    try:
        pipe.require_type_generation("the likelihood bound on p(x, h, N)")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    categorical = pipe.categorical is not None
    qm9 = load_qm9(_cache_dir(args), progress=True)
    bonds = None
    if categorical and (pipe.bond_types or pipe.categorical.charges is not None):
        from moldiff.data.qm9_bonds import load_qm9_bonds

        bonds = load_qm9_bonds(qm9, _cache_dir(args), progress=True)  # RDKit's bond orders and formal charges
    idx = edm_split(len(qm9))[split_name]
    idx = idx[: args.n] if args.n is not None else idx
    mols = MoleculeSet(qm9.ptr, qm9.atom_types, qm9.positions, [SYMBOL_TO_Z[e] for e in QM9_ELEMENTS], idx, bonds=bonds)
    gen = torch.Generator(device=pipe.device).manual_seed(args.seed)
    names = ("total", "prior", "diffusion", "reconstruction", "size") + (("classes",) if categorical else ())
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    order = np.arange(len(idx))
    with _progress_bar(len(idx), "NLL", "mol") as bar:
        for lo in range(0, len(idx), args.batch_size):
            b = mols.batch(order[lo : lo + args.batch_size]).to(pipe.device)
            try:
                terms = pipe.nll_terms(b.pos, b.types, b.charges, b.batch, b.num_graphs, formal_charges=b.formal_charges,
                                       bonds=b.bonds, generator=gen)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            for k in parts:
                parts[k].append((terms.total if k == "total" else getattr(terms, k)).cpu().numpy())
            bar.update(b.num_graphs)
    vals = {k: np.concatenate(v) for k, v in parts.items()}
    total = vals["total"]
    n_bad = int((~np.isfinite(total)).sum())
    mean, sem = float(total.mean()), float(total.std(ddof=1) / np.sqrt(len(total))) if len(total) > 1 else float("nan")
    quantity = ("-log p(x, elements, charges, bonds, N); not comparable with EDM's -log p(x, h, N)" if categorical
                else "-log p(x, h, N); EDM, QM9 with H: -110.7")
    print(f"NLL on {args.dataset} ({len(total)} molecules, one draw each, seed {args.seed}): "
          f"{mean:.2f} +- {sem:.2f} nats per molecule  ({quantity})")
    print("  terms (means): " + ", ".join(f"{k} {float(vals[k].mean()):.2f}" for k in names[1:])
          + ("  (classes: the discrete part of diffusion)" if categorical else ""))
    if n_bad:
        print(f"  {n_bad} molecules gave a non-finite value (sizes with p(N) = 0 or a numerical fault)")
    if args.json:
        from moldiff.chemistry.io import write_json

        write_json(args.json, {"dataset": args.dataset, "n": len(total), "seed": args.seed, "checkpoint": str(checkpoint),
                               "quantity": quantity.split(";")[0], "nll": mean, "nll_sem": sem, "non_finite": n_bad,
                               **{f"mean_{k}": float(vals[k].mean()) for k in names[1:]}})
    return 0


#: ``moldiff sample`` compiles the network by default where :func:`moldiff.runtime.choose_arithmetic`
#: says compiled steps are faster (bf16 on a CPU with native bf16; on an AVX2-only CPU compiled
#: reverse steps measured slower, docs/benchmarks.md) and from this many molecule-steps (n x steps)
#: on: 1,000 molecules x 50 steps and up, where the one-off compilation pays for itself.
COMPILE_AUTO_WORK = 20_000


def _check_sample_args(args) -> None:
    """The checks that need neither torch nor the model (they fail before anything loads); the
    options' defaults and their consistency are :meth:`moldiff.pipeline.SampleRequest.resolved`'s."""
    if args.n <= 0:
        raise UsageError(f"-n must be a positive number of molecules, got {args.n}")
    if args.steps <= 0:
        raise UsageError(f"--steps must be positive, got {args.steps}")
    if args.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    if args.num_atoms is not None and args.num_atoms < 2:
        raise UsageError(f"--num-atoms must be at least 2, got {args.num_atoms}")
    if args.threads is not None and args.threads <= 0:
        raise UsageError(f"--threads must be positive, got {args.threads}")
    if args.resample is not None and args.resample <= 0:
        raise UsageError(f"--resample must be positive, got {args.resample}")
    if args.resample_below is not None and not (math.isfinite(args.resample_below) and 0 <= args.resample_below <= 1):
        raise UsageError(f"--resample-below must be a time in [0, 1], got {args.resample_below}")
    if args.formula_draws is not None and not args.formula:
        raise UsageError("--formula-draws goes with --formula")
    if args.valence_guidance is not None and not (args.fragment or args.fragment_smiles):
        raise UsageError("--valence-guidance steers the atoms around a fragment: give --fragment or --fragment-smiles")
    args.condition = _parse_conditions(args.condition)
    if args.guidance is not None:
        if not (math.isfinite(args.guidance) and args.guidance >= 0):
            raise UsageError(f"--guidance must be a number >= 0 (0: unconditional, 1: plain conditional), got {args.guidance}")
        if args.condition is None:
            raise UsageError("--guidance goes with --condition (the properties to steer toward)")


def _parse_conditions(items) -> dict[str, float] | None:
    """``--condition NAME=VALUE[UNIT]`` options as name -> value in the default units
    (:data:`moldiff.data.properties.CONDITION_UNITS`); checked for syntax, property and unit only
    (the model's own properties and ranges are checked once it is loaded)."""
    if not items:
        return None
    from moldiff.data.properties import canonical_property, parse_condition_value

    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise UsageError(f"--condition {item!r}: write NAME=VALUE, e.g. --condition gap=6.0eV")
        try:
            key = canonical_property(name)
            if key in out:
                raise ValueError(f"{key} given twice")
            out[key] = parse_condition_value(key, value)
        except ValueError as exc:
            raise UsageError(f"--condition: {exc}") from None
    return out


def _keep_spec(args):
    """``--keep`` / ``--max-strain`` / ``--budget`` as a :class:`moldiff.filters.Keep` (``None``:
    no filtering); fails before anything loads."""
    if args.keep is None and args.max_strain is None:
        if args.budget is not None:
            raise UsageError("--budget goes with --keep or --max-strain")
        return None
    from moldiff.filters import Keep

    try:
        keep = Keep.parse(args.keep or "", args.max_strain, args.relax)
    except ValueError as exc:
        raise UsageError(f"--keep/--max-strain: {exc}") from None
    if args.budget is not None and args.budget < args.n:
        raise UsageError(f"--budget must be at least -n ({args.n}), got {args.budget}")
    if "posebusters" in keep.criteria:
        from moldiff.chemistry.plausibility import MissingExtraError, require_posebusters

        try:
            require_posebusters()
        except MissingExtraError as exc:
            raise UsageError(f"--keep posebusters: {exc}") from None
    return keep


def _sampling_pipeline(args):
    """The model ``moldiff sample`` runs (``--formula`` alone: the given-types model, ``--condition``:
    the conditional model, unless ``--checkpoint`` names one), configured for inference; returns
    ``(pipe, checkpoint folder)``."""
    import torch

    from moldiff.pipeline import (CONDITIONAL_MODEL, EVEN_VALENCE_MODEL, FORMULA_MODEL, PRETRAINED_DIR, PRETRAINED_ROOT,
                                  CheckpointError, load_pretrained, resolve_checkpoint, shipped_models)

    if args.checkpoint is None and args.condition:
        if CONDITIONAL_MODEL not in shipped_models():
            raise UsageError(f"--condition needs a property-conditional model and {CONDITIONAL_MODEL} is missing from "
                             f"{PRETRAINED_ROOT}; give --checkpoint RUN (train one: moldiff train --config "
                             "configs/qm9_conditional_small.yaml --run-dir RUN)")
        args.checkpoint = CONDITIONAL_MODEL  # named in the summary line once the conditions pass their checks
    if args.checkpoint is None and args.even_valence is not None and EVEN_VALENCE_MODEL in shipped_models():
        args.checkpoint = EVEN_VALENCE_MODEL  # a rule on Gaussian element features, which the default lacks
        print(f"--even-valence: using the shipped model {EVEN_VALENCE_MODEL} (Gaussian element features)",
              file=sys.stderr)
    if args.checkpoint is None and args.formula and not (args.fragment or args.fragment_smiles) \
            and FORMULA_MODEL in shipped_models():
        args.checkpoint = FORMULA_MODEL  # isomers: the given-types model is more often valid and ~10x faster
        print(f"--formula: using the shipped model {FORMULA_MODEL} (elements given to the network); "
              "--checkpoint qm9 for the joint model", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
    except CheckpointError:
        raise UsageError(f"no pretrained model is shipped in {PRETRAINED_DIR} yet; give --checkpoint DIR "
                         "(a checkpoint folder or a `moldiff train` run folder)") from None
    pipe = load_pretrained(checkpoint, device=args.device)
    if args.compile is None:  # auto: where compiled steps measured faster, and only for runs long enough
        from moldiff.runtime import choose_arithmetic

        arithmetic = choose_arithmetic(pipe.device, args.precision, "auto")
        args.compile = arithmetic.compile and args.n * args.steps >= COMPILE_AUTO_WORK
    pipe.configure_inference(precision=args.precision, compile=args.compile)
    if args.num_atoms is not None:
        pipe.check_sizes([args.num_atoms])
    return pipe, checkpoint


def _novelty_reference(args):
    """QM9 training SMILES for novelty, or ``None`` with ``--no-novelty``."""
    if not args.novelty:
        return None
    from moldiff.data.qm9 import default_cache_dir, training_smiles

    cache_folder = Path(_cache_dir(args) or default_cache_dir())

    def announce():  # only when neither the cache nor the shipped reference (same RDKit) serves
        print(f"building the novelty reference (QM9 training SMILES) once into {cache_folder}; about a minute ...",
              file=sys.stderr, flush=True)

    try:
        return training_smiles(_cache_dir(args), on_build=announce)
    except Exception as exc:  # noqa: BLE001 - say what to do instead
        raise UsageError(f"cannot load QM9 training SMILES for novelty ({exc}); use --no-novelty") from None


def cmd_sample(args) -> int:
    # Parse, call, save: every check that needs no model runs before torch and RDKit are imported.
    _check_sample_args(args)
    _check_plausibility_args(args)
    keep = _keep_spec(args)
    folder, files = _output_files(args.output)
    if args.relax:
        files["relaxed"] = files["sdf"].with_name(f"{files['sdf'].stem}_relaxed.sdf")
    _check_writable(folder, files)
    _check_sampler_name(args.sampler)
    args.device = _check_device(args.device)

    pipe, checkpoint = _sampling_pipeline(args)
    from moldiff.diffusion.samplers import make_sampler
    from moldiff.pipeline import SampleRequest, evaluate_molecules, interpret

    make_sampler(args.sampler, pipe.schedule)  # a bad sampler fails here, not after loading data
    predictors = _sample_predictors(args, pipe)
    fragment = None
    if args.fragment or args.fragment_smiles:
        from moldiff.inpainting import Fragment

        fragment = Fragment.from_file(args.fragment) if args.fragment else Fragment.from_smiles(args.fragment_smiles)
    request = SampleRequest(args.n, steps=args.steps, sampler=args.sampler, seed=args.seed, num_atoms=args.num_atoms,
                            batch_size=args.batch_size, composition=args.composition, fragment=fragment,
                            formula=args.formula, resample=args.resample, resample_below=args.resample_below,
                            time_power=args.time_power,
                            noise_scale=args.noise_scale, valence_guidance=args.valence_guidance,
                            formula_draws=args.formula_draws, type_lag=args.type_lag, type_steps=args.type_steps,
                            condition=args.condition, guidance_scale=args.guidance, even_valence=args.even_valence)
    try:
        request = request.resolved(pipe)  # bad values and combinations fail here, before any sampling
    except ValueError as exc:  # say it with the option's name: "time_power ..." -> "--time-power ..."
        field, _, rest = str(exc).partition(" ")
        name = f"--{field.replace('_', '-')}" if hasattr(request, field) and "_" in field else field
        name = {"condition": "--condition", "condition:": "--condition:", "guidance_scale": "--guidance"}.get(field, name)
        raise UsageError(f"{name} {rest}") from None
    trained_on = (pipe.metadata or {}).get("dataset", "qm9")
    if args.novelty and trained_on != "qm9":  # novelty is against QM9's training set: meaningless here
        print(f"novelty not computed: the model was trained on {trained_on!r}, not QM9", file=sys.stderr)
        args.novelty = False
    reference = _novelty_reference(args)

    if args.compile and sys.stderr.isatty():
        print("compiling the network on the first step (PyTorch caches it: ~30 s on a new machine, a few s later)",
              file=sys.stderr, flush=True)
    t0 = time.monotonic()
    if keep is not None:
        return _sample_filtered(pipe, request, keep, args, reference, folder, files, checkpoint, t0, predictors)
    with _progress_bar(args.n, "sampling", "mol") as bar:
        def advance(done):  # after every network evaluation: move the bar to the molecules done
            bar.update(int(done) - bar.n)

        arrays = pipe.generate(request, on_step=advance)
    t1 = time.monotonic()
    with _progress_bar(args.n, "bonds + RDKit", "mol") as bar:
        molecules = interpret(arrays, fragment=fragment, progress=bar.update)
    report = evaluate_molecules(molecules, reference=reference)
    charged = _sample_charged(molecules, args)
    t2 = time.monotonic()
    valid = [(k, m.mol if m.mol is not None else (m.symbols, m.positions)) for k, m in enumerate(molecules) if m.valid]
    plausibility = _plausibility(valid, args)
    timing = {"seconds": round(t2 - t0, 3), "seconds_sampling": round(t1 - t0, 3)}
    if args.posebusters or args.relax:
        timing["seconds_plausibility"] = round(time.monotonic() - t2, 3)
    predicted = _sample_predictions(predictors, molecules, arrays)
    summary = _write_samples(folder, files, molecules, report, arrays, request, args, pipe, checkpoint, timing,
                             plausibility, charged=charged, predicted=predicted)
    _print_sample_summary(summary, report, arrays, files, args, t2 - t0, t1 - t0, charged=charged)
    return 0


def _sample_predictors(args, pipe):
    """``--predictor`` folders loaded and checked against the model before any sampling: every element
    the model places must be one the predictor reads. With ``--condition`` and no ``--predictor``, the
    shipped predictor (if this installation has one and it reads the model's elements) is used, so
    that conditional samples always come with their estimates; ``--no-predictor`` turns that off."""
    from moldiff.prediction import default_predictors

    folders = args.predictor
    if not folders and args.condition and not args.no_predictor:
        folders = default_predictors()
        if folders:
            shipped = _load_predictors(folders, pipe.device)
            if any(p.unknown_elements([str(e) for e in pipe.elements]) for p in shipped):
                return []  # a model of other elements than the shipped predictor's: no default estimates
            return shipped
    if not folders:
        return []
    predictors = _load_predictors(folders, pipe.device)
    for p in predictors:
        unknown = p.unknown_elements([str(e) for e in pipe.elements])
        if unknown:
            raise UsageError(f"--predictor {p.folder} does not know element(s) {', '.join(unknown)} that this model "
                             f"places (it knows {', '.join(p.model.config.elements)})")
    return predictors


def _sample_predictions(predictors, molecules, arrays, indices=None) -> dict | None:
    """The predictors' estimates for sampled ``molecules``: ``{"columns": {sample number: {column:
    value}}, "summary": JSON fields}``, or ``None`` without ``--predictor``. Values are in the units a
    condition is given in; with a condition, the MAE between target and estimate over the samples a
    predictor can read (finite coordinates), in those units and in EDM's Table 3 units."""
    if not predictors:
        return None
    import numpy as np

    from moldiff.data.properties import EDM_UNITS, condition_unit_factor
    from moldiff.prediction import condition_unit_values, estimate, mae_statement

    indices = list(range(len(molecules))) if indices is None else list(indices)
    columns = {k: {} for k in indices}
    summary = {"predictors": [mae_statement(p) for p in predictors], "mean": {}, "units": {}}
    condition = arrays.extra.get("condition") or {}
    for p in predictors:
        values, units = condition_unit_values(p, estimate(p, molecules), [len(m.symbols) for m in molecules])
        for j, (name, unit) in enumerate(zip(p.properties, units)):
            column = values[:, j]
            key = f"predicted_{name}_{_unit_slug(unit)}" if unit else f"predicted_{name}"
            for k, v in zip(indices, column.tolist()):
                columns[k][key] = "" if not math.isfinite(v) else float(f"{v:.6g}")
            scored = np.isfinite(column)
            summary["units"][name] = unit
            summary["mean"][name] = float(column[scored].mean()) if scored.any() else None
            if name in condition and scored.any():
                asked = condition[name]
                target = np.array([asked[k] if isinstance(asked, list) else asked for k in indices], dtype=np.float64)
                mae = float(np.abs(column - target)[scored].mean())
                entry = {"mae": mae, "unit": unit, "n_scored": int(scored.sum()), "n_unscored": int((~scored).sum())}
                if p.edm_targets:
                    entry.update(mae_edm_units=mae * condition_unit_factor(name), edm_unit=EDM_UNITS[name])
                summary.setdefault("mae_vs_target", {})[name] = entry
    return {"columns": columns, "summary": summary}


def _sample_charged(molecules, args):
    """Charge-aware stability of sampled molecules, ``(on EDM's table bonds, on the model's own bonds
    or None)``, when ``--charged-stability`` asks for it or the model generates formal charges;
    ``None`` otherwise. Positions in the reports follow ``molecules``."""
    if not molecules or not (args.charged_stability or any(m.formal_charges is not None for m in molecules)):
        return None
    from moldiff.chemistry.metrics import evaluate_charged_stability

    table = evaluate_charged_stability(molecules)
    own = (evaluate_charged_stability(molecules, own_bonds=True)
           if any(m.generated_bonds is not None for m in molecules) else None)
    return table, own


def _sample_filtered(pipe, request, keep, args, reference, folder, files, checkpoint, t0, predictors=()) -> int:
    """``moldiff sample --keep ... / --max-strain``: draw in rounds until ``-n`` molecules pass or the
    budget is spent; write only the kept molecules, report the EDM metrics of every draw."""
    from dataclasses import fields

    from moldiff.chemistry.plausibility import summarize_plausibility
    from moldiff.filters import sample_passing
    from moldiff.pipeline import evaluate_molecules

    options = {f.name: getattr(request, f.name) for f in fields(request) if f.init and f.name != "n"}
    bar = _progress_bar(None, "sampling (round 1)", "mol")

    def advance(done):
        bar.update(int(done) - bar.n)

    def on_round(outcome, size):
        bar.reset()
        bar.set_description(f"sampling (round {outcome.rounds + 1})")
        print(f"round {outcome.rounds}: drew {size}, {len(outcome.kept)} of {outcome.requested} kept so far "
              f"(pass rate {100 * outcome.pass_rate:.1f}%, {len(outcome.drawn)} of {outcome.budget} budget drawn)",
              file=sys.stderr, flush=True)

    try:
        with bar:
            outcome = sample_passing(pipe, args.n, keep, budget=args.budget, workers=args.workers,
                                     checks=args.posebusters, relax=args.relax, on_round=on_round, on_step=advance,
                                     energy_conformers=args.pb_conformers, **options)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    t1 = time.monotonic()
    report = evaluate_molecules(outcome.drawn, reference=reference)  # the model's metrics: every draw
    charged = _sample_charged(outcome.drawn, args)
    plausible = {i: outcome.plausibility[i] for i in outcome.kept_indices if i in outcome.plausibility}
    plausibility = (plausible, summarize_plausibility(list(plausible.values()), checks=args.posebusters,
                                                      forcefield=args.relax, energy_conformers=args.pb_conformers)
                    if (args.posebusters or args.relax) else {})
    timing = {"seconds": round(time.monotonic() - t0, 3), "seconds_sampling_and_filtering": round(t1 - t0, 3)}
    summary = _write_samples(folder, files, outcome.kept, report, outcome.arrays[0], request, args, pipe, checkpoint,
                             timing, plausibility, indices=outcome.kept_indices,
                             extra={"filter": outcome.to_dict(), "metrics_over": f"all {len(outcome.drawn)} drawn samples"},
                             charged=charged,
                             predicted=_sample_predictions(predictors, outcome.kept, outcome.arrays[0],
                                                           outcome.kept_indices))
    _print_sample_summary(summary, report, outcome.arrays[0], files, args, time.monotonic() - t0, t1 - t0,
                          drawn=len(outcome.drawn), charged=charged)
    print(outcome.describe())
    if not outcome.reached:
        print(f"warning: only {len(outcome.kept)} of {outcome.requested} molecules passed within the budget of "
              f"{outcome.budget} draws (--budget)", file=sys.stderr)
    return 0


def _write_samples(folder, files, molecules, report, arrays, request, args, pipe, checkpoint, timing,
                   plausibility=({}, {}), indices=None, extra=None, charged=None, predicted=None) -> dict:
    """Write the SDF, CSV, PNG and JSON (and with ``--relax`` the relaxed SDF) of a sampling run, all
    together and atomically; returns the JSON summary. ``indices``: each molecule's sample number
    (default its position; a filtered run passes the draw numbers of the kept molecules); ``extra``:
    more JSON fields; ``charged``: :func:`_sample_charged`'s reports, indexed by sample number;
    ``predicted``: :func:`_sample_predictions`' estimates (SD tags, CSV columns, JSON)."""
    indices = list(range(len(molecules))) if indices is None else list(indices)
    from moldiff.chemistry.io import write_csv, write_json, write_sdf
    from moldiff.chemistry.report import (SA_SCORE_NOTE, descriptor_row, display_smiles, drawing_unavailable, grid_image,
                                          sa_score_available, sd_record, write_png)

    fragment = request.fragment
    plausible, plausibility = plausibility
    tags = {"sampler": request.sampler, "steps": request.steps, "time_power": arrays.time_power,
            "noise_scale": arrays.noise_scale, "seed": request.seed}
    estimates = predicted["columns"] if predicted else {}
    records = [sd_record(m.mol, m.symbols, m.positions,
                         _sample_tags(m, k, tags | _condition_columns(arrays, k) | estimates.get(k, {})),
                         f"moldiff sample {k}")
               for k, m in zip(indices, molecules)]
    rows = []
    for k, m in zip(indices, molecules):
        row = {"index": k, "SMILES": m.smiles, "valid": int(m.valid), "mol_stable": int(m.mol_stable)}
        row.update(descriptor_row(m.mol if m.valid else None))
        row.update(num_atoms=m.num_atoms, formula=m.formula, rdkit_SMILES=m.rdkit_smiles, bonds=m.bonds, reason=m.reason)
        row.update(_condition_columns(arrays, k))  # property-conditional sampling: the values asked for
        row.update(estimates.get(k, {}))  # --predictor: the properties estimated for this molecule
        if fragment is not None:
            row.update(fragment_retained=int(bool(m.fragment_retained)), fragment_rmsd=m.fragment_rmsd)
        if m.own_valid is not None:
            row.update(own_bonds_valid=int(m.own_valid), own_bonds_mol_stable=int(m.own_mol_stable),
                       own_bonds_SMILES=m.own_smiles, own_bonds_reason=m.own_reason)
        if charged is not None:
            row["mol_stable_charged"] = int(charged[0].per_molecule[k].mol_stable)
            if charged[1] is not None:
                row["own_bonds_mol_stable_charged"] = int(charged[1].per_molecule[k].mol_stable)
        if k in plausible:
            row.update(plausible[k].row(checks=args.posebusters))
        rows.append(row)
    preview = [(k, m.mol) for k, m in zip(indices, molecules) if m.valid and m.mol is not None][:_PREVIEW_MOLECULES]
    no_drawing = drawing_unavailable()
    if no_drawing is None:
        image = grid_image([mol for _, mol in preview], [f"#{k} {display_smiles(mol) or ''}" for k, mol in preview],
                           empty_text=f"no valid molecules among {request.n} samples")
    else:  # RDKit without its drawing libraries (a headless server): everything but the preview
        image, preview = None, []
        stale_png = files.pop("png")
    # The SA scorer loads a 1 s fragment table; only needed (and only reported) with valid molecules.
    if not any(m.valid for m in molecules):
        sa_note = "not computed (no valid molecules)"
    else:
        sa_note = "RDKit Contrib sascorer" if sa_score_available() else SA_SCORE_NOTE
    summary = report.to_dict(per_molecule=False) | {
        "n_faults": sum(m.fault for m in molecules),
        "n_coordinates_only": sum(m.bonds == "none" for m in molecules),
        **tags,
        "composition": request.composition,
        "num_atoms": args.num_atoms,
        "batch_size": request.batch_size,
        "device": str(pipe.device),
        "precision": pipe.inference_precision,
        "compile": args.compile,
        "checkpoint": str(checkpoint),
        **timing,
        "protocol": "EDM (Hoogeboom et al. 2022): table bonds, stability, validity, uniqueness, novelty",
        "sa_score": sa_note,
        "preview": len(preview),
        "records": len(records),
        **(extra or {}),
    }
    if molecules:  # EDM's validity counts a cloud that fell apart into lone atoms as valid: say how many hold together
        from moldiff.chemistry.diagnostics import geometry_diagnostics

        summary["one_piece"] = geometry_diagnostics([(m.symbols, m.positions) for m in molecules])["one_piece"]
    if request.route != "plain":
        summary["conditioning"] = {"fragment": args.fragment or args.fragment_smiles, "formula": args.formula,
                                   "resample": int(arrays.extra["resample"]),
                                   "valence_guidance": arrays.extra["valence_guidance"]}
        if "formula_route" in arrays.extra:
            route = arrays.extra["formula_route"]
            summary["conditioning"].update(formula_drawn=route.count("drawn"), formula_given=route.count("given"),
                                           formula_clamped=route.count("clamped"),
                                           formula_draws_used=int(arrays.extra["formula_draws_used"]))
    if request.route == "plain":  # what the loop ran: late resampling and network calls per molecule
        summary.update(resample=int(arrays.extra.get("resample", 1)),
                       resample_below=float(arrays.extra.get("resample_below", 1.0)),
                       network_evaluations=int(arrays.extra.get("network_evaluations", request.steps + 1)))
    if "even_valence" in arrays.extra:  # compositions kept even: how many molecules it changed
        summary["even_valence"] = {"t_start": arrays.extra["even_valence"],
                                   "molecules_steered": int((arrays.extra["even_valence_steered"] > 0).sum())}
    if arrays.extra.get("type_lag"):  # elements behind the coordinates: what the sampler ran
        summary.update(type_lag=float(arrays.extra["type_lag"]), type_steps=int(arrays.extra["type_steps"]),
                       network_evaluations=int(arrays.extra["network_evaluations"]))
    if "condition" in arrays.extra:
        summary["condition"] = {"properties": dict(arrays.extra["condition"]), "units": dict(arrays.extra["condition_units"]),
                                "guidance_scale": arrays.extra["guidance_scale"],
                                "num_atoms": "given (--num-atoms)" if args.num_atoms is not None else
                                "drawn from the sizes of the training molecules nearest to the condition"}
    if predicted:
        summary["predicted"] = predicted["summary"]
    if fragment is not None and molecules:
        summary["fragment_retention"] = sum(bool(m.fragment_retained) for m in molecules) / len(molecules)
    if molecules and any(m.own_valid is not None for m in molecules):  # a model that generates bonds: judged on them too
        summary["own_bonds"] = {
            "validity": sum(bool(m.own_valid) for m in molecules) / len(molecules),
            "mol_stable": sum(bool(m.own_mol_stable) for m in molecules) / len(molecules),
            "protocol": "the model's own bonds and formal charges: RDKit sanitization, EDM's valence rule; "
                        "every sample counted",
        }
    if charged is not None:
        generated = any(m.formal_charges is not None for m in molecules)
        summary = _charged_summary(summary, charged[0], "generated by the model" if generated else
                                   "none (the model generates neutral atoms)", 0)
        if charged[1] is not None and "own_bonds" in summary:
            summary["own_bonds"]["mol_stable_charged"] = charged[1].mol_stable
    summary |= plausibility
    writers = {
        "sdf": lambda path: write_sdf(path, records),
        "csv": lambda path: write_csv(path, rows),
        "png": lambda path: write_png(path, image),
        "json": lambda path: write_json(path, {k: v for k, v in summary.items() if k != "preview"}),
    }
    if no_drawing is not None:
        del writers["png"]
        summary["png"] = f"not written: {no_drawing}"
    if "relaxed" in files:
        by_index = dict(zip(indices, molecules))
        relaxed = _relaxed_records(plausible, {k: {"SMILES": by_index[k].smiles} for k in plausible})
        summary["relaxed_records"] = len(relaxed)
        writers["relaxed"] = lambda path: write_sdf(path, relaxed)
    _write_outputs(folder, files, writers)
    if no_drawing is not None:
        stale_png.unlink(missing_ok=True)  # a preview of earlier samples must not sit beside these
    return summary


def _condition_columns(arrays, k: int) -> dict:
    """SD tags / CSV columns of property-conditional sample ``k``: ``target_<property>_<unit>`` per
    conditioned property and ``guidance_scale``; empty for other samples."""
    if "condition" not in arrays.extra:
        return {}
    units = arrays.extra["condition_units"]
    out = {f"target_{name}_{_unit_slug(units[name])}": value[k] if isinstance(value, list) else value
           for name, value in arrays.extra["condition"].items()}
    return out | {"guidance_scale": arrays.extra["guidance_scale"]}


def _charged_line(summary: dict, n_charged: int) -> str:
    """The line under a metrics table that says how charge-aware stability was scored."""
    return (f"charges allowed: valences per (element, formal charge) after MiDi's table, on EDM's distance-table "
            f"bonds; charges: {summary['charged_stability']['charges']} ({n_charged} molecules carry one)")


def _own_charged_clause(own: dict) -> str:
    """', molecule stable (charges allowed) X%' for an own-bonds summary that has it, else ''."""
    if "mol_stable_charged" not in own:
        return ""
    return f", molecule stable (charges allowed) {100 * own['mol_stable_charged']:.2f}%"


def _print_sample_summary(summary, report, arrays, files, args, seconds, seconds_sampling, drawn=None,
                          charged=None) -> None:
    from moldiff.chemistry.metrics import format_table
    from moldiff.chemistry.report import SA_SCORE_NOTE

    late = (f"resampled x{summary['resample']} below t = {summary['resample_below']:g}, "
            f"{summary['network_evaluations']} network calls per molecule, " if summary.get("resample", 1) > 1 else "")
    print(f"sampled {args.n if drawn is None else drawn} molecules in {seconds:.1f} s ({summary['sampler']}, {summary['steps']} steps, time power "
          f"{summary['time_power']:g}, noise scale {summary['noise_scale']:g}, {late}"
          f"{'compositions from the training data, ' if summary['composition'] == 'data' else ''}seed {summary['seed']}, "
          f"device {summary['device']}; denoising {seconds_sampling:.1f} s)")
    print(format_table(report, charged=None if charged is None else charged[0]))
    if charged is not None:
        print(_charged_line(summary, charged[0].n_charged))
    if "condition" in summary:
        c = summary["condition"]
        asked = ", ".join(f"{k} = {v:g} {c['units'][k]}" if not isinstance(v, list) else f"{k} per molecule"
                          for k, v in c["properties"].items())
        from moldiff.pipeline import CONDITIONAL_MODEL

        model = f" (the shipped model {CONDITIONAL_MODEL})" if args.checkpoint == CONDITIONAL_MODEL else ""
        print(f"conditioned on {asked}{model}; guidance scale {c['guidance_scale']:g}; atom counts {c['num_atoms']}")
    if "predicted" in summary:
        pr = summary["predicted"]
        for line in pr["predictors"]:
            print(line)
        for name, e in pr.get("mae_vs_target", {}).items():
            edm = f" ({e['mae_edm_units']:.4g} {e['edm_unit']}, EDM's Table 3 unit)" if "mae_edm_units" in e else ""
            print(f"{name}: MAE between target and predicted {e['mae']:.4g} {e['unit']}{edm} over {e['n_scored']} "
                  f"samples" + (f" ({e['n_unscored']} unreadable: non-finite coordinates)" if e["n_unscored"] else ""))
        means = ", ".join(f"{k} {v:.4g} {pr['units'][k]}" for k, v in pr["mean"].items() if v is not None)
        print(f"predicted properties, mean over the samples: {means}")
    if "even_valence" in summary:
        ev = summary["even_valence"]
        print(f"even valence sums kept from t = {ev['t_start']:g}: {ev['molecules_steered']} of {len(arrays.positions)} "
              f"molecules steered (the metrics above score a constrained sampler, not EDM's)")
    if "fragment_retention" in summary:
        print(f"fragment retained (substructure match): {100 * summary['fragment_retention']:.2f}%")
    if "formula_route" in arrays.extra:
        c = summary["conditioning"]
        print(f"formula {arrays.extra['formula']}: {c['formula_drawn']} drawn from unconditional samples, "
              f"{c['formula_given']} sampled with the elements given to the network, {c['formula_clamped']} clamped (RePaint)")
    if "own_bonds" in summary:
        own = summary["own_bonds"]
        with_charges = _own_charged_clause(own)
        print(f"with the model's own bonds: molecule stable {100 * own['mol_stable']:.2f}%{with_charges}, "
              f"valid {100 * own['validity']:.2f}% (the table above: EDM's distance-table bonds)")
    if "one_piece" in summary:
        print(f"in one piece: {100 * summary['one_piece']:.2f}% (EDM's table bonds; its validity also counts a molecule "
              "that fell apart into lone atoms)")
    print(f"numerical faults: {summary['n_faults']}; coordinates-only records (no bonds): {summary['n_coordinates_only']}")
    if summary["sa_score"] == SA_SCORE_NOTE:
        print(f"note: {SA_SCORE_NOTE}")
    if "posebusters" in summary or "relax" in summary:
        from moldiff.chemistry.plausibility import format_plausibility

        print(format_plausibility(summary))
    if drawn is not None:
        print(f"(the metrics above are over all {drawn} molecules drawn; the files hold only the ones kept)")
    if "png" in summary:
        print(f"note: no PNG preview: {summary['png'][len('not written: '):]}")
    preview = f"{files['png']} ({summary['preview']} molecules), " if "png" in files else ""
    print(f"wrote {files['sdf']} ({summary['records']} records), {files['csv']}, {preview}{files['json']}"
          + (f", {files['relaxed']} ({summary['relaxed_records']} relaxed)" if "relaxed" in files else ""))


# ---------------------------------------------------------------------------- predict
_TRAIN_PREDICTOR = "python scripts/train_predictor.py --run-dir runs/predictor (docs/properties.md), then --predictor runs/predictor/best"


def _unit_slug(unit: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "_", unit.replace("^", "")).strip("_")  # Bohr^3 -> Bohr3, cal/(mol K) -> cal_mol_K


def cmd_predict(args) -> int:
    """``moldiff predict FILE``: property estimates per molecule (CSV), each predictor's test MAE first."""
    from moldiff.chemistry.io import read_molecules, write_csv
    from moldiff.prediction import default_predictors, estimate, mae_statement, molecule_values
    from moldiff.runtime import resolve_device

    folders = args.predictor or default_predictors()
    if not folders:
        raise UsageError(f"no property predictor is shipped yet; give --predictor DIR (train one: {_TRAIN_PREDICTOR})")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.csv and Path(args.csv).is_dir():
        raise UsageError(f"--csv {args.csv}: it is a folder; give a file name")
    predictors = _load_predictors(folders, resolve_device(args.device))
    records = read_molecules(args.file)
    bad = [(k, r) for k, r in enumerate(records) if r.error is not None or not r.symbols]
    if bad:
        k, r = bad[0]
        why = r.error or "it has no atoms"
        raise UsageError(f"{args.file}: {len(bad)} of {len(records)} records cannot be used; first, record {k} ({r.name!r}): {why}")
    rows = [{"index": k, "name": r.name, "num_atoms": len(r.symbols)} for k, r in enumerate(records)]
    num_atoms = [len(r.symbols) for r in records]
    for p in predictors:
        for k, r in enumerate(records):
            unknown = p.unknown_elements(r.symbols)
            if unknown:
                raise UsageError(f"{args.file}: record {k} ({r.name!r}) has element(s) {', '.join(unknown)}, which the "
                                 f"predictor {p.folder} does not know (it knows {', '.join(p.model.config.elements)})")
        values = molecule_values(p, estimate(p, records, args.batch_size), num_atoms)
        for j, (name, unit) in enumerate(zip(p.properties, p.units)):
            for row, v in zip(rows, values[:, j].tolist()):
                row[f"{name}_{_unit_slug(unit)}" if unit else name] = f"{v:.6g}"
    for p in predictors:
        print(f"# {mae_statement(p)}")
    if args.csv:
        write_csv(args.csv, rows)
        print(f"# wrote {args.csv}: {len(rows)} molecules, {len(rows[0]) - 3} properties")
    else:
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return 0


def _load_predictors(folders, device):
    """:func:`moldiff.prediction.load_predictors`, its errors as one-line usage errors."""
    from moldiff.models.property import PredictorError
    from moldiff.prediction import load_predictors

    try:
        return load_predictors(folders, device)
    except (PredictorError, ValueError) as exc:
        raise UsageError(str(exc)) from None


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moldiff", description="E(3)-equivariant diffusion for 3D molecules")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="build the processed dataset cache and print a summary",
                       description="`moldiff data` or `moldiff data qm9`: build the QM9 cache. `moldiff data sdf "
                       "FILE.sdf`: read your own 3D molecules (hydrogens as atoms) into a cached training set, "
                       "report what was kept and skipped (docs/own_data.md).")
    d.add_argument("name", nargs="?", default="qm9", metavar="DATASET", help="qm9 (default) or sdf")
    d.add_argument("file", nargs="?", metavar="FILE", help="with sdf: the .sdf file (one record per conformer)")
    d.add_argument("--name", dest="dataset_name", metavar="NAME", help="sdf: cache name (default: the file's stem); "
                   "train with --data NAME")
    d.add_argument("--max-atoms", type=int, metavar="N", help="sdf: skip conformers with more atoms (default 200)")
    d.add_argument("--elements", metavar="H,C,N,...", help="sdf: allowed elements (default: those EDM's bond and "
                   "valence tables cover: H,B,C,N,O,F,Si,P,S,Cl,As,Br,I)")
    d.add_argument("--split", metavar="TRAIN,VALID,TEST", help="sdf: fractions of molecules (default 0.8,0.1,0.1)")
    d.add_argument("--seed", type=int, help="sdf: seed of the split (default 0)")
    d.add_argument("--group-by", choices=("smiles", "inchikey"), help="sdf: what makes conformers one molecule "
                   "(default smiles: canonical SMILES with stereo)")
    d.add_argument("--cache-dir", help="processed-data cache (default ~/.cache/moldiff or $MOLDIFF_CACHE)")
    d.set_defaults(func=cmd_data)

    e = sub.add_parser("evaluate", help="EDM-protocol metrics for an SDF/XYZ file or a dataset split")
    e.add_argument("path", nargs="?", help="molecules to score (.sdf or .xyz)")
    e.add_argument("--dataset", help="score real molecules instead, e.g. qm9:test")
    e.add_argument("--json", help="also write the metrics as JSON here")
    e.add_argument("--no-novelty", dest="novelty", action="store_false", help="skip novelty (no training-set reference)")
    e.add_argument("--csv", help="also write one row per molecule here (EDM verdict, PoseBusters and relaxation columns)")
    e.add_argument("--workers", type=int, default=1, help="processes for RDKit work, PoseBusters and relaxation (default 1)")
    e.add_argument("--cache-dir")
    e.add_argument("--subsample", type=int, metavar="N", help="score a random N of the molecules (seeded by --seed), "
                   "e.g. --dataset qm9:test --subsample 1000")
    e.add_argument("--seed", type=int, default=0, help="seed of --subsample (default 0)")
    e.add_argument("--charged-stability", action="store_true", help="also report stability with charged atoms "
                   "allowed (valences per element and formal charge, after MiDi's table; charges from the SDF, "
                   "neutral for XYZ and datasets), beside EDM's numbers")
    _add_plausibility_options(e)
    e.add_argument("--relaxed-sdf", metavar="PATH", help="with --relax: where the relaxed molecules go "
                   "(default: FILE_relaxed.sdf beside FILE; none for --dataset unless given)")
    e.set_defaults(func=cmd_evaluate)

    t = sub.add_parser("train", help="train a model (torchrun-compatible for multi-process DDP)",
                       description="Train a model. SIGTERM or SIGINT (Ctrl-C) saves a checkpoint and exits with "
                                   "128 + the signal's number (143, 130); --resume continues from it.")
    t.add_argument("--config", help="YAML config, e.g. configs/qm9_small.yaml")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. --set optim.lr=3e-4")
    t.add_argument("--data", metavar="FILE.sdf|NAME", help="train on your own molecules: an .sdf file or a dataset "
                   "built by `moldiff data sdf` (sets data.dataset; default qm9; docs/own_data.md)")
    t.add_argument("--run-dir", required=True, help="where checkpoints and logs go")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    t.add_argument("--overwrite", action="store_true", help="start afresh even if --run-dir holds a run")
    t.add_argument("--init-from", metavar="MODEL", help="start from this model's weights instead of random ones: a "
                   "shipped name (qm9), a pipeline or run folder, or a checkpoint.pt; elements are matched by symbol "
                   "(sets train.init_from; docs/own_data.md)")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: train.num_threads)")
    t.set_defaults(func=cmd_train)

    n = sub.add_parser("nll", help="EDM's test NLL (variational bound, nats per molecule) of a model on QM9; for "
                       "models with categorical elements and bonds (qm9-bonds) the bound on p(x, elements, charges, "
                       "bonds, N), a different quantity")
    n.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder, run folder or shipped model name "
                   "(default: the shipped qm9 model, whose bound is EDM's quantity)")
    n.add_argument("--dataset", default="qm9:test", help="qm9:test (default), qm9:valid or qm9:train")
    n.add_argument("-n", type=int, help="first N molecules of the split (default: all)")
    n.add_argument("--seed", type=int, default=0, help="noise and time draws (default 0)")
    n.add_argument("--batch-size", type=int, default=128)
    n.add_argument("--device", default="auto", help="auto (default: cuda when a CUDA GPU is available, else cpu), "
                   "cpu, cuda or cuda:N")
    n.add_argument("--threads", type=int)
    n.add_argument("--json", help="also write the result as JSON here")
    n.add_argument("--cache-dir")
    n.set_defaults(func=cmd_nll)

    s = sub.add_parser(
        "sample",
        help="sample molecules from a trained model into SDF + CSV + PNG + JSON",
        description="Sample molecules and write OUT.sdf (every sample, SD tags SMILES/valid/mol_stable/"
        "num_atoms/sampler/steps/seed/reason; invalid ones kept, coordinates-only when no bonds fit), "
        "OUT.csv (SMILES, EDM flags, QED, SA score, MW, logP of valid molecules), OUT.png (first 16 valid "
        "molecules in 2D) and OUT.json (EDM-protocol metrics). Files are written all together at the end; "
        "a bad option or failure writes nothing.",
    )
    s.add_argument("-n", type=int, default=100, help="number of molecules (default 100)")
    s.add_argument("-o", "--output", default="samples.sdf", metavar="PATH",
                   help="output .sdf file (default samples.sdf); the .csv, .png and .json go beside it with the "
                   "same name. A path without .sdf (e.g. out/samples) is a folder, created if needed, that "
                   "receives samples.sdf, samples.csv, samples.png and samples.json")
    s.add_argument("--steps", type=int, default=50, metavar="K", help="reverse diffusion steps (default 50)")
    s.add_argument("--sampler", default="ancestral", metavar="NAME", help="ancestral (default), ddim, or ddim:<eta> e.g. ddim:0.5")
    s.add_argument("--time-power", type=float, default=None, metavar="P",
                   help="time grid t_k = (k/K)^P: 1 is EDM's uniform grid, larger puts more steps at low noise "
                   "(default 2, moldiff.sampling.DEFAULT_TIME_POWER; 1 with --fragment*/--formula, where it "
                   "measured better; docs/experiments.md)")
    s.add_argument("--noise-scale", type=float, default=None, metavar="L",
                   help="factor in [0, 1] on each reverse step's fresh noise: 1 is EDM's ancestral sampler, lower "
                   "is lower-temperature sampling (default 0.5, moldiff.sampling.DEFAULT_NOISE_SCALE, and "
                   "moldiff.inpainting.DEFAULT_INPAINT_NOISE_SCALE with --fragment*/--formula; docs/experiments.md)")
    s.add_argument("--composition", choices=("model", "data"), default=None,
                   help="model: the network generates each molecule's elements with its geometry, as EDM; "
                   "data: each molecule gets the composition of a training molecule of its size and the network "
                   "places the atoms (models trained with diffusion.known_types_prob > 0; docs/experiments.md). "
                   "Default: model, or data for a model trained with every molecule's types given")
    s.add_argument("--type-lag", type=float, default=0.0, metavar="D",
                   help="elements D behind the coordinates in noise time, decided at the end from the nearly final "
                   "geometry (models trained with model.type_time; docs/experiments.md session 13; default 0: off)")
    s.add_argument("--type-steps", type=int, default=None, metavar="M",
                   help="with --type-lag: steps the elements take alone at the end (default: steps x D)")
    s.add_argument("--even-valence", type=float, default=None, metavar="T",
                   help="from noise time T in [0, 1] down, keep each molecule's elements to an even valence sum "
                   "(an odd one can never be stable): its cheapest atom moves to an element of the other parity "
                   "(0: at the final decode only; docs/experiments.md session 16; default: off, EDM's sampler)")
    s.add_argument("--seed", type=int, default=0, help="same seed, same molecules (default 0)")
    s.add_argument("--num-atoms", type=int, metavar="N", help="atoms per molecule (default: drawn from the training sizes)")
    s.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder, a `moldiff train` run folder, or the "
                   "name of a model shipped with moldiff (moldiff.pipeline.shipped_models(); default: qm9-bonds, and "
                   "qm9-given for --formula without a fragment, qm9-cond for --condition, qm9 for --even-valence)")
    s.add_argument("--device", default="auto", help="auto (default: cuda when a CUDA GPU is available, else cpu), "
                   "cpu, cuda or cuda:N")
    s.add_argument("--batch-size", type=int, default=1000, metavar="B", help="molecules denoised together (default 1000)")
    s.add_argument("--no-novelty", dest="novelty", action="store_false",
                   help="skip novelty (otherwise compared with the cached QM9 training SMILES)")
    s.add_argument("--threads", type=int, metavar="T", help="torch CPU threads (default: torch's choice)")
    s.add_argument("--cache-dir", metavar="DIR", help="processed-data cache for the novelty reference")
    s.add_argument("--charged-stability", action="store_true", help="also report stability with charged atoms "
                   "allowed (valences per element and formal charge, after MiDi's table), beside EDM's numbers; "
                   "on by itself for models that generate formal charges")
    s.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="auto",
                   help="network arithmetic: auto (default: bf16 autocast on CPUs with native bf16, AMX or "
                   "AVX512-BF16, else fp32; same quality, docs/experiments.md), fp32 or bf16")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the network: ~20-60 s once (cached on disk by PyTorch), then faster steps. "
                   f"Default: on for CPU runs of at least {COMPILE_AUTO_WORK:,} molecule-steps (n x steps), else off")
    s.add_argument("--resample", type=int, default=None, metavar="R",
                   help="resampling rounds per step (RePaint's: the step is taken R times, the state pushed back up "
                   "by the forward process in between). Default: 10 on every step with --fragment*/--formula "
                   "(cost x R); in plain sampling 2 on the steps below --resample-below (+22 network calls at 50 steps; "
                   "1 turns it off)")
    s.add_argument("--resample-below", type=float, default=None, metavar="T",
                   help="resample only the steps that start at noise time <= T (default: 0.2 in plain sampling, "
                   "where the network re-decides elements and bonds on a nearly final geometry; 1, every step, "
                   "with --fragment*/--formula)")
    g = s.add_argument_group("conditioning (inpainting, docs/inpainting.md)")
    frag = g.add_mutually_exclusive_group()
    frag.add_argument("--fragment", metavar="FILE", help="every molecule contains this fragment (.sdf/.mol/.xyz, 3D) at its geometry")
    frag.add_argument("--fragment-smiles", metavar="SMILES", help="fragment as SMILES, embedded in 3D by RDKit (heavy atoms only)")
    g.add_argument("--formula", metavar="FORMULA", help="composition of every molecule, e.g. C7H8O (isomer generation)")
    g.add_argument("--formula-draws", type=int, default=None, metavar="K",
                   help="with --formula alone: draw up to K unconditional molecules per requested one and keep exact "
                   "matches before clamping types for the rest, or giving them to a model trained with given types "
                   "(default 20; 0 = no drawing)")
    g.add_argument("--valence-guidance", type=float, default=None, metavar="G",
                   help="steer the free atoms so each fragment atom gets as many new neighbours as it has open "
                   "valences (default: see docs/inpainting.md; 0 = off)")
    c = s.add_argument_group("property conditioning (models trained with model.properties; docs/properties.md)")
    c.add_argument("--condition", action="append", metavar="NAME=VALUE[UNIT]",
                   help="every molecule should have this property value; repeat for several. NAME is one of alpha, "
                   "gap, homo, lumo, mu, cv (EDM's QM9 properties; the model must be trained on it). Units, default "
                   "first: alpha Bohr3; gap/homo/lumo eV, meV or Ha; mu D; cv cal/mol/K (the molecule's whole heat "
                   "capacity). E.g. --condition gap=6.0eV --condition mu=1.5. Values outside the range seen in "
                   "training are refused. Without --num-atoms, each molecule's atom count is drawn from the 50 "
                   "training molecules nearest to the condition")
    c.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance scale W >= 0 with --condition: eps_uncond + W (eps_cond - eps_uncond); "
                   "0 = the unconditional model, 1 = the plain conditional model, above 1 steers harder (one network "
                   "call on a doubled batch, 2-3x the time; default 2: on qm9-cond 15-25%% lower property error than 1 "
                   "for 2.5 points of molecule stability)")
    c.add_argument("--predictor", action="append", metavar="DIR",
                   help="a property predictor folder (as for `moldiff predict`; repeatable): each molecule's estimated "
                   "properties go into the SD tags and CSV as predicted_<property>_<unit> (in --condition's units), and "
                   "with --condition the JSON and the summary give the MAE between target and estimate. A shipped "
                   "predictor may be named (qm9-props, used by default with --condition)")
    c.add_argument("--no-predictor", action="store_true",
                   help="with --condition: do not add the shipped predictor's estimates")
    _add_plausibility_options(s)
    s.add_argument("--workers", type=int, default=1, metavar="W",
                   help="processes for --posebusters / --relax / --keep posebusters / --max-strain (default 1)")
    f = s.add_argument_group("filters for pipelines (docs/plausibility.md)")
    f.add_argument("--keep", metavar="CRITERIA", help="write -n molecules that pass all of these (comma list of valid, "
                   "stable, unique, posebusters), drawing in rounds until -n pass or --budget draws are spent; the "
                   "metrics table still covers every draw")
    f.add_argument("--max-strain", type=float, metavar="KCAL", help="also keep only molecules whose strain energy "
                   "(force-field energy as generated minus relaxed; MMFF94 unless --relax uff) is at most KCAL kcal/mol")
    f.add_argument("--budget", type=int, metavar="N", help="with --keep/--max-strain: most molecules drawn in all "
                   "(default 10 x -n); the output says when it ran out first")
    s.set_defaults(func=cmd_sample)

    r = sub.add_parser("predict", help="property estimates (EDM's six QM9 properties) for the molecules of a file",
                       description="Print, or write as CSV, a trained property predictor's estimates for every molecule "
                       "of an .sdf or .xyz file (3D, hydrogens as atoms), in EDM's units: alpha Bohr^3; gap, HOMO, LUMO meV; "
                       "mu D; Cv cal/(mol K). The first lines state each predictor's test MAE. A bad file, an unreadable "
                       "record or an element the predictor does not know stops the command before anything is written "
                       "(docs/properties.md).")
    r.add_argument("file", metavar="FILE", help="molecules (.sdf or .xyz)")
    r.add_argument("--predictor", action="append", metavar="DIR", help="a predictor folder (config.json + model.pt, "
                   "e.g. RUN/best of scripts/train_predictor.py) or a shipped predictor's name (default: qm9-props when "
                   "shipped); repeat to combine predictors of different properties")
    r.add_argument("--csv", metavar="OUT", help="write the table here instead of printing it")
    r.add_argument("--device", default="auto", help="auto (default: cuda when a CUDA GPU is available, else cpu), cpu, cuda or cuda:N")
    r.add_argument("--batch-size", type=int, default=256, metavar="B", help="molecules per network call (default 256)")
    r.set_defaults(func=cmd_predict)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tune_allocator()
    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows up here rather than at interpreter exit
        return status
    except BrokenPipeError:
        # The reader went away (e.g. `moldiff data | head -3`): stop quietly, like other Unix
        # tools, and keep Python from complaining when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe
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
