"""The training loop: data -> add_noise -> denoiser -> epsilon loss -> AdamW (+ clipping, EMA).

Run it through the CLI (``moldiff train --config configs/qm9_small.yaml``) or build a
:class:`Trainer` directly. A run directory holds::

    config.yaml        the resolved configuration (a resumed run reads this copy)
    log.csv            one row per logged step (train loss, grad norm, val loss, sampled metrics)
    checkpoint.pt      full training state (weights, EMA, optimiser, step, data position, RNG states)
    pipeline/          the EMA model as a MolDiffPipeline (``moldiff sample --checkpoint RUN/pipeline``)

Resuming from ``checkpoint.pt`` continues exactly: the data order is a function of (seed, epoch),
and the noise generator's state is saved, so the loss trajectory after a kill and resume equals
an uninterrupted run with the same seed (tested).
"""

from __future__ import annotations

import csv
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from moldiff.chemistry.elements import QM9_ELEMENTS, SYMBOL_TO_Z, valence_sum_parity
from moldiff.data.batching import MoleculeBatch, MoleculeSet
from moldiff.data.properties import PropertyConditioning, edm_halves, edm_targets
from moldiff.data.qm9 import edm_split, load_qm9
from moldiff.data.statistics import DatasetStatistics, compute_statistics
from moldiff.files import atomic_write
from moldiff.diffusion import PAIRINGS, AtomFeatures, NoiseSchedule, add_noise, epsilon_loss, symmetric_edge_noise
from moldiff.diffusion.categorical import CHARGE_VALUES, CategoricalDiffusion, CategoricalFeatures
from moldiff.diffusion.losses import bond_epsilon_loss, loss_weight, valence_parity_loss
from moldiff.diffusion.process import centred_noise
from moldiff.diffusion.times import lagged_type_times, sample_times
from moldiff.geometry import edge_bond_orders, fully_connected_edges, num_nodes_per_graph, reverse_edges, scatter_sum
from moldiff.models import build_denoiser
from moldiff.pipeline import MolDiffPipeline
from moldiff.runtime import choose_arithmetic, resolve_device, slow_bf16_warning
from moldiff.training.clipping import AdaptiveClipper
from moldiff.training.config import RunConfig
from moldiff.training.ema import EMA

__all__ = ["Trainer", "TrainingData", "load_training_data", "build_pipeline", "NumericalFaultError",
           "property_context"]

LOG_FIELDS = ["step", "epoch", "hours", "loss", "grad_norm", "clipped", "skipped", "val_loss",
              "atom_stable", "mol_stable", "validity", "uniqueness", "one_piece"]
# The sampled columns: EDM's four, then the share of molecules in one piece. EDM's validity counts a
# cloud whose atoms flew apart as valid (every lone atom sanitizes), so read validity beside it.
SAMPLED_FIELDS = ("atom_stable", "mol_stable", "validity", "uniqueness", "one_piece")


class NumericalFaultError(RuntimeError):
    """Training produced non-finite losses repeatedly."""


@dataclass
class TrainingData:
    train: MoleculeSet
    valid: MoleculeSet
    statistics: DatasetStatistics
    elements: tuple[str, ...]
    atomic_numbers: list[int]
    #: property-conditional runs (``model.properties``): the normalisation, ranges and reference table
    conditioning: PropertyConditioning | None = None


def load_training_data(cfg: RunConfig) -> TrainingData:
    """QM9 with the EDM split as :class:`MoleculeSet` objects plus training-set statistics; or, when
    ``data.dataset`` is an .sdf file or the name of a dataset built by ``moldiff data sdf``, that
    dataset's split by molecule, with its own element vocabulary (:mod:`moldiff.data.sdf`).

    ``data.train_half`` picks EDM's halves of the training split (``generator`` by default for a
    property-conditional model, ``model.properties``); such a model's batches carry each molecule's
    EDM targets (:func:`moldiff.data.properties.edm_targets`), normalised by the validation split."""
    properties = list(cfg.model.properties)
    half = cfg.data.train_half or ("generator" if properties else "all")
    if cfg.data.dataset != "qm9" and (properties or half != "all"):
        raise ValueError(f"model.properties and data.train_half are for QM9 (EDM's halves and targets); "
                         f"this run trains on {cfg.data.dataset}")
    if cfg.data.dataset != "qm9":
        from moldiff.data.sdf import load_sdf_dataset

        labels = bool(cfg.model.bond_types or (cfg.diffusion.categorical and cfg.diffusion.categorical_charges))
        own = load_sdf_dataset(cfg.data.dataset, cfg.data.cache_dir, progress=True)
        train, valid, stats = own.training_sets(cfg.data.max_train_molecules, cfg.data.max_valid_molecules, labels)
        return TrainingData(train, valid, stats, own.elements, own.atomic_numbers)
    qm9 = load_qm9(cfg.data.cache_dir)
    split = edm_split(len(qm9))
    train_idx = split["train"] if half == "all" else getattr(edm_halves(split), half)
    if cfg.data.max_train_molecules is not None:
        train_idx = train_idx[: cfg.data.max_train_molecules]
    valid_idx = split["valid"][: cfg.data.max_valid_molecules]
    z = [SYMBOL_TO_Z[e] for e in QM9_ELEMENTS]
    bonds = None
    if cfg.model.bond_types or (cfg.diffusion.categorical and cfg.diffusion.categorical_charges):
        # only bond models and categorical charges need the labels (built once, cached)
        from moldiff.data.qm9_bonds import load_qm9_bonds

        bonds = load_qm9_bonds(qm9, cfg.data.cache_dir, progress=True)
    targets = conditioning = None
    if properties:
        targets = edm_targets(qm9, properties)
        conditioning = PropertyConditioning.from_data(properties, targets[train_idx], qm9.num_atoms[train_idx],
                                                      targets[split["valid"]], subset=half)
    train = MoleculeSet(qm9.ptr, qm9.atom_types, qm9.positions, z, train_idx, bonds=bonds, targets=targets)
    valid = MoleculeSet(qm9.ptr, qm9.atom_types, qm9.positions, z, valid_idx, bonds=bonds, targets=targets)
    atom_types = np.concatenate([qm9.atom_types[qm9.ptr[i] : qm9.ptr[i + 1]] for i in train_idx])
    formal = orders = None  # with the labels, the statistics also count charges and bond classes
    if bonds is not None:
        formal = np.concatenate([bonds.charges[qm9.ptr[i] : qm9.ptr[i + 1]] for i in train_idx])
        orders = np.concatenate([bonds.orders[bonds.ptr[i] : bonds.ptr[i + 1]] for i in train_idx])
    stats = compute_statistics(QM9_ELEMENTS, train.num_atoms, atom_types, formal, orders)
    return TrainingData(train, valid, stats, QM9_ELEMENTS, z, conditioning)


