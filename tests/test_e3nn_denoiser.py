"""The e3nn denoiser (``model.arch=e3nn``): configuration, E(3) x permutation equivariance in float64
(with e3nn's own checker and with moldiff's), invariance of the feature and bond outputs, saving and
loading, compiled blocks, and training / resuming / sampling / evaluating through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from e3nn.util.test import assert_equivariant as e3nn_assert_equivariant

from moldiff.data.statistics import compute_statistics
from moldiff.diffusion import AtomFeatures, NoiseSchedule, symmetric_edge_noise
from moldiff.equivariance import assert_equivariant
from moldiff.geometry import fully_connected_edges, random_orthogonal, reverse_edges, scatter_mean
from moldiff.models import DenoiserConfig, DenoiserOutput, EGNNDenoiser, build_denoiser
from moldiff.models.e3nn_denoiser import E3nnBlock, E3nnDenoiser, drop_unused_einsums, edge_geometry
from moldiff.pipeline import MolDiffPipeline

SIZES = [1, 2, 5, 9]  # a lone atom (no edges), a pair, and two larger molecules
F = 6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_batch(sizes=SIZES, seed: int = 0):
    """Random float64 ``(pos (n, 3), h (n, F), t (B,), batch (n,))``."""
    g = gen(seed)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    n = batch.shape[0]
    pos = 1.5 * torch.randn(n, 3, generator=g, dtype=torch.float64) + 2.0
    h = torch.randn(n, F, generator=g, dtype=torch.float64)
    t = torch.rand(len(sizes), generator=g, dtype=torch.float64)
    return pos, h, t, batch


def e3nn_net(seed: int = 0, **overrides) -> E3nnDenoiser:
    torch.manual_seed(seed)
    cfg = DenoiserConfig(**{"arch": "e3nn", "num_features": F, "hidden": 16, "n_layers": 2, "e3nn_vectors": 4,
                            **overrides})
    return build_denoiser(cfg).double().eval()


# ----------------------------------------------------------------------------- configuration
def test_arch_field_defaults_to_egnn_validates_and_round_trips():
    assert DenoiserConfig().arch == "egnn"
    old = DenoiserConfig(hidden=16).to_dict()
    del old["arch"]  # a config.json written before the field existed
    assert DenoiserConfig.from_dict(old).arch == "egnn"
    assert type(build_denoiser(DenoiserConfig.from_dict(old))) is EGNNDenoiser
    cfg = DenoiserConfig(arch="e3nn", hidden=16, n_layers=2, e3nn_lmax=2)
    assert DenoiserConfig.from_dict(cfg.to_dict()) == cfg
    assert type(build_denoiser(cfg)) is E3nnDenoiser
    with pytest.raises(ValueError, match="arch must be 'egnn' or 'e3nn'"):
        DenoiserConfig(arch="transformer")


def test_run_config_selects_the_arch_from_an_override():
    from moldiff.training.config import load_config

    cfg = load_config("configs/debug_tiny.yaml", ["model.arch=e3nn", "model.e3nn_vectors=8"])
    assert cfg.model.arch == "e3nn" and cfg.model.e3nn_vectors == 8 and cfg.model.hidden == 16
    with pytest.raises(ValueError, match="arch"):
        load_config("configs/debug_tiny.yaml", ["model.arch=nope"])


@pytest.mark.parametrize("overrides, name", [
    ({"attention": False}, "attention"),
    ({"inv_sublayers": 2}, "inv_sublayers"),
    ({"tanh": False}, "tanh"),
    ({"normalization_factor": 100.0}, "normalization_factor"),
    ({"e3nn_lmax": 3}, "e3nn_lmax"),
    ({"e3nn_radial_basis": 0}, "e3nn_radial_basis"),
])
def test_e3nn_refuses_what_it_does_not_support_in_one_line(overrides, name):
    with pytest.raises(ValueError, match=name) as err:
        e3nn_net(**overrides)
    assert "\n" not in str(err.value)


def test_parameter_count_is_near_egnn_at_the_same_size():
    for hidden, layers in [(16, 2), (128, 6)]:
        egnn = build_denoiser(DenoiserConfig(hidden=hidden, n_layers=layers))
        e3 = build_denoiser(DenoiserConfig(arch="e3nn", hidden=hidden, n_layers=layers))
        ratio = sum(p.numel() for p in e3.parameters()) / sum(p.numel() for p in egnn.parameters())
        assert 0.85 <= ratio <= 1.1, (hidden, layers, ratio)


# ----------------------------------------------------------------------------- outputs and equivariance
@pytest.fixture
def float64_default():
    """e3nn builds the representation matrices of its checker in the default dtype: float64 makes them
    exact enough (errors ~1e-10 rather than ~1e-7) for a float64 tolerance."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_output_shapes_zero_centre_of_mass_and_nontrivial_vectors():
    net = e3nn_net()
    pos, h, t, batch = make_batch()
    out = net(pos, h, t, batch)
    assert isinstance(out, DenoiserOutput)
    assert out.pos.shape == pos.shape and out.h.shape == h.shape
    assert out.pos.dtype == torch.float64 and out.h.dtype == torch.float64
    assert scatter_mean(out.pos, batch, len(SIZES)).abs().max() < 1e-12
    assert out.pos[0].abs().max() == 0  # the lone atom: zero centre of mass leaves nothing
    assert out.pos.abs().max() > 1e-3  # real vectors come out, so the checks below are not vacuous
    assert torch.isfinite(out.pos).all() and torch.isfinite(out.h).all()


