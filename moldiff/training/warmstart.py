"""Start a new run from another model's weights (``moldiff train --init-from MODEL``).

The use: fine-tune the shipped QM9 model on your own molecules (another element vocabulary), or
start a model of another family of features (categorical elements and bonds) from a trained
Gaussian one, instead of from random weights. Both networks must have the same architecture, width
and depth; everything else may differ, and each tensor is carried over by what its rows and
columns mean:

- **Atom inputs** (the first layer, ``embedding``): columns are matched by label: an element by its
  symbol, the atomic-number channel of EDM's features, a categorical charge class by its charge,
  the time, the conditioning properties, the self-conditioning estimate. A column that the source
  lacks (an element it never saw, a charge class, a property) starts at zero, so on molecules of
  the shared elements the new network computes what the source computed. An element's weight is
  rescaled when the two encodings scale the one-hot differently (EDM: 0.25; categorical: 1), so
  a clean atom reaches the hidden layer with the same pre-activation.
- **Atom outputs** (``embedding_out`` / ``h_out``): rows are matched by label only when both models
  predict the same kind of thing (Gaussian noise on EDM's features, or categorical logits);
  otherwise, and for rows the source lacks, they keep their fresh initialisation.
- **Edge inputs**: inputs that only the new model has (self-conditioning distances, bond classes)
  are the last columns of every edge layer; they start at zero, as when such inputs are switched
  on in a running training (:func:`moldiff.training.loop._widen`).
- Every other tensor of the same name and shape is copied; tensors only the new model has keep their
  initialisation (a bond head) or start at zero (EGNN's centre skip of sparse graphs, an added term
  of the coordinate output); tensors only the source has are left behind.

:func:`warm_start` returns a :class:`WarmStart` report of what went where; the trainer logs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from moldiff.models.valence import VALENCE_INPUTS

__all__ = ["WarmStart", "load_source", "warm_start", "input_labels", "feature_labels"]

#: state-dict names of the atom-input layer and of the atom-output layer, per denoiser family
INPUT_LAYER = "embedding"
OUTPUT_LAYERS = ("embedding_out", "h_out")
#: tensors only the new model has that start at zero rather than at their initialisation
ZERO_WHEN_NEW = ("centre_skip.",)
#: the settings two denoisers must share for their weights to fit each other
SHAPE_SETTINGS = ("arch", "hidden", "n_layers", "attention", "inv_sublayers", "e3nn_vectors", "e3nn_lmax",
                  "e3nn_edge_hidden", "e3nn_radial_basis")


@dataclass
class WarmStart:
    """What :func:`warm_start` did: tensor names copied whole, matched by label, widened with zero
    columns, left at their initialisation (only in the new model) and left behind (only in the
    source); ``matched_elements`` the elements whose weights were carried over; ``outputs`` whether
    the atom-output rows were carried over (same kind of prediction)."""

    source: str
    copied: list[str] = field(default_factory=list)
    matched: list[str] = field(default_factory=list)
    widened: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    matched_elements: list[str] = field(default_factory=list)
    new_elements: list[str] = field(default_factory=list)
    outputs: bool = False

    def summary(self) -> str:
        parts = [f"initialised from {self.source}: {len(self.copied)} tensors copied",
                 f"{len(self.matched)} matched by label (elements {', '.join(self.matched_elements) or 'none'}"
                 + (f"; new at zero: {', '.join(self.new_elements)}" if self.new_elements else "") + ")"]
        if self.widened:
            parts.append(f"{len(self.widened)} widened with zero columns")
        if self.fresh:
            parts.append(f"{len(self.fresh)} new ({', '.join(sorted({n.split('.')[0] for n in self.fresh}))})")
        if self.dropped:
            parts.append(f"{len(self.dropped)} of the source left behind")
        parts.append("atom outputs " + ("carried over" if self.outputs else "fresh (another kind of prediction)"))
        return "; ".join(parts)


def feature_labels(pipe) -> tuple[str, list[tuple]]:
    """``(kind, labels)`` of a pipeline's atom feature channels: ``kind`` is ``"gaussian"`` (EDM's
    scaled one-hots and atomic-number channel) or ``"categorical"``; each label is ``(name, scale)``
    with ``name`` ``("element", symbol)``, ``("atomic number",)`` or ``("charge class", charge)``."""
    from moldiff.diffusion.categorical import CategoricalFeatures

    f = pipe.features
    elements = [str(e) for e in pipe.elements]
    if isinstance(f, CategoricalFeatures):
        return "categorical", [(("element", e), 1.0) for e in elements] + [(("charge class", int(v)), 1.0)
                                                                          for v in f.charge_values]
    labels = [(("element", e), float(f.type_scale)) for e in elements]
    if f.include_charges:
        labels.append((("atomic number",), float(f.charge_scale)))
    return "gaussian", labels


def input_labels(pipe) -> list[tuple]:
    """``(name, scale)`` of every column of the atom-input layer, in the order the denoisers build it
    (:func:`moldiff.models.denoiser.network_inputs`): features, time, context, self-conditioning
    estimate, the elements' own time."""
    cfg = pipe.denoiser.config
    _, feats = feature_labels(pipe)
    cols = [(("h",) + name, scale) for name, scale in feats] + [(("time",), 1.0)]
    props = list(getattr(cfg, "properties", []) or [])
    if cfg.context_dim:
        if len(props) * 2 == cfg.context_dim:
            cols += [(("context value", p), 1.0) for p in props] + [(("context shown", p), 1.0) for p in props]
        else:
            cols += [(("context", k), 1.0) for k in range(cfg.context_dim)]
    if cfg.self_condition:
        cols += [(("estimate",) + name, 1.0) for name, _ in feats]
    if getattr(cfg, "type_time", False):
        cols.append((("type time",), 1.0))
    if getattr(cfg, "valence_features", False):
        cols += [(("valence", k), 1.0) for k in range(VALENCE_INPUTS)]
    return cols


