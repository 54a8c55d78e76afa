"""Where on [0, 1] training draws its diffusion times (t = 0 data, t = 1 noise).

``"uniform"`` is EDM's ``t ~ U(0, 1)``. ``"beta:A,B"`` draws ``t = 1 - Beta(A, B)``: SemlaFlow (Irwin
et al. 2024) samples flow time from Beta(2, 1) with 1 = data, which on our axis (0 = data) is
``t = 1 - Beta(2, 1)``, density ``2 (1 - t)``, mean 1/3: more training at the low-noise end where bond
lengths and types are decided. Both use one uniform number per molecule from the training
generator (Beta by its inverse CDF), so the random stream, and with it exact resume, is the same
for every choice.
"""

from __future__ import annotations

import math

import torch

__all__ = ["TIME_SAMPLINGS", "parse_time_sampling", "sample_times", "lagged_type_times"]

TIME_SAMPLINGS = ("uniform", "beta:<A>,<B>")


def parse_time_sampling(spec: str) -> tuple[float, float] | None:
    """``None`` for ``"uniform"``, ``(A, B)`` for ``"beta:A,B"`` (both positive); raises ``ValueError``."""
    if spec == "uniform":
        return None
    name, _, args = spec.partition(":")
    parts = args.split(",")
    if name == "beta" and len(parts) == 2:
        try:
            a, b = (float(p) for p in parts)
        except ValueError:
            a = b = float("nan")
        if math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0:
            return a, b
    raise ValueError(f"time sampling {spec!r}: expected 'uniform' or 'beta:A,B' with A, B > 0 (e.g. beta:2,1)")


def sample_times(num: int, spec: str, generator: torch.Generator, device=None) -> torch.Tensor:
    """``(num,)`` float64 training times drawn as ``spec`` says (see the module docstring).

    ``"uniform"`` is exactly ``torch.rand(num, generator=generator, dtype=float64, device=device)``;
    ``"beta:A,B"`` maps those same numbers ``u`` to ``1 - F^{-1}_{Beta(A,B)}(u)``.
    """
    u = torch.rand(num, generator=generator, dtype=torch.float64, device=device)
    ab = parse_time_sampling(spec)
    if ab is None:
        return u
    from scipy.special import betaincinv

    x = betaincinv(ab[0], ab[1], u.cpu().numpy())
    return (1.0 - torch.from_numpy(x)).clamp(0.0, 1.0).to(device=u.device, dtype=torch.float64)


def lagged_type_times(t: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Noise times ``(B,)`` of the element features, at or above the coordinates' times ``t``.

    Each molecule, on a coin of probability ``prob``, gets ``t_h = t + (1 - t) u`` with ``u ~ U(0, 1)``
    (its elements noisier than its coordinates, up to pure noise); the others keep ``t_h = t``. Two
    uniform numbers per molecule are drawn from ``generator`` whatever ``prob`` is (``prob = 0`` is
    not drawn at all by training, so EDM's random stream is unchanged there).
    """
    coin = torch.rand(t.shape[0], generator=generator, dtype=torch.float64, device=t.device) < prob
    u = torch.rand(t.shape[0], generator=generator, dtype=torch.float64, device=t.device)
    return torch.where(coin, t + (1.0 - t) * u, t)