def build_pipeline(cfg: RunConfig, data: TrainingData) -> MolDiffPipeline:
    model_cfg = cfg.model
    if cfg.diffusion.categorical:
        features = categorical_features(cfg, data.statistics)
        if model_cfg.num_features != features.dim:
            raise ValueError(f"model.num_features={model_cfg.num_features} but categorical mode's one-hot encoding has "
                             f"{features.dim} channels ({features.num_types} elements + {len(features.charge_values)} "
                             f"charge classes): set model.num_features={features.dim}")
    else:
        features = AtomFeatures(num_types=len(data.elements), include_charges=cfg.data.include_charges)
    if model_cfg.num_features != features.dim:
        raise ValueError(f"model.num_features={model_cfg.num_features} but the data encoding has {features.dim} channels")
    d = cfg.diffusion
    if d.schedule == "polynomial":
        schedule = NoiseSchedule.polynomial(power=d.power, precision=d.precision, grid=d.grid)
    elif d.schedule == "cosine":
        schedule = NoiseSchedule.cosine(s=d.cosine_s, grid=d.grid)
    else:
        raise ValueError(f"unknown schedule {d.schedule!r}")
    metadata = {"run_name": cfg.name, "dataset": Path(cfg.data.dataset).stem if cfg.data.dataset.endswith(".sdf")
                else cfg.data.dataset}
    if d.known_types_prob > 0:  # the network also models p(positions | types): composition="data" works
        metadata["known_types_prob"] = d.known_types_prob
    if model_cfg.properties:
        if data.conditioning is None or list(data.conditioning.names) != list(model_cfg.properties):
            raise ValueError(f"model.properties={model_cfg.properties} but the training data carries no targets for them")
        metadata["conditioning"] = data.conditioning.to_dict() | {"property_dropout": d.property_dropout,
                                                                  "uncond_prob": d.uncond_prob}
    return MolDiffPipeline(build_denoiser(model_cfg), schedule, features, data.statistics, data.atomic_numbers,
                           metadata=metadata)


def categorical_features(cfg: RunConfig, statistics: DatasetStatistics) -> CategoricalFeatures:
    """The :class:`CategoricalFeatures` of a ``diffusion.categorical`` run: one-hot elements (+ charge
    classes -1 / 0 / +1 with ``diffusion.categorical_charges``; + ``model.bond_types`` bond classes),
    with the training split's marginals from ``statistics``. Raises ``ValueError`` for options that
    do not combine with categorical mode."""
    d, m = cfg.diffusion, cfg.model
    clash = [what for what, on in (("model.self_condition", m.self_condition),
                                   ("diffusion.parity_weight", d.parity_weight > 0),
                                   ("diffusion.noise_pairing", d.noise_pairing != "none"),
                                   ("diffusion.known_types_prob", d.known_types_prob > 0)) if on]
    if clash:
        raise ValueError(f"diffusion.categorical does not combine with {', '.join(clash)} yet")
    if m.bond_types and m.bond_output != "logits":
        raise ValueError("diffusion.categorical with model.bond_types: the bond head gives clean-bond logits, "
                         "set model.bond_output=logits")
    charges = CHARGE_VALUES if d.categorical_charges else ()
    return CategoricalFeatures(
        num_types=len(statistics.elements),
        type_marginals=tuple(statistics.type_marginals()),
        charge_values=charges,
        charge_marginals=tuple(statistics.charge_marginals(charges)) if charges else (),
        bond_types=m.bond_types,
        bond_marginals=tuple(statistics.bond_marginals(m.bond_types)) if m.bond_types else (),
        schedule=d.categorical_schedule,
        cosine_s=d.cosine_s,
    )


def property_context(conditioning: PropertyConditioning, targets: torch.Tensor, generator: torch.Generator | None = None,
                     property_dropout: float = 0.0, uncond_prob: float = 0.0) -> torch.Tensor:
    """``(B, 2P)`` network context of molecules with EDM targets ``targets`` ``(B, P)``: normalised
    values, then present bits (:class:`~moldiff.data.properties.PropertyConditioning`).

    Classifier-free guidance training: with a ``generator``, each molecule's properties are dropped
    (value 0, bit 0) independently with probability ``property_dropout``, and all of them together
    with probability ``uncond_prob``. Draws, in order: ``(B,)`` uniforms for the all-drop coin, then
    ``(B, P)`` for the single drops, both from ``generator``. Without one nothing is dropped."""
    mean = torch.as_tensor(conditioning.mean, dtype=torch.float64, device=targets.device)
    mad = torch.as_tensor(conditioning.mad, dtype=torch.float64, device=targets.device)
    z = (targets.to(torch.float64) - mean) / mad
    present = torch.ones_like(z, dtype=torch.bool)
    if generator is not None:
        b, p = z.shape
        drop_all = torch.rand(b, generator=generator, device=generator.device) < uncond_prob
        drop = torch.rand(b, p, generator=generator, device=generator.device) < property_dropout
        present = ~(drop | drop_all.unsqueeze(-1)).to(targets.device)
    z = torch.where(present, z, torch.zeros_like(z))
    return torch.cat([z, present.to(z.dtype)], -1).to(torch.float32)


def training_times(cfg: RunConfig, num: int, generator: torch.Generator, device) -> torch.Tensor:
    """``(num,)`` float64 training times as ``diffusion.time_sampling`` says (one uniform number per
    molecule from ``generator`` whatever the choice; "uniform" is EDM's ``torch.rand``)."""
    return sample_times(num, cfg.diffusion.time_sampling, generator, device)


#: logits of the parity loss's type probabilities per unit of one-hot: a clean one-hot gives a gap
#: of 10 (wrong types ~5e-5 each), so a correct composition scores ~0, not the coin flip a soft gap gives
PARITY_LOGIT_SCALE = 10.0


