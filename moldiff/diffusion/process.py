"""The forward process q(z_t | x) on atom positions and features (EDM, Hoogeboom et al. 2022, eq. 1-4).

Positions live in the zero centre-of-mass subspace of each molecule: their noise is a standard
Gaussian projected onto it. Features are Gaussian-noised continuous encodings of atom type (one-hot
scaled by 1/4) and atom charge (atomic number scaled by 1/10), EDM's normalisation [1, 4, 10].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from moldiff.diffusion.pairing import pair_noise
from moldiff.geometry import remove_mean

__all__ = ["AtomFeatures", "BondFeatures", "NoisedState", "centred_noise", "add_noise", "symmetric_edge_noise"]


@dataclass(frozen=True)
class AtomFeatures:
    """Encodes atom types (and charges) as continuous features and decodes them back.

    ``h = [one_hot(type) * type_scale, charge * charge_scale]`` (the charge column only when
    ``include_charges``). For QM9 EDM uses the atomic number as "charge".
    """

    num_types: int
    include_charges: bool = True
    type_scale: float = 0.25
    charge_scale: float = 0.1

    @property
    def dim(self) -> int:
        return self.num_types + int(self.include_charges)

    def encode(self, types: torch.Tensor, charges: torch.Tensor | None = None, dtype=torch.float32) -> torch.Tensor:
        """``types`` ``(n,)`` int in [0, num_types), ``charges`` ``(n,)`` -> ``h`` ``(n, dim)``."""
        onehot = torch.nn.functional.one_hot(types.long(), self.num_types).to(dtype) * self.type_scale
        if not self.include_charges:
            return onehot
        if charges is None:
            raise ValueError("these features include charges: pass charges")
        return torch.cat([onehot, charges.to(dtype).unsqueeze(-1) * self.charge_scale], -1)

    def decode(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``h`` ``(n, dim)`` -> ``(types (n,) long by argmax, charges (n,) long rounded or None)``."""
        types = h[:, : self.num_types].argmax(-1)
        if not self.include_charges:
            return types, None
        return types, torch.round(h[:, self.num_types] / self.charge_scale).long()


@dataclass(frozen=True)
class BondFeatures:
    """Encodes bond orders of atom pairs (0 = no bond, 1-3) as scaled one-hots, like atom types.

    ``num_types = 4``: no bond / single / double / triple (aromatic rings as their Kekulé form).
    """

    num_types: int = 4
    scale: float = 0.25

    def encode(self, orders: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """``orders`` ``(E,)`` int in [0, num_types) -> ``(E, num_types)``."""
        if orders.numel() and (int(orders.min()) < 0 or int(orders.max()) >= self.num_types):
            raise ValueError(f"bond orders must be in [0, {self.num_types}), got {int(orders.min())}..{int(orders.max())}")
        return torch.nn.functional.one_hot(orders.long(), self.num_types).to(dtype) * self.scale

    def decode(self, e: torch.Tensor) -> torch.Tensor:
        """``(E, num_types)`` -> ``(E,)`` bond orders by argmax."""
        return e.argmax(-1)


def symmetric_edge_noise(rev: torch.Tensor, num_types: int, *, generator=None, dtype=torch.float32) -> torch.Tensor:
    """Standard Gaussian noise ``(E, num_types)`` equal on each edge and its reverse ``rev``
    (:func:`moldiff.geometry.reverse_edges`): one draw per atom pair, ``(g + g[rev]) / sqrt(2)``."""
    g = torch.randn(rev.shape[0], num_types, generator=generator, dtype=dtype, device=rev.device)
    return (g + g[rev]) * (0.5**0.5)


class NoisedState(NamedTuple):
    """A draw from q(z_t | x): noisy ``pos_t`` ``(n, 3)``, ``h_t`` ``(n, F)`` and the noise used."""

    pos_t: torch.Tensor
    h_t: torch.Tensor
    eps_pos: torch.Tensor
    eps_h: torch.Tensor


def centred_noise(batch: torch.Tensor, num_graphs: int, *, generator=None, dtype=torch.float32) -> torch.Tensor:
    """Standard Gaussian noise ``(n, 3)`` projected onto each molecule's zero-CoM subspace."""
    eps = torch.randn(batch.shape[0], 3, generator=generator, dtype=dtype, device=batch.device)
    return remove_mean(eps, batch, num_graphs)


def add_noise(
    pos: torch.Tensor,
    h: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    batch: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    pairing: str = "none",
) -> NoisedState:
    """``z_t = alpha_t x + sigma_t eps`` for zero-CoM ``pos`` ``(n, 3)`` and features ``h`` ``(n, F)``.

    ``alpha``, ``sigma`` are per molecule, shape ``(B,)``. ``pairing`` (``"none"``, EDM; or
    ``"rotation"`` / ``"permutation"``, see :mod:`moldiff.diffusion.pairing`) moves the position noise
    towards the molecule before it is used; the random numbers drawn are the same either way.
    """
    num_graphs = alpha.shape[0]
    eps_pos = centred_noise(batch, num_graphs, generator=generator, dtype=pos.dtype)
    eps_pos = pair_noise(eps_pos, pos, batch, num_graphs, pairing)
    eps_h = torch.randn(h.shape, generator=generator, dtype=h.dtype, device=h.device)
    a = alpha.to(pos.dtype)[batch].unsqueeze(-1)
    s = sigma.to(pos.dtype)[batch].unsqueeze(-1)
    return NoisedState(a * pos + s * eps_pos, a * h + s * eps_h, eps_pos, eps_h)
