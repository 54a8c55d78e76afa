"""Networks; they know nothing of noise schedules or RDKit."""

from moldiff.models.denoiser import DenoiserConfig, DenoiserOutput, EGNNDenoiser

__all__ = ["DenoiserConfig", "DenoiserOutput", "EGNNDenoiser"]
