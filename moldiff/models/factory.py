"""The one place a denoiser is built from its configuration: ``DenoiserConfig.arch`` names the family."""

from __future__ import annotations

from torch import nn

from moldiff.models.denoiser import DenoiserConfig, EGNNDenoiser

__all__ = ["build_denoiser"]


def build_denoiser(config: DenoiserConfig) -> nn.Module:
    """The denoiser that ``config.arch`` names: :class:`~moldiff.models.denoiser.EGNNDenoiser`
    (``"egnn"``) or :class:`~moldiff.models.e3nn_denoiser.E3nnDenoiser` (``"e3nn"``). Both take
    ``forward(pos_t, h_t, t, batch, context=None, edge_index=None, cond=None, blocks=None, e_t=None)``
    and return a ``DenoiserOutput`` (with the bond output for bond models)."""
    if config.arch == "e3nn":
        # imported here: e3nn adds seconds to the start of every command that never uses it
        from moldiff.models.e3nn_denoiser import E3nnDenoiser

        return E3nnDenoiser(config)
    if config.arch == "egnn":
        return EGNNDenoiser(config)
    raise ValueError(f"unknown denoiser arch {config.arch!r} (known: egnn, e3nn)")
