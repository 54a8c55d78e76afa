"""Measure fragment- and formula-conditioned sampling against unconditional sampling at the same sizes.

    python scripts/bench_inpainting.py --checkpoint qm9 --fragments 20 --formulas 20 --n 10 --steps 100 \\
        --out out/inpainting.md --record docs/results/inpainting/reports.jsonl --run <name>

Fragments (deterministic): walk the QM9 test split (EDM split, in split order); keep a molecule when
RDKit's DetermineBonds gives it a sanitized graph, it has a ring, and at least one heavy atom lies
outside its Bemis-Murcko framework (ring systems + linkers, heavy atoms only, exocyclic =O
stripped); the framework is the fragment (its atoms, bonds and the molecule's own coordinates),
each framework SMILES used once. For each fragment, ``--n`` molecules are grown to the source
molecule's size N, and ``--n`` unconditional ones are sampled at the same N.

Formulas (deterministic): the first ``--formulas`` distinct formulas of the test split in split
order; ``--n`` isomers each, against ``--n`` unconditional molecules of the same size.

Reported (EDM protocol, moldiff.chemistry.metrics): validity, molecule and atom stability; for
fragments, retention (the fragment is a substructure of the RDKit molecule, anywhere), retention
in place (the fixed atoms themselves form it) and the largest fragment RMSD after alignment; for
formulas, the fraction of molecules with exactly that formula and the unique valid SMILES count.
The markdown goes to stdout and, with ``--out``, to a file; ``--record FILE --run NAME`` appends it
to the study's JSON-lines file as one record: ``run``, ``step``, ``command`` and ``blocks`` (each
paragraph as ``{"text": ...}``, each table as ``{"columns": [...], "table": [{column: cell}, ...]}``,
cells as printed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moldiff.chemistry.fragments import (
    bonded_mol,
    cut_fragment,
    element_counts,
    format_formula,
    fragment_smiles,
    murcko_scaffold_atoms,
)
from moldiff.chemistry.io import write_bytes
from moldiff.chemistry.metrics import evaluate_molecules
from moldiff.data.qm9 import edm_split, load_qm9
from moldiff.inpainting import DEFAULT_INPAINT_NOISE_SCALE, DEFAULT_INPAINT_TIME_POWER, DEFAULT_FORMULA_DRAWS, DEFAULT_RESAMPLE, DEFAULT_VALENCE_GUIDANCE, Fragment, formula_honoured, fragment_report, fragment_reports, inpaint_arrays
from moldiff.pipeline import DEFAULT_TIME_POWER, load_pretrained


# ----------------------------------------------------------------------------- picking the inputs
def pick_fragments(qm9, test, count: int, elements, max_atoms: int) -> list[tuple[Fragment, int, int]]:
    """``(fragment, QM9 index, N of the source molecule)`` for the first ``count`` usable test molecules."""
    picked, seen = [], set()
    if count <= 0:
        return picked
    for k in test:
        symbols, positions = qm9.molecule(int(k))
        if not set(symbols) <= set(elements) or len(symbols) > max_atoms:
            continue
        mol, route, _ = bonded_mol(symbols, positions)
        if route != "rdDetermineBonds":
            continue
        scaffold = murcko_scaffold_atoms(mol)
        heavy = sum(s != "H" for s in symbols)
        if len(scaffold) < 3 or len(scaffold) >= heavy:
            continue
        query = cut_fragment(mol, scaffold)
        label = fragment_smiles(query)
        if label is None or label in seen:
            continue
        seen.add(label)
        fragment = Fragment([symbols[i] for i in scaffold], positions[scaffold], query, label)
        picked.append((fragment, int(qm9.index[int(k)]), len(symbols)))
        if len(picked) == count:
            break
    return picked


def pick_formulas(qm9, test, count: int, elements, max_atoms: int) -> list[tuple[str, int, int]]:
    """``(formula, QM9 index, N)`` of the first ``count`` distinct formulas of the test split."""
    picked, seen = [], set()
    if count <= 0:
        return picked
    for k in test:
        symbols, _ = qm9.molecule(int(k))
        if not set(symbols) <= set(elements) or len(symbols) > max_atoms:
            continue
        formula = format_formula(element_counts(symbols))
        if formula in seen:
            continue
        seen.add(formula)
        picked.append((formula, int(qm9.index[int(k)]), len(symbols)))
        if len(picked) == count:
            break
    return picked


# ----------------------------------------------------------------------------- measuring
def split_arrays(arrays, start: int, stop: int):
    return [(arrays.symbols(j), arrays.positions[j]) for j in range(start, stop)]


def protocol(molecules) -> dict:
    report = evaluate_molecules(molecules)
    return {"validity": report.validity, "mol_stable": report.mol_stable, "atom_stable": report.atom_stable,
            "smiles": [r.smiles for r in report.per_molecule if r.valid]}  # fmt: skip


def pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def plain_power(args) -> float:
    """The time power of the unconditional rows: the one asked for, else plain sampling's default."""
    return DEFAULT_TIME_POWER if args.time_power is None else args.time_power


