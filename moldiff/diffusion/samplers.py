"""Reverse-process samplers over the same trained noise predictor.

A sampler owns a schedule, turns a number of steps into a descending time grid from 1 to 0
(``t_k = (k / K) ** time_power``: 1 is EDM's uniform grid, larger powers put more of the steps at
low noise, where bond lengths are decided; docs/experiments.md measures it), and
performs one reverse ``step`` from time ``t`` to ``s < t`` given the network's noise prediction
(the pipeline writes the loop and calls the network; samplers never import one).

- :class:`AncestralSampler`: DDPM ancestral sampling from the true posterior q(z_s | z_t, x_hat)
  (EDM eq. 5-6; Kingma et al. 2021 eq. 31-33), for any number of steps.
- :class:`DDIMSampler`: DDIM (Song et al. 2021, eq. 12) with ``eta`` in [0, 1]: 0 is the
  deterministic probability-flow-like sampler, 1 matches the ancestral variance.
Positions are kept in the zero centre-of-mass subspace at every step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from moldiff.diffusion.process import centred_noise, symmetric_edge_noise
from moldiff.diffusion.schedules import NoiseSchedule

__all__ = ["SamplerStep", "Sampler", "AncestralSampler", "DDIMSampler", "make_sampler", "SAMPLERS"]


class SamplerStep(NamedTuple):
    """Result of one reverse step: the state at time ``s`` and the clean-sample estimate at ``t``."""

    pos: torch.Tensor
    h: torch.Tensor
    pos0: torch.Tensor
    h0: torch.Tensor


def _per_atom(x: torch.Tensor, batch: torch.Tensor, dtype) -> torch.Tensor:
    return x.to(dtype)[batch].unsqueeze(-1)


class Sampler:
    """Interface: ``timesteps(num_steps)`` and ``step(...)``; ``decode_final`` gives x from z_0."""

    name = "base"

    def __init__(self, schedule: NoiseSchedule, time_power: float = 1.0, noise_scale: float = 1.0):
        if not (math.isfinite(time_power) and time_power > 0):
            raise ValueError(f"time_power must be a positive number, got {time_power}")
        if not (math.isfinite(noise_scale) and 0.0 <= noise_scale <= 1.0):
            raise ValueError(f"noise_scale must be in [0, 1], got {noise_scale}")
        self.schedule = schedule
        self.time_power = float(time_power)
        #: factor on the fresh noise of each stochastic step (1: the model's posterior, as EDM;
        #: below 1: lower-temperature sampling, the means are unchanged)
        self.noise_scale = float(noise_scale)

    def timesteps(self, num_steps: int, device=None) -> torch.Tensor:
        """Descending times ``(num_steps + 1,)`` from 1 to 0: ``t_k = (k / num_steps) ** time_power``
        (``time_power = 1``: uniform, EDM's grid)."""
        if num_steps < 1:
            raise ValueError(f"need at least one step, got {num_steps}")
        grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64, device=device)
        return grid if self.time_power == 1.0 else grid**self.time_power

    def clean_estimate(self, pos_t, h_t, eps_pos, eps_h, t, batch):
        """x_hat = (z_t - sigma_t eps_hat) / alpha_t for positions and features (B-shaped ``t``)."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        a, s = _per_atom(alpha, batch, pos_t.dtype), _per_atom(sigma, batch, pos_t.dtype)
        return (pos_t - s * eps_pos) / a, (h_t - s * eps_h) / a

    def step(self, eps_pos, eps_h, t, s, pos_t, h_t, batch, *, generator=None) -> SamplerStep:
        raise NotImplementedError

    def edge_step(self, eps_e, e_t, t, s, edge_batch, rev, *, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The same reverse step for bond features ``e_t`` ``(E, K)`` of directed edges (molecule of
        each edge ``edge_batch`` ``(E,)``, reverse edges ``rev``); fresh noise is symmetric.
        Returns ``(e_s, e0)``: the state at ``s`` and the clean estimate at ``t``."""
        raise NotImplementedError


