"""Data-parallel training equals single-process training on the same global batches, and ranks
stop together.

Two processes (gloo on CPU) each build a Trainer with ``rank``/``world_size`` set, as ``cmd_train``
does under torchrun, and take optimiser steps on the same global batches. Every rank draws times
and noise for the whole global batch from identically seeded generators and keeps only its shard
(``diffusion_loss(shard=...)``), so the averaged gradients, and hence the parameters, must match a
single process doing the same steps.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moldiff.training.config import load_config
from moldiff.training.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_tiny.yaml"
OVERRIDES = ["train.batch_size=8"]
BATCHES = [np.arange(8), np.arange(8, 16)]  # two global batches of the training set


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def take_steps(trainer: Trainer) -> dict:
    """Run the global batches through ``train_step``; parameters and gradients after the last."""
    losses = [trainer.train_step(trainer.data.train.batch(idx))[0] for idx in BATCHES]
    return {
        "losses": losses,
        "params": {k: v.detach().clone() for k, v in trainer.model.named_parameters()},
        "grads": {k: v.grad.detach().clone() for k, v in trainer.model.named_parameters()},
    }


def ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # The caller's job, as in cmd_train. A short timeout turns a deadlock into an error.
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        out = Path(out_dir)
        trainer = Trainer(load_config(DEBUG, OVERRIDES), out / "run", rank=rank, world_size=world_size,
                          log=lambda _m: None)
        result = take_steps(trainer)
        # Ranks that disagree about stopping (here: different step limits; in practice max_minutes on
        # two clocks, or a signal reaching one rank) must still stop together, at the earliest limit.
        limit = 3 if rank == 1 else 5
        cfg = load_config(DEBUG, OVERRIDES + [f"train.max_steps={limit}", "train.log_every=1", "train.val_every=0"])
        stopper = Trainer(cfg, out / "stop", rank=rank, world_size=world_size, log=lambda _m: None)
        stopper.train()
        result["stopped_at"] = stopper.step
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_matches_single_process(tmp_path):
    mp.spawn(ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = take_steps(Trainer(load_config(DEBUG, OVERRIDES), tmp_path / "single", log=lambda _m: None))

    # The ranks agree with each other (DDP all-reduced gradients, same optimiser state) ...
    for name in single["params"]:
        assert torch.allclose(ranks[0]["params"][name], ranks[1]["params"][name], atol=1e-7, rtol=0), name
    # ... and with one process: the reported loss is the global mean, and gradients (which Adam's
    # scale invariance would hide in the parameters) match as well as the parameters.
    for r in ranks:
        assert r["losses"] == pytest.approx(single["losses"], rel=1e-5)
        for name, grad in single["grads"].items():
            assert torch.allclose(r["grads"][name], grad, rtol=1e-4, atol=1e-6), name
        for name, param in single["params"].items():
            assert torch.allclose(r["params"][name], param, rtol=0, atol=1e-6), name
    assert [r["stopped_at"] for r in ranks] == [3, 3]
    # Only rank 0 writes the run directory.
    with open(tmp_path / "stop" / "log.csv") as fh:
        assert [line.split(",")[0] for line in fh.read().splitlines()[1:]] == ["1", "2", "3"]
    assert torch.load(tmp_path / "stop" / "checkpoint.pt", weights_only=False)["step"] == 3
    # Not vacuous: the parameters moved and the two batches gave different losses.
    fresh = Trainer(load_config(DEBUG, OVERRIDES), tmp_path / "fresh", log=lambda _m: None)
    moved = max((p - single["params"][k]).abs().max().item() for k, p in fresh.model.named_parameters())
    assert moved > 1e-4
    assert single["losses"][0] != single["losses"][1]


def test_global_batch_must_split_evenly_across_ranks(tmp_path):
    # Checked before any collective call, so no process group is needed.
    with pytest.raises(ValueError, match="not divisible"):
        Trainer(load_config(DEBUG, ["train.batch_size=7"]), tmp_path, rank=0, world_size=2, log=lambda _m: None)
