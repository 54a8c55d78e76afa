"""EGNN layers and the denoiser: exactness of the per-node edge linear layer and E(3) x permutation
equivariance of every layer and the full network (float64, via ``moldiff.equivariance``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moldiff.equivariance import assert_equivariant, random_transform
from moldiff.geometry import fully_connected_edges, remove_mean, scatter_mean
from moldiff.models import DenoiserConfig, DenoiserOutput, EGNNDenoiser
from moldiff.models.egnn import GCL, EdgeInputLinear, EquivariantBlock, EquivariantUpdate, coord_features, edge_head

HIDDEN = 16
SIZES = [1, 2, 5, 9]  # includes a lone atom (no edges) and a two-atom molecule


def make_batch(sizes=SIZES, features: int = 6, hidden: int | None = None, seed: int = 0):
    """Random float64 ``(pos (n, 3), h (n, F or hidden), batch (n,))``."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    n = batch.shape[0]
    pos = 1.5 * torch.randn(n, 3, generator=g, dtype=torch.float64) + 2.0
    h = torch.randn(n, hidden or features, generator=g, dtype=torch.float64)
    return pos, h, batch


def visible_coordinate_updates(module: nn.Module, std: float = 0.3, seed: int = 0) -> None:
    """Re-draw the coordinate heads (initialised with gain 0.001, as EDM) so that the coordinate
    output is O(1) Å and an equivariance error could not hide below the tolerance."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, EquivariantUpdate):
            with torch.no_grad():
                m.out.weight.copy_(std * torch.randn(m.out.weight.shape, generator=g, dtype=m.out.weight.dtype))


def gen(seed: int = 123) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- EdgeInputLinear
@pytest.mark.parametrize("edge_attr_dim", [0, 2, 3])
def test_edge_input_linear_equals_plain_linear_on_concatenated_inputs(edge_attr_dim):
    torch.manual_seed(0)
    layer = EdgeInputLinear(HIDDEN, edge_attr_dim, 7).double()
    pos, h, batch = make_batch(hidden=HIDDEN)
    edge_index = fully_connected_edges(batch)
    g = gen(1)
    edge_attr = torch.randn(edge_index.shape[1], edge_attr_dim, generator=g, dtype=torch.float64)
    row, col = edge_index
    want = layer.linear(torch.cat([h[row], h[col], edge_attr], -1))
    got = layer(h, edge_index, edge_attr)
    assert got.shape == (edge_index.shape[1], 7)
    assert (got - want).abs().max().item() < 1e-12
    # Gradients reach the same weights as the plain layer's.
    got.square().sum().backward()
    grad_fast = layer.linear.weight.grad.clone()
    layer.linear.weight.grad = None
    layer.linear(torch.cat([h[row], h[col], edge_attr], -1)).square().sum().backward()
    assert torch.allclose(grad_fast, layer.linear.weight.grad, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("bias", [True, False])
def test_edge_head_is_the_linear_layer_eagerly_and_when_compiled(bias):
    """Under torch.compile the one-column edge heads are written as reductions: same numbers."""
    g = torch.Generator().manual_seed(3)
    layer = nn.Linear(HIDDEN, 1, bias=bias).double()
    x = torch.randn(40, HIDDEN, generator=g, dtype=torch.float64)
    graphs = []

    def capture(gm, example_inputs):  # run the traced graph as it is (the compiled branch), count it
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda v: edge_head(layer, v), backend=capture, fullgraph=True)
    got = compiled(x)
    targets = [getattr(n.target, "__name__", n.target) for n in graphs[0].graph.nodes]
    assert "sum" in targets and "linear" not in targets  # the reduction, not the layer, was traced
    torch.testing.assert_close(edge_head(layer, x), layer(x), rtol=0, atol=0)
    torch.testing.assert_close(got, layer(x), rtol=1e-12, atol=1e-12)
    assert got.shape == (40, 1)


def test_coord_features_are_squared_distances_and_bounded_directions():
    pos = torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]], dtype=torch.float64)
    edge_index = torch.tensor([[0, 1], [1, 0]])
    radial, diff = coord_features(pos, edge_index, norm_constant=1.0)
    assert radial.squeeze(-1).tolist() == pytest.approx([25.0, 25.0])
    # (x_i - x_j) / (|x_i - x_j| + 1) with |.| = 5 (up to the 1e-8 guard inside the square root)
    assert torch.allclose(diff[0], torch.tensor([-3.0, -4.0, 0.0], dtype=torch.float64) / 6.0, atol=1e-9)
    assert torch.allclose(diff[1], -diff[0], atol=0)


# ----------------------------------------------------------------------------- layer equivariance
def layer_inputs(pos, batch, norm_constant=1.0):
    edge_index = fully_connected_edges(batch)
    radial, coord_diff = coord_features(pos, edge_index, norm_constant)
    return edge_index, radial, coord_diff


def test_gcl_features_are_invariant():
    torch.manual_seed(0)
    gcl = GCL(HIDDEN, edge_attr_dim=2, attention=True).double()
    pos, h, batch = make_batch(hidden=HIDDEN)

    def fn(pos, h, batch):
        edge_index, radial, _ = layer_inputs(pos, batch)
        return pos, gcl(h, edge_index, torch.cat([radial, radial.sqrt()], -1))

    assert_equivariant(fn, pos, h, batch, pos_output="point", generator=gen())
    # Not a trivial pass: the features really change.
    edge_index, radial, _ = layer_inputs(pos, batch)
    assert (gcl(h, edge_index, torch.cat([radial, radial], -1)) - h).abs().max() > 1e-2


def test_gcl_without_attention_and_with_normalisation_is_invariant():
    torch.manual_seed(1)
    gcl = GCL(HIDDEN, edge_attr_dim=2, attention=False, normalization_factor=100.0).double()
    pos, h, batch = make_batch(hidden=HIDDEN, seed=1)

    def fn(pos, h, batch):
        edge_index, radial, _ = layer_inputs(pos, batch)
        return pos, gcl(h, edge_index, torch.cat([radial, radial], -1))

    assert_equivariant(fn, pos, h, batch, pos_output="point", generator=gen())


@pytest.mark.parametrize("tanh", [True, False])
def test_equivariant_update_moves_positions_equivariantly(tanh):
    torch.manual_seed(2)
    upd = EquivariantUpdate(HIDDEN, edge_attr_dim=2, tanh=tanh, coords_range=15.0).double()
    visible_coordinate_updates(upd)
    pos, h, batch = make_batch(hidden=HIDDEN, seed=2)

    def fn(pos, h, batch):
        edge_index, radial, coord_diff = layer_inputs(pos, batch)
        return upd(h, pos, edge_index, coord_diff, torch.cat([radial, radial], -1)), h

    assert_equivariant(fn, pos, h, batch, pos_output="point", generator=gen())
    new_pos, _ = fn(pos, h, batch)
    assert (new_pos - pos).abs().max() > 1e-2
    # A lone atom has no edges, so nothing moves it.
    assert torch.equal(new_pos[0], pos[0])


def test_equivariant_block_is_equivariant():
    torch.manual_seed(3)
    block = EquivariantBlock(HIDDEN, inv_sublayers=2, attention=True, tanh=True).double()
    visible_coordinate_updates(block)
    pos, h, batch = make_batch(hidden=HIDDEN, seed=3)

    def fn(pos, h, batch):
        edge_index = fully_connected_edges(batch)
        radial0, _ = coord_features(pos, edge_index)
        new_h, new_pos = block(h, pos, edge_index, radial0)
        return new_pos, new_h

    worst = assert_equivariant(fn, pos, h, batch, pos_output="point", trials=4, generator=gen())
    assert worst < 1e-9


# ----------------------------------------------------------------------------- full denoiser
def tiny_denoiser(context_dim: int = 0, seed: int = 0, **kw) -> EGNNDenoiser:
    torch.manual_seed(seed)
    cfg = DenoiserConfig(num_features=6, hidden=HIDDEN, n_layers=3, context_dim=context_dim, **kw)
    net = EGNNDenoiser(cfg).double().eval()
    visible_coordinate_updates(net, seed=seed)
    return net


def test_denoiser_output_shapes_and_zero_centre_of_mass():
    net = tiny_denoiser()
    pos, h, batch = make_batch()
    t = torch.tensor([0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    out = net(pos, h, t, batch)
    assert isinstance(out, DenoiserOutput)
    assert out.pos.shape == pos.shape and out.h.shape == h.shape
    assert out.pos.dtype == torch.float64
    assert scatter_mean(out.pos, batch, 4).abs().max() < 1e-12
    assert out.pos[batch > 0].abs().max() > 1e-2  # a non-trivial displacement
    # Passing the edges explicitly gives the same result as building them inside.
    again = net(pos, h, t, batch, edge_index=fully_connected_edges(batch))
    assert torch.equal(again.pos, out.pos) and torch.equal(again.h, out.h)
    # The time input matters.
    other = net(pos, h, t.flip(0), batch)
    assert (other.h - out.h).abs().max() > 1e-6


def test_denoiser_is_e3_and_permutation_equivariant():
    net = tiny_denoiser()
    pos, h, batch = make_batch()
    t = torch.tensor([0.3, 0.05, 0.7, 0.99], dtype=torch.float64)
    worst = assert_equivariant(
        lambda p, x, b: tuple(net(p, x, t, b)), pos, h, batch, pos_output="vector", trials=5, generator=gen(7)
    )
    assert worst < 1e-9


def test_conditional_denoiser_is_equivariant_and_uses_its_context():
    net = tiny_denoiser(context_dim=3, seed=4, attention=False, inv_sublayers=2)
    pos, h, batch = make_batch(seed=4)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    context = torch.randn(4, 3, generator=gen(5), dtype=torch.float64)
    assert_equivariant(
        lambda p, x, b: tuple(net(p, x, t, b, context=context)), pos, h, batch, pos_output="vector", generator=gen(8)
    )
    out = net(pos, h, t, batch, context=context)
    out2 = net(pos, h, t, batch, context=context + 1.0)
    assert (out.h - out2.h).abs().max() > 1e-6
    with pytest.raises(ValueError, match="context"):
        net(pos, h, t, batch)


def test_self_conditioned_denoiser_is_equivariant_with_its_estimate():
    """The clean estimate (pos_hat, h_hat) is transformed with the input: rotations, reflections,
    translations (of either point set independently) and permutations."""
    net = tiny_denoiser(seed=9, self_condition=True)
    pos, h, batch = make_batch(seed=9)
    pos_hat, h_hat, _ = make_batch(seed=10)
    t = torch.tensor([0.2, 0.5, 0.7, 0.95], dtype=torch.float64)
    ref = net(pos, h, t, batch, cond=(pos_hat, h_hat))
    g = gen(11)
    for _ in range(4):
        q, shift, perm = random_transform(batch, generator=g)
        out = net((pos @ q.T + shift)[perm], h[perm], t, batch, cond=((pos_hat @ q.T - 2 * shift)[perm], h_hat[perm]))
        torch.testing.assert_close(out.pos, (ref.pos @ q.T)[perm], atol=1e-9, rtol=0)
        torch.testing.assert_close(out.h, ref.h[perm], atol=1e-9, rtol=0)


def test_self_conditioning_input_is_used_and_none_means_a_blank_estimate():
    net = tiny_denoiser(seed=12, self_condition=True)
    pos, h, batch = make_batch(seed=12)
    pos_hat, h_hat, _ = make_batch(seed=13)
    t = torch.tensor([0.2, 0.5, 0.7, 0.95], dtype=torch.float64)
    with torch.no_grad():  # the new input columns of a fresh model are random, not zero
        blank = net(pos, h, t, batch)
        zeros = net(pos, h, t, batch, cond=(torch.zeros_like(pos), torch.zeros_like(h)))
        used = net(pos, h, t, batch, cond=(pos_hat, h_hat))
    torch.testing.assert_close(blank.pos, zeros.pos, atol=1e-12, rtol=0)
    assert (used.h - blank.h).abs().max() > 1e-4 and (used.pos - blank.pos).abs().max() > 1e-4
    with pytest.raises(ValueError, match="self_condition"):
        tiny_denoiser()(pos, h, t, batch, cond=(pos_hat, h_hat))


def test_denoiser_outputs_are_independent_across_molecules():
    """Molecules in one flat batch must not see each other (no cross-molecule edges or pooling)."""
    net = tiny_denoiser(seed=6)
    pos, h, batch = make_batch(seed=6)
    t = torch.tensor([0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    out = net(pos, h, t, batch)
    member = batch == 3
    alone = net(pos[member], h[member], t[3:], torch.zeros(int(member.sum()), dtype=torch.long))
    assert torch.allclose(alone.pos, out.pos[member], atol=1e-12)
    assert torch.allclose(alone.h, out.h[member], atol=1e-12)


def test_denoiser_config_round_trip_and_unknown_fields():
    cfg = DenoiserConfig(hidden=32, n_layers=2, context_dim=1)
    assert DenoiserConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown DenoiserConfig"):
        DenoiserConfig.from_dict({"hidden": 8, "layers": 2})


# ----------------------------------------------------------------------------- the checker itself
def test_assert_equivariant_rejects_a_non_equivariant_function():
    pos, h, batch = make_batch()

    def leaks_x_coordinate(pos, h, batch):
        return pos + pos[:, :1], h  # adds the x coordinate to every component: not rotation-equivariant

    with pytest.raises(AssertionError, match="pos output not equivariant"):
        assert_equivariant(leaks_x_coordinate, pos, h, batch, pos_output="point", generator=gen())

    def features_see_coordinates(pos, h, batch):
        return pos, h + pos[:, :1]

    with pytest.raises(AssertionError, match="h output not equivariant"):
        assert_equivariant(features_see_coordinates, pos, h, batch, pos_output="point", generator=gen())

    def not_permutation_equivariant(pos, h, batch):
        return pos, h.roll(1, dims=0)

    with pytest.raises(AssertionError, match="h output not equivariant"):
        assert_equivariant(not_permutation_equivariant, pos, h, batch, pos_output="point", generator=gen())

    # A centred position is translation-invariant: claiming "point" for it must fail ...
    centred = lambda p, x, b: (remove_mean(p, b), x)  # noqa: E731
    with pytest.raises(AssertionError):
        assert_equivariant(centred, pos, h, batch, pos_output="point", generator=gen())
    # ... and the matching claim passes; so does the identity as a "point".
    assert_equivariant(centred, pos, h, batch, pos_output="centred", generator=gen())
    assert assert_equivariant(lambda p, x, b: (p, x), pos, h, batch, pos_output="point", generator=gen()) < 1e-12
    with pytest.raises(ValueError):
        assert_equivariant(centred, pos, h, batch, pos_output="scalar")


def test_random_transform_keeps_atoms_inside_their_molecule():
    _, _, batch = make_batch()
    for seed in range(5):
        q, shift, perm = random_transform(batch, generator=gen(seed))
        assert torch.equal(batch[perm], batch)
        assert sorted(perm.tolist()) == list(range(batch.shape[0]))
        assert torch.allclose(q.T @ q, torch.eye(3, dtype=torch.float64), atol=1e-12)
        assert shift.shape == (3,)
