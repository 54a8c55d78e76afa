"""A second denoiser family: tensor products of irreps (e3nn) on the fully connected molecular graph.

Same contract as :class:`~moldiff.models.denoiser.EGNNDenoiser` (same ``forward`` arguments and
outputs, same :class:`~moldiff.models.denoiser.DenoiserConfig`, selected by ``arch="e3nn"``), built
from e3nn's equivariant pieces instead of EGNN's distance-and-difference-vector updates.

Features of atom ``i``: ``H x 0e + V x 1o`` (``+ V x 2e`` with ``e3nn_lmax=2``), ``H = hidden``,
``V = e3nn_vectors``. Parity is the natural one, ``(-1)^l``: ``0e`` are true scalars (unchanged by
a reflection, as atom types must be), ``1o`` true vectors (they turn with a reflection, as positions
and displacements do), ``2e`` true rank-2 tensors. Pseudo-scalars ``0o`` and pseudo-vectors ``1e``
(cross products) are never produced: the invariant outputs of a molecule and of its mirror image
are equal and the coordinate output (one ``1o`` channel) of the mirror image is the mirrored output.
The network is E(3)-equivariant, like EGNN, not only SE(3)-equivariant.

One interaction block (:class:`E3nnBlock`), for edges ``i <- j``:

1. an edge MLP of ``[s_i, s_j, radial basis of |r_ij|, other invariant edge inputs]`` (``s``: the
   atom's ``0e`` scalars; first layer computed per atom, as EGNN's) gives the invariant ``H``-channel
   message (as EGNN's edge MLP does) and the per-edge weights of the tensor product;
2. an ``o3.Linear`` of atom ``j``'s features into ``V x 0e + V x 1o (+ V x 2e)``, then a channel-wise
   (``uvu``) ``o3.TensorProduct`` with the spherical harmonics ``Y(r_ij / |r_ij|)`` up to
   ``e3nn_lmax``, weighted per edge. Paths: scalar x Y_l -> degree ``l``, and degree ``l1`` x Y_l2 ->
   every natural-parity degree ``l3 <= lmax`` (``1o x 0e -> 1o`` carries a vector along, ``1o x 1o
   -> 0e`` is the dot product with the bond direction; ``1o x 1o -> 1e`` is left out);
3. both messages summed at ``i`` and divided by ``sqrt(number of neighbours)``;
4. ``o3.Linear([x_i, messages] -> H x 0e + gates + V x l)``, ``e3nn.nn.Gate`` (SiLU on scalars,
   sigmoid gates on the ``l >= 1`` channels), ``o3.Linear`` back to the atom irreps, residual sum.

Geometry is not moved between blocks (unlike EGNN, which updates positions in every block): the
edge spherical harmonics and radial basis are computed once per forward pass. Inputs enter as
scalars (``[h_t, t, context, tanh(h_hat)]`` embedded linearly into ``H x 0e``; the ``l >= 1``
channels start at zero); invariant edge inputs are the radial basis, ``log(1 + |pos_hat_i -
pos_hat_j|^2)`` for self-conditioning and the noisy bond features ``e_t`` for bond models, in
EGNN's column order, so that plain weights widen into self-conditioned or bond models as EGNN's do.
Outputs: ``pos`` from an ``o3.Linear`` of the final features to ``1x1o``, centre of mass removed per
molecule; ``h`` and the bond head (:class:`~moldiff.models.denoiser.BondHead`, symmetric in ``i, j``)
from the final scalars only, hence invariant. Under bf16 autocast the plain-torch layers (embedding,
edge MLPs, heads) run in bf16 and e3nn's modules in the parameters' dtype.

Speed, measured before choosing (``scripts/bench_denoisers.py``: one thread of an AMD EPYC (Zen 3,
AVX2), fp32 eager, QM9 batches of 64 molecules, ``hidden=128, n_layers=6``; training step / reverse
step, relative to EGNN's 1.49 s / 0.54 s):

* a first design sent the ``H`` scalars through the tensor product too (4 paths, ``H + 3V`` = 224
  weights per edge): ~1.5x EGNN. Taking the scalar messages from the edge MLP directly and leaving
  only the ``V`` channels to the tensor product (96 weights per edge) cut that to the final design;
* e3nn 0.6's eagerly run generated code evaluates, then discards, one outer product per path
  (:func:`drop_unused_einsums` removes them): the tensor product alone went from 56 to 27 ms forward
  and 132 to 109 ms forward + backward on 19,584 edges;
* the default (``lmax=1``, ``V = hidden // 4 = 32``, edge MLP width ``hidden``; 809k parameters, 0.90x
  EGNN's 896k): 1.17x / 1.19x. The same at ``hidden=136`` (912k, 1.02x the parameters): 1.32x / 1.27x.
  ``V=16`` (699k): 0.84x / 0.88x. ``lmax=2`` (adds ``32x2e``, 10 paths; 1.06M): 3.98x / 3.90x.

``blocks=`` works as for EGNN: the blocks are ``self.blocks`` and share one signature, so
``MolDiffPipeline.configure_inference(compile=True)`` compiles them one by one.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from e3nn import o3
from e3nn.math import soft_one_hot_linspace
from e3nn.nn import Gate
from torch import nn

from moldiff.geometry import remove_mean, scatter_sum
from moldiff.models.denoiser import BondHead, DenoiserConfig, DenoiserOutput, network_inputs
from moldiff.models.egnn import EdgeInputLinear

__all__ = ["E3nnDenoiser", "E3nnBlock", "atom_irreps", "edge_geometry", "drop_unused_einsums"]

#: DenoiserConfig fields that only EGNN reads, with the values the e3nn model accepts (their defaults)
EGNN_ONLY = {"inv_sublayers": 1, "attention": True, "tanh": True, "coords_range": 15.0, "norm_constant": 1.0,
             "normalization_factor": 1.0, "type_time": False}


def _ir(l: int) -> o3.Irrep:
    """The natural-parity irrep of degree ``l``: ``0e``, ``1o``, ``2e``."""
    return o3.Irrep(l, (-1) ** l)


def atom_irreps(hidden: int, vectors: int, lmax: int) -> o3.Irreps:
    """Per-atom features ``hidden x 0e + vectors x 1o (+ vectors x 2e ...)`` up to degree ``lmax``."""
    return o3.Irreps([(hidden, _ir(0))] + [(vectors, _ir(l)) for l in range(1, lmax + 1)])


def drop_unused_einsums(module: nn.Module) -> int:
    """Remove the einsums whose results nothing uses from the code e3nn generated for ``module``'s
    tensor products; returns how many were removed. Same function, same gradients.

    e3nn 0.6 writes each tensor product as an ``fx.GraphModule``; under torch >= 2.10 it runs them
    eagerly (no TorchScript), and the generated code still evaluates an outer product per path that
    it then discards, ``(E, mul, 1, 3, 3)`` floats for a vector path: with per-edge inputs that is
    half of a tensor product's forward time. Only einsums are touched (pure functions); e3nn's
    in-place output assembly elsewhere (``Extract``) must stay, so no general dead-code pass.
    TorchScript-compiled modules (older torch) are skipped: TorchScript removes dead code itself.
    """
    removed = 0
    for sub in module.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        dead = [node for node in sub.graph.nodes
                if node.op == "call_function" and node.target in (torch.einsum, torch.functional.einsum) and not node.users]
        for node in reversed(dead):
            sub.graph.erase_node(node)
        if dead:
            sub.recompile()
            removed += len(dead)
    return removed


def edge_geometry(pos: torch.Tensor, edge_index: torch.Tensor, lmax: int, num_basis: int, r_max: float):
    """Spherical harmonics ``(E, (lmax + 1)^2)`` of the edge directions and the Gaussian radial basis
    ``(E, num_basis)`` of the edge lengths, for the vectors ``pos[j] - pos[i]`` of edges ``i <- j``
    (``edge_index[0] = i``). Coincident atoms get direction zero (all ``l >= 1`` harmonics vanish)."""
    row, col = edge_index
    vec = torch.index_select(pos, 0, col) - torch.index_select(pos, 0, row)
    length = torch.sqrt((vec * vec).sum(-1) + 1e-8)  # the guard keeps the gradient finite at zero length
    sh = o3.spherical_harmonics(list(range(lmax + 1)), vec / length.unsqueeze(-1), normalize=False,
                                normalization="component")
    basis = soft_one_hot_linspace(length, 0.0, r_max, num_basis, basis="gaussian", cutoff=False)
    return sh, basis


class E3nnBlock(nn.Module):
    """One interaction: invariant edge-MLP messages for the scalars, per-edge-weighted tensor product
    messages for the ``l >= 1`` channels, gated update, residual.

    ``forward(x (n, irreps.dim), edge_index (2, E), sh (E, (lmax+1)^2), edge_attr (E, A)) -> x``:
    equivariant in ``x`` and ``sh`` (which must be the spherical harmonics of the edge directions),
    invariant inputs ``edge_attr``.
    """

    def __init__(self, hidden: int, vectors: int, lmax: int, edge_attr_dim: int, edge_hidden: int):
        super().__init__()
        self.hidden = hidden
        self.irreps = atom_irreps(hidden, vectors, lmax)
        irreps_sh = o3.Irreps.spherical_harmonics(lmax)  # 0e + 1o (+ 2e): natural parity
        # Tensor product input and output: V scalars (they seed the l >= 1 messages, so that H does
        # not fix their width; as outputs they take the dot products) and the V channels of each l >= 1.
        irreps_tp = o3.Irreps([(vectors, _ir(l)) for l in range(lmax + 1)])
        instructions = [(0, l, l, "uvu", True) for l in range(1, lmax + 1)]  # scalar x Y_l -> degree l
        for l1 in range(1, lmax + 1):
            for l2 in range(lmax + 1):
                for l3 in range(abs(l1 - l2), min(l1 + l2, lmax) + 1):
                    if (l1 + l2 + l3) % 2 == 0:  # natural parity out of natural parity: no 1e, no 0o
                        instructions.append((l1, l2, l3, "uvu", True))
        self.pre = o3.Linear(self.irreps, irreps_tp)
        self.tp = o3.TensorProduct(irreps_tp, irreps_sh, irreps_tp, instructions,
                                   shared_weights=False, internal_weights=False)
        # Edge MLP on [s_i, s_j, edge_attr] (first layer computed per atom, see EdgeInputLinear): its
        # output is the H-channel invariant message and the tensor product's per-edge weights.
        self.edge_in = EdgeInputLinear(hidden, edge_attr_dim, edge_hidden)
        self.edge_msg = nn.Linear(edge_hidden, hidden)
        self.edge_weights = nn.Linear(edge_hidden, self.tp.weight_numel)
        self.act = nn.SiLU()
        irreps_msg = o3.Irreps([(hidden, _ir(0))]) + irreps_tp
        gated = o3.Irreps([(vectors, _ir(l)) for l in range(1, lmax + 1)])
        irreps_gates = o3.Irreps([(gated.num_irreps, _ir(0))])
        self.post = o3.Linear(self.irreps + irreps_msg, o3.Irreps([(hidden, _ir(0))]) + irreps_gates + gated)
        self.gate = Gate(f"{hidden}x0e", [nn.functional.silu], irreps_gates, [torch.sigmoid], gated)
        self.out = o3.Linear(self.gate.irreps_out, self.irreps)
        drop_unused_einsums(self)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, sh: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        row, col = edge_index
        n = x.shape[0]
        # The edge MLP is plain torch (bf16 under autocast, where its matrix products gain); two
        # products rather than one split in two, as slicing an (E, .) tensor costs a zero-filled
        # (E, .) gradient per slice in the backward pass.
        e = self.act(self.edge_in(x[:, : self.hidden], edge_index, edge_attr))
        scalar_msg = scatter_sum(self.act(self.edge_msg(e)), row, n)
        weights = self.edge_weights(e)
        # e3nn's modules contract fp32 weights with their inputs outside autocast's reach: they run
        # in the parameters' dtype with autocast off (x, the residual stream, stays in that dtype).
        dtype = self.edge_weights.weight.dtype
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            tp_msg = scatter_sum(self.tp(torch.index_select(self.pre(x), 0, col), sh.to(dtype), weights.to(dtype)), row, n)
            degree = torch.bincount(row, minlength=n).clamp(min=1).to(dtype).sqrt().unsqueeze(-1)
            agg = torch.cat([x, scalar_msg.to(dtype) / degree, tp_msg / degree], -1)
            return x + self.out(self.gate(self.post(agg)))


class E3nnDenoiser(nn.Module):
    """Denoiser of ``arch="e3nn"``: the forward contract of :class:`~moldiff.models.denoiser.EGNNDenoiser`.

    Supports ``context_dim``, ``self_condition`` and ``bond_types`` (either ``bond_output``). The
    ``pos`` output rotates and reflects with the input and ignores translations; ``h`` (and the bond
    output) are invariant; all are permutation-equivariant.
    """

    def __init__(self, config: DenoiserConfig):
        super().__init__()
        c = config
        if c.arch != "e3nn":
            raise ValueError(f"E3nnDenoiser needs arch='e3nn', got {c.arch!r}")
        for name, default in EGNN_ONLY.items():
            if getattr(c, name) != default:
                raise ValueError(f"model.{name} is an EGNN option; arch=e3nn supports only {name}={default}")
        if c.e3nn_lmax not in (1, 2):
            raise ValueError(f"model.e3nn_lmax must be 1 or 2, got {c.e3nn_lmax}")
        if c.e3nn_vectors < 0 or c.e3nn_edge_hidden < 0 or c.e3nn_radial_basis < 1 or c.e3nn_r_max <= 0:
            raise ValueError("model.e3nn_vectors / e3nn_edge_hidden must be >= 0, e3nn_radial_basis >= 1, e3nn_r_max > 0")
        self.config = config
        self.vectors = c.e3nn_vectors or max(c.hidden // 4, 1)
        edge_hidden = c.e3nn_edge_hidden or c.hidden
        self.irreps = atom_irreps(c.hidden, self.vectors, c.e3nn_lmax)
        in_nf = c.num_features + 1 + c.context_dim
        # As in EGNN, self-conditioning inputs are the last columns of the embedding and of each edge
        # MLP's first layer, and the bond head is registered last, so a plain checkpoint widens into a
        # self-conditioned or bond model with zero new columns (moldiff.training.loop._widen).
        self.embedding = nn.Linear(in_nf + (c.num_features if c.self_condition else 0), c.hidden)
        edge_attr_dim = c.e3nn_radial_basis + int(c.self_condition) + c.bond_types
        self.blocks = nn.ModuleList(
            E3nnBlock(c.hidden, self.vectors, c.e3nn_lmax, edge_attr_dim, edge_hidden) for _ in range(c.n_layers)
        )
        self.h_out = nn.Linear(c.hidden, c.num_features)
        self.pos_out = o3.Linear(self.irreps, "1x1o")
        self.bond_head = BondHead(c.hidden, c.bond_types) if c.bond_types else None

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
        bond_head: Callable | None = None,
    ) -> DenoiserOutput | tuple[DenoiserOutput, torch.Tensor]:
        """Predict on a flat batch; arguments and outputs as :meth:`EGNNDenoiser.forward
        <moldiff.models.denoiser.EGNNDenoiser.forward>` (``blocks``: callables replacing
        ``self.blocks``, signature of :meth:`E3nnBlock.forward`; ``bond_head``: one replacing
        ``self.bond_head``)."""
        c = self.config
        num_graphs = t.shape[0]
        edge_index, nodes, edge_extra = network_inputs(c, pos_t, h_t, t, batch, context, edge_index, cond, e_t)
        sh, basis = edge_geometry(pos_t, edge_index, c.e3nn_lmax, c.e3nn_radial_basis, c.e3nn_r_max)
        basis = basis.to(h_t.dtype)  # invariant edge inputs, in the features' dtype as EGNN's
        edge_attr = basis if edge_extra is None else torch.cat([basis, edge_extra.to(basis.dtype)], -1)
        scalars = self.embedding(nodes)
        dtype = self.h_out.weight.dtype  # the residual stream's (see E3nnBlock.forward)
        x = torch.cat([scalars.to(dtype), scalars.new_zeros(scalars.shape[0], self.irreps.dim - c.hidden, dtype=dtype)], -1)
        for block in self.blocks if blocks is None else blocks:
            x = block(x, edge_index, sh, edge_attr)
        s = x[:, : c.hidden]
        h_out = self.h_out(s)
        with torch.autocast(x.device.type, enabled=False):
            vel = remove_mean(self.pos_out(x.to(dtype)).to(pos_t.dtype), batch, num_graphs)
        if self.bond_head is None:
            return DenoiserOutput(vel, h_out)
        row, col = edge_index
        diff = pos_t[row] - pos_t[col]
        radial = (diff * diff).sum(-1, keepdim=True)
        return DenoiserOutput(vel, h_out), (self.bond_head if bond_head is None else bond_head)(s, edge_index, radial, e_t)