def describe_power(args) -> str:
    if args.time_power is not None:
        return f"time grid power {args.time_power:g}"
    return (f"the package's time grids (power {DEFAULT_TIME_POWER:g} for unconditional, drawn and given-types "
            f"molecules, {DEFAULT_INPAINT_TIME_POWER:g} for RePaint)")


def run_fragments(pipe, fragments, args) -> tuple[list[dict], float]:
    if not fragments:
        return [], 0.0
    start = time.perf_counter()
    sizes = [size for _, _, size in fragments for _ in range(args.n)]
    free = pipe.sample_arrays(len(sizes), num_atoms=sizes, steps=args.steps, sampler=args.sampler, seed=args.seed,
                              time_power=plain_power(args), noise_scale=args.noise_scale)
    rows = []
    for i, (fragment, index, size) in enumerate(fragments):
        cond = inpaint_arrays(pipe, args.n, fragment=fragment, num_atoms=size, steps=args.steps,
                              sampler=args.sampler, resample=args.resample, seed=args.seed + i,
                              time_power=args.time_power, noise_scale=args.noise_scale,
                              valence_guidance=args.valence_guidance)  # fmt: skip
        cond_reports = fragment_reports(fragment, cond)
        free_mols = split_arrays(free, i * args.n, (i + 1) * args.n)
        query = fragment.query()
        free_reports = [fragment_report(fragment, s, p, query=query) for s, p in free_mols]
        rmsds = [r.rmsd for r in cond_reports if not math.isnan(r.rmsd)]
        rows.append({
            "fragment": fragment.name, "qm9_index": index, "N": size, "k": fragment.num_atoms,
            "cond": {**protocol(split_arrays(cond, 0, args.n)),
                     "retained": np.mean([r.retained for r in cond_reports]),
                     "in_place": np.mean([r.retained_in_place for r in cond_reports]),
                     "max_rmsd": max(rmsds) if rmsds else math.nan},
            "free": {**protocol(free_mols), "retained": np.mean([r.retained for r in free_reports])},
        })  # fmt: skip
    return rows, time.perf_counter() - start


def run_formulas(pipe, formulas, args) -> tuple[list[dict], float]:
    if not formulas:
        return [], 0.0
    start = time.perf_counter()
    sizes = [size for _, _, size in formulas for _ in range(args.n)]
    free = pipe.sample_arrays(len(sizes), num_atoms=sizes, steps=args.steps, sampler=args.sampler, seed=args.seed + 1,
                              time_power=plain_power(args), noise_scale=args.noise_scale)
    rows = []
    for i, (formula, index, size) in enumerate(formulas):
        cond = inpaint_arrays(pipe, args.n, formula=formula, steps=args.steps, sampler=args.sampler,
                              resample=args.resample, seed=args.seed + 1000 + i, time_power=args.time_power,
                              noise_scale=args.noise_scale, formula_draws=args.formula_draws)  # fmt: skip
        cond_mols = split_arrays(cond, 0, args.n)
        free_mols = split_arrays(free, i * args.n, (i + 1) * args.n)
        rows.append({
            "formula": formula, "qm9_index": index, "N": size, "drawn": cond.extra.get("formula_route", []).count("drawn"), "given": cond.extra.get("formula_route", []).count("given"),
            "cond": {**protocol(cond_mols), "honoured": np.mean([formula_honoured(s, formula) for s, _ in cond_mols])},
            "free": {**protocol(free_mols), "honoured": np.mean([formula_honoured(s, formula) for s, _ in free_mols])},
        })  # fmt: skip
    return rows, time.perf_counter() - start


# ----------------------------------------------------------------------------- report
def mean_of(rows, side: str, key: str) -> float:
    values = [row[side][key] for row in rows if not (isinstance(row[side][key], float) and math.isnan(row[side][key]))]
    return float(np.mean(values)) if values else math.nan


