"""A drug-like 3D training set built offline: MOSES SMILES embedded with RDKit, written as one SD file.

    python scripts/build_druglike.py --out out/druglike.sdf --n 5000 --workers 2
    moldiff data sdf out/druglike.sdf --name druglike

SMILES come from the MOSES benchmark set (Polykovskiy et al. 2020: 1.9M drug-like molecules from
ZINC, neutral, elements C N O S F Cl Br H). MOSES ships them as ``moses/dataset/data/{train,test,
test_scaffolds}.csv.gz`` inside the ``molsets`` wheel on PyPI; this script reads that file from the
wheel and never imports the package (whose dependencies pin old libraries). Without ``--moses-wheel``
it fetches the wheel with ``pip download molsets==0.3.1 --no-deps`` into a temporary folder (52 MB)
and checks its SHA-256. ``--smiles-file`` takes your own SMILES instead (one per line, first column;
a header line ``SMILES`` and lines starting with ``#`` are skipped).

``--n`` molecules are drawn without replacement (seeded by ``--seed``) and each is, in a process of
its own (``--workers``):

  1. parsed; stereocentres and double bonds the SMILES leaves open (MOSES gives none) are fixed to
     one random assignment (seeded), so that all conformers of a molecule are one stereoisomer; as
     cages such as adamantane have assignments that cannot exist in 3D, up to 8 random assignments
     get 20 ETKDG attempts each, in turn, before the first gets RDKit's full effort;
  2. given explicit hydrogens and embedded in 3D by ETKDG v3 (``--conformers K`` conformers, pruned
     at 0.5 Å heavy-atom RMSD; a second try from random coordinates if the first fails);
  3. optimised with MMFF94 (``--mmff-iterations``, default 2000).

Failures are skipped and counted by reason (``parse``, ``embed``, ``mmff_parameters``); conformers
whose MMFF optimisation did not converge are kept and counted. Each record is titled
``<source>_<index>`` (the SMILES' line in its file) and carries the input SMILES, the stereoisomer
embedded, the conformer number and its MMFF94 energy (kcal/mol). The seed of each molecule depends
on ``--seed`` and its index only, so the file does not depend on ``--workers``. It is written
atomically once complete; ``moldiff data sdf`` reads it (conformers of a molecule grouped).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

MOSES_VERSION = "0.3.1"
MOSES_WHEEL = f"molsets-{MOSES_VERSION}-py3-none-any.whl"
#: SHA-256 of the wheel on PyPI (checked when the file has this name)
MOSES_SHA256 = "7f4450e3ebecebe79c3a2a55950c93daddee071120daf64a163d03481e811d34"
MOSES_SPLITS = ("train", "test", "test_scaffolds")
FAILURES = ("parse", "embed", "mmff_parameters")
#: random stereoisomers tried per molecule before it counts as an embedding failure
STEREO_TRIES = 8
#: ETKDG attempts per stereoisomer before the next is tried (RDKit's default effort is 10 per atom)
QUICK_ATTEMPTS = 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_moses_wheel(folder: Path) -> Path:
    """``pip download`` the pinned molsets wheel (no dependencies) into ``folder``."""
    cmd = [sys.executable, "-m", "pip", "download", f"molsets=={MOSES_VERSION}", "--no-deps", "--only-binary=:all:",
           "--dest", str(folder), "--quiet"]
    print("fetching the MOSES SMILES:", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    return folder / MOSES_WHEEL


def read_moses(wheel: Path, split: str) -> list[str]:
    """The SMILES of one MOSES split, read from the molsets wheel (a zip file) without importing it."""
    if wheel.name == MOSES_WHEEL and sha256(wheel) != MOSES_SHA256:
        raise SystemExit(f"{wheel}: SHA-256 differs from the molsets {MOSES_VERSION} wheel on PyPI; not reading it")
    with zipfile.ZipFile(wheel) as archive:
        raw = archive.read(f"moses/dataset/data/{split}.csv.gz")
    rows = csv.reader(io.StringIO(gzip.decompress(raw).decode()))
    header = next(rows)
    column = header.index("SMILES")
    return [row[column] for row in rows if row]


def read_smiles_file(path: Path) -> list[str]:
    """One SMILES per line (the first comma-, tab- or space-separated field); skips ``#`` lines and a
    ``SMILES`` header."""
    out = []
    for line in path.read_text().splitlines():
        field = line.strip().replace(",", " ").replace("\t", " ").split(" ")[0]
        if field and not field.startswith("#") and field.upper() != "SMILES":
            out.append(field)
    return out


def embed(item: tuple[int, str, int, int, int, str]) -> tuple[int, str | None, list[str], int]:
    """One molecule: ``(index, smiles, seed, conformers, mmff_iterations, source)`` ->
    ``(index, failure reason or None, SD records, conformers not converged)``."""
    from rdkit import Chem
    from rdkit.Chem import AllChem, rdDistGeom
    from rdkit.Chem.EnumerateStereoisomers import (
        EnumerateStereoisomers,
        StereoEnumerationOptions,
    )

    index, smiles, seed, conformers, iterations, source = item
    mol = Chem.MolFromSmiles(smiles)
    if mol is None or mol.GetNumAtoms() == 0:
        return index, "parse", [], 0
    # Random stereoisomers in a seeded order. Some cannot exist in 3D (e.g. at the bridgeheads of
    # cages), and ETKDG spends its full effort (10 attempts per atom) failing on them, so each isomer
    # first gets a few attempts; only if all fail does the first get the full effort, then a start
    # from random coordinates.
    options = StereoEnumerationOptions(onlyUnassigned=True, maxIsomers=STEREO_TRIES, rand=seed, unique=True)
    isomers = list(EnumerateStereoisomers(mol, options=options)) or [mol]
    tries = [(isomer, False, QUICK_ATTEMPTS) for isomer in isomers] if len(isomers) > 1 else []
    tries += [(isomers[0], False, 0), (isomers[0], True, 0)]
    ids = []
    for isomer, random_coords, attempts in tries:
        hydrogens = Chem.AddHs(isomer)
        params = rdDistGeom.ETKDGv3()
        params.randomSeed = seed
        params.useRandomCoords = random_coords
        params.maxIterations = attempts  # 0: RDKit's default
        params.pruneRmsThresh = 0.5 if conformers > 1 else -1.0
        params.numThreads = 1
        ids = list(rdDistGeom.EmbedMultipleConfs(hydrogens, conformers, params))
        if ids:
            break
    if not ids:
        return index, "embed", [], 0
    stereo_smiles = Chem.MolToSmiles(isomer)
    mol = hydrogens
    if not AllChem.MMFFHasAllMoleculeParams(mol):
        return index, "mmff_parameters", [], 0
    results = AllChem.MMFFOptimizeMoleculeConfs(mol, maxIters=iterations, numThreads=1)
    records, unconverged = [], 0
    mol.SetProp("_Name", f"{source}_{index}")
    mol.SetProp("smiles", smiles)
    mol.SetProp("stereo_smiles", stereo_smiles)
    for k, (cid, (not_converged, energy)) in enumerate(zip(ids, results)):
        unconverged += int(not_converged != 0)
        mol.SetProp("conformer", str(k))
        mol.SetProp("mmff94_energy_kcal_mol", f"{energy:.4f}")
        mol.SetProp("mmff94_converged", str(int(not_converged == 0)))
        block = io.StringIO()
        writer = Chem.SDWriter(block)
        writer.write(mol, confId=cid)
        writer.close()
        records.append(block.getvalue())
    return index, None, records, unconverged


def molecule_seed(seed: int, index: int) -> int:
    """ETKDG's and the stereo choice's seed for one molecule: a function of ``--seed`` and its index."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] % (2**31 - 1))


