"""The noise-predicting network: an EGNN over the flat, fully connected graph of each molecule.

It knows nothing of noise schedules: it maps a noisy state ``(pos_t, h_t)`` at time ``t`` to a
prediction with the same shapes (the diffusion module decides what that prediction means).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

from moldiff.geometry import fully_connected_edges, graph_edges, parse_graph, remove_mean
from moldiff.models.egnn import EquivariantBlock, coord_features
from moldiff.models.valence import VALENCE_INPUTS

__all__ = ["DenoiserConfig", "DenoiserOutput", "EGNNDenoiser"]


@dataclass
class DenoiserConfig:
    """Architecture of the denoiser (:class:`EGNNDenoiser`, or the e3nn model with ``arch="e3nn"``).
    EDM's QM9 model: ``hidden=256, n_layers=9``."""

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
    #: bond classes generated jointly as edge features (MiDi, Vignac et al. 2023; EQGAT-diff, Le et al.
    #: 2024): 0 = none (EDM), 4 = no bond / single / double / triple. The network then also takes the
    #: noisy bond features of every atom pair and predicts their noise.
    bond_types: int = 0
    #: what the bond head predicts: ``"eps"`` (the noise on the bond features, as for atoms) or
    #: ``"logits"`` (the clean bond class, trained by cross-entropy as in MiDi; sampling turns the
    #: expected clean one-hot into the noise it implies)
    bond_output: str = "eps"
    #: the network also takes the element features' own noise time ``t_h`` (one more input column,
    #: after all others, so a plain model's weights load with a zero column and compute the same
    #: function). Trained with ``diffusion.type_lag_prob > 0``, where elements are often noisier than
    #: the coordinates, it can decide elements late, from a nearly final geometry (sampling with
    #: ``type_lag``; docs/experiments.md, session 13). Without ``t_h`` the network is given ``t``.
    type_time: bool = False
    #: network family: ``"egnn"`` (:class:`EGNNDenoiser`, EDM's) or ``"e3nn"``
    #: (:class:`~moldiff.models.e3nn_denoiser.E3nnDenoiser`, tensor products of irreps). Configs
    #: written before the field existed load as ``"egnn"``. Build either with
    #: :func:`moldiff.models.build_denoiser`. ``inv_sublayers``, ``attention``, ``tanh``,
    #: ``coords_range``, ``norm_constant`` and ``normalization_factor`` are EGNN's only (the e3nn
    #: model refuses values other than their defaults); the ``e3nn_*`` fields are the e3nn model's only.
    arch: str = "egnn"
    #: e3nn: channels of each irrep with l >= 1 per atom (``1o``, and ``2e`` with ``e3nn_lmax=2``);
    #: 0 means ``hidden // 4``. The ``hidden`` field counts the ``0e`` scalar channels.
    e3nn_vectors: int = 0
    #: e3nn: highest degree of the edge spherical harmonics and of the atom features (1 or 2)
    e3nn_lmax: int = 1
    #: e3nn: Gaussian radial basis functions of the interatomic distance, spread over [0, e3nn_r_max] Å
    e3nn_radial_basis: int = 16
    e3nn_r_max: float = 10.0
    #: e3nn: width of the edge MLP that gives each tensor product its per-edge weights; 0 means ``hidden``
    e3nn_edge_hidden: int = 0
    #: the graph messages run on (docs/drug_sized.md): ``"full"`` (every pair of atoms of a molecule,
    #: EDM's; the default), ``"radius:R"`` (pairs closer than R Å, plus each atom's nearest atom) or
    #: ``"knn:K"`` (each atom's K nearest atoms, made symmetric). Sparse graphs are built from the
    #: network's input positions ``pos_t`` on every call (a passed ``edge_index`` is ignored); ``knn``
    #: has O(N) edges per molecule instead of N(N-1). Not with ``bond_types`` (every pair needed).
    graph: str = "full"
    #: EGNN on a sparse graph: also add ``c_i (x_i - centroid)`` to each atom's coordinate output,
    #: ``c_i`` a linear function of the atom's final features. Local messages cannot say where an atom
    #: lies in the whole molecule, yet near t = 1 the noise to predict is the input itself (alpha_1 is
    #: about 0.003), and the first reverse step multiplies any error there by 24 or more; early knn
    #: exports without this term sampled clouds that flew apart (docs/drug_sized.md).
    #: ``None``: on for EGNN with a sparse graph, off otherwise (left out of :meth:`to_dict` when off).
    centre_skip: bool | None = None
    #: the coordinates' noise output gets the skip that is optimal for Gaussian data of this
    #: per-coordinate standard deviation s (Å; the training set's centred positions): ``eps_pos =
    #: c_skip (x_t - centroid) + c_out F`` with ``c_skip = sigma / (alpha^2 s^2 + sigma^2)`` and
    #: ``c_out = alpha s / sqrt(alpha^2 s^2 + sigma^2)``, ``F`` the network's coordinate output. This is
    #: Karras et al.'s (NeurIPS 2022) preconditioning written for noise prediction: ``F``'s target has
    #: unit variance at every t, and near t = 1, where the first reverse step multiplies the error 24
    #: times (50 steps), the network's share is c_out < 0.01. Applied by ``MolDiffPipeline.predict_noise``
    #: (it needs the schedule), so training, sampling and the likelihood see the same function.
    #: 0: off (EDM's plain output; left out of :meth:`to_dict`). docs/drug_sized.md
    pos_skip_std: float = 0.0
    #: the same skip for EDM's Gaussian element features, per channel, with the mean m and variance v
    #: of the encoded training atoms (from the pipeline's statistics): ``eps_h = sigma (h_t - alpha m)
    #: / (alpha^2 v + sigma^2) + c_out F_h``. The features' variance is small (one-hots times 0.25), so
    #: the network's share stays small until late, and the 24-fold first step cannot blow them up.
    #: Not for categorical models (their element output is logits). False: off (left out of to_dict).
    h_skip: bool = False
    #: property conditioning (docs/properties.md, "Conditional generation"): the names of the
    #: per-molecule properties the context holds, in order. The context is a value and a present bit
    #: per property, so ``context_dim`` is ``2 x len(properties)`` (set from it when left at 0). Empty:
    #: unconditional, and the field is left out of :meth:`to_dict` (configs as before it existed).
    properties: list[str] = field(default_factory=list)
    #: categorical models with bond classes: the network also reads, per atom, whether its noisy
    #: molecule's valence sum is odd and its valence minus its current bond orders
    #: (:mod:`moldiff.models.valence`; DiGress's extra features). The last input columns, so a model
    #: without them resumes with them switched on computing the same function (new weights at zero).
    #: Computed by ``MolDiffPipeline.predict_noise``. False: off (left out of :meth:`to_dict`).
    valence_features: bool = False
    #: the factor the valence inputs enter with. Under Adam a column's weights move by about the
    #: learning rate per step whatever its input's size, so the factor sets how fast the network can
    #: come to lean on them; switched on at resume in a run at a low rate (3e-5), columns at factor 1
    #: left the validation loss unchanged to 1e-6 over 3,000 steps (docs/experiments.md, session 25)
    valence_scale: float = 1.0

    def __post_init__(self):
        if self.properties is None:
            self.properties = []
        if isinstance(self.properties, str) or not isinstance(self.properties, (list, tuple)) \
                or not all(isinstance(p, str) for p in self.properties):
            raise ValueError(f"model.properties must be a list of property names, e.g. [gap, mu], got {self.properties!r}")
        self.properties = [p.strip().lower() for p in self.properties]
        if len(set(self.properties)) != len(self.properties):
            raise ValueError(f"model.properties names a property twice: {self.properties}")
        if self.properties:
            if self.context_dim == 0:
                self.context_dim = 2 * len(self.properties)
            elif self.context_dim != 2 * len(self.properties):
                raise ValueError(f"model.context_dim={self.context_dim} but model.properties has {len(self.properties)} "
                                 f"properties: the context is a value and a present bit per property "
                                 f"(context_dim {2 * len(self.properties)})")
        if self.bond_output not in ("eps", "logits"):
            raise ValueError(f"bond_output must be 'eps' or 'logits', got {self.bond_output!r}")
        if self.arch not in ("egnn", "e3nn"):
            raise ValueError(f"arch must be 'egnn' or 'e3nn', got {self.arch!r}")
        sparse = parse_graph(self.graph)[0] != "full"
        if self.centre_skip is None:
            self.centre_skip = sparse and self.arch == "egnn"
        elif self.centre_skip and not (sparse and self.arch == "egnn"):
            raise ValueError("model.centre_skip is for EGNN models on a sparse graph (model.graph radius:R or knn:K)")
        if not (math.isfinite(self.pos_skip_std) and self.pos_skip_std >= 0):
            raise ValueError(f"model.pos_skip_std must be a finite number >= 0 (Å; 0 is off), got {self.pos_skip_std}")
        if not (math.isfinite(self.valence_scale) and self.valence_scale > 0):
            raise ValueError(f"model.valence_scale must be a positive number, got {self.valence_scale}")
        if self.valence_features and (self.arch != "egnn" or not self.bond_types):
            raise ValueError("model.valence_features needs an EGNN model with bond classes (model.bond_types)")
        if sparse and self.bond_types:
            raise ValueError(f"model.graph={self.graph!r} cannot be used with model.bond_types={self.bond_types}: "
                             "bond models predict a class for every atom pair and need graph 'full'")

    @classmethod
    def from_dict(cls, d: dict) -> "DenoiserConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DenoiserConfig fields: {sorted(unknown)}")
        # a saved model without the key has no centre skip (to_dict leaves it out when off, and
        # sparse models saved before the option existed were built without one)
        return cls(**{"centre_skip": False, **d})

    def to_dict(self) -> dict:
        """The fields as a dict (``properties`` only when there are some)."""
        out = asdict(self)
        if not out["properties"]:
            del out["properties"]
        for key in ("centre_skip", "pos_skip_std", "h_skip", "valence_features"):  # off: as saved before the option existed
            if not out[key]:
                del out[key]
        if not self.valence_features:
            del out["valence_scale"]
        return out