def diffusion_loss(pipe: MolDiffPipeline, batch: MoleculeBatch, t: torch.Tensor, generator, shard=None,
                   weighting: str = "uniform", pairing: str = "none", parity_weight: float = 0.0,
                   bond_weight: float = 1.0, known_types_prob: float = 0.0, type_weight: float = 1.0,
                   charge_weight: float = 1.0, type_lag_prob: float = 0.0, class_floor: float = 0.0,
                   context: torch.Tensor | None = None) -> torch.Tensor:
    """EDM's L2 loss on one batch at times ``t`` ``(B,)`` (optionally SNR-weighted, see ``loss_weight``).

    Categorical models (``pipe.features`` is :class:`CategoricalFeatures`): the coordinate noise MSE
    per dimension + ``type_weight`` x CE(types) + ``charge_weight`` x CE(charges) + ``bond_weight``
    x CE(bonds), per molecule, averaged over molecules (:func:`categorical_loss_terms`; ``class_floor``:
    its floor on the classes' corruption).

    ``parity_weight > 0`` adds ``parity_weight * mean_k alpha_k^2 * valence_parity_loss_k``: the
    clean estimate's atom types, as probabilities ``softmax(PARITY_LOGIT_SCALE * h0 / type_scale)``,
    should give an even valence sum, as every real molecule has (session 6 found half the samples
    odd). ``alpha^2 = SNR / (1 + SNR)`` keeps the term to the low-noise end, where types are decided.

    ``shard=(lo, hi)`` restricts the loss to molecules ``lo:hi`` after drawing noise for the whole
    batch (data-parallel ranks use this so that they reproduce single-process noise exactly).

    Bond models (``pipe.bond_types``): the batch's bond orders (``batch.bonds``) are noised on every
    atom pair at the same ``t`` and the loss adds ``bond_weight x`` their noise error per dimension
    (:func:`moldiff.diffusion.losses.bond_epsilon_loss`) to the atoms' loss.

    ``known_types_prob = p > 0``: each molecule, on a coin of probability ``p`` (drawn for the whole
    batch from ``generator``), is shown to the network with its clean atom features ``h_0`` in place
    of ``h_t``, and its type error counts as zero (the coordinates' error keeps its usual weight):
    the network also learns to place atoms whose elements are given (composition-conditioned
    sampling). ``p = 0`` draws nothing, so the random stream is EDM's.

    ``type_lag_prob = q > 0`` (``type_time`` models): each molecule's element features are noised at
    ``t_h`` from :func:`~moldiff.diffusion.times.lagged_type_times` (``t_h >= t``; on a coin of
    probability ``q``, ``t + (1 - t) u``) instead of ``t``, with the same noise draw, and the network
    is told ``t_h``; the loss is unchanged in form (noise MSE of coordinates and features).

    ``context`` ``(B, context_dim)``: per-molecule conditioning of a property-conditional model
    (:func:`property_context`), for the whole batch (``shard`` slices it); ``None`` for others.
    """
    if isinstance(pipe.features, CategoricalFeatures):
        terms = categorical_loss_terms(pipe, batch, t, generator, shard, weighting, context=context,
                                       class_floor=class_floor)
        per_mol = terms["pos"] + type_weight * terms["types"]
        if "charges" in terms:
            per_mol = per_mol + charge_weight * terms["charges"]
        if "bonds" in terms:
            per_mol = per_mol + bond_weight * terms["bonds"]
        return per_mol.mean()
    h = pipe.features.encode(batch.types, batch.charges, dtype=batch.pos.dtype)
    alpha, sigma = pipe.schedule.alpha_sigma(t)
    noised = add_noise(batch.pos, h, alpha, sigma, batch.batch, generator=generator, pairing=pairing)
    bvec, num_graphs, tt = batch.batch, batch.num_graphs, t
    pos_t, h_t, eps_pos, eps_h = noised
    t_h = None  # element features' own noise times (type_time models)
    if type_lag_prob > 0:
        t_h = lagged_type_times(t, type_lag_prob, generator)
        a_h, s_h = (x.to(h_t.dtype)[bvec].unsqueeze(-1) for x in pipe.schedule.alpha_sigma(t_h))
        h_t = a_h * h.to(h_t.dtype) + s_h * eps_h
    known = None  # (n, 1) bool: atoms of molecules whose types are given clean
    if known_types_prob > 0:
        coin = torch.rand(num_graphs, generator=generator, device=generator.device) < known_types_prob
        known = coin.to(bvec.device)[bvec].unsqueeze(-1)
        h_t = torch.where(known, h.to(h_t.dtype), h_t)
    if shard is not None:
        lo, hi = shard
        keep = (bvec >= lo) & (bvec < hi)
        pos_t, h_t, eps_pos, eps_h = pos_t[keep], h_t[keep], eps_pos[keep], eps_h[keep]
        known = None if known is None else known[keep]
        bvec, num_graphs, tt = bvec[keep] - lo, hi - lo, t[lo:hi]
        t_h = None if t_h is None else t_h[lo:hi]
        context = None if context is None else context[lo:hi]
    cond = None
    # Self-conditioning (Chen et al. 2023): on a coin flip per batch, first estimate the clean
    # molecule without gradients and feed it back as an input. The coin comes from the training
    # generator (reproducible, identical on every data-parallel rank); plain models draw nothing.
    if pipe.self_condition and bool(torch.rand((), generator=generator, device=generator.device) < 0.5):
        with torch.no_grad():
            e_pos, e_h = pipe.predict_noise(pos_t, h_t, tt.to(pos_t.dtype), bvec, context=context)
            a, s = pipe.schedule.alpha_sigma(tt)
            a, s = a.to(pos_t.dtype)[bvec].unsqueeze(-1), s.to(pos_t.dtype)[bvec].unsqueeze(-1)
            cond = ((pos_t - s * e_pos) / a, (h_t - s * e_h) / a)
    weight = loss_weight(pipe.schedule.snr(tt), weighting)
    if pipe.bond_types:
        return _bond_model_loss(pipe, batch, pos_t, h_t, eps_pos, eps_h, tt, weight, generator, bond_weight, context)
    pred_pos, pred_h = pipe.predict_noise(pos_t, h_t, tt.to(pos_t.dtype), bvec, cond=cond, context=context,
                                          t_h=None if t_h is None else t_h.to(pos_t.dtype))
    if known is not None:  # given types: nothing to predict for them (zero error, no gradient)
        pred_h = torch.where(known, eps_h.to(pred_h.dtype), pred_h)
    loss = epsilon_loss(pred_pos, eps_pos, pred_h, eps_h, bvec, num_graphs, weight=weight)
    if parity_weight > 0:
        a, s = pipe.schedule.alpha_sigma(tt)
        a_atom, s_atom = a.to(h_t.dtype)[bvec].unsqueeze(-1), s.to(h_t.dtype)[bvec].unsqueeze(-1)
        k = pipe.features.num_types
        h0 = (h_t[:, :k] - s_atom * pred_h[:, :k]) / a_atom
        odd = torch.tensor([valence_sum_parity([e]) == 1 for e in pipe.elements], device=h0.device)
        per_mol = valence_parity_loss(PARITY_LOGIT_SCALE * h0 / pipe.features.type_scale, odd, bvec, num_graphs)
        loss = loss + parity_weight * (a.to(per_mol.dtype) ** 2 * per_mol).mean()
    return loss


