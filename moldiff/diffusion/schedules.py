"""Noise schedules in continuous time t in [0, 1] (t = 1 is noise).

A schedule is ``gamma(t) = log(sigma_t^2 / alpha_t^2)`` with the variance-preserving constraint
``alpha_t^2 + sigma_t^2 = 1`` (Kingma et al. 2021, "Variational Diffusion Models", sec. 3; EDM eq. 2):
``alpha_t^2 = sigmoid(-gamma)``, ``sigma_t^2 = sigmoid(gamma)``, ``SNR(t) = exp(-gamma)``.

Both schedules are built exactly as EDM builds them on its 1000-step grid (float64), stored as a
buffer, and linearly interpolated in gamma between grid points, so any sampler discretisation
can be used with one trained model and EDM's own timesteps ``k / 1000`` give EDM's exact values.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["NoiseSchedule", "polynomial_alphas2", "cosine_alphas2"]


def polynomial_alphas2(grid: int = 1000, power: float = 2.0, precision: float = 1e-5) -> np.ndarray:
    """EDM's polynomial schedule on ``grid + 1`` points t = k / grid: ``alpha^2 = (1 - t^power)^2``,
    with the per-step ratio ``alpha^2_k / alpha^2_{k-1}`` clipped below at 0.001 for stability, then
    squeezed into ``[precision, 1 - precision]`` (EDM, ``polynomial_schedule`` / ``clip_noise_schedule``).
    """
    t = np.linspace(0.0, 1.0, grid + 1, dtype=np.float64)
    a2 = (1.0 - t**power) ** 2
    ratio = np.clip(a2 / np.concatenate([[1.0], a2[:-1]]), 0.001, 1.0)
    a2 = np.cumprod(ratio)
    return (1.0 - 2.0 * precision) * a2 + precision


def cosine_alphas2(grid: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal 2021) as EDM builds it: ``alpha^2 ~ cos^2(((t + s)/(1 + s)) pi/2)``
    with per-step beta clipped at ``max_beta`` so that the end point keeps a finite log-SNR.
    """
    # EDM evaluates on grid + 2 points and drops the first step; this keeps its exact values.
    steps = grid + 2
    x = np.linspace(0.0, 1.0, steps, dtype=np.float64)
    f = np.cos((x + s) / (1.0 + s) * math.pi * 0.5) ** 2
    f = f / f[0]
    betas = np.clip(1.0 - f[1:] / f[:-1], 0.0, max_beta)
    return np.cumprod(1.0 - betas)


class NoiseSchedule(nn.Module):
    """gamma(t) as a float64 lookup table (``grid + 1`` points) with linear interpolation.

    Build with :meth:`polynomial` or :meth:`cosine`; :attr:`config` round-trips through JSON.
    """

    def __init__(self, kind: str = "polynomial", grid: int = 1000, **params: float):
        super().__init__()
        if kind == "polynomial":
            a2 = polynomial_alphas2(grid, **params)
        elif kind == "cosine":
            a2 = cosine_alphas2(grid, **params)
        else:
            raise ValueError(f"unknown schedule {kind!r}; choose 'polynomial' or 'cosine'")
        gamma = np.log(1.0 - a2) - np.log(a2)
        if not np.all(np.isfinite(gamma)) or not np.all(np.diff(gamma) > 0):
            raise ValueError(f"schedule {kind} {params} is not a finite, increasing log-SNR curve")
        self.register_buffer("gamma_table", torch.from_numpy(gamma))
        self.config = {"kind": kind, "grid": grid, **params}

    @classmethod
    def polynomial(cls, power: float = 2.0, precision: float = 1e-5, grid: int = 1000) -> "NoiseSchedule":
        return cls("polynomial", grid, power=power, precision=precision)

    @classmethod
    def cosine(cls, s: float = 0.008, grid: int = 1000) -> "NoiseSchedule":
        return cls("cosine", grid, s=s)

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """gamma(t) for ``t`` of any shape in [0, 1], in float64."""
        table = self.gamma_table
        grid = table.shape[0] - 1
        x = t.to(table.dtype).clamp(0.0, 1.0) * grid
        lo = x.floor().long().clamp(max=grid - 1)
        w = x - lo.to(x.dtype)
        return table[lo] * (1.0 - w) + table[lo + 1] * w

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` in float64, each with the shape of ``t``."""
        g = self.gamma(t)
        return torch.sqrt(torch.sigmoid(-g)), torch.sqrt(torch.sigmoid(g))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``alpha_t^2 / sigma_t^2 = exp(-gamma(t))``."""
        return torch.exp(-self.gamma(t))
