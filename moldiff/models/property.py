"""An invariant property predictor: moldiff's EGNN layers, pooled over atoms, read out per molecule.

The network is the one EDM uses to judge conditional generation (``qm9/property_prediction``:
``EGNN`` of ``E_GCL_mask`` layers): element one-hots embedded, ``n_layers`` invariant graph
convolutions (:class:`moldiff.models.egnn.GCL`: edge MLP on ``[h_i, h_j, |x_i - x_j|^2]`` with an
attention gate, sum over neighbours, residual node MLP) over the fully connected graph of each
molecule, a node MLP, a sum over the atoms and a molecule MLP. Its inputs are element types and
interatomic distances only, so its output is invariant to rotations, reflections, translations and
the order of the atoms.

One network may predict several properties at once (one output per name in
``PredictorConfig.properties``): EDM trains one network per property; a multi-output network shares
the trunk and costs one training run instead of six (``docs/properties.md`` has the measurement).

Outputs are normalised targets ``(y - mean) / mad``; :meth:`PropertyPredictor.predict` undoes that
with the statistics kept in the config, so a saved predictor answers in the units it was trained on.
The network knows nothing of QM9: element vocabulary, property names, units and normalisation are
config values the training script fills in.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from moldiff.files import atomic_directory
from moldiff.geometry import fully_connected_edges, scatter_mean, scatter_sum
from moldiff.models.egnn import GCL, coord_features

__all__ = ["PredictorConfig", "PropertyPredictor", "PredictorError", "save_predictor", "load_predictor",
           "PREDICTOR_CONFIG_NAME", "PREDICTOR_WEIGHTS_NAME"]

PREDICTOR_CONFIG_NAME = "config.json"
PREDICTOR_WEIGHTS_NAME = "model.pt"
_FORMAT = "moldiff-property-predictor"
_VERSION = 1


class PredictorError(ValueError):
    """A predictor folder that cannot be loaded (one-line message)."""


@dataclass
class PredictorConfig:
    """Architecture and output meaning of a :class:`PropertyPredictor`.

    EDM's classifier: ``hidden=128, n_layers=7, attention=True``, sum pooling, one property.
    """

    elements: tuple[str, ...] = ("H", "C", "N", "O", "F")  #: element of each type index (one-hot order)
    properties: tuple[str, ...] = ("alpha",)  #: one output per name, in this order
    units: tuple[str, ...] = ("",)  #: unit of each output after :meth:`PropertyPredictor.predict`
    target_mean: tuple[float, ...] = (0.0,)  #: per output: the outputs are ``(y - mean) / mad``
    target_mad: tuple[float, ...] = (1.0,)
    hidden: int = 128
    n_layers: int = 7
    attention: bool = True
    pooling: str = "sum"  #: ``"sum"`` (EDM) or ``"mean"`` over the atoms of a molecule
    notes: dict = field(default_factory=dict)  #: free-form facts about the targets (JSON values)

    def __post_init__(self):
        self.elements = tuple(self.elements)
        self.properties = tuple(self.properties)
        self.units = tuple(self.units)
        self.target_mean = tuple(float(v) for v in self.target_mean)
        self.target_mad = tuple(float(v) for v in self.target_mad)
        p = len(self.properties)
        if p == 0 or len(set(self.properties)) != p:
            raise ValueError(f"properties must be distinct and non-empty, got {self.properties}")
        for name in ("units", "target_mean", "target_mad"):
            if len(getattr(self, name)) != p:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {p} properties")
        if not all(m > 0 for m in self.target_mad):
            raise ValueError(f"target_mad must be positive, got {self.target_mad}")
        if not self.elements or len(set(self.elements)) != len(self.elements):
            raise ValueError(f"elements must be distinct and non-empty, got {self.elements}")
        if self.pooling not in ("sum", "mean"):
            raise ValueError(f"pooling must be 'sum' or 'mean', got {self.pooling!r}")
        if self.hidden < 1 or self.n_layers < 0:
            raise ValueError(f"hidden must be >= 1 and n_layers >= 0, got {self.hidden}, {self.n_layers}")

    @classmethod
    def from_dict(cls, d: dict) -> "PredictorConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown PredictorConfig fields: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class PropertyPredictor(nn.Module):
    """Molecule-level property regressor, invariant to E(3) and to atom order."""

    def __init__(self, config: PredictorConfig):
        super().__init__()
        self.config = config
        c = config
        self.embedding = nn.Linear(len(c.elements), c.hidden)
        self.layers = nn.ModuleList(GCL(c.hidden, 1, c.attention) for _ in range(c.n_layers))
        self.node_out = nn.Sequential(nn.Linear(c.hidden, c.hidden), nn.SiLU(), nn.Linear(c.hidden, c.hidden))
        self.graph_out = nn.Sequential(nn.Linear(c.hidden, c.hidden), nn.SiLU(),
                                       nn.Linear(c.hidden, len(c.properties)))
        self.register_buffer("mean", torch.tensor(c.target_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("mad", torch.tensor(c.target_mad, dtype=torch.float32), persistent=False)

    def forward(self, pos: torch.Tensor, types: torch.Tensor, batch: torch.Tensor, num_graphs: int | None = None,
                edge_index: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised predictions ``(B, P)``.

        Args:
            pos: ``(n, 3)`` positions, Å (any frame: only distances are used).
            types: ``(n,)`` int indices into ``config.elements``.
            batch: ``(n,)`` sorted molecule index of each atom.
            num_graphs: number of molecules ``B`` (default ``batch.max() + 1``).
            edge_index: optional precomputed ``fully_connected_edges(batch)``.
        """
        if num_graphs is None:
            num_graphs = int(batch.max()) + 1 if batch.numel() else 0
        if edge_index is None:
            edge_index = fully_connected_edges(batch)
        one_hot = nn.functional.one_hot(types.long(), len(self.config.elements)).to(pos.dtype)
        h = self.embedding(one_hot)
        radial, _ = coord_features(pos, edge_index)
        for layer in self.layers:
            h = layer(h, edge_index, radial)
        h = self.node_out(h)
        pool = scatter_sum if self.config.pooling == "sum" else scatter_mean
        return self.graph_out(pool(h, batch, num_graphs))

    def denormalize(self, out: torch.Tensor) -> torch.Tensor:
        """Normalised outputs -> targets in the trained units: ``out * mad + mean``."""
        return out * self.mad.to(out.dtype) + self.mean.to(out.dtype)

    def normalize(self, targets: torch.Tensor) -> torch.Tensor:
        """Targets -> what the network is trained to output: ``(y - mean) / mad``."""
        return (targets - self.mean.to(targets.dtype)) / self.mad.to(targets.dtype)

    @torch.no_grad()
    def predict(self, pos, types, batch, num_graphs: int | None = None) -> torch.Tensor:
        """Targets ``(B, P)`` in the trained units (eval mode, no gradients)."""
        was_training = self.training
        self.eval()
        try:
            return self.denormalize(self(pos, types, batch, num_graphs))
        finally:
            self.train(was_training)


