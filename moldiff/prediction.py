"""Property estimates for any molecules from trained property predictors.

One place for what ``moldiff predict``, ``moldiff sample --predictor`` and
``scripts/eval_conditional.py`` share: loading predictor folders (one property is predicted by one
folder only), checking that they know every element, running them in batches over molecules given as
element symbols and coordinates, and turning EDM's targets back into the molecule's property in the
unit a condition is given in.

A molecule here is anything with ``symbols`` (element symbols) and ``positions`` (``(n, 3)`` Å): the
records of :func:`moldiff.chemistry.io.read_molecules` and sampled molecules alike. One whose
coordinates are not finite (a numerical fault of the sampler) or that has no atoms cannot be read by
a predictor: its estimate is NaN, and callers count it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["LoadedPredictor", "load_predictors", "estimate", "mae_statement", "condition_unit_values",
           "PREDICTOR_ROOT", "DEFAULT_PREDICTOR", "shipped_predictors", "resolve_predictor", "default_predictors"]

#: Where predictors shipped inside the package live: one folder each (``config.json`` + ``model.pt``).
#: It is a subfolder of the diffusion models' folder and holds no ``config.json`` itself, so
#: :func:`moldiff.pipeline.shipped_models` never lists it.
PREDICTOR_ROOT = Path(__file__).resolve().parent / "pretrained" / "predictors"
#: The shipped predictor of EDM's six QM9 properties, used when no ``--predictor`` is given.
DEFAULT_PREDICTOR = "qm9-props"


def shipped_predictors() -> list[str]:
    """Names of the property predictors shipped inside the package (folders of :data:`PREDICTOR_ROOT`), sorted."""
    if not PREDICTOR_ROOT.is_dir():
        return []
    return sorted(d.name for d in PREDICTOR_ROOT.iterdir() if (d / "config.json").is_file())


def resolve_predictor(folder: str | os.PathLike) -> Path:
    """The predictor folder ``folder`` names: a shipped predictor's name (:func:`shipped_predictors`,
    e.g. ``"qm9-props"``) is that predictor unless a folder of that name exists here; anything else
    is taken as it is."""
    path = Path(folder).expanduser()
    if not path.exists() and isinstance(folder, str) and folder in shipped_predictors():
        return PREDICTOR_ROOT / folder
    return path


def default_predictors() -> list[str]:
    """``[DEFAULT_PREDICTOR]`` when this installation ships it, else ``[]``."""
    return [DEFAULT_PREDICTOR] if DEFAULT_PREDICTOR in shipped_predictors() else []


@dataclass
class LoadedPredictor:
    """A predictor folder, its model (eval mode) and the metadata its training wrote (test MAE)."""

    folder: str
    model: object
    metadata: dict = field(default_factory=dict)

    @property
    def properties(self) -> tuple[str, ...]:
        return tuple(self.model.config.properties)

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(self.model.config.units)

    @property
    def edm_targets(self) -> bool:
        """Whether it predicts EDM's targets (``Cv`` less the free atoms' share), as scripts/train_predictor.py trains."""
        return bool(self.model.config.notes.get("edm_targets"))

    def unknown_elements(self, elements) -> list[str]:
        """The elements among ``elements`` this predictor has no input for, in their order."""
        known = set(self.model.config.elements)
        return [e for e in dict.fromkeys(elements) if e not in known]


def load_predictors(folders: Sequence[str], device="cpu") -> list[LoadedPredictor]:
    """Each folder's predictor; a folder may be given by a shipped predictor's name (:func:`resolve_predictor`).

    Raises:
        PredictorError: a folder that is not a readable predictor (one line).
        ValueError: two folders predict the same property (one line).
    """
    from moldiff.models.property import load_predictor

    loaded, seen = [], {}
    for folder in folders:
        model, meta = load_predictor(resolve_predictor(folder), device)
        for name in model.config.properties:
            if name in seen:
                raise ValueError(f"property {name!r} is predicted by both {seen[name]} and {folder}; give one of them")
            seen[name] = folder
        loaded.append(LoadedPredictor(str(folder), model, meta))
    return loaded


def estimate(predictor: LoadedPredictor, molecules: Sequence, batch_size: int = 512) -> np.ndarray:
    """``(M, P)`` float64: the predictor's outputs for each molecule, in its trained units and targets
    (for a predictor of EDM's targets: ``Cv - 2.981 N``; :func:`condition_unit_values` converts);
    a row of NaN for a molecule with no atoms or non-finite coordinates.

    Raises:
        ValueError: a molecule has an element the predictor does not know (one line).
    """
    import torch

    from moldiff.geometry import remove_mean

    model = predictor.model
    vocab = {e: i for i, e in enumerate(model.config.elements)}
    out = np.full((len(molecules), len(model.config.properties)), np.nan)
    readable = []
    for j, m in enumerate(molecules):
        unknown = predictor.unknown_elements(m.symbols)
        if unknown:
            raise ValueError(f"molecule {j} has element(s) {', '.join(unknown)}, which the predictor {predictor.folder} "
                             f"does not know (it knows {', '.join(model.config.elements)})")
        if len(m.symbols) and np.isfinite(np.asarray(m.positions, dtype=np.float64)).all():
            readable.append(j)
    param = next(model.parameters())
    for lo in range(0, len(readable), batch_size):
        chunk = readable[lo:lo + batch_size]
        counts = torch.tensor([len(molecules[j].symbols) for j in chunk])
        batch = torch.repeat_interleave(torch.arange(len(chunk)), counts).to(param.device)
        types = torch.tensor([vocab[s] for j in chunk for s in molecules[j].symbols], device=param.device)
        pos = torch.from_numpy(np.concatenate([np.asarray(molecules[j].positions, dtype=np.float64) for j in chunk]))
        pos = pos.to(param.device, param.dtype)
        pos = remove_mean(pos, batch, len(chunk))
        out[chunk] = model.predict(pos, types, batch, len(chunk)).double().cpu().numpy()
    return out


def molecule_values(predictor: LoadedPredictor, values: np.ndarray, num_atoms) -> np.ndarray:
    """:func:`estimate`'s ``(M, P)`` outputs as the molecules' properties in the predictor's units:
    for EDM's targets, Cv with the atoms' share added back (what ``moldiff predict`` prints)."""
    from moldiff.data.properties import from_edm_target

    out = np.array(values, dtype=np.float64, copy=True)
    if predictor.edm_targets:
        for k, name in enumerate(predictor.properties):
            out[:, k] = from_edm_target(name, out[:, k], num_atoms)
    return out


def condition_unit_values(predictor: LoadedPredictor, values: np.ndarray, num_atoms) -> tuple[np.ndarray, list[str]]:
    """:func:`estimate`'s outputs as the molecules' properties in the units a condition is given in
    (:data:`moldiff.data.properties.CONDITION_UNITS`: orbital energies in eV, Cv whole), so they sit
    beside the targets of a conditional sample; ``(values, units)``. A predictor not of EDM's targets
    keeps its own units."""
    from moldiff.data.properties import CONDITION_UNITS, condition_unit_factor

    out = molecule_values(predictor, values, num_atoms)
    if not predictor.edm_targets:
        return out, list(predictor.units)
    units = []
    for k, name in enumerate(predictor.properties):
        out[:, k] /= condition_unit_factor(name)
        units.append(CONDITION_UNITS[name])
    return out, units


def mae_statement(predictor: LoadedPredictor) -> str:
    """One line: the predictor's test MAE as its training recorded it, or that it was not recorded."""
    mae = predictor.metadata.get("test_mae") or {}
    stated = ", ".join(f"{k} {mae[k]:.4g} {u}" for k, u in zip(predictor.properties, predictor.units) if k in mae)
    meta = predictor.metadata
    where = f" on {meta['test_set']}, {meta['n_test']:,} molecules" if meta.get("test_set") and meta.get("n_test") else ""
    if stated:
        return f"predictor {predictor.folder}: test MAE{where}: {stated}"
    return f"predictor {predictor.folder}: test MAE not recorded in its folder (not evaluated by scripts/train_predictor.py)"
