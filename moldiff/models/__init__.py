"""Networks; they know nothing of noise schedules or RDKit."""

from importlib import import_module

from moldiff.models.denoiser import DenoiserConfig, DenoiserOutput, EGNNDenoiser
from moldiff.models.factory import build_denoiser
from moldiff.models.property import PredictorConfig, PropertyPredictor, load_predictor, save_predictor

__all__ = ["DenoiserConfig", "DenoiserOutput", "EGNNDenoiser", "E3nnDenoiser", "build_denoiser",
           "PredictorConfig", "PropertyPredictor", "load_predictor", "save_predictor"]


def __getattr__(name: str):
    # E3nnDenoiser on first use, so that importing moldiff.models does not import e3nn
    if name == "E3nnDenoiser":
        return getattr(import_module("moldiff.models.e3nn_denoiser"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