def build(smiles: list[str], *, n: int, seed: int, conformers: int, iterations: int, workers: int, source: str,
          progress: bool = True) -> tuple[list[str], dict]:
    """Embed a seeded choice of ``n`` of ``smiles``: ``(SD records in index order, report)``."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(smiles), size=min(n, len(smiles)), replace=False))
    items = [(int(i), smiles[i], molecule_seed(seed, int(i)), conformers, iterations, source) for i in chosen]
    failures: Counter = Counter()
    records: dict[int, list[str]] = {}
    unconverged = 0
    bar = tqdm(total=len(items), desc="embedding", unit="mol", disable=not progress)
    if workers <= 1:
        results = map(embed, items)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(embed, items, chunksize=max(1, min(32, len(items) // (8 * workers))))
    try:
        for index, failure, blocks, bad in results:
            bar.update(1)
            if failure:
                failures[failure] += 1
            else:
                records[index] = blocks
                unconverged += bad
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    ordered = [block for index in sorted(records) for block in records[index]]
    report = {"source": source, "attempted": len(items), "molecules": len(records), "conformers": len(ordered),
              "failed": {reason: failures.get(reason, 0) for reason in FAILURES},
              "mmff_not_converged": unconverged, "seed": seed, "conformers_per_molecule": conformers,
              "mmff_iterations": iterations}
    return ordered, report


def atom_counts(records: list[str]) -> list[int]:
    """Atoms per record, from the counts line of each molfile."""
    return [int(r.splitlines()[3][:3]) for r in records]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the SD file to write, e.g. out/druglike.sdf")
    p.add_argument("--n", type=int, default=5000, help="molecules to draw (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw, the stereo choice and ETKDG")
    p.add_argument("--conformers", type=int, default=1, metavar="K", help="conformers per molecule (default 1)")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.add_argument("--mmff-iterations", type=int, default=2000, help="MMFF94 optimisation steps (default 2000)")
    p.add_argument("--split", choices=MOSES_SPLITS, default="train", help="MOSES split (default train)")
    p.add_argument("--moses-wheel", metavar="FILE", help=f"a downloaded {MOSES_WHEEL} (default: pip download it)")
    p.add_argument("--smiles-file", metavar="FILE", help="embed these SMILES instead of MOSES (one per line)")
    p.add_argument("--report", metavar="FILE", help="also write the report as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args()
    if args.n < 1 or args.conformers < 1 or args.workers < 1 or args.mmff_iterations < 1:
        p.error("--n, --conformers, --workers and --mmff-iterations must be at least 1")
    started = time.monotonic()
    if args.smiles_file:
        smiles, source = read_smiles_file(Path(args.smiles_file)), Path(args.smiles_file).stem
    elif args.moses_wheel:
        smiles, source = read_moses(Path(args.moses_wheel), args.split), f"moses_{args.split}"
    else:
        with tempfile.TemporaryDirectory() as folder:
            smiles, source = read_moses(download_moses_wheel(Path(folder)), args.split), f"moses_{args.split}"
    if not smiles:
        raise SystemExit("no SMILES to embed")
    print(f"{len(smiles)} SMILES from {source}; embedding {min(args.n, len(smiles))} with {args.workers} worker(s)",
          flush=True)
    records, report = build(smiles, n=args.n, seed=args.seed, conformers=args.conformers,
                            iterations=args.mmff_iterations, workers=args.workers, source=source,
                            progress=not args.no_progress)
    if not records:
        raise SystemExit(f"no molecule could be embedded: {report['failed']}")
    from moldiff.files import atomic_write

    atomic_write(args.out, lambda fh: fh.writelines(records))
    sizes = atom_counts(records)
    report.update(available_smiles=len(smiles), out=args.out, wall_s=round(time.monotonic() - started, 1),
                  atoms_min_median_max=[int(min(sizes)), int(np.median(sizes)), int(max(sizes))],
                  command="python scripts/build_druglike.py " + " ".join(sys.argv[1:]))
    print(f"wrote {args.out}: {report['molecules']} molecules, {report['conformers']} conformers "
          f"(atoms with H: {report['atoms_min_median_max']} min/median/max); failed: "
          + ", ".join(f"{k} {v}" for k, v in report["failed"].items())
          + f"; MMFF not converged: {report['mmff_not_converged']} ({report['wall_s']} s)")
    print(f"next: moldiff data sdf {args.out} --name {Path(args.out).stem}")
    if args.report:
        atomic_write(args.report, lambda fh: fh.write(json.dumps(report, indent=2) + "\n"))


if __name__ == "__main__":
    main()
