"""Pack the QM9 caches small enough to travel to a lent GPU machine, and unpack them there.

A lent machine reaches no network (no ``pip install qm9pack``, no CSVs) and takes at most 64 MiB of
working tree plus carried files, and RDKit's wheel alone is 32 MB. The full caches are 102 MB
(``qm9_v1.npz`` 85 MB, ``qm9_bonds_v2.npz`` 17 MB). The pack keeps every molecule's atom types,
properties, bond labels and formal charges (the statistics and splits need them all), but the
coordinates and SMILES only of the molecules a run there reads: EDM's generator half of the training
split (issue 21's D_a), the first ``--valid`` validation molecules and the first ``--train`` training
molecules (the debug config's). Coordinates travel as float32 (at most 5e-7 Å from the float64
cache) and the others are zero: a run that reads a molecule outside the kept set is wrong, so
``--unpack`` records the kept set beside the caches (``kept.npy``) for a check.

    python scripts/gpu_pack.py --out .gpudata/qm9_pack.npz         # here, from the local caches
    python scripts/gpu_pack.py --unpack .gpudata/qm9_pack.npz --cache-dir /tmp/moldiff_cache   # there
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from moldiff.data.properties import edm_halves
from moldiff.data.qm9 import QM9, _cache_path, _save, default_cache_dir, edm_split, load_qm9
from moldiff.data.qm9_bonds import BondTable, _bonds_cache_path, _save_bonds, load_qm9_bonds


def kept_molecules(n: int, n_train: int, n_valid: int) -> np.ndarray:
    split = edm_split(n)
    keep = np.zeros(n, dtype=bool)
    keep[np.asarray(edm_halves(split).generator)] = True
    keep[np.asarray(split["train"][:n_train])] = True
    keep[np.asarray(split["valid"][:n_valid])] = True
    return keep


def pack(out: Path, cache_dir: Path | None, n_train: int, n_valid: int) -> None:
    qm9 = load_qm9(cache_dir)
    bonds = load_qm9_bonds(qm9, cache_dir)
    keep = kept_molecules(len(qm9), n_train, n_valid)
    atom_keep = np.repeat(keep, np.diff(qm9.ptr))
    smiles = np.where(keep, qm9.smiles, "")
    arrays = dict(
        index=qm9.index, ptr=qm9.ptr, atom_types=qm9.atom_types, keep=keep,
        positions=qm9.positions[atom_keep].astype(np.float32), smiles=smiles,
        bonds_ptr=bonds.ptr, bonds_pairs=bonds.pairs, bonds_orders=bonds.orders, bonds_source=bonds.source,
        bonds_charges=bonds.charges,
        **{f"prop_{k}": v for k, v in qm9.properties.items()},
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB, coordinates of {int(keep.sum())} of {len(qm9)} molecules")


def unpack(pack_path: Path, cache_dir: Path) -> None:
    start = time.time()
    with np.load(pack_path, allow_pickle=False) as z:
        keep = z["keep"]
        ptr = z["ptr"]
        atom_keep = np.repeat(keep, np.diff(ptr))
        positions = np.zeros((len(atom_keep), 3), dtype=np.float64)
        positions[atom_keep] = z["positions"]
        qm9 = QM9(index=z["index"], ptr=ptr, atom_types=z["atom_types"], positions=positions, smiles=z["smiles"],
                  properties={k[5:]: z[k] for k in z.files if k.startswith("prop_")})
        table = BondTable(ptr=z["bonds_ptr"], pairs=z["bonds_pairs"], orders=z["bonds_orders"],
                          source=z["bonds_source"], charges=z["bonds_charges"])
    cache_dir.mkdir(parents=True, exist_ok=True)
    _save(qm9, _cache_path(cache_dir))
    _save_bonds(table, np.diff(ptr), _bonds_cache_path(cache_dir))
    np.save(cache_dir / "kept.npy", keep)
    print(f"unpacked {pack_path} into {cache_dir} in {time.time() - start:.1f} s "
          f"({int(keep.sum())} molecules with coordinates)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(".gpudata/qm9_pack.npz"))
    p.add_argument("--cache-dir", type=Path, default=None, help="default: $MOLDIFF_CACHE or ~/.cache/moldiff")
    p.add_argument("--train", type=int, default=256, help="keep the first N training molecules (debug config)")
    p.add_argument("--valid", type=int, default=1000, help="keep the first N validation molecules")
    p.add_argument("--unpack", type=Path, default=None, help="write the caches from this pack into --cache-dir")
    a = p.parse_args(argv)
    if a.unpack is not None:
        if a.cache_dir is None:
            p.error("--unpack needs --cache-dir")
        unpack(a.unpack, a.cache_dir)
    else:
        pack(a.out, a.cache_dir or default_cache_dir(), a.train, a.valid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