def load_source(spec: str | Path):
    """``(pipeline, name)`` of the model to start from: a shipped model's name, a pipeline folder, a
    training run's folder, or a run's ``checkpoint.pt`` (its EMA weights when it has them).

    Raises:
        CheckpointError / ValueError: the model cannot be found or read (one line).
    """
    from moldiff.pipeline import MolDiffPipeline, load_pretrained

    path = Path(spec)
    if path.suffix == ".pt":
        if not path.is_file():
            raise ValueError(f"--init-from: no file {path}")
        state = torch.load(path, weights_only=False, map_location="cpu")
        if not isinstance(state, dict) or "pipeline_config" not in state:
            raise ValueError(f"--init-from: {path} is not a moldiff training checkpoint")
        pipe = MolDiffPipeline.from_config(state["pipeline_config"])
        pipe.denoiser.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
        return pipe, f"{path} (step {state.get('step', '?')})"
    pipe = load_pretrained(spec, device="cpu")
    step = pipe.metadata.get("step")
    return pipe, f"{spec}" + (f" (step {step})" if step is not None else "")


def _check_shapes(source_cfg, target_cfg) -> None:
    for name in SHAPE_SETTINGS:
        a, b = getattr(source_cfg, name, None), getattr(target_cfg, name, None)
        if a != b:
            raise ValueError(f"--init-from: the source model has model.{name}={a}, this run {b}; "
                             "width, depth and architecture must match")


def _map_columns(src: torch.Tensor, dst: torch.Tensor, src_labels, dst_labels) -> torch.Tensor:
    """``dst`` with each column whose label the source has replaced by the source's column, scaled by
    ``scale_source / scale_target``, and every other column set to zero. When the source reads EDM's
    atomic-number channel and the target has none (categorical features), that channel's weight is
    folded into each element's column (``Z`` is a function of the element), so a clean atom still
    reaches the hidden layer with the source's pre-activation."""
    from moldiff.chemistry.elements import SYMBOL_TO_Z

    out = torch.zeros_like(dst)
    where = {name: (k, scale) for k, (name, scale) in enumerate(src_labels)}
    dst_names = {name for name, _ in dst_labels}
    fold = ("h", "atomic number")
    fold = where[fold] if fold in where and fold not in dst_names else None
    for k, (name, scale) in enumerate(dst_labels):
        if name in where:
            j, s_scale = where[name]
            out[:, k] = src[:, j] * (s_scale / scale)
        if fold is not None and name[:2] == ("h", "element"):  # new elements too: what the source does with that Z
            j, z_scale = fold
            out[:, k] += src[:, j] * (z_scale * SYMBOL_TO_Z[name[2]] / scale)
    return out