def test_e3nn_blocks_are_equivariant_by_e3nn_own_checker(float64_default):
    """Each block maps its irreps equivariantly when the edge geometry turns with the atoms
    (``assert_equivariant`` draws rotations and inversions; ``2e`` included with lmax=2)."""
    pos, _, _, batch = make_batch()
    edge_index = fully_connected_edges(batch)
    for lmax in (1, 2):
        torch.manual_seed(lmax)
        block = E3nnBlock(8, 3, lmax, edge_attr_dim=4, edge_hidden=8).double()

        def fn(x, points):
            sh, basis = edge_geometry(points, edge_index, lmax, 4, 10.0)
            return block(x, edge_index, sh, basis)

        x = block.irreps.randn(batch.shape[0], -1, dtype=torch.float64)
        errors = e3nn_assert_equivariant(fn, args_in=[x, pos], irreps_in=[block.irreps, "cartesian_points"],
                                         irreps_out=[block.irreps], ntrials=2, tolerance=1e-8)
        assert set(errors) == {(0, False), (0, True), (1, False), (1, True)}  # parity and translation tried
        assert (fn(x, pos) - x).abs().max() > 1e-2  # the block does something


@pytest.mark.parametrize("lmax", [1, 2])
def test_denoiser_is_equivariant_by_e3nn_own_checker(lmax, float64_default):
    net = e3nn_net(seed=lmax, e3nn_lmax=lmax)
    pos, h, t, batch = make_batch(seed=lmax)

    def fn(points, feats):
        out = net(points, feats, t, batch)
        return out.pos, out.h

    # positions are points (rotated, inverted, translated); the coordinate output is a 1o vector
    # (turns with the rotation and the inversion, ignores the translation); features are invariant
    e3nn_assert_equivariant(fn, args_in=[pos, h], irreps_in=["cartesian_points", None],
                            irreps_out=["1x1o", None], ntrials=2, tolerance=1e-8)


@pytest.mark.parametrize("lmax", [1, 2])
def test_denoiser_is_e3_and_permutation_equivariant(lmax):
    """moldiff's check: random rotations and reflections, translations, and permutations within
    molecules, at float64 precision."""
    net = e3nn_net(seed=3, e3nn_lmax=lmax)
    pos, h, t, batch = make_batch(seed=3)
    worst = assert_equivariant(lambda p, x, b: tuple(net(p, x, t, b)), pos, h, batch, pos_output="vector",
                               trials=4, generator=gen(7))
    assert worst < 1e-9