class AncestralSampler(Sampler):
    """z_s ~ q(z_s | z_t, x = x_hat): mean ``z_t / a_ts - s2_ts / (a_ts sigma_t) eps_hat``,
    std ``s_ts sigma_s / sigma_t`` where ``a_ts = alpha_t / alpha_s`` and ``s2_ts = sigma_t^2 - a_ts^2 sigma_s^2``;
    the noise drawn at each step is scaled by ``noise_scale`` (1: exactly this posterior).
    """

    name = "ancestral"

    def posterior(self, t: torch.Tensor, s: torch.Tensor):
        """Per-molecule ``(coef_z, coef_eps, std)`` of q(z_s | z_t, x_hat), float64, shapes of ``t``."""
        alpha_t, sigma_t = self.schedule.alpha_sigma(t)
        alpha_s, sigma_s = self.schedule.alpha_sigma(s)
        a_ts = alpha_t / alpha_s
        s2_ts = sigma_t**2 - a_ts**2 * sigma_s**2
        coef_z = 1.0 / a_ts
        coef_eps = s2_ts / (a_ts * sigma_t)
        std = torch.sqrt(s2_ts.clamp(min=0.0)) * sigma_s / sigma_t
        return coef_z, coef_eps, std

    def step(self, eps_pos, eps_h, t, s, pos_t, h_t, batch, *, generator=None) -> SamplerStep:
        """One reverse step for a flat batch; ``t``, ``s`` are ``(B,)`` float64 with ``s < t``."""
        num_graphs = t.shape[0]
        dt = pos_t.dtype
        cz, ce, std = (_per_atom(x, batch, dt) for x in self.posterior(t, s))
        noise_pos = centred_noise(batch, num_graphs, generator=generator, dtype=dt)
        noise_h = torch.randn(h_t.shape, generator=generator, dtype=dt, device=h_t.device)
        std = std * self.noise_scale
        pos = cz * pos_t - ce * eps_pos + std * noise_pos
        h = cz * h_t - ce * eps_h + std * noise_h
        pos0, h0 = self.clean_estimate(pos_t, h_t, eps_pos, eps_h, t, batch)
        return SamplerStep(pos, h, pos0, h0)

    def edge_step(self, eps_e, e_t, t, s, edge_batch, rev, *, generator=None):
        dt = e_t.dtype
        cz, ce, std = (_per_atom(x, edge_batch, dt) for x in self.posterior(t, s))
        noise = symmetric_edge_noise(rev, e_t.shape[1], generator=generator, dtype=dt)
        e_s = cz * e_t - ce * eps_e + std * self.noise_scale * noise
        alpha, sigma = self.schedule.alpha_sigma(t)
        e0 = (e_t - _per_atom(sigma, edge_batch, dt) * eps_e) / _per_atom(alpha, edge_batch, dt)
        return e_s, e0


class DDIMSampler(Sampler):
    """DDIM: ``z_s = alpha_s x_hat + sqrt(sigma_s^2 - c^2) eps_hat + c * noise`` with
    ``c = eta * (ancestral std)``; ``eta = 0`` is deterministic given the initial noise.
    """

    name = "ddim"

    def __init__(self, schedule: NoiseSchedule, eta: float = 0.0, time_power: float = 1.0, noise_scale: float = 1.0):
        super().__init__(schedule, time_power, noise_scale)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        self.eta = eta

    def step(self, eps_pos, eps_h, t, s, pos_t, h_t, batch, *, generator=None) -> SamplerStep:
        num_graphs = t.shape[0]
        dt = pos_t.dtype
        alpha_t, sigma_t = self.schedule.alpha_sigma(t)
        alpha_s, sigma_s = self.schedule.alpha_sigma(s)
        a_ts = alpha_t / alpha_s
        s2_ts = (sigma_t**2 - a_ts**2 * sigma_s**2).clamp(min=0.0)
        c = self.eta * torch.sqrt(s2_ts) * sigma_s / sigma_t
        keep = torch.sqrt((sigma_s**2 - c**2).clamp(min=0.0))
        pos0, h0 = self.clean_estimate(pos_t, h_t, eps_pos, eps_h, t, batch)
        a_s, k, c = (_per_atom(x, batch, dt) for x in (alpha_s, keep, c))
        pos = a_s * pos0 + k * eps_pos
        h = a_s * h0 + k * eps_h
        if self.eta > 0:
            c = c * self.noise_scale
            pos = pos + c * centred_noise(batch, num_graphs, generator=generator, dtype=dt)
            h = h + c * torch.randn(h_t.shape, generator=generator, dtype=dt, device=h_t.device)
        return SamplerStep(pos, h, pos0, h0)

    def edge_step(self, eps_e, e_t, t, s, edge_batch, rev, *, generator=None):
        dt = e_t.dtype
        alpha_t, sigma_t = self.schedule.alpha_sigma(t)
        alpha_s, sigma_s = self.schedule.alpha_sigma(s)
        a_ts = alpha_t / alpha_s
        c = self.eta * torch.sqrt((sigma_t**2 - a_ts**2 * sigma_s**2).clamp(min=0.0)) * sigma_s / sigma_t
        keep = torch.sqrt((sigma_s**2 - c**2).clamp(min=0.0))
        e0 = (e_t - _per_atom(sigma_t, edge_batch, dt) * eps_e) / _per_atom(alpha_t, edge_batch, dt)
        e_s = _per_atom(alpha_s, edge_batch, dt) * e0 + _per_atom(keep, edge_batch, dt) * eps_e
        if self.eta > 0:
            noise = symmetric_edge_noise(rev, e_t.shape[1], generator=generator, dtype=dt)
            e_s = e_s + _per_atom(c * self.noise_scale, edge_batch, dt) * noise
        return e_s, e0


SAMPLERS = {"ancestral": AncestralSampler, "ddim": DDIMSampler}


def make_sampler(name: str, schedule: NoiseSchedule, **kwargs) -> Sampler:
    """``"ancestral"``, ``"ddim"`` (eta=0) or ``"ddim:<eta>"``; ``kwargs`` go to the sampler
    (e.g. ``time_power``, ``noise_scale``)."""
    base, _, arg = name.partition(":")
    if base not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(SAMPLERS)} (e.g. 'ddim:0.5')")
    if arg:
        if base != "ddim":
            raise ValueError(f"sampler {base!r} takes no argument")
        kwargs["eta"] = float(arg)
    return SAMPLERS[base](schedule, **kwargs)