def categorical_loss_terms(pipe, batch: MoleculeBatch, t: torch.Tensor, generator, shard=None,
                           weighting: str = "uniform", context: torch.Tensor | None = None,
                           class_floor: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-molecule terms ``(B,)`` of a categorical model's loss at times ``t`` ``(B,)``.

    Coordinates get EDM's Gaussian noise; elements, charge classes and (bond models) the bond class
    of every atom pair are drawn from ``q(x_t | x_0)`` (bonds once per pair, equal on both
    directions). The network sees one-hot classes and returns the coordinates' noise and clean-class
    logits. Terms: ``"pos"``, the noise MSE summed over a molecule's coordinates / ``3 (N - 1)``
    (times ``loss_weight``'s SNR weight unless ``weighting="uniform"``); ``"types"`` and
    ``"charges"``, cross-entropy of the clean class averaged over the molecule's atoms; ``"bonds"``,
    over its directed atom pairs (each pair twice, with equal labels and logits). Random draws, in
    order: position noise, types, charges, bonds, for the whole batch; ``shard=(lo, hi)`` then keeps
    molecules ``lo:hi`` (data-parallel ranks). ``context``: as in :func:`diffusion_loss`.
    ``class_floor > 0``: every class is redrawn from the marginals with probability at least this
    (``diffusion.class_floor``; the same random draws as without it).
    """
    feats: CategoricalFeatures = pipe.features
    cat = CategoricalDiffusion.from_features(feats, pipe.schedule)
    bvec, num_graphs, dtype = batch.batch, batch.num_graphs, batch.pos.dtype
    alpha, sigma = pipe.schedule.alpha_sigma(t)
    eps_pos = centred_noise(bvec, num_graphs, generator=generator, dtype=dtype)
    pos_t = alpha.to(dtype)[bvec].unsqueeze(-1) * batch.pos + sigma.to(dtype)[bvec].unsqueeze(-1) * eps_pos
    t_atom = t[bvec]
    types0 = batch.types.long()
    types_t = cat.types.sample_forward(types0, t_atom, generator, floor=class_floor)
    charges0 = charges_t = None
    if cat.charges is not None:
        if batch.formal_charges is None:
            raise ValueError("this model diffuses formal charges: its batches need them (a bond table with charges)")
        charges0 = feats.charge_classes(batch.formal_charges)
        charges_t = cat.charges.sample_forward(charges0, t_atom, generator, floor=class_floor)
    edge_index = bonds0 = bonds_t = None
    if cat.bonds is not None:
        if batch.bonds is None:
            raise ValueError("this model generates bonds: its batches need bond orders (MoleculeSet(..., bonds=...))")
        n = bvec.shape[0]
        edge_index = fully_connected_edges(bvec)
        rev = reverse_edges(edge_index, n)
        bonds0 = edge_bond_orders(batch.bonds, edge_index, n)
        bonds_t = cat.bonds.sample_forward_edges(bonds0, t[bvec[edge_index[0]]], edge_index, rev, generator,
                                                 floor=class_floor)
    tt = t
    if shard is not None:
        lo, hi = shard
        keep = (bvec >= lo) & (bvec < hi)
        first = int(torch.searchsorted(bvec, torch.tensor(lo, device=bvec.device)))  # batch is sorted
        eps_pos, pos_t, types0, types_t = eps_pos[keep], pos_t[keep], types0[keep], types_t[keep]
        if charges0 is not None:
            charges0, charges_t = charges0[keep], charges_t[keep]
        if edge_index is not None:
            on = keep[edge_index[0]]
            edge_index, bonds0, bonds_t = edge_index[:, on] - first, bonds0[on], bonds_t[on]
        bvec, num_graphs, tt = bvec[keep] - lo, hi - lo, t[lo:hi]
        context = None if context is None else context[lo:hi]
    h_t = feats.encode(types_t, charges_t, dtype=dtype)
    if edge_index is None:
        pred_pos, logits = pipe.predict_noise(pos_t, h_t, tt.to(dtype), bvec, context=context)[:2]
    else:
        pred_pos, logits, bond_logits = pipe.predict_noise(pos_t, h_t, tt.to(dtype), bvec, context=context,
                                                           edge_index=edge_index,
                                                           e_t=feats.encode_bonds(bonds_t, dtype), raw_bonds=True)
    atoms = num_nodes_per_graph(bvec, num_graphs).to(torch.float32)
    sq = ((pred_pos.float() - eps_pos.float()) ** 2).sum(-1)
    pos_term = scatter_sum(sq, bvec, num_graphs) / (3.0 * (atoms - 1.0)).clamp(min=1.0)
    weight = loss_weight(pipe.schedule.snr(tt), weighting)
    if weight is not None:
        pos_term = pos_term * weight.to(pos_term.dtype)
    type_logits, charge_logits = feats.split(logits)
    ce = torch.nn.functional.cross_entropy

    def per_atom_mean(x):
        return scatter_sum(x, bvec, num_graphs) / atoms.clamp(min=1.0)

    terms = {"pos": pos_term, "types": per_atom_mean(ce(type_logits.float(), types0, reduction="none"))}
    if charge_logits is not None:
        terms["charges"] = per_atom_mean(ce(charge_logits.float(), charges0, reduction="none"))
    if edge_index is not None:
        edge_batch = bvec[edge_index[0]]
        pairs = torch.bincount(edge_batch, minlength=num_graphs).to(torch.float32).clamp(min=1.0)
        terms["bonds"] = scatter_sum(ce(bond_logits.float(), bonds0, reduction="none"), edge_batch, num_graphs) / pairs
    return terms


def _bond_model_loss(pipe, batch, pos_t, h_t, eps_pos, eps_h, t, weight, generator, bond_weight, context=None):
    if batch.bonds is None:
        raise ValueError("this model generates bonds: its batches need bond orders (MoleculeSet(..., bonds=...))")
    n = batch.batch.shape[0]
    edge_index = fully_connected_edges(batch.batch)
    edge_batch, rev = batch.batch[edge_index[0]], reverse_edges(edge_index, n)
    labels = edge_bond_orders(batch.bonds, edge_index, n)
    e = pipe.bond_features.encode(labels, dtype=pos_t.dtype)
    eps_e = symmetric_edge_noise(rev, pipe.bond_types, generator=generator, dtype=pos_t.dtype)
    alpha, sigma = pipe.schedule.alpha_sigma(t)
    e_t = alpha.to(e.dtype)[edge_batch].unsqueeze(-1) * e + sigma.to(e.dtype)[edge_batch].unsqueeze(-1) * eps_e
    pred_pos, pred_h, pred_e = pipe.predict_noise(pos_t, h_t, t.to(pos_t.dtype), batch.batch, edge_index=edge_index,
                                                  e_t=e_t, raw_bonds=True, context=context)
    atoms = epsilon_loss(pred_pos, eps_pos, pred_h, eps_h, batch.batch, batch.num_graphs, weight=weight)
    if pipe.bond_output == "logits":  # cross-entropy of the clean bond class, mean over each molecule's edges
        ce = torch.nn.functional.cross_entropy(pred_e.float(), labels, reduction="none")
        per_mol = scatter_sum(ce, edge_batch, batch.num_graphs) / torch.bincount(
            edge_batch, minlength=batch.num_graphs).clamp(min=1).to(ce.dtype)
    else:
        per_mol = bond_epsilon_loss(pred_e.float(), eps_e.float(), edge_batch, batch.num_graphs)
        if weight is not None:
            per_mol = per_mol * weight.to(per_mol.dtype)
    return atoms + bond_weight * per_mol.mean()


def check_same_diffusion_mode(saved_cfg: dict, cfg: RunConfig) -> None:
    """Raise ``ValueError`` when a checkpoint of a categorical run would continue as a Gaussian one, or
    the other way round, or with other charge classes (``saved_cfg``: the checkpoint's configuration)."""
    saved = saved_cfg.get("diffusion", {})
    was = bool(saved.get("categorical", False))
    if was != cfg.diffusion.categorical:
        mode = {True: "categorical", False: "Gaussian (EDM)"}
        raise ValueError(f"this checkpoint diffuses atom types as {mode[was]} features; it cannot continue with "
                         f"diffusion.categorical={str(cfg.diffusion.categorical).lower()}")
    if was and bool(saved.get("categorical_charges", True)) != cfg.diffusion.categorical_charges:
        raise ValueError("this checkpoint's categorical charge classes differ from diffusion.categorical_charges")


def _atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda handle: torch.save(obj, handle), binary=True)


def _pad(tensor: torch.Tensor, shape) -> torch.Tensor:
    """Zero-pad ``tensor`` at the end of its last dimension to ``shape`` (other dimensions equal)."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    if tensor.dim() != len(shape) or tuple(tensor.shape[:-1]) != tuple(shape[:-1]) or tensor.shape[-1] > shape[-1]:
        raise ValueError(f"cannot widen a tensor of shape {tuple(tensor.shape)} to {tuple(shape)}")
    out = tensor.new_zeros(shape)
    out[..., : tensor.shape[-1]] = tensor
    return out


def _widen(saved: dict, target: dict) -> dict:
    """A plain model's state dict laid out for the self-conditioned or bond model ``target``: zero new
    input columns; parameters only ``target`` has (new output heads) keep ``target``'s values."""
    out = {k: _pad(v, target[k].shape) for k, v in saved.items()}
    return {k: out.get(k, v) for k, v in target.items()}


class Trainer:
    """Owns one run directory. ``rank``/``world_size`` > 1 trains data-parallel (DDP, rank 0 writes)."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, *, data: TrainingData | None = None,
                 rank: int = 0, world_size: int = 1, log: Callable[[str], None] = print,
                 evaluate: Callable | None = None, device: str | torch.device | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = rank, world_size
        self.log = log if rank == 0 else (lambda _msg: None)
        self.evaluate = evaluate  # (pipeline, cfg) -> dict of sampled metrics; injected by the CLI
        # The caller's device (cmd_train gives each data-parallel rank its own GPU), else train.device,
        # "auto" being a CUDA GPU when torch sees one. Resolved at every start and never written back
        # into the configuration, so a run saved with "auto" resumes on whatever machine it moves to.
        self.device = torch.device(device if device is not None else resolve_device(cfg.train.device))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        # bf16 autocast and torch.compile only where this machine is faster with them (moldiff.runtime).
        self.arithmetic = choose_arithmetic(self.device, cfg.train.precision, cfg.train.compile)
        self.log(f"training on {self.device} in {self.arithmetic.precision}, "
                 f"{'compiled' if self.arithmetic.compile else 'eager'}: {self.arithmetic.reason}")
        slow = slow_bf16_warning(self.device, cfg.train.precision, cfg.train.compile)
        if slow:
            self.log(slow)
        if cfg.train.batch_size % world_size:
            # Every rank takes an equal shard of each global batch; a remainder would be dropped silently.
            raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {world_size} processes")
        self.data = data or load_training_data(cfg)
        if len(self.data.train) < cfg.train.batch_size:
            # Epochs drop the last partial batch, so such an epoch is empty and training would never advance.
            raise ValueError(f"the training set has {len(self.data.train)} molecules, fewer than one batch "
                             f"(train.batch_size={cfg.train.batch_size})")
        # Parameter initialisation from train.seed, without reseeding the caller's global RNG
        # (DESIGN: only the CLI seeds global RNGs).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            self.pipe = build_pipeline(cfg, self.data).to(self.device)
        self.model = self.pipe.denoiser
        # predict_noise opens its own autocast region, enabled by the pipeline's precision: left at
        # fp32 it would switch train_step's bf16 autocast off inside the network (uncompiled runs
        # trained in fp32 whatever train.precision said). Exported pipelines start at fp32 again.
        self.pipe.configure_inference(precision=self.arithmetic.precision)
        # What the training forward pass calls: the model, maybe compiled, maybe wrapped in DDP.
        self.forward_model = self.model
        if self.arithmetic.compile:
            self.forward_model = torch.compile(self.forward_model, dynamic=True)
        if world_size > 1:
            # On a GPU, DDP needs the rank's own device for its buckets and outputs (NCCL).
            on_gpu = self.device.type == "cuda"
            ids = {"device_ids": [self.device.index], "output_device": self.device.index} if on_gpu else {}
            self.forward_model = torch.nn.parallel.DistributedDataParallel(self.forward_model, **ids)
        loss_weight(torch.ones(1, dtype=torch.float64), cfg.diffusion.loss_weighting)  # bad names fail here
        if cfg.model.bond_types:
            clash = [what for what, on in (("data-parallel training", world_size > 1),
                                           ("model.self_condition", cfg.model.self_condition),
                                           ("diffusion.parity_weight", cfg.diffusion.parity_weight > 0),
                                           ("diffusion.noise_pairing", cfg.diffusion.noise_pairing != "none"),
                                           ("diffusion.known_types_prob", cfg.diffusion.known_types_prob > 0)) if on]
            if clash:
                raise ValueError(f"model.bond_types does not combine with {', '.join(clash)} yet")
        if cfg.diffusion.known_types_prob > 0:
            clash = [what for what, on in (("model.self_condition", cfg.model.self_condition),
                                           ("diffusion.parity_weight", cfg.diffusion.parity_weight > 0)) if on]
            if clash:
                raise ValueError(f"diffusion.known_types_prob does not combine with {', '.join(clash)} yet")
        if cfg.diffusion.type_lag_prob > 0:
            clash = [what for what, on in (("model.type_time off", not cfg.model.type_time),
                                           ("model.self_condition", cfg.model.self_condition),
                                           ("model.bond_types", cfg.model.bond_types > 0),
                                           ("diffusion.categorical", cfg.diffusion.categorical),
                                           ("diffusion.parity_weight", cfg.diffusion.parity_weight > 0),
                                           ("diffusion.noise_pairing", cfg.diffusion.noise_pairing != "none"),
                                           ("diffusion.known_types_prob", cfg.diffusion.known_types_prob > 0)) if on]
            if clash:
                raise ValueError(f"diffusion.type_lag_prob does not combine with {', '.join(clash)} "
                                 "(it needs model.type_time=true)")
        if cfg.diffusion.noise_pairing not in PAIRINGS:
            raise ValueError(f"diffusion.noise_pairing must be one of {', '.join(PAIRINGS)}, got {cfg.diffusion.noise_pairing!r}")
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay, amsgrad=o.amsgrad)
        self.ema = EMA(self.model, o.ema_decay) if o.ema_decay > 0 else None
        self.clipper = AdaptiveClipper() if o.clip == "edm" else None
        self.fixed_clip = None if o.clip in ("edm", "none") else float(o.clip)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.train.seed + 1)
        self.step, self.epoch, self.batch_in_epoch, self.hours = 0, 0, 0, 0.0
        # Losses since the last log row and fault counters: checkpointed, so that a run resumed
        # between two log rows writes the same next row as an uninterrupted one.
        self.loss_window: list[float] = []
        self.consecutive_bad, self.skipped_total = 0, 0
        self._stop_signal = None
        self._tb = self._open_tensorboard()

    @property
    def stopped_by(self) -> int | None:
        """The signal (SIGTERM or SIGINT) that stopped the last ``train()`` early, or None."""
        return self._stop_signal

    def warm_start(self, spec: str) -> None:
        """Replace the freshly initialised weights by those of the model ``spec`` (``train.init_from``;
        :mod:`moldiff.training.warmstart`) before the first step; the EMA starts from them too.

        Raises:
            ValueError / CheckpointError: the model cannot be read or does not fit this run (one line).
        """
        from moldiff.training.warmstart import load_source, warm_start

        if self.step:
            raise ValueError(f"init_from starts a new run; this one is already at step {self.step}")
        source, name = load_source(spec)
        report = warm_start(self.pipe, source, name)
        if self.ema is not None:
            self.ema = EMA(self.model, self.cfg.optim.ema_decay)
        self.log(report.summary())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "format_version": 1,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "clipper": None if self.clipper is None else self.clipper.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "hours": self.hours,
            "loss_window": list(self.loss_window),
            "consecutive_bad": self.consecutive_bad,
            "skipped_total": self.skipped_total,
            "pipeline_config": self.pipe.config_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        check_same_diffusion_mode(state.get("config", {}), self.cfg)
        saved_model = state.get("config", {}).get("model", {})
        saved_props = [str(p).lower() for p in saved_model.get("properties") or []]
        if saved_props != list(self.cfg.model.properties):
            what = {True: "is unconditional", False: f"conditions on {', '.join(saved_props)}"}[not saved_props]
            wanted = ", ".join(self.cfg.model.properties) or "nothing (model.properties=[])"
            raise ValueError(f"this checkpoint {what}; it cannot continue conditioned on {wanted} "
                             "(model.properties must stay as the run started)")
        saved_sc = bool(saved_model.get("self_condition", False))
        saved_bonds = int(saved_model.get("bond_types", 0))
        if saved_sc and not self.cfg.model.self_condition:
            raise ValueError("this checkpoint is self-conditioned; it cannot continue as a plain model")
        saved_tt = bool(saved_model.get("type_time", False))
        if saved_tt and not self.cfg.model.type_time:
            raise ValueError("this checkpoint takes the elements' own noise time; it cannot continue without model.type_time")
        saved_vf = bool(saved_model.get("valence_features", False))
        if saved_vf and not self.cfg.model.valence_features:
            raise ValueError("this checkpoint reads valence inputs; it cannot continue without model.valence_features")
        if saved_bonds and saved_bonds != self.cfg.model.bond_types:
            raise ValueError(f"this checkpoint generates {saved_bonds} bond classes; it cannot continue with "
                             f"model.bond_types={self.cfg.model.bond_types}")
        switched = [name for name, on in (("self-conditioning", saved_sc != self.cfg.model.self_condition),
                                          ("bond features", saved_bonds != self.cfg.model.bond_types),
                                          ("the elements' noise time", saved_tt != self.cfg.model.type_time),
                                          ("valence inputs", saved_vf != self.cfg.model.valence_features)) if on]
        if switched:
            # Switching self-conditioning or bond features on mid-run: the new input columns start at
            # zero, so the network computes what it computed before; new output heads keep their
            # initialisation; optimiser moments start at zero for everything new.
            state = dict(state)
            target = self.model.state_dict()
            state["model"] = _widen(state["model"], target)
            if state["ema"] is not None:
                state["ema"] = _widen(state["ema"], target)
            opt = dict(state["optimizer"])
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            opt["state"] = {i: {k: (_pad(v, params[i].shape) if torch.is_tensor(v) and v.dim() else v) for k, v in st.items()}
                            for i, st in opt["state"].items()}
            groups = [dict(g) for g in opt["param_groups"]]
            known = sum(len(g["params"]) for g in groups)
            groups[-1]["params"] = list(groups[-1]["params"]) + list(range(known, len(params)))
            opt["param_groups"] = groups
            state["optimizer"] = opt
            self.log(f"{' and '.join(switched)} switched on: new input weights start at zero")
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        # The optimiser's saved hyper-parameters would override the configuration; the configuration
        # wins, so that ``--resume --set optim.lr=...`` takes effect (unchanged config: same values).
        for group in self.optimizer.param_groups:
            group["lr"], group["weight_decay"] = self.cfg.optim.lr, self.cfg.optim.weight_decay
        if self.clipper is not None and state["clipper"] is not None:
            self.clipper.load_state_dict(state["clipper"])
        # Generator.set_state takes a CPU byte tensor, for CUDA generators too; a state dict loaded
        # with map_location="cuda" holds it on the GPU. The states of the two kinds differ (CPU:
        # Mersenne Twister, 5,056 bytes; CUDA: Philox seed and offset, 16 bytes), so a run moved
        # between a GPU and a CPU cannot continue its noise stream: it restarts from the seed and
        # the step, reproducibly, and says so.
        saved = state["generator"].cpu()
        if saved.numel() == self.generator.get_state().numel():
            self.generator.set_state(saved)
        else:
            self.generator.manual_seed(self.cfg.train.seed + 1 + 1_000_003 * int(state["step"]))
            self.log(f"the saved noise generator's state ({saved.numel()} bytes) is not a {self.device.type} "
                     f"generator's (moved between a GPU and a CPU?): its stream restarts from the seed and step "
                     f"{state['step']}")
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch, self.hours = state["batch_in_epoch"], state["hours"]
        self.loss_window = [float(x) for x in state.get("loss_window", [])]
        self.consecutive_bad = int(state.get("consecutive_bad", 0))
        self.skipped_total = int(state.get("skipped_total", 0))

    def export_pipeline(self) -> MolDiffPipeline:
        """The EMA weights (or raw weights without EMA) as a sampling pipeline."""
        pipe = MolDiffPipeline.from_config(self.pipe.config_dict())
        src = self.ema.model if self.ema is not None else self.model
        pipe.denoiser.load_state_dict(src.state_dict())
        pipe.metadata.update({"step": self.step, "epoch": self.epoch, "train_hours": round(self.hours, 4)})
        return pipe.to(self.device)

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(self.state_dict(), self.run_dir / "checkpoint.pt")
        self.export_pipeline().save_pretrained(self.run_dir / "pipeline")

    def resume(self) -> bool:
        """Load ``checkpoint.pt`` from the run directory if there is one; returns whether it did."""
        path = self.run_dir / "checkpoint.pt"
        if not path.is_file():
            return False
        # On the CPU first: the RNG state must stay there, and loading copies weights and optimiser
        # moments onto the training device.
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.load_state_dict(state)
        self._truncate_log()
        self.log(f"resumed from {path} at step {self.step} (epoch {self.epoch}, {self.hours:.2f} h)")
        return True

    # ------------------------------------------------------------------ logging
    def _log_path(self) -> Path:
        return self.run_dir / "log.csv"

    def _truncate_log(self) -> None:
        """Drop log rows written after the checkpoint (they will be written again identically)."""
        path = self._log_path()
        if self.rank != 0 or not path.is_file():
            return
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= self.step]
        self._write_log_rows(rows, mode="w")

    def _open_tensorboard(self):
        """A SummaryWriter when ``train.tensorboard`` is set (checked at start, not at the first log)."""
        if not self.cfg.train.tensorboard or self.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("train.tensorboard=true needs the tensorboard package (pip install tensorboard)") from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _write_tensorboard(self, row: dict) -> None:
        if self._tb is None:
            return
        for key, value in row.items():
            if key in ("step", "epoch") or value in ("", None):
                continue
            self._tb.add_scalar(key, float(value), int(row["step"]))
        self._tb.flush()

    def _write_log_rows(self, rows, mode="a") -> None:
        """Append rows, or (``mode="w"``) replace the log through a temporary file renamed into place,
        so that an interrupted rewrite leaves the old log whole. A log written before a column was
        added gets the new header on its first rewrite (every resume), its old rows blank there."""
        path = self._log_path()
        if mode == "w":
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
                w.writeheader()
                w.writerows(rows)
            os.replace(tmp, path)
            return
        new = not path.is_file()
        with open(path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
            if new:
                w.writeheader()
            w.writerows(rows)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def validation_loss(self, max_batches: int = 20) -> float:
        """Mean loss of the EMA model on the validation subset with fixed times and noise.

        EDM's uniform atom loss only (for bond models too: their bond term is left out), so that
        runs of every variant are compared on the same number. The exception is a run with
        ``diffusion.known_types_prob = 1``: its network never learns to denoise types (their error
        grows without bound), so it is validated as it is trained, every molecule's types given
        (the coordinate error alone)."""
        model = self.ema.model if self.ema is not None else self.model
        pipe = MolDiffPipeline(model, self.pipe.schedule, self.pipe.features, self.pipe.statistics, self.pipe.atomic_numbers)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(12345)
        if isinstance(pipe.features, CategoricalFeatures):
            return self._categorical_validation_loss(pipe, gen, max_batches)
        given = 1.0 if self.cfg.diffusion.known_types_prob >= 1.0 else 0.0
        total, count = 0.0, 0
        for b, batch in self.data.valid.batches(self.cfg.train.batch_size, seed=0, epoch=0, drop_last=False):
            if b >= max_batches:
                break
            batch = batch.to(self.device)
            t = torch.rand(batch.num_graphs, generator=gen, dtype=torch.float64, device=self.device)
            total += float(diffusion_loss(pipe, batch, t, gen, bond_weight=0.0, known_types_prob=given,
                                          context=self._context(batch, dropout=False))) * batch.num_graphs
            count += batch.num_graphs
        return total / max(1, count)

    def _categorical_validation_loss(self, pipe: MolDiffPipeline, gen: torch.Generator, max_batches: int) -> float:
        """A categorical model's validation loss: the coordinate noise MSE + CE(types) + CE(charges)
        + CE(bonds) with unit weights, uniform times and the EDM weighting, whatever the run trains
        with, so that categorical runs compare on one number; the terms are logged on one line."""
        sums: dict[str, float] = {}
        count = 0
        for b, batch in self.data.valid.batches(self.cfg.train.batch_size, seed=0, epoch=0, drop_last=False):
            if b >= max_batches:
                break
            batch = batch.to(self.device)
            t = torch.rand(batch.num_graphs, generator=gen, dtype=torch.float64, device=self.device)
            for name, per_mol in categorical_loss_terms(pipe, batch, t, gen, context=self._context(batch, False)).items():
                sums[name] = sums.get(name, 0.0) + float(per_mol.sum())
            count += batch.num_graphs
        means = {name: total / max(1, count) for name, total in sums.items()}
        self.log(f"validation at step {self.step}: " + "  ".join(f"{k}={v:.6f}" for k, v in means.items())
                 + " (val_loss is their sum)")
        return sum(means.values())

    # ------------------------------------------------------------------ the loop
    def _install_signal_handlers(self):
        def handler(signum, _frame):
            self._stop_signal = signum
        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        return old

    def train_step(self, batch: MoleculeBatch) -> tuple[float, float, bool, bool]:
        """One optimiser step; returns ``(loss, grad_norm, clipped, skipped)``."""
        self.model.train()
        b = batch.num_graphs
        t = training_times(self.cfg, b, self.generator, self.device)
        context = self._context(batch, dropout=True)
        shard = None
        if self.world_size > 1:
            per = b // self.world_size
            shard = (self.rank * per, (self.rank + 1) * per)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.arithmetic.precision == "bf16"):
            loss = diffusion_loss(self._loss_pipe(), batch.to(self.device), t, self.generator, shard,
                                  weighting=self.cfg.diffusion.loss_weighting,
                                  pairing=self.cfg.diffusion.noise_pairing,
                                  parity_weight=self.cfg.diffusion.parity_weight,
                                  bond_weight=self.cfg.diffusion.bond_weight,
                                  known_types_prob=self.cfg.diffusion.known_types_prob,
                                  type_weight=self.cfg.diffusion.type_weight,
                                  charge_weight=self.cfg.diffusion.charge_weight,
                                  type_lag_prob=self.cfg.diffusion.type_lag_prob,
                                  class_floor=self.cfg.diffusion.class_floor, context=context)
        if not self._all_ranks(bool(torch.isfinite(loss))):
            self.optimizer.zero_grad(set_to_none=True)
            return float(loss), float("nan"), False, True
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clipped = False
        if self.clipper is not None:
            norm, _, clipped = self.clipper.clip(self.model.parameters())
        elif self.fixed_clip is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.fixed_clip))
            clipped = norm > self.fixed_clip
        else:
            norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf")))
        lr = self.cfg.optim.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        if self.world_size > 1:
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss /= self.world_size
        return float(loss.detach()), norm, clipped, False

    def _context(self, batch: MoleculeBatch, dropout: bool) -> torch.Tensor | None:
        """The network context of a property-conditional run's batch (``None`` for other runs):
        with ``dropout``, properties hidden as ``diffusion.property_dropout`` / ``uncond_prob`` say,
        drawn from the training generator; without, every property given (validation)."""
        conditioning = self.data.conditioning
        if not self.cfg.model.properties:
            return None
        if conditioning is None or batch.targets is None:
            raise ValueError("a property-conditional model needs batches with targets (model.properties)")
        d = self.cfg.diffusion
        gen = self.generator if dropout else None
        return property_context(conditioning, batch.targets.to(self.device), gen, d.property_dropout, d.uncond_prob)

    def _loss_pipe(self) -> MolDiffPipeline:
        if self.forward_model is self.model:
            return self.pipe
        # Route the forward pass through the compiled / DDP wrapper (DDP all-reduces gradients).
        wrapper = self.forward_model
        pipe = self.pipe
        valence = bool(getattr(pipe.denoiser.config, "valence_features", False))

        class _Proxy:
            features, schedule, self_condition = self.pipe.features, self.pipe.schedule, self.pipe.self_condition
            elements, bond_types, bond_features = self.pipe.elements, self.pipe.bond_types, self.pipe.bond_features
            bond_output = self.pipe.bond_output

            @staticmethod
            def predict_noise(pos_t, h_t, t, batch, cond=None, edge_index=None, e_t=None, raw_bonds=False, t_h=None,
                              context=None):
                # training only: bond heads' raw output (the loss asks for it with raw_bonds=True)
                extra = {} if t_h is None else {"t_h": t_h}
                if valence:  # computed outside the compiled network, as MolDiffPipeline.predict_noise does
                    if edge_index is None:
                        edge_index = fully_connected_edges(batch)
                    extra["valence"] = pipe.valence_inputs(h_t, e_t, edge_index, batch, t.shape[0])
                out = wrapper(pos_t, h_t, t, batch, cond=cond, edge_index=edge_index, e_t=e_t, context=context, **extra)
                if e_t is not None:
                    out, eps_e = out
                    return out.pos, out.h, eps_e
                return out.pos, out.h

        return _Proxy()

    def train(self, progress: Callable | None = None) -> dict:
        """Train until ``max_steps`` or ``max_minutes`` (or a signal); checkpoint on the way out."""
        cfg = self.cfg.train
        if cfg.max_steps is None and cfg.max_minutes is None:
            raise ValueError("set train.max_steps or train.max_minutes")
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        old_handlers = self._install_signal_handlers()
        start = time.monotonic()
        hours0 = self.hours
        last_ckpt = time.monotonic()
        last = {}
        try:
            while True:
                for b, batch in self.data.train.batches(cfg.batch_size, cfg.seed, self.epoch, self.batch_in_epoch):
                    if self._done(start):
                        raise StopIteration
                    loss, norm, clipped, skipped = self.train_step(batch)
                    self.step += 1
                    self.batch_in_epoch = b + 1
                    self.hours = hours0 + (time.monotonic() - start) / 3600.0
                    if skipped:
                        self.consecutive_bad += 1
                        self.skipped_total += 1
                        if self.consecutive_bad >= 10:
                            raise NumericalFaultError(f"10 consecutive non-finite losses (last at step {self.step})")
                    else:
                        self.consecutive_bad = 0
                        self.loss_window.append(loss)
                    if progress is not None:
                        progress(self.step, loss)
                    row = self._maybe_log(self.loss_window, norm, clipped, self.skipped_total)
                    if row:
                        last, self.loss_window = row, []
                    if time.monotonic() - last_ckpt > 60.0 * cfg.checkpoint_minutes:
                        self.save_checkpoint()
                        last_ckpt = time.monotonic()
                if self.batch_in_epoch == 0:  # not even one batch this epoch (cannot happen after __init__'s check)
                    raise ValueError("an epoch of the training set holds no complete batch")
                self.epoch += 1
                self.batch_in_epoch = 0
        except StopIteration:
            pass
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
        self.save_checkpoint()
        if self._stop_signal is not None:
            self.log(f"stopped by signal {self._stop_signal} at step {self.step}; checkpoint saved")
        return last

    def _all_ranks(self, flag: bool) -> bool:
        """``flag`` on every rank (logical AND over the process group; the flag itself without DDP)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item() > 0.5)

    def _done(self, start: float) -> bool:
        cfg = self.cfg.train
        done = (
            self._stop_signal is not None
            or (cfg.max_steps is not None and self.step >= cfg.max_steps)
            or (cfg.max_minutes is not None and (time.monotonic() - start) / 60.0 >= cfg.max_minutes)
        )
        # Clocks and signals differ between ranks; stop when any rank wants to, all at the same step.
        return not self._all_ranks(not done)

    def _maybe_log(self, window, norm, clipped, skipped_total) -> dict | None:
        cfg = self.cfg.train
        at_val = cfg.val_every and self.step % cfg.val_every == 0
        at_sample = cfg.sample_every and self.step % cfg.sample_every == 0
        if not (self.step % cfg.log_every == 0 or at_val or at_sample):
            return None
        row = {k: "" for k in LOG_FIELDS}
        row.update(step=self.step, epoch=self.epoch, hours=f"{self.hours:.4f}",
                   loss=f"{np.mean(window):.6f}" if window else "nan", grad_norm=f"{norm:.4f}",
                   clipped=int(clipped), skipped=skipped_total)
        if at_val:
            row["val_loss"] = f"{self.validation_loss():.6f}"
        if at_sample and self.evaluate is not None and self.rank == 0:
            metrics = self.evaluate(self.export_pipeline(), self.cfg)
            row.update({k: f"{metrics[k]:.4f}" for k in SAMPLED_FIELDS if k in metrics})
        if self.rank == 0:
            self._write_log_rows([row])
            self._write_tensorboard(row)
            shown = {k: v for k, v in row.items() if v not in ("",)}
            self.log("  ".join(f"{k}={v}" for k, v in shown.items()))
        return row
