"""Typed run configuration: YAML file + ``key=value`` overrides -> :class:`RunConfig`.

Every field has a default, so a YAML file only states what differs; the resolved configuration is
written into the run directory and into every checkpoint, and a resumed run uses that copy.
"""

from __future__ import annotations

import math

import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml

from moldiff.models import DenoiserConfig

__all__ = ["DataConfig", "DiffusionConfig", "OptimConfig", "TrainConfig", "RunConfig", "load_config", "ConfigError"]


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


@dataclass
class DataConfig:
    #: "qm9", an .sdf file of your own 3D molecules, or the name of a dataset built by
    #: ``moldiff data sdf FILE --name NAME`` (docs/own_data.md); ``moldiff train --data`` sets it
    dataset: str = "qm9"
    cache_dir: str | None = None  #: processed-data cache (default ~/.cache/moldiff)
    include_charges: bool = True  #: EDM's extra "charge" channel (the atomic number, scaled 1/10)
    max_train_molecules: int | None = None  #: truncate the training split (debugging, overfit tests)
    max_valid_molecules: int = 1000  #: validation-loss subset size
    #: which molecules of QM9's training split to train on: "all" (EDM's unconditional model),
    #: "generator" (EDM's ``qm9_second_half``, on which its conditional models train) or "predictor"
    #: (``qm9_first_half``, the property classifiers'); ``moldiff.data.properties.edm_halves``.
    #: null: "generator" for a property-conditional model (``model.properties``), else "all"
    train_half: str | None = None

    def __post_init__(self):
        if self.train_half not in (None, "all", "generator", "predictor"):
            raise ConfigError(f"data.train_half must be all, generator, predictor or null, got {self.train_half!r}")


