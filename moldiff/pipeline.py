"""MolDiffPipeline: a trained denoiser + its noise schedule + dataset statistics, and the sampling loop.

The loop is written out in :meth:`MolDiffPipeline.sample_arrays` (diffusers style): draw sizes,
draw zero-CoM noise, then for each time pair ``(t, s)`` ask the network for the noise and let
the sampler take one step. Checkpoint directories hold ``config.json`` (everything needed to
rebuild the objects, no code defaults involved) and ``model.pt`` (a plain state dict that loads
with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from moldiff.chemistry.elements import QM9_ELEMENTS
from moldiff.data.statistics import DatasetStatistics
from moldiff.diffusion import AtomFeatures, NoiseSchedule, centred_noise, make_sampler
from moldiff.geometry import fully_connected_edges, num_nodes_per_graph
from moldiff.models import DenoiserConfig, EGNNDenoiser

__all__ = ["MolDiffPipeline", "SampledArrays", "CheckpointError", "FORMAT_VERSION"]

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.pt"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or corrupt."""


@dataclass
class SampledArrays:
    """Raw output of the reverse process for ``B`` molecules.

    ``positions`` list of ``(N_k, 3)`` float arrays (Å, zero centroid); ``types`` list of ``(N_k,)``
    element indices; ``charges`` list of ``(N_k,)`` decoded charge channels (or ``None``);
    ``fault_step[k]`` is the reverse step at which molecule k first became non-finite, or -1.
    """

    positions: list[np.ndarray]
    types: list[np.ndarray]
    charges: list[np.ndarray | None]
    fault_step: np.ndarray
    elements: tuple[str, ...] = QM9_ELEMENTS
    steps: int = 0
    sampler: str = ""
    seed: int | None = None
    extra: dict = field(default_factory=dict)

    def symbols(self, k: int) -> list[str]:
        return [self.elements[i] for i in self.types[k]]