def unique_valid(rows, side: str) -> int:
    return sum(len(set(row[side]["smiles"])) for row in rows)


def markdown(args, frag_rows, frag_s, form_rows, form_s, command: str) -> str:
    lines = [
        "# Inpainting results",
        "",
        f"Command: `{command}`",
        "",
        f"Checkpoint `{args.checkpoint}`; sampler `{args.sampler}`, {args.steps} steps, {describe_power(args)}, resample {args.resample if args.resample is not None else DEFAULT_RESAMPLE}, "
        f"noise scale {args.noise_scale:g}, open-valence guidance {args.valence_guidance:g} (fragments), "
        f"{args.n} molecules per fragment / formula, seed {args.seed}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Unconditional rows: the same sampler at the same sizes.",
    ]
    if frag_rows:
        lines += fragment_section(args, frag_rows, frag_s)
    if form_rows:
        lines += formula_section(args, form_rows, form_s)
    return "\n".join(lines) + "\n"


def fragment_section(args, frag_rows, frag_s) -> list[str]:
    n_frag = len(frag_rows) * args.n
    lines = [
        "",
        f"## Fragments ({len(frag_rows)} Bemis-Murcko frameworks cut from QM9 test molecules, {n_frag} molecules per row, {frag_s:.0f} s)",
        "",
        "| sampling | fragment retained | retained in place | max fragment RMSD (Å) | validity | molecule stable | atom stable |",
        "|---|---|---|---|---|---|---|",
        f"| fragment-conditioned | {pct(mean_of(frag_rows, 'cond', 'retained'))} | {pct(mean_of(frag_rows, 'cond', 'in_place'))} | "
        f"{max((r['cond']['max_rmsd'] for r in frag_rows), default=math.nan):.1e} | {pct(mean_of(frag_rows, 'cond', 'validity'))} | "
        f"{pct(mean_of(frag_rows, 'cond', 'mol_stable'))} | {pct(mean_of(frag_rows, 'cond', 'atom_stable'))} |",
        f"| unconditional, same sizes | {pct(mean_of(frag_rows, 'free', 'retained'))} | n/a | n/a | {pct(mean_of(frag_rows, 'free', 'validity'))} | "
        f"{pct(mean_of(frag_rows, 'free', 'mol_stable'))} | {pct(mean_of(frag_rows, 'free', 'atom_stable'))} |",
        "",
        "| fragment (framework SMILES) | QM9 index | N | k | retained (cond / uncond) | in place | validity (cond / uncond) | mol. stable (cond / uncond) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in frag_rows:
        c, f = r["cond"], r["free"]
        lines.append(
            f"| `{r['fragment']}` | {r['qm9_index']} | {r['N']} | {r['k']} | {pct(c['retained'])} / {pct(f['retained'])} | "
            f"{pct(c['in_place'])} | {pct(c['validity'])} / {pct(f['validity'])} | {pct(c['mol_stable'])} / {pct(f['mol_stable'])} |"
        )
    return lines


def formula_section(args, form_rows, form_s) -> list[str]:
    n_form = len(form_rows) * args.n
    lines = [
        "",
        f"## Formulas ({len(form_rows)} formulas of QM9 test molecules, {n_form} molecules per row, {form_s:.0f} s; "
        f"formula draws {args.formula_draws if args.formula_draws is not None else DEFAULT_FORMULA_DRAWS} per molecule: "
        f"{sum(r['drawn'] for r in form_rows)} of {n_form} drawn, {sum(r.get('given', 0) for r in form_rows)} sampled with "
        f"the types given to the network (a model trained with given types), the rest clamped)",
        "",
        "| sampling | exact formula | validity | molecule stable | atom stable | unique valid SMILES |",
        "|---|---|---|---|---|---|",
        f"| formula-conditioned | {pct(mean_of(form_rows, 'cond', 'honoured'))} | {pct(mean_of(form_rows, 'cond', 'validity'))} | "
        f"{pct(mean_of(form_rows, 'cond', 'mol_stable'))} | {pct(mean_of(form_rows, 'cond', 'atom_stable'))} | {unique_valid(form_rows, 'cond')} |",
        f"| unconditional, same sizes | {pct(mean_of(form_rows, 'free', 'honoured'))} | {pct(mean_of(form_rows, 'free', 'validity'))} | "
        f"{pct(mean_of(form_rows, 'free', 'mol_stable'))} | {pct(mean_of(form_rows, 'free', 'atom_stable'))} | {unique_valid(form_rows, 'free')} |",
        "",
        "| formula | QM9 index | N | validity (cond / uncond) | mol. stable (cond / uncond) | unique valid isomers |",
        "|---|---|---|---|---|---|",
    ]
    for r in form_rows:
        c, f = r["cond"], r["free"]
        lines.append(
            f"| {r['formula']} | {r['qm9_index']} | {r['N']} | {pct(c['validity'])} / {pct(f['validity'])} | "
            f"{pct(c['mol_stable'])} / {pct(f['mol_stable'])} | {len(set(c['smiles']))} |"
        )
    return lines


def table_cells(line: str) -> list[str]:
    """The cells of one markdown table row (a ``|`` inside backticks is text, as in a SMILES)."""
    cells, cell, code = [], "", False
    for ch in line.strip()[1:-1]:
        code = not code if ch == "`" else code
        if ch == "|" and not code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
    return cells + [cell.strip()]


def blocks(text: str) -> list[dict]:
    """The report as data: paragraphs ``{"text": line}`` and tables ``{"columns", "table"}``."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("|"):
            columns, rows, i = table_cells(lines[i]), [], i + 2  # skip the |---| line
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(columns, table_cells(lines[i]))))
                i += 1
            out.append({"table": rows, "columns": columns})
            continue
        if lines[i].strip():
            out.append({"text": lines[i]})
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="pipeline directory (config.json + model.pt), run directory or shipped model name")
    p.add_argument("--fragments", type=int, default=20, help="number of fragments (default 20)")
    p.add_argument("--formulas", type=int, default=20, help="number of formulas (default 20)")
    p.add_argument("--n", type=int, default=10, help="molecules per fragment / formula (default 10)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--sampler", default="ancestral")
    p.add_argument("--time-power", type=float, default=None,
                   help=f"time grid t_k = (k/K)^P of both the conditioned and the unconditional rows (1 = uniform; "
                   f"default: the package's for each route, as `moldiff sample` runs it: {DEFAULT_TIME_POWER:g} for "
                   f"unconditional, drawn and given-types molecules, {DEFAULT_INPAINT_TIME_POWER:g} for RePaint)")
    p.add_argument("--noise-scale", type=float, default=DEFAULT_INPAINT_NOISE_SCALE,
                   help=f"factor on each step's fresh noise, both rows (default {DEFAULT_INPAINT_NOISE_SCALE:g}, the "
                   f"package's inpainting default)")
    p.add_argument("--formula-draws", type=int, default=None,
                   help="unconditional draws per formula molecule before clamping (default: the package's)")
    p.add_argument("--valence-guidance", type=float, default=DEFAULT_VALENCE_GUIDANCE,
                   help=f"open-valence guidance strength for the fragment rows (default {DEFAULT_VALENCE_GUIDANCE:g})")
    p.add_argument("--resample", type=int, default=None, help="RePaint resampling per step (default: the package's, 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="network arithmetic (default fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", default=None, help="QM9 processed cache (default ~/.cache/moldiff)")
    p.add_argument("--out", type=Path, help="also write the markdown here")
    p.add_argument("--record", type=Path, help="append the report to this JSON-lines file (the study's results file)")
    p.add_argument("--run", help="the record's name with --record (e.g. s82308_noise0.5_guidance1)")
    args = p.parse_args(argv)
    if args.record and not args.run:
        p.error("--record needs --run NAME")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pretrained(args.checkpoint, device=args.device).configure_inference(args.precision)
    qm9 = load_qm9(args.cache_dir)
    test = edm_split(len(qm9))["test"]
    # Molecules larger than the model's largest training molecule are skipped (only matters for
    # models trained on a subset, e.g. the debug configs).
    max_atoms = pipe.statistics.max_atoms
    fragments = pick_fragments(qm9, test, args.fragments, pipe.elements, max_atoms)
    formulas = pick_formulas(qm9, test, args.formulas, pipe.elements, max_atoms)
    print(f"{len(fragments)} fragments, {len(formulas)} formulas; sampling ...", file=sys.stderr, flush=True)
    frag_rows, frag_s = run_fragments(pipe, fragments, args)
    form_rows, form_s = run_formulas(pipe, formulas, args)
    command = "python scripts/bench_inpainting.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(args, frag_rows, frag_s, form_rows, form_s, command)
    sys.stdout.write(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(args.out, text.encode())
    if args.record is not None:
        record = {"run": args.run, "step": pipe.metadata.get("step"), "command": command, "blocks": blocks(text)}
        with open(args.record, "a") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