@dataclass
class DiffusionConfig:
    """The forward process and the training loss.

    Categorical mode (``categorical: true``; MiDi-style, Vignac et al. 2023): atom elements, formal
    charges (``categorical_charges``, classes -1 / 0 / +1 from RDKit's DetermineBonds) and, with
    ``model.bond_types=4``, the bond class of every atom pair are diffused by discrete
    marginal-transition noise (:mod:`moldiff.diffusion.categorical`), coordinates by EDM's Gaussian
    noise. The network sees one-hot classes and predicts the coordinates' noise and the logits of the
    clean classes; the loss is the coordinate noise MSE per dimension + ``type_weight`` x CE(types) +
    ``charge_weight`` x CE(charges) + ``bond_weight`` x CE(bonds), each a mean over a molecule's
    atoms / atom pairs, then over molecules. Needs ``model.num_features`` = elements + charge classes
    (QM9: 5 + 3 = 8) and, with bonds, ``model.bond_output=logits``. ``time_sampling`` applies to
    both modes.
    """

    schedule: str = "polynomial"  #: "polynomial" (EDM, power 2, precision 1e-5) or "cosine"
    power: float = 2.0
    precision: float = 1e-5
    cosine_s: float = 0.008
    grid: int = 1000
    loss_weighting: str = "uniform"  #: "uniform" (EDM), "min_snr:<gamma>" or "snr_plus_one:<cap>"
    noise_pairing: str = "none"  #: "none" (EDM), "rotation" or "permutation" (moldiff.diffusion.pairing)
    #: weight of the auxiliary valence-parity loss (0: EDM's loss only); see ``training.loop.diffusion_loss``.
    #: Experimental: 0.2 raised the validation loss without fixing parity (docs/experiments.md, session 6)
    parity_weight: float = 0.0
    #: weight of the bond-feature noise loss for models with ``model.bond_types`` (per dimension, on
    #: the scale of the atoms' loss; see ``training.loop.diffusion_loss``); in categorical mode, and
    #: with ``model.bond_output=logits``, the weight of the bond classes' cross-entropy
    bond_weight: float = 1.0
    #: fraction of training molecules whose atom types are given to the network clean (their
    #: ``h_t`` replaced by ``h_0``, no type loss): the model also learns p(x | types), which lets
    #: it sample a composition drawn from the data (``composition="data"``) or a given formula
    #: directly. 0: EDM's training. See docs/experiments.md, session 9
    known_types_prob: float = 0.0
    #: categorical mode: discrete diffusion of elements (+ charges, + bonds); see the class docstring
    categorical: bool = False
    #: categorical mode: also diffuse formal charges as classes -1 / 0 / +1 (needs the QM9 charge labels)
    categorical_charges: bool = True
    #: categorical mode: alpha_bar(t) of the classes: "coordinate" (the coordinate schedule's
    #: alpha_t^2, rescaled to run exactly from 1 to 0) or "cosine" (MiDi's, offset ``cosine_s``)
    categorical_schedule: str = "coordinate"
    #: categorical mode: weight of the element cross-entropy (mean over a molecule's atoms)
    type_weight: float = 1.0
    #: categorical mode: weight of the formal-charge cross-entropy (mean over a molecule's atoms)
    charge_weight: float = 1.0
    #: categorical mode, training only: every class (element, charge, bond) is redrawn from the
    #: data's marginals with probability at least this, however small t is (alpha_bar capped at
    #: 1 - class_floor), so the network also learns to correct a class that disagrees with the rest
    #: of a nearly clean molecule, the element or bond its final decode must fix. 0: the plain process
    class_floor: float = 0.0
    #: training times: "uniform" (EDM) or "beta:A,B": t = 1 - Beta(A, B) (t = 0 is data), e.g.
    #: "beta:2,1" (SemlaFlow's Beta(2, 1) over flow time with 1 = data; mean t = 1/3)
    time_sampling: str = "uniform"
    #: fraction of training molecules whose element features are noised at a later time than their
    #: coordinates, ``t_h = t + (1 - t) u`` (``moldiff.diffusion.times.lagged_type_times``): the model
    #: learns to decide elements from a geometry that is further along, the late joint element
    #: decision of issue 19's recipe (b). Needs ``model.type_time``. 0: EDM's training
    type_lag_prob: float = 0.0
    #: property-conditional models (``model.properties``), classifier-free guidance training: each
    #: molecule's properties are hidden from the network independently with this probability ...
    property_dropout: float = 0.5
    #: ... and all of them together with this one (the unconditional model, sampled with guidance)
    uncond_prob: float = 0.1

    def __post_init__(self):
        for name in ("property_dropout", "uncond_prob"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ConfigError(f"diffusion.{name} must be in [0, 1], got {value}")
        if not (math.isfinite(self.parity_weight) and self.parity_weight >= 0):
            raise ConfigError(f"diffusion.parity_weight must be a non-negative number, got {self.parity_weight}")
        if not (math.isfinite(self.bond_weight) and self.bond_weight >= 0):
            raise ConfigError(f"diffusion.bond_weight must be a non-negative number, got {self.bond_weight}")
        if not (math.isfinite(self.type_lag_prob) and 0.0 <= self.type_lag_prob <= 1.0):
            raise ConfigError(f"diffusion.type_lag_prob must be in [0, 1], got {self.type_lag_prob}")
        if not (math.isfinite(self.known_types_prob) and 0.0 <= self.known_types_prob <= 1.0):
            raise ConfigError(f"diffusion.known_types_prob must be in [0, 1], got {self.known_types_prob}")
        if not (math.isfinite(self.class_floor) and 0.0 <= self.class_floor < 1.0):
            raise ConfigError(f"diffusion.class_floor must be in [0, 1), got {self.class_floor}")
        if self.class_floor > 0 and not self.categorical:
            raise ConfigError("diffusion.class_floor applies to categorical classes: set diffusion.categorical=true")
        for name in ("type_weight", "charge_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"diffusion.{name} must be a non-negative number, got {value}")
        from moldiff.diffusion.categorical import CATEGORICAL_SCHEDULES
        from moldiff.diffusion.times import parse_time_sampling

        if self.categorical_schedule not in CATEGORICAL_SCHEDULES:
            raise ConfigError(f"diffusion.categorical_schedule must be one of {', '.join(CATEGORICAL_SCHEDULES)}, "
                              f"got {self.categorical_schedule!r}")
        try:
            parse_time_sampling(self.time_sampling)
        except ValueError as exc:
            raise ConfigError(f"diffusion.time_sampling: {exc}") from None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-12
    amsgrad: bool = True
    ema_decay: float = 0.999  #: 0 disables EMA
    clip: str = "edm"  #: "edm" (adaptive: 1.5 x mean + 2 x std of the last 50 norms), "none", or a number
    #: learning-rate annealing: constant ``lr`` until step ``lr_decay_start`` (None: constant for
    #: ever), then linear over ``lr_decay_steps`` steps down to ``lr * lr_final``, constant after.
    #: A function of the step, so resumed runs follow it exactly; set it on ``--resume`` to anneal
    #: the end of a long run.
    lr_decay_start: int | None = None
    lr_decay_steps: int = 1000
    lr_final: float = 0.0

    def __post_init__(self):
        if self.lr_decay_steps < 1:
            raise ConfigError(f"optim.lr_decay_steps must be at least 1, got {self.lr_decay_steps}")
        if not 0.0 <= self.lr_final <= 1.0:
            raise ConfigError(f"optim.lr_final is a fraction of optim.lr in [0, 1], got {self.lr_final}")

    def lr_at(self, step: int) -> float:
        """Learning rate for the update that takes the model from ``step`` to ``step + 1``."""
        if self.lr_decay_start is None or step < self.lr_decay_start:
            return self.lr
        frac = min(1.0, (step - self.lr_decay_start) / max(1, self.lr_decay_steps))
        return self.lr * (1.0 - frac * (1.0 - self.lr_final))


@dataclass
class TrainConfig:
    batch_size: int = 64
    max_steps: int | None = None
    max_minutes: float | None = None
    seed: int = 0
    #: "auto" (a CUDA GPU when torch sees one, else the CPU), "cpu", "cuda" or "cuda:N"
    device: str = "auto"
    num_threads: int = 1
    #: "auto", "fp32" or "bf16" (autocast of the network's matrix products). auto: bf16 on CPUs with
    #: AMX/AVX512-BF16, else fp32 (GPUs too: bf16 measured slower there for these networks);
    #: decided on every start, so a resumed run suits the machine it resumes on (moldiff.runtime)
    precision: str = "auto"
    #: torch.compile the denoiser for training: true, false or auto (also null): auto compiles only
    #: on CPUs with native bf16 in bf16, where it measured faster (one-off cost of minutes on a CPU)
    compile: bool | str | None = "auto"
    log_every: int = 50
    val_every: int = 1000
    sample_every: int = 0  #: steps between sampled-metrics checks (0: never)
    sample_n: int = 100
    sample_steps: int = 100
    sample_sampler: str = "ancestral"
    checkpoint_minutes: float = 10.0
    tensorboard: bool = False  #: also write the log rows as TensorBoard scalars to RUN/tensorboard (needs tensorboard)
    #: start a new run from this model's weights (a shipped name, a pipeline or run folder, or a
    #: checkpoint.pt; moldiff.training.warmstart); null: random initialisation. Read once, at step 0.
    init_from: str | None = None

    def __post_init__(self):
        import re

        from moldiff.runtime import DEVICE_PATTERN, PRECISIONS

        if not re.fullmatch(DEVICE_PATTERN, self.device):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.compile is None:
            self.compile = "auto"
        if not (isinstance(self.compile, bool) or self.compile == "auto"):
            raise ConfigError(f"train.compile must be true, false or auto, got {self.compile!r}")


@dataclass
class RunConfig:
    name: str = "run"
    model: DenoiserConfig = field(default_factory=DenoiserConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return _build(cls, d, "")


def _build(cls, d, prefix):
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in d.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known: {', '.join(sorted(known))})")
        default = known[key].default_factory() if callable(known[key].default_factory) else None
        if is_dataclass(default):
            kwargs[key] = _build(type(default), value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value, annotation, name: str):
    """Check ``value`` against a field's annotation (``int``, ``float``, ``bool``, ``str``, optionally
    ``| None``) and convert numbers written as strings. YAML 1.1, which PyYAML follows, reads ``3e-4``
    (no dot) as the string "3e-4", so ``--set optim.lr=3e-4`` must be converted here."""
    args = typing.get_args(annotation)
    if type(None) in args:
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else annotation
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is float:
        if is_number:
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if is_number or isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if is_number:  # e.g. optim.clip=1.0 (a fixed clipping norm)
            return str(value)
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def _set(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"cannot set '{dotted}': '{k}' is not a section")
    d[keys[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or start from defaults) and apply ``section.key=value`` overrides.

    Values are parsed as YAML scalars (``lr=3e-4``, ``tanh=false``, ``max_steps=null``).
    """
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: invalid YAML ({str(exc).splitlines()[0]})") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override must look like section.key=value, got {item!r}")
        _set(raw, key.strip(), yaml.safe_load(value))
    try:
        return RunConfig.from_dict(raw)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