class DenoiserOutput(NamedTuple):
    """Network prediction: ``pos`` ``(n, 3)`` (zero centre of mass per molecule), ``h`` ``(n, F)``."""

    pos: torch.Tensor
    h: torch.Tensor


class BondHead(nn.Module):
    """Edge output ``(E, K)`` from ``[h_i + h_j, |x_i - x_j|^2, e_ij]``: symmetric in ``i, j`` and
    invariant (the sum of the endpoint features, a distance and the symmetric input bond features)."""

    def __init__(self, hidden: int, bond_types: int):
        super().__init__()
        self.node = nn.Linear(hidden, hidden)
        self.edge = nn.Linear(1 + bond_types, hidden, bias=False)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, bond_types))

    def forward(self, h, edge_index, radial, e_t):
        a = self.node(h)  # linear, so node(h_i + h_j) = a_i + a_j - bias: one product per node
        row, col = edge_index
        pair = torch.index_select(a, 0, row) + torch.index_select(a, 0, col) - self.node.bias.to(a.dtype)
        return self.out(pair + self.edge(torch.cat([radial, e_t], -1).to(a.dtype)))


def network_inputs(
    config: DenoiserConfig,
    pos_t: torch.Tensor,
    h_t: torch.Tensor,
    t: torch.Tensor,
    batch: torch.Tensor,
    context: torch.Tensor | None,
    edge_index: torch.Tensor | None,
    cond: tuple[torch.Tensor, torch.Tensor] | None,
    e_t: torch.Tensor | None,
    t_h: torch.Tensor | None = None,
    valence: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What every denoiser family reads, checked against its config, in one place.

    Returns ``(edge_index, nodes, edge_extra)``: the graph (``config.graph``; sparse ones follow
    ``pos_t``), the per-atom input columns ``[h_t, t, context, tanh(h_hat), t_h, valence]`` (the optional ones
    as the config has them, in that order: new inputs are appended so older weights widen with zero
    columns), and the invariant per-edge columns after the family's own geometry features
    (``log(1 + |pos_hat_i - pos_hat_j|^2)`` for self-conditioning, then ``e_t``), or ``None``.

    Raises:
        ValueError: an input the config needs is missing, or one it cannot use was given.
    """
    if config.graph != "full":  # sparse graphs follow the input positions (DenoiserConfig.graph)
        edge_index = graph_edges(config.graph, pos_t, batch)
    elif edge_index is None:
        edge_index = fully_connected_edges(batch)
    parts = [h_t, t.to(h_t.dtype)[batch].unsqueeze(-1)]
    edge_parts = []
    if config.context_dim:
        if context is None:
            raise ValueError("this denoiser is conditional: pass a context of shape (B, context_dim)")
        parts.append(context.to(h_t.dtype)[batch])
    if config.self_condition:
        if cond is None:
            parts.append(torch.zeros_like(h_t))
            edge_parts.append(pos_t.new_zeros(edge_index.shape[1], 1))
        else:
            pos_hat, h_hat = cond
            parts.append(torch.tanh(h_hat.to(h_t.dtype)))
            radial_hat, _ = coord_features(pos_hat.to(pos_t.dtype), edge_index)
            edge_parts.append(torch.log1p(radial_hat))
    elif cond is not None:
        raise ValueError("cond was given but this denoiser was not built with self_condition")
    if config.bond_types:
        if e_t is None or e_t.shape != (edge_index.shape[1], config.bond_types):
            raise ValueError(f"this denoiser generates bonds: pass e_t of shape (E, {config.bond_types})")
        edge_parts.append(e_t.to(pos_t.dtype))
    elif e_t is not None:
        raise ValueError("e_t was given but this denoiser was not built with bond_types")
    if config.type_time:  # the last input column (see DenoiserConfig.type_time)
        parts.append((t if t_h is None else t_h).to(h_t.dtype)[batch].unsqueeze(-1))
    elif t_h is not None:
        raise ValueError("t_h was given but this denoiser was not built with type_time")
    if config.valence_features:  # after everything else (see DenoiserConfig.valence_features)
        if valence is None or valence.shape != (h_t.shape[0], VALENCE_INPUTS):
            raise ValueError(f"this denoiser reads valence inputs: pass valence of shape (n, {VALENCE_INPUTS})")
        parts.append(config.valence_scale * valence.to(h_t.dtype))
    elif valence is not None:
        raise ValueError("valence inputs were given but this denoiser was not built with valence_features")
    return edge_index, torch.cat(parts, -1), (torch.cat(edge_parts, -1) if edge_parts else None)


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
        self.embedding = nn.Linear(in_nf + (c.num_features if c.self_condition else 0) + int(c.type_time)
                                   + (VALENCE_INPUTS if c.valence_features else 0), c.hidden)
        self.blocks = nn.ModuleList(
            EquivariantBlock(
                c.hidden,
                c.inv_sublayers,
                c.attention,
                c.tanh,
                c.coords_range,
                c.norm_constant,
                c.normalization_factor,
                extra_edge_attr=int(c.self_condition) + c.bond_types,
            )
            for _ in range(c.n_layers)
        )
        self.embedding_out = nn.Linear(c.hidden, in_nf)
        # Registered last: its parameters come after the plain model's, so a plain checkpoint's
        # optimiser state still lines up when bond features are switched on mid-run.
        self.bond_head = BondHead(c.hidden, c.bond_types) if c.bond_types else None
        self.centre_skip = nn.Linear(c.hidden, 1) if c.centre_skip else None

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
        e_t: torch.Tensor | None = None,
        t_h: torch.Tensor | None = None,
        valence: torch.Tensor | None = None,
        bond_head: Callable | None = None,
    ) -> DenoiserOutput | tuple[DenoiserOutput, torch.Tensor]:
        """Predict on a flat batch.

        Args:
            pos_t: ``(n, 3)`` noisy positions.
            h_t: ``(n, F)`` noisy invariant features.
            t: ``(B,)`` time in [0, 1] per molecule (1 = pure noise).
            batch: ``(n,)`` sorted molecule index of each atom.
            context: ``(B, context_dim)`` or ``None``.
            edge_index: optional precomputed ``fully_connected_edges(batch)``; ignored by models with a
                sparse ``graph``, which build theirs from ``pos_t``.
            cond: self-conditioning input ``(pos_hat (n, 3), h_hat (n, F))``, the previous estimate of
                the clean molecule, or ``None`` (no estimate yet: zeros). Only for ``self_condition``
                models. It enters as ``tanh(h_hat)`` per atom and ``log(1 + |pos_hat_i - pos_hat_j|^2)``
                per edge: invariant, and bounded where the estimate is poor (high noise).
            blocks: callables to run in place of ``self.blocks``, one per block with the same
                signature (e.g. compiled versions of them, see ``MolDiffPipeline.configure_inference``).
            e_t: ``(E, bond_types)`` noisy bond features of the directed edges ``edge_index`` (equal for
                ``i -> j`` and ``j -> i``); required by, and only accepted by, models with ``bond_types``.

            t_h: ``(B,)`` noise time of the element features, for ``type_time`` models (default ``t``).
            valence: ``(n, VALENCE_INPUTS)`` valence inputs of the noisy classes
                (:func:`moldiff.models.valence.valence_inputs`), for ``valence_features`` models only.
            bond_head: a callable to run in place of ``self.bond_head`` (e.g. a compiled version of it).

        Returns:
            :class:`DenoiserOutput`; for bond models ``(DenoiserOutput, eps_e (E, bond_types))``.
        """
        num_graphs = t.shape[0]
        edge_index, nodes, edge_extra = network_inputs(self.config, pos_t, h_t, t, batch, context, edge_index, cond,
                                                       e_t, t_h, valence)
        radial0, _ = coord_features(pos_t, edge_index, self.config.norm_constant)
        static = radial0 if edge_extra is None else torch.cat([radial0, edge_extra.to(radial0.dtype)], -1)
        h = self.embedding(nodes)
        pos = pos_t
        for block in self.blocks if blocks is None else blocks:
            h, pos = block(h, pos, edge_index, static)
        h_out = self.embedding_out(h)[:, : self.config.num_features]
        vel = pos - pos_t
        if self.centre_skip is not None:
            vel = vel + self.centre_skip(h).to(pos_t.dtype) * remove_mean(pos_t, batch, num_graphs)
        vel = remove_mean(vel, batch, num_graphs)
        if self.bond_head is None:
            return DenoiserOutput(vel, h_out)
        radial, _ = coord_features(pos, edge_index, self.config.norm_constant)
        return DenoiserOutput(vel, h_out), (self.bond_head if bond_head is None else bond_head)(h, edge_index, radial, e_t)
