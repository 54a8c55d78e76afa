"""The noise-predicting network: an EGNN over the flat, fully connected graph of each molecule.

It knows nothing of noise schedules: it maps a noisy state ``(pos_t, h_t)`` at time ``t`` to a
prediction with the same shapes (the diffusion module decides what that prediction means).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

from moldiff.geometry import fully_connected_edges, remove_mean
from moldiff.models.egnn import EquivariantBlock, coord_features

__all__ = ["DenoiserConfig", "DenoiserOutput", "EGNNDenoiser"]


@dataclass
class DenoiserConfig:
    """Architecture of :class:`EGNNDenoiser`. EDM's QM9 model: ``hidden=256, n_layers=9``."""

    num_features: int = 6  #: invariant input channels per atom (QM9: 5 one-hot types + 1 charge)
    hidden: int = 256
    n_layers: int = 9
    inv_sublayers: int = 1
    attention: bool = True
    tanh: bool = True
    coords_range: float = 15.0
    norm_constant: float = 1.0
    normalization_factor: float = 1.0
    context_dim: int = 0  #: per-molecule conditioning vector length (0: unconditional)
    #: self-conditioning (Chen et al., ICLR 2023, "Analog Bits"): the network also sees its previous
    #: estimate of the clean molecule, as invariant inputs (features per atom, distances per edge)
    self_condition: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "DenoiserConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DenoiserConfig fields: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class DenoiserOutput(NamedTuple):
    """Network prediction: ``pos`` ``(n, 3)`` (zero centre of mass per molecule), ``h`` ``(n, F)``."""

    pos: torch.Tensor
    h: torch.Tensor


class EGNNDenoiser(nn.Module):
    """EGNN denoiser with EDM's dynamics wrapper.

    Input node features are ``[h_t, t, context]``; the coordinate output is the displacement the
    EGNN applies to ``pos_t``, projected to zero centre of mass; feature outputs drop the time and
    context channels. Equivariance: the ``pos`` output rotates/reflects with the input and ignores
    translations; the ``h`` output is invariant; both are permutation-equivariant.
    """

    def __init__(self, config: DenoiserConfig):
        super().__init__()
        self.config = config
        c = config
        in_nf = c.num_features + 1 + c.context_dim
        # Self-conditioning inputs are appended after the plain ones (last columns of the embedding
        # and of every edge MLP's first layer), so a plain model's weights load into a
        # self-conditioned one with zero columns and compute the same function.
        self.embedding = nn.Linear(in_nf + (c.num_features if c.self_condition else 0), c.hidden)
        self.blocks = nn.ModuleList(
            EquivariantBlock(
                c.hidden,
                c.inv_sublayers,
                c.attention,
                c.tanh,
                c.coords_range,
                c.norm_constant,
                c.normalization_factor,
                extra_edge_attr=int(c.self_condition),
            )
            for _ in range(c.n_layers)
        )
        self.embedding_out = nn.Linear(c.hidden, in_nf)

    def forward(
        self,
        pos_t: torch.Tensor,
        h_t: torch.Tensor,
        t: torch.Tensor,
        batch: torch.Tensor,
        context: torch.Tensor | None = None,
        edge_index: torch.Tensor | None = None,
        cond: tuple[torch.Tensor, torch.Tensor] | None = None,
        blocks: Sequence[Callable] | None = None,
    ) -> DenoiserOutput:
        """Predict on a flat batch.

        Args:
            pos_t: ``(n, 3)`` noisy positions.
            h_t: ``(n, F)`` noisy invariant features.
            t: ``(B,)`` time in [0, 1] per molecule (1 = pure noise).
            batch: ``(n,)`` sorted molecule index of each atom.
            context: ``(B, context_dim)`` or ``None``.
            edge_index: optional precomputed ``fully_connected_edges(batch)``.
            cond: self-conditioning input ``(pos_hat (n, 3), h_hat (n, F))``, the previous estimate of
                the clean molecule, or ``None`` (no estimate yet: zeros). Only for ``self_condition``
                models. It enters as ``tanh(h_hat)`` per atom and ``log(1 + |pos_hat_i - pos_hat_j|^2)``
                per edge: invariant, and bounded where the estimate is poor (high noise).
            blocks: callables to run in place of ``self.blocks``, one per block with the same
                signature (e.g. compiled versions of them, see ``MolDiffPipeline.configure_inference``).
        """
        num_graphs = t.shape[0]
        if edge_index is None:
            edge_index = fully_connected_edges(batch)
        parts = [h_t, t.to(h_t.dtype)[batch].unsqueeze(-1)]
        if self.config.context_dim:
            if context is None:
                raise ValueError("this denoiser is conditional: pass a context of shape (B, context_dim)")
            parts.append(context.to(h_t.dtype)[batch])
        radial0, _ = coord_features(pos_t, edge_index, self.config.norm_constant)
        static = radial0
        if self.config.self_condition:
            if cond is None:
                parts.append(torch.zeros_like(h_t))
                static = torch.cat([radial0, torch.zeros_like(radial0)], -1)
            else:
                pos_hat, h_hat = cond
                parts.append(torch.tanh(h_hat.to(h_t.dtype)))
                radial_hat, _ = coord_features(pos_hat.to(pos_t.dtype), edge_index, self.config.norm_constant)
                static = torch.cat([radial0, torch.log1p(radial_hat)], -1)
        elif cond is not None:
            raise ValueError("cond was given but this denoiser was not built with self_condition")
        h = self.embedding(torch.cat(parts, -1))
        pos = pos_t
        for block in self.blocks if blocks is None else blocks:
            h, pos = block(h, pos, edge_index, static)
        h_out = self.embedding_out(h)[:, : self.config.num_features]
        vel = remove_mean(pos - pos_t, batch, num_graphs)
        return DenoiserOutput(vel, h_out)
