"""GEOM conformer ensembles (per-molecule pickles of ``rdkit_folder``) to one multi-conformer SD file.

    python scripts/geom_to_sdf.py rdkit_folder/drugs --out out/geom_drugs.sdf --max-conformers 30
    moldiff data sdf out/geom_drugs.sdf --name geom_drugs

GEOM (Axelrod & Gomez-Bombarelli, Scientific Data 2022) distributes ``rdkit_folder.tar.gz``; its
``drugs/`` and ``qm9/`` folders hold one pickle per molecule: a dict with the molecule's ``smiles``
and a ``conformers`` list, each item a dict with an RDKit molecule with hydrogens and one conformer
(``rd_mol``), ``geom_id``, ``totalenergy`` (Hartree), ``relativeenergy`` (kcal/mol) and
``boltzmannweight``. Give pickle files, or folders whose ``*.pickle`` files are read (not recursively).
Each molecule's ``--max-conformers`` lowest-energy conformers (by ``totalenergy``; 30 by default, as
EDM's GEOM-drugs set; 0 keeps all) are written, lowest first, titled ``geom_<geom_id>`` with GEOM's
SMILES, energies and weight as properties. ``moldiff data sdf`` then groups the conformers by molecule
(from their structure, not the title) and checks every record.

Loading a pickle can run code that the file names. This script reads only the files you name, and
by default through a restricted unpickler that accepts no objects but RDKit molecules and plain
data (dicts, lists, numbers, strings): a file that asks for anything else stops the conversion. The
RDKit molecules' own binary data is still parsed by RDKit. Use ``--unsafe-pickle`` (plain
``pickle.load``) only for files you trust, e.g. a GEOM archive whose checksum you have verified.
GEOM's ``drugs_crude.msgpack`` (coordinates without bonds) is not read.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import pickle
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

#: the only globals a GEOM pickle needs: the RDKit molecule class, and ``_codecs.encode``, with which
#: pickle protocol 2 (Python 2 era files) writes ``bytes``
ALLOWED_GLOBALS = {("rdkit.Chem.rdchem", "Mol"), ("_codecs", "encode")}
SKIPS = ("unreadable_pickle", "no_conformers", "bad_conformer")


class GeomUnpickler(pickle.Unpickler):
    """An unpickler that builds RDKit molecules and plain data only (see the module docstring)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a GEOM pickle holds only RDKit molecules "
                                         "and plain data (use --unsafe-pickle for files you trust)")
        return super().find_class(module, name)


def load_pickle(path: Path, unsafe: bool = False):
    with open(path, "rb") as fh:
        return pickle.load(fh) if unsafe else GeomUnpickler(fh).load()


def pickle_files(paths: list[str]) -> list[Path]:
    """The named ``.pickle`` files, and the ``*.pickle`` files of the named folders, sorted per folder."""
    out = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            out.extend(sorted(path.glob("*.pickle")))
        elif path.is_file():
            out.append(path)
        else:
            raise SystemExit(f"{name}: no such file or folder")
    return out


def _number(value, default=math.nan) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def molecule_records(data, max_conformers: int) -> tuple[list[str], str | None]:
    """SD records of one GEOM molecule dict, lowest ``totalenergy`` first: ``(records, skip reason)``."""
    from rdkit import Chem

    if not isinstance(data, dict) or not isinstance(data.get("conformers"), list) or not data["conformers"]:
        return [], "no_conformers"
    confs = [c for c in data["conformers"] if isinstance(c, dict)]
    confs.sort(key=lambda c: _number(c.get("totalenergy"), math.inf))
    if max_conformers > 0:
        confs = confs[:max_conformers]
    records = []
    for rank, conf in enumerate(confs):
        mol = conf.get("rd_mol")
        if not isinstance(mol, Chem.Mol) or mol.GetNumConformers() == 0:
            return [], "bad_conformer"
        mol = Chem.Mol(mol)
        mol.SetProp("_Name", f"geom_{conf.get('geom_id', 'unknown')}")
        mol.SetProp("geom_smiles", str(data.get("smiles", "")))
        mol.SetProp("conformer_rank", str(rank))
        for key, unit in (("totalenergy", "hartree"), ("relativeenergy", "kcal_mol"), ("boltzmannweight", "")):
            if key in conf:
                mol.SetProp(f"{key}_{unit}".rstrip("_"), f"{_number(conf[key]):.8g}")
        block = io.StringIO()
        writer = Chem.SDWriter(block)
        try:
            writer.write(mol)  # kekulized, as SD files are read best
            writer.close()
        except (RuntimeError, ValueError):  # RDKit cannot write it (e.g. kekulization fails)
            return [], "bad_conformer"
        records.append(block.getvalue())
    return records, None