def _map_rows(src: torch.Tensor, dst: torch.Tensor, src_labels, dst_labels) -> torch.Tensor:
    """``dst`` with each of its first ``len(dst_labels)`` rows whose label the source has replaced by
    the source's row, and the rows after them (EGNN's unused time and context outputs) copied when
    both have as many; other rows keep ``dst``'s values."""
    out = dst.clone()
    where = {name: k for k, (name, _) in enumerate(src_labels)}
    for k, (name, _) in enumerate(dst_labels):
        if name in where:
            out[k] = src[where[name]]
    if src.shape[0] - len(src_labels) == dst.shape[0] - len(dst_labels):
        out[len(dst_labels):] = src[len(src_labels):]
    return out


@torch.no_grad()
def warm_start(target_pipe, source_pipe, source_name: str = "the source") -> WarmStart:
    """Load ``source_pipe``'s denoiser weights into ``target_pipe``'s denoiser in place, tensor by
    tensor as the module docstring describes; returns the :class:`WarmStart` report.

    Raises:
        ValueError: the two denoisers differ in architecture, width or depth, or a tensor cannot be
            fitted (one line).
    """
    _check_shapes(source_pipe.denoiser.config, target_pipe.denoiser.config)
    src_kind, src_feats = feature_labels(source_pipe)
    dst_kind, dst_feats = feature_labels(target_pipe)
    src_in, dst_in = input_labels(source_pipe), input_labels(target_pipe)
    same_outputs = src_kind == dst_kind
    src_state = source_pipe.denoiser.state_dict()
    dst_state = target_pipe.denoiser.state_dict()
    src_elements = {name[1] for name, _ in src_feats if name[0] == "element"}
    dst_elements = [name[1] for name, _ in dst_feats if name[0] == "element"]
    report = WarmStart(source_name, outputs=same_outputs,
                       matched_elements=[e for e in dst_elements if e in src_elements],
                       new_elements=[e for e in dst_elements if e not in src_elements])
    new_state = {}
    for name, dst in dst_state.items():
        src = src_state.get(name)
        layer = name.rsplit(".", 1)[0]
        if src is None:
            # a new additive term of an existing output (EGNN's centre skip) starts at zero, so the
            # source's coordinates come out unchanged; new heads keep their initialisation
            new_state[name] = torch.zeros_like(dst) if name.startswith(ZERO_WHEN_NEW) else dst
            report.fresh.append(name)
        elif layer == INPUT_LAYER and name.endswith("weight"):
            new_state[name] = _map_columns(src, dst, src_in, dst_in)
            report.matched.append(name)
        elif layer in OUTPUT_LAYERS:
            if same_outputs:
                # rows: the atom features first (EGNN's embedding_out also has the time and context
                # rows, which the network's output drops)
                new_state[name] = _map_rows(src, dst, src_feats, dst_feats)
                report.matched.append(name)
            else:
                new_state[name] = dst
                report.fresh.append(name)
        elif src.shape == dst.shape:
            new_state[name] = src.clone()
            report.copied.append(name)
        elif src.dim() == dst.dim() and src.shape[:-1] == dst.shape[:-1] and src.shape[-1] < dst.shape[-1]:
            widened = torch.zeros_like(dst)
            widened[..., : src.shape[-1]] = src
            new_state[name] = widened
            report.widened.append(name)
        else:
            raise ValueError(f"--init-from: {name} has shape {tuple(src.shape)} in the source and "
                             f"{tuple(dst.shape)} here; the models do not fit each other")
    report.dropped = [n for n in src_state if n not in dst_state]
    target_pipe.denoiser.load_state_dict(new_state)
    return report