class MolDiffPipeline(torch.nn.Module):
    """Everything needed to sample: ``denoiser``, ``schedule``, atom ``features`` and ``statistics``."""

    def __init__(
        self,
        denoiser: EGNNDenoiser,
        schedule: NoiseSchedule,
        features: AtomFeatures,
        statistics: DatasetStatistics,
        atomic_numbers: Sequence[int],
        parametrization: str = "eps",
        metadata: dict | None = None,
    ):
        super().__init__()
        if parametrization != "eps":
            raise ValueError(f"unknown parametrization {parametrization!r}")
        if denoiser.config.num_features != features.dim:
            raise ValueError(f"denoiser expects {denoiser.config.num_features} features, encoding has {features.dim}")
        self.denoiser = denoiser
        self.schedule = schedule
        self.features = features
        self.statistics = statistics
        self.atomic_numbers = list(atomic_numbers)
        self.parametrization = parametrization
        self.metadata = dict(metadata or {})

    # ------------------------------------------------------------------ model calls
    @property
    def elements(self) -> tuple[str, ...]:
        return self.statistics.elements

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def predict_noise(self, pos_t, h_t, t, batch, context=None, edge_index=None):
        """Noise prediction ``(eps_pos (n, 3), eps_h (n, F))`` at times ``t`` ``(B,)``."""
        out = self.denoiser(pos_t, h_t, t, batch, context=context, edge_index=edge_index)
        return out.pos, out.h

    # ------------------------------------------------------------------ sampling
    def check_sizes(self, num_atoms: Sequence[int]) -> None:
        """Raise ``ValueError`` for sizes the model was not trained on (0, or above the data maximum)."""
        hi = self.statistics.max_atoms
        bad = [int(n) for n in num_atoms if not 2 <= int(n) <= hi]
        if bad:
            raise ValueError(f"num_atoms must be between 2 and {hi} (the largest training molecule), got {bad[0]}")

    @torch.no_grad()
    def sample_arrays(
        self,
        n: int,
        *,
        steps: int = 100,
        sampler: str = "ancestral",
        seed: int | None = 0,
        num_atoms: int | Sequence[int] | None = None,
        batch_size: int = 256,
        progress: Callable[[int], None] | None = None,
    ) -> SampledArrays:
        """Sample ``n`` molecules; returns raw arrays (see :class:`SampledArrays`).

        ``num_atoms``: ``None`` draws sizes from the training p(N); an int fixes every size; a list
        gives one size per molecule. ``progress(k)`` is called after each batch with molecules done.
        Same ``seed``, same output (on the same device and torch version).
        """
        if n <= 0:
            raise ValueError(f"number of molecules must be positive, got {n}")
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        rng = np.random.default_rng(seed)
        if num_atoms is None:
            sizes = self.statistics.sample_sizes(n, rng, min_atoms=2)
        elif isinstance(num_atoms, (int, np.integer)):
            sizes = np.full(n, int(num_atoms))
        else:
            sizes = np.asarray(list(num_atoms), dtype=np.int64)
            if len(sizes) != n:
                raise ValueError(f"got {len(sizes)} sizes for {n} molecules")
        self.check_sizes(sizes)
        device = self.device
        gen = torch.Generator(device=device)
        gen.manual_seed(int(rng.integers(2**62)))
        sampler_obj = make_sampler(sampler, self.schedule)
        out = SampledArrays([], [], [], np.full(n, -1), self.elements, steps, sampler, seed)
        self.denoiser.eval()
        for start in range(0, n, batch_size):
            chunk = sizes[start : start + batch_size]
            pos, types, charges, fault = self._sample_batch(chunk, steps, sampler_obj, gen, device)
            offsets = np.concatenate([[0], np.cumsum(chunk)])
            for k in range(len(chunk)):
                lo, hi = offsets[k], offsets[k + 1]
                out.positions.append(pos[lo:hi])
                out.types.append(types[lo:hi])
                out.charges.append(None if charges is None else charges[lo:hi])
            out.fault_step[start : start + len(chunk)] = fault
            if progress is not None:
                progress(len(chunk))
        return out

    def _sample_batch(self, sizes, steps, sampler, gen, device):
        num_graphs = len(sizes)
        batch = torch.repeat_interleave(torch.arange(num_graphs, device=device), torch.as_tensor(sizes, device=device))
        edge_index = fully_connected_edges(batch)
        dtype = next(self.denoiser.parameters()).dtype
        pos = centred_noise(batch, num_graphs, generator=gen, dtype=dtype)
        h = torch.randn(batch.shape[0], self.features.dim, generator=gen, dtype=dtype, device=device)
        fault = torch.full((num_graphs,), -1, dtype=torch.long, device=device)
        times = sampler.timesteps(steps, device=device)
        for i in range(steps):
            t = times[i].expand(num_graphs)
            s = times[i + 1].expand(num_graphs)
            eps_pos, eps_h = self.predict_noise(pos, h, t, batch, edge_index=edge_index)
            step = sampler.step(eps_pos, eps_h, t, s, pos, h, batch, generator=gen)
            pos, h = step.pos, step.h
            self._record_faults(fault, pos, h, batch, num_graphs, i)
        # Final decode at t = 0: x = (z_0 - sigma_0 eps_hat) / alpha_0 (mean of p(x | z_0), EDM eq. 9-10).
        t0 = times[-1].expand(num_graphs)
        eps_pos, eps_h = self.predict_noise(pos, h, t0, batch, edge_index=edge_index)
        pos, h = sampler.clean_estimate(pos, h, eps_pos, eps_h, t0, batch)
        self._record_faults(fault, pos, h, batch, num_graphs, steps)
        types, charges = self.features.decode(h.nan_to_num(0.0))  # decode only; faulty molecules stay flagged
        return (
            pos.double().cpu().numpy(),
            types.cpu().numpy(),
            None if charges is None else charges.cpu().numpy(),
            fault.cpu().numpy(),
        )

    @staticmethod
    def _record_faults(fault, pos, h, batch, num_graphs, step_index):
        bad_atom = ~(torch.isfinite(pos).all(-1) & torch.isfinite(h).all(-1))
        if bad_atom.any():
            bad_mol = num_nodes_per_graph(batch[bad_atom], num_graphs) > 0
            fault[bad_mol & (fault < 0)] = step_index

    # ------------------------------------------------------------------ persistence
    def config_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "denoiser": self.denoiser.config.to_dict(),
            "schedule": self.schedule.config,
            "features": {
                "num_types": self.features.num_types,
                "include_charges": self.features.include_charges,
                "type_scale": self.features.type_scale,
                "charge_scale": self.features.charge_scale,
            },
            "statistics": self.statistics.to_dict(),
            "atomic_numbers": self.atomic_numbers,
            "parametrization": self.parametrization,
            "metadata": self.metadata,
        }

    @classmethod
    def from_config(cls, cfg: dict) -> "MolDiffPipeline":
        if cfg.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"unsupported checkpoint format {cfg.get('format_version')!r} (expected {FORMAT_VERSION})")
        sched = dict(cfg["schedule"])
        return cls(
            EGNNDenoiser(DenoiserConfig.from_dict(cfg["denoiser"])),
            NoiseSchedule(sched.pop("kind"), sched.pop("grid"), **sched),
            AtomFeatures(**cfg["features"]),
            DatasetStatistics.from_dict(cfg["statistics"]),
            cfg["atomic_numbers"],
            cfg.get("parametrization", "eps"),
            cfg.get("metadata"),
        )

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.pt`` (denoiser weights) into ``directory`` atomically:
        files go to a temporary sibling folder that replaces the target only when complete."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp"))
        try:
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2))
            state = {k: v.detach().cpu().contiguous() for k, v in self.denoiser.state_dict().items()}
            torch.save(state, tmp / WEIGHTS_NAME)
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                directory.rename(old)
                tmp.rename(directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "MolDiffPipeline":
        """Load a directory written by :meth:`save_pretrained` (or a training checkpoint export)."""
        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not directory.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {directory}")
        if not cfg_path.is_file() or not w_path.is_file():
            raise CheckpointError(f"{directory} is not a moldiff checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        try:
            cfg = json.loads(cfg_path.read_text())
            pipe = cls.from_config(cfg)
            state = torch.load(w_path, map_location="cpu", weights_only=True)
            pipe.denoiser.load_state_dict(state)
        except CheckpointError:
            raise
        except Exception as exc:  # corrupt JSON, truncated weights, shape mismatch
            raise CheckpointError(f"cannot load checkpoint {directory}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        return pipe.to(device)