def save_predictor(directory: str | os.PathLike, model: PropertyPredictor, metadata: dict | None = None) -> Path:
    """Write ``config.json`` (config + ``metadata``, e.g. the test MAE) and ``model.pt`` (weights) into
    ``directory``, atomically: they are written to a temporary sibling folder that replaces
    ``directory`` only when complete, so a reader sees the old predictor or the new one, never a mix."""
    def fill(folder: Path) -> None:
        doc = {"format": _FORMAT, "version": _VERSION, "config": model.config.to_dict(), "metadata": metadata or {}}
        (folder / PREDICTOR_CONFIG_NAME).write_text(json.dumps(doc, indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        torch.save(state, folder / PREDICTOR_WEIGHTS_NAME)

    return atomic_directory(directory, fill)


def load_predictor(directory: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[PropertyPredictor, dict]:
    """``(model in eval mode, metadata)`` from a folder written by :func:`save_predictor`.

    Raises:
        PredictorError: missing folder or files, not a predictor, corrupt or mismatched weights.
    """
    directory = Path(directory)
    cfg_path, w_path = directory / PREDICTOR_CONFIG_NAME, directory / PREDICTOR_WEIGHTS_NAME
    if not directory.is_dir():
        raise PredictorError(f"predictor folder not found: {directory}")
    if not cfg_path.is_file() or not w_path.is_file():
        raise PredictorError(f"{directory} is not a property predictor (needs {PREDICTOR_CONFIG_NAME} and "
                             f"{PREDICTOR_WEIGHTS_NAME})")
    try:
        doc = json.loads(cfg_path.read_text())
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise PredictorError(f"{cfg_path} is not a property predictor's config (a diffusion checkpoint?)")
        if doc.get("version") != _VERSION:
            raise PredictorError(f"{cfg_path}: predictor format version {doc.get('version')}, expected {_VERSION}")
        model = PropertyPredictor(PredictorConfig.from_dict(doc["config"]))
        model.load_state_dict(torch.load(w_path, map_location="cpu", weights_only=True))
    except PredictorError:
        raise
    except Exception as exc:  # bad JSON, missing keys, truncated weights, shape mismatch
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PredictorError(f"cannot load predictor {directory}: {type(exc).__name__}: {detail}") from None
    return model.to(device).eval(), dict(doc.get("metadata") or {})
