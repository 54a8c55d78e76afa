"""Chemistry of generated samples and the pieces of a sampling report (numpy + RDKit, no torch).

One sample (element symbols and (n, 3) coordinates in Å) goes through :func:`assess_sample`, which
answers three questions:

* the EDM protocol verdict (:func:`~moldiff.chemistry.metrics.evaluate_molecule`: table bonds,
  stability, validity SMILES), so sampled numbers compare with papers;
* a chemist's molecule: RDKit's ``rdDetermineBonds`` (connectivity from covalent radii, then bond
  orders and formal charges) when it succeeds; otherwise the EDM table-bonded molecule when it
  sanitizes; otherwise a coordinates-only molecule (atoms, no bonds) so the sample can still be
  looked at;
* that molecule's heavy-atom SMILES (``display_smiles``).

Atom ``i`` of every molecule built here is atom ``i`` of the sample, in the same order.

The rest serves the files ``moldiff sample`` writes: SD records with tags (:func:`sd_record`),
descriptor rows for the CSV (:func:`descriptor_row`: QED, SA score, MW, logP) and a 2D grid image
of molecules (:func:`grid_image`, :func:`write_png`).
"""

from __future__ import annotations

import importlib.util
import io as _io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from rdkit import Chem, rdBase

from .bonds import rdkit_bond_orders
from .elements import to_symbols
from .io import write_bytes
from .metrics import MoleculeResult, evaluate_molecule
from .rdkit import build_mol, edm_mol, sanitize_error

__all__ = [
    "BOND_SOURCES",
    "SampleChemistry",
    "assess_sample",
    "fault_result",
    "display_smiles",
    "sd_record",
    "sa_score_available",
    "SA_SCORE_NOTE",
    "descriptor_row",
    "grid_image",
    "drawing_unavailable",
    "write_png",
]

#: Where the bonds of :attr:`SampleChemistry.mol` came from.
BOND_SOURCES = ("rdDetermineBonds", "EDM table", "none")


@dataclass(frozen=True)
class SampleChemistry:
    """What :func:`assess_sample` found out about one sample.

    Attributes:
        result: EDM-protocol verdict (validity SMILES, valid, mol_stable, stable atoms, reason).
        mol: the best RDKit molecule (3D conformer, atoms in sample order) or ``None`` when the
            sample has no usable coordinates; sanitized unless ``bonds == "none"``.
        bonds: which route made ``mol``'s bonds, one of :data:`BOND_SOURCES`.
        rdkit_smiles: heavy-atom SMILES of the ``rdDetermineBonds`` molecule, ``None`` if that
            route failed.
        rdkit_reason: why ``rdDetermineBonds`` failed (``None`` when it succeeded).
    """

    result: MoleculeResult
    mol: Chem.Mol | None
    bonds: str
    rdkit_smiles: str | None = None
    rdkit_reason: str | None = None


def fault_result(n_atoms: int, reason: str) -> MoleculeResult:
    """Protocol verdict for a sample that must not be interpreted (e.g. a numerical fault):
    invalid, unstable, no stable atoms, with ``reason``."""
    return MoleculeResult(None, False, False, 0, int(n_atoms), reason)


def display_smiles(mol: Chem.Mol | None) -> str | None:
    """Canonical SMILES of a sanitized molecule with its hydrogens folded into heavy atoms
    (``CCO``, not EDM's ``[H]OC([H])...``); ``None`` if there is no molecule or RDKit refuses."""
    if mol is None:
        return None
    try:
        with rdBase.BlockLogs():
            return Chem.MolToSmiles(Chem.RemoveHs(mol))
    except Exception:  # noqa: BLE001 - a display string is optional
        return None


def _coordinates_mol(elements: tuple[str, ...], positions: np.ndarray) -> Chem.Mol | None:
    if positions.shape != (len(elements), 3) or not np.isfinite(positions).all():
        return None
    mol = build_mol(elements, positions)
    mol.UpdatePropertyCache(strict=False)
    return mol