def convert(files: list[Path], out: str, *, max_conformers: int = 30, unsafe: bool = False,
            progress: bool = True) -> dict:
    """Write the records of ``files`` to ``out`` (atomically, streamed); returns the report."""
    from tqdm import tqdm

    from moldiff.files import atomic_write

    skipped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    counts = {"molecules": 0, "conformers": 0}

    def write(fh):
        for path in tqdm(files, desc="GEOM pickles", unit="mol", disable=not progress):
            try:
                data = load_pickle(path, unsafe)
            except pickle.UnpicklingError as exc:
                if "refusing" in str(exc):
                    raise SystemExit(f"{path}: {exc}") from None
                reason = "unreadable_pickle"
            except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, RuntimeError):
                reason = "unreadable_pickle"
            else:
                records, reason = molecule_records(data, max_conformers)
                if reason is None:
                    fh.writelines(records)
                    counts["molecules"] += 1
                    counts["conformers"] += len(records)
                    continue
            skipped[reason] += 1
            examples.setdefault(reason, [])
            if len(examples[reason]) < 3:
                examples[reason].append(path.name)

    atomic_write(out, write)
    return {"files": len(files), **counts, "skipped": {k: skipped.get(k, 0) for k in SKIPS},
            "skipped_examples": examples, "max_conformers": max_conformers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="GEOM .pickle files or folders of them (rdkit_folder/drugs)")
    p.add_argument("--out", required=True, help="the SD file to write")
    p.add_argument("--max-conformers", type=int, default=30, metavar="K",
                   help="lowest-energy conformers kept per molecule (default 30; 0: all)")
    p.add_argument("--molecules", type=int, metavar="N", help="convert a random N of the files (seeded by --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unsafe-pickle", action="store_true", help="plain pickle.load: runs whatever the files ask; "
                   "only for files you trust")
    p.add_argument("--report", metavar="FILE", help="also write the report as JSON here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    if args.max_conformers < 0 or (args.molecules is not None and args.molecules < 1):
        p.error("--max-conformers must be >= 0 and --molecules >= 1")
    files = pickle_files(args.paths)
    if not files:
        raise SystemExit("no .pickle files found in " + ", ".join(args.paths))
    if args.molecules is not None and args.molecules < len(files):
        pick = np.random.default_rng(args.seed).choice(len(files), size=args.molecules, replace=False)
        files = [files[i] for i in sorted(pick)]
    started = time.monotonic()
    report = convert(files, args.out, max_conformers=args.max_conformers, unsafe=args.unsafe_pickle,
                     progress=not args.no_progress)
    if report["molecules"] == 0:
        Path(args.out).unlink(missing_ok=True)
        raise SystemExit(f"no molecule converted from {len(files)} files: {report['skipped']}")
    report.update(out=args.out, wall_s=round(time.monotonic() - started, 1),
                  command="python scripts/geom_to_sdf.py " + " ".join(sys.argv[1:]))
    print(f"wrote {args.out}: {report['molecules']} molecules, {report['conformers']} conformers from "
          f"{report['files']} files; skipped: " + ", ".join(f"{k} {v}" for k, v in report["skipped"].items()))
    print(f"next: moldiff data sdf {args.out} --name {Path(args.out).stem}")
    if args.report:
        from moldiff.files import atomic_write

        atomic_write(args.report, lambda fh: fh.write(json.dumps(report, indent=2) + "\n"))


if __name__ == "__main__":
    main()