def test_reflection_turns_the_coordinate_output_and_leaves_the_features():
    net = e3nn_net(seed=4)
    pos, h, t, batch = make_batch(seed=4)
    q = random_orthogonal(generator=gen(5), dtype=torch.float64, reflect=True)
    assert torch.det(q) < 0
    out = net(pos, h, t, batch)
    mirrored = net(pos @ q.T + torch.tensor([4.0, -2.0, 1.0], dtype=torch.float64), h, t, batch)
    torch.testing.assert_close(mirrored.pos, out.pos @ q.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(mirrored.h, out.h, atol=1e-10, rtol=0)
    # a true vector, not a pseudo-vector: a pure inversion flips its sign
    inverted = net(-pos, h, t, batch)
    torch.testing.assert_close(inverted.pos, -out.pos, atol=1e-10, rtol=0)
    assert (inverted.pos - out.pos).abs().max() > 1e-3


def test_molecules_do_not_see_each_other():
    net = e3nn_net(seed=5)
    pos, h, t, batch = make_batch(seed=5)
    full = net(pos, h, t, batch)
    start = sum(SIZES[:3])  # the last molecule, alone
    alone = net(pos[start:], h[start:], t[3:], torch.zeros(SIZES[3], dtype=torch.long))
    torch.testing.assert_close(alone.pos, full.pos[start:], atol=1e-12, rtol=0)
    torch.testing.assert_close(alone.h, full.h[start:], atol=1e-12, rtol=0)


def test_conditional_and_self_conditioned_model_is_equivariant_and_uses_its_inputs():
    net = e3nn_net(seed=6, context_dim=2, self_condition=True)
    pos, h, t, batch = make_batch(seed=6)
    g = gen(8)
    context = torch.randn(len(SIZES), 2, generator=g, dtype=torch.float64)
    pos_hat = pos + 0.3 * torch.randn(pos.shape, generator=g, dtype=torch.float64)
    h_hat = torch.randn(h.shape, generator=g, dtype=torch.float64)
    q = random_orthogonal(generator=g, dtype=torch.float64, reflect=True)
    shift = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
    out = net(pos, h, t, batch, context=context, cond=(pos_hat, h_hat))
    moved = net(pos @ q.T + shift, h, t, batch, context=context, cond=(pos_hat @ q.T + shift, h_hat))
    torch.testing.assert_close(moved.pos, out.pos @ q.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(moved.h, out.h, atol=1e-10, rtol=0)
    # the context and the estimate change the prediction; no estimate equals a blank one
    assert (net(pos, h, t, batch, context=context + 1.0, cond=(pos_hat, h_hat)).h - out.h).abs().max() > 1e-4
    blank = net(pos, h, t, batch, context=context)
    assert (blank.h - out.h).abs().max() > 1e-4
    zeros = net(pos, h, t, batch, context=context, cond=(torch.zeros_like(pos), torch.zeros_like(h)))
    torch.testing.assert_close(zeros.h, blank.h, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="context"):
        net(pos, h, t, batch)
    with pytest.raises(ValueError, match="self_condition"):
        e3nn_net()(pos, h, t, batch, cond=(pos_hat, h_hat))


@pytest.mark.parametrize("bond_output", ["eps", "logits"])
def test_bond_output_is_symmetric_invariant_and_permutation_equivariant(bond_output):
    K = 4
    net = e3nn_net(seed=7, bond_types=K, bond_output=bond_output)
    pos, h, t, batch = make_batch(seed=7)
    n = batch.shape[0]
    edge_index = fully_connected_edges(batch)
    rev = reverse_edges(edge_index, n)
    e = symmetric_edge_noise(rev, K, generator=gen(9), dtype=torch.float64)
    out, eps_e = net(pos, h, t, batch, edge_index=edge_index, e_t=e)
    assert eps_e.shape == (edge_index.shape[1], K)
    torch.testing.assert_close(eps_e, eps_e[rev], atol=1e-12, rtol=0)
    key = {(int(a), int(b)): k for k, (a, b) in enumerate(edge_index.T.tolist())}
    g = gen(10)
    for reflect in (False, True):
        q = random_orthogonal(generator=g, dtype=torch.float64, reflect=reflect)
        perm = torch.argsort(batch.to(torch.float64) + torch.rand(n, generator=g, dtype=torch.float64))
        inv = torch.argsort(perm)  # new index of each old atom
        # edge (i, j) of the permuted batch is edge (perm[i], perm[j]) of the original
        where = torch.tensor([key[(int(perm[a]), int(perm[b]))] for a, b in edge_index.T.tolist()])
        out2, eps2 = net((pos @ q.T + 5.0)[perm], h[perm], t, batch, edge_index=edge_index, e_t=e[where])
        torch.testing.assert_close(eps2, eps_e[where], atol=1e-10, rtol=0)
        torch.testing.assert_close(out2.pos, (out.pos @ q.T)[perm], atol=1e-10, rtol=0)
        torch.testing.assert_close(out2.h[inv], out.h, atol=1e-10, rtol=0)
    # the bond input reaches the atoms
    assert (net(pos, h, t, batch, edge_index=edge_index, e_t=e + 0.5)[0].h - out.h).abs().max() > 1e-5
    with pytest.raises(ValueError, match="e_t"):
        net(pos, h, t, batch)


def test_coincident_atoms_give_finite_outputs_and_gradients():
    torch.manual_seed(0)
    net = build_denoiser(DenoiserConfig(arch="e3nn", num_features=F, hidden=16, n_layers=2, e3nn_vectors=4)).double()
    pos = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, F, dtype=torch.float64)
    out = net(pos, h, torch.tensor([0.5], dtype=torch.float64), torch.zeros(3, dtype=torch.long))
    (out.pos.square().sum() + out.h.square().sum()).backward()
    assert torch.isfinite(out.pos).all() and torch.isfinite(pos.grad).all()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_unused_einsums_are_dropped_without_changing_the_function():
    import copy

    pos, _, _, batch = make_batch()
    edge_index = fully_connected_edges(batch)
    block = E3nnBlock(8, 3, 2, edge_attr_dim=4, edge_hidden=8).double()
    assert drop_unused_einsums(block) == 0  # already done at construction
    sh, basis = edge_geometry(pos, edge_index, 2, 4, 10.0)
    x = block.irreps.randn(batch.shape[0], -1, dtype=torch.float64)
    clone = copy.deepcopy(block)  # as the EMA copies the model: stays pruned, same numbers
    assert drop_unused_einsums(clone) == 0
    torch.testing.assert_close(clone(x, edge_index, sh, basis), block(x, edge_index, sh, basis), atol=0, rtol=0)


def test_plain_weights_widen_into_self_conditioned_and_bond_models():
    """As for EGNN, the new inputs are the last columns and the bond head comes last, so a plain
    checkpoint continues as a self-conditioned or bond model computing the same function."""
    from moldiff.training.loop import _widen

    plain = e3nn_net(seed=0)
    pos, h, t, batch = make_batch(seed=13)
    edge_index = fully_connected_edges(batch)
    want = plain(pos, h, t, batch)
    for overrides in ({"self_condition": True}, {"bond_types": 4}):
        wide = e3nn_net(seed=1, **overrides)
        wide.load_state_dict(_widen(plain.state_dict(), wide.state_dict()))
        e_t = torch.randn(edge_index.shape[1], 4, generator=gen(14), dtype=torch.float64)
        got = wide(pos, h, t, batch, edge_index=edge_index, e_t=e_t if "bond_types" in overrides else None)
        got = got[0] if "bond_types" in overrides else got
        torch.testing.assert_close(got.pos, want.pos, atol=1e-12, rtol=0)
        torch.testing.assert_close(got.h, want.h, atol=1e-12, rtol=0)
        assert list(dict(wide.named_parameters()))[: len(dict(plain.named_parameters()))] == list(dict(plain.named_parameters()))


# ----------------------------------------------------------------------------- pipeline
def e3nn_pipeline(**overrides) -> MolDiffPipeline:
    stats = compute_statistics(("H", "C", "N", "O", "F"), np.array([3, 4, 5, 6]), np.array([0, 1, 2, 3, 4, 1] * 3))
    torch.manual_seed(0)
    net = build_denoiser(DenoiserConfig(**{"arch": "e3nn", "num_features": F, "hidden": 16, "n_layers": 2,
                                           "e3nn_vectors": 4, **overrides}))
    return MolDiffPipeline(net, NoiseSchedule.polynomial(), AtomFeatures(5), stats, [1, 6, 7, 8, 9])


def test_save_and_load_give_the_same_model(tmp_path):
    pipe = e3nn_pipeline(e3nn_lmax=2, e3nn_radial_basis=8)
    pipe.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["denoiser"]
    assert saved["arch"] == "e3nn" and saved["e3nn_lmax"] == 2 and saved["e3nn_radial_basis"] == 8
    loaded = MolDiffPipeline.from_pretrained(tmp_path / "m")
    assert isinstance(loaded.denoiser, E3nnDenoiser) and loaded.denoiser.config == pipe.denoiser.config
    pos, h, t, batch = make_batch(seed=11)
    pos, h, t = pos.float(), h.float(), t.float()
    for a, b in zip(pipe.predict_noise(pos, h, t, batch), loaded.predict_noise(pos, h, t, batch)):
        assert torch.equal(a, b)


def test_compiled_blocks_and_bf16_inference_run_the_same_network():
    pipe = e3nn_pipeline()
    pos, h, t, batch = make_batch(seed=12)
    pos, h, t = pos.float(), h.float(), t.float()
    plain = pipe.predict_noise(pos, h, t, batch)
    pipe.configure_inference(compile=True, compile_backend="eager")  # dynamo traces each e3nn block
    assert len(pipe._compiled_blocks) == len(pipe.denoiser.blocks)
    for a, b in zip(plain, pipe.predict_noise(pos, h, t, batch)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    pipe.configure_inference(precision="bf16")
    bf16 = pipe.predict_noise(pos, h, t, batch)
    for a, b in zip(plain, bf16):
        assert b.dtype == torch.float32 and torch.isfinite(b).all()
        assert (a - b).abs().max() < 0.1 * a.abs().max() + 0.05


# ----------------------------------------------------------------------------- CLI end to end
def test_cli_trains_resumes_samples_and_evaluates_an_e3nn_model(tmp_path):
    from moldiff.cli import main

    threads = torch.get_num_threads()
    run = tmp_path / "run"
    try:
        assert main(["train", "--config", "configs/debug_tiny.yaml", "--set", "model.arch=e3nn", "--set",
                     "train.max_steps=6", "--run-dir", str(run), "--threads", "1"]) == 0
        assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 6
        assert main(["train", "--run-dir", str(run), "--resume", "--set", "train.max_steps=10", "--threads", "1"]) == 0
        state = torch.load(run / "checkpoint.pt", weights_only=False)
        assert state["step"] == 10
        config = json.loads((run / "pipeline" / "config.json").read_text())
        assert config["denoiser"]["arch"] == "e3nn" and config["metadata"]["step"] == 10
        out = tmp_path / "x.sdf"
        assert main(["sample", "--checkpoint", str(run / "pipeline"), "-n", "4", "--steps", "5", "--out", str(out),
                     "--no-novelty", "--threads", "1"]) == 0
        assert out.read_text().count("$$$$") == 4
        metrics = tmp_path / "m.json"
        assert main(["evaluate", str(out), "--no-novelty", "--json", str(metrics)]) == 0
        assert json.loads(metrics.read_text())
    finally:
        torch.set_num_threads(threads)
    loaded = MolDiffPipeline.from_pretrained(run / "pipeline")
    assert isinstance(loaded.denoiser, E3nnDenoiser)