def assess_sample(
    symbols: Sequence[object],
    positions: np.ndarray,
    *,
    fault: str | None = None,
    max_iterations: int = 100_000,
) -> SampleChemistry:
    """EDM verdict and the best RDKit molecule for one generated sample; never raises on bad input.

    Args:
        symbols: n element symbols or atomic numbers.
        positions: (n, 3) coordinates in Å.
        fault: if given (e.g. ``"numerical fault at reverse step 12"``), the sample is not
            interpreted at all: invalid, unstable, no molecule, and this is the reason.
        max_iterations: cap on ``rdDetermineBonds``' bond-order search (see
            :func:`~moldiff.chemistry.bonds.rdkit_bond_orders`).

    Returns:
        :class:`SampleChemistry`.
    """
    n_atoms = len(symbols)
    if fault is not None:
        return SampleChemistry(fault_result(n_atoms, fault), None, "none")
    result = evaluate_molecule(symbols, positions)
    if result.reason is not None and result.reason.startswith(("malformed", "error")):
        return SampleChemistry(result, None, "none")
    elements = to_symbols(symbols)
    pos = np.asarray(positions, dtype=np.float64)
    determined = rdkit_bond_orders(elements, pos, max_iterations=max_iterations)
    if determined.mol is not None:
        return SampleChemistry(result, determined.mol, "rdDetermineBonds", display_smiles(determined.mol))
    table_mol = edm_mol(elements, pos, conformer=True)
    with rdBase.BlockLogs():
        sanitized = sanitize_error(table_mol) is None
    if sanitized:
        return SampleChemistry(result, table_mol, "EDM table", None, determined.reason)
    return SampleChemistry(result, _coordinates_mol(elements, pos), "none", None, determined.reason)


def _tag_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    # SD tag values are one line each in practice; keep multi-line RDKit messages readable.
    return " ".join(str(value).split())


def sd_record(
    mol: Chem.Mol | None,
    symbols: Sequence[object],
    positions: np.ndarray,
    tags: Mapping[str, object],
    name: str = "",
) -> Chem.Mol:
    """A molecule ready for :func:`~moldiff.chemistry.io.write_sdf`, carrying ``tags`` as SD tags.

    Args:
        mol: the sample's molecule, copied (the argument is not modified); ``None`` writes a
            coordinates-only record (atoms, no bonds) from ``symbols`` and ``positions``.
        symbols: n element symbols (used when ``mol`` is ``None``).
        positions: (n, 3) coordinates in Å (used when ``mol`` is ``None``). Non-finite values,
            which no SD reader accepts, are written as 0.0; say so in a tag.
        tags: SD tag name -> value; ``None`` becomes an empty value, booleans ``1``/``0``.
        name: record title (first line of the record).

    Returns:
        A new ``Chem.Mol``.
    """
    if mol is not None:
        record = Chem.Mol(mol)
    else:
        pos = np.nan_to_num(np.asarray(positions, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        record = build_mol(symbols, pos.reshape(len(symbols), 3))
    record.SetProp("_Name", _tag_text(name))
    for key, value in tags.items():
        record.SetProp(str(key), _tag_text(value))
    return record


# ------------------------------------------------------------------------------------ descriptors

#: Shown when RDKit's contributed SA scorer is not installed.
SA_SCORE_NOTE = "SA score left blank: RDKit's Contrib/SA_Score/sascorer.py was not found under RDConfig.RDContribDir"


@lru_cache(maxsize=1)
def _sascorer():
    """RDKit's contributed SA scorer (Ertl & Schuffenhauer 2009), loaded from ``RDContribDir``."""
    try:
        from rdkit import RDConfig

        path = Path(RDConfig.RDContribDir) / "SA_Score" / "sascorer.py"
        if not path.is_file():
            return None
        spec = importlib.util.spec_from_file_location("moldiff_rdkit_contrib_sascorer", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.readFragmentScores()  # fpscores.pkl.gz beside it; load once, not on first molecule
        return module
    except Exception:  # noqa: BLE001 - optional: any failure means "not available"
        return None


def sa_score_available() -> bool:
    """Whether :func:`descriptor_row` can fill in the SA score."""
    return _sascorer() is not None


def _safe(function, mol: Chem.Mol, digits: int) -> float | None:
    try:
        value = float(function(mol))
    except Exception:  # noqa: BLE001 - one odd molecule leaves one cell blank
        return None
    return round(value, digits) if np.isfinite(value) else None


def descriptor_row(mol: Chem.Mol | None) -> dict[str, float | None]:
    """Drug-likeness descriptors of a sanitized molecule, hydrogens folded in.

    Args:
        mol: sanitized ``Chem.Mol`` (explicit or implicit hydrogens); ``None`` gives blanks.

    Returns:
        ``{"QED": [0, 1], "SA_score": [1 (easy), 10 (hard)], "MW": g/mol, "logP": Crippen}``;
        a value is ``None`` where it cannot be computed (SA score without RDKit Contrib).
    """
    from rdkit.Chem import QED, Crippen, Descriptors

    row: dict[str, float | None] = {"QED": None, "SA_score": None, "MW": None, "logP": None}
    if mol is None:
        return row
    try:
        with rdBase.BlockLogs():
            heavy = Chem.RemoveHs(mol)
    except Exception:  # noqa: BLE001
        return row
    scorer = _sascorer()
    with rdBase.BlockLogs():
        row["QED"] = _safe(QED.qed, heavy, 4)
        row["SA_score"] = None if scorer is None else _safe(scorer.calculateScore, heavy, 3)
        row["MW"] = _safe(Descriptors.MolWt, heavy, 3)
        row["logP"] = _safe(Crippen.MolLogP, heavy, 3)
    return row


# ------------------------------------------------------------------------------------ images


def grid_image(
    mols: Sequence[Chem.Mol],
    legends: Sequence[str] | None = None,
    *,
    per_row: int = 4,
    size: tuple[int, int] = (250, 250),
    empty_text: str = "no molecules to draw",
):
    """2D depictions of molecules in a grid (``rdkit.Chem.Draw.MolsToGridImage``), as a PIL image.

    Args:
        mols: sanitized molecules; copies are drawn with hydrogens folded in and fresh 2D
            coordinates (the 3D conformers are left alone).
        legends: one caption per molecule.
        per_row: molecules per grid row.
        size: pixels per molecule cell.
        empty_text: text of the placeholder image drawn when ``mols`` is empty.

    Returns:
        ``PIL.Image.Image``.
    """
    from PIL import Image, ImageDraw
    from rdkit.Chem import Draw, rdDepictor

    drawable, captions = [], []
    for k, mol in enumerate(mols):
        try:
            with rdBase.BlockLogs():
                flat = Chem.RemoveHs(mol)
                rdDepictor.Compute2DCoords(flat)
        except Exception:  # noqa: BLE001 - skip what cannot be drawn
            continue
        drawable.append(flat)
        captions.append(legends[k] if legends is not None else "")
    if not drawable:
        image = Image.new("RGB", (2 * size[0], size[1] // 2), "white")
        ImageDraw.Draw(image).text((10, 10), empty_text, fill="black")
        return image
    with rdBase.BlockLogs():
        image = Draw.MolsToGridImage(
            drawable, molsPerRow=min(per_row, len(drawable)), subImgSize=size, legends=captions, returnPNG=False
        )
    return image


def drawing_unavailable() -> str | None:
    """Why RDKit cannot draw here (``rdkit.Chem.Draw`` failed to import, e.g. a headless server
    without ``libXrender.so.1``), or ``None`` when it can. The import is tried once per process."""
    global _DRAWING_UNAVAILABLE
    if _DRAWING_UNAVAILABLE is _NOT_CHECKED:
        try:
            from rdkit.Chem import Draw  # noqa: F401
        except ImportError as exc:
            _DRAWING_UNAVAILABLE = f"rdkit.Chem.Draw cannot load ({exc})"
        else:
            _DRAWING_UNAVAILABLE = None
    return _DRAWING_UNAVAILABLE


_NOT_CHECKED = object()
_DRAWING_UNAVAILABLE: object = _NOT_CHECKED


def write_png(path: str | os.PathLike, image) -> None:
    """Save a PIL image as PNG, atomically (temporary file in the target folder, then rename)."""
    buffer = _io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())
