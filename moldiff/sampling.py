"""What a reverse-diffusion run returns, and how numerical faults are recorded (shared by
plain sampling in :mod:`moldiff.pipeline` and conditioned sampling in :mod:`moldiff.inpainting`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from moldiff.chemistry.elements import QM9_ELEMENTS
from moldiff.geometry import num_nodes_per_graph

__all__ = ["SampledArrays", "record_faults", "network_inputs", "batch_ticker", "DEFAULT_TIME_POWER", "DEFAULT_NOISE_SCALE"]

#: Default time grid of sampling, ``t_k = (k / K) ** DEFAULT_TIME_POWER`` (1 would be EDM's uniform
#: grid). Measured on the shipped model with 50 and 100 ancestral steps (docs/experiments.md,
#: "Time grid"): a power of 2 gave higher stability and validity than the uniform grid at no cost.
DEFAULT_TIME_POWER = 2.0

#: Default factor on the noise drawn at each reverse step (1 is the model's posterior, as EDM
#: samples). Below 1 is lower-temperature sampling: same means, less fresh noise, which the
#: session-5 study in docs/experiments.md ("Noise scale") found raises validity and stability
#: with uniqueness and novelty kept; ``noise_scale=1`` restores EDM's ancestral sampler.
DEFAULT_NOISE_SCALE = 0.5


def batch_ticker(on_step, start: int, size: int):
    """``tick(i, total)`` for one batch of ``size`` molecules starting at molecule ``start``: calls
    ``on_step(start + size * i / total)`` after the batch's i-th of ``total`` network evaluations
    (``None`` when ``on_step`` is ``None``)."""
    if on_step is None:
        return None
    return lambda i, total: on_step(start + size * i / total)


@dataclass
class SampledArrays:
    """Raw output of the reverse process for ``B`` molecules.

    ``positions`` list of ``(N_k, 3)`` float arrays (Å, zero centroid); ``types`` list of ``(N_k,)``
    element indices; ``charges`` list of ``(N_k,)`` decoded charge channels (or ``None``);
    ``fault_step[k]`` is the reverse step at which molecule k first became non-finite, or -1;
    ``bonds``: for models that generate bonds, one ``(P_k, 3)`` int array per molecule of rows
    ``[i, j, order]`` (``i < j`` atom indices, order 1-3), else empty.
    """

    positions: list[np.ndarray]
    types: list[np.ndarray]
    charges: list[np.ndarray | None]
    fault_step: np.ndarray
    elements: tuple[str, ...] = QM9_ELEMENTS
    steps: int = 0
    sampler: str = ""
    seed: int | None = None
    time_power: float = 1.0
    noise_scale: float = 1.0
    extra: dict = field(default_factory=dict)
    bonds: list[np.ndarray] = field(default_factory=list)

    def symbols(self, k: int) -> list[str]:
        return [self.elements[i] for i in self.types[k]]

    def add_batch(self, start: int, sizes, pos: np.ndarray, types: np.ndarray, charges, fault: np.ndarray) -> None:
        """Split one denoised flat batch (molecules ``start .. start + len(sizes) - 1``) into per-molecule arrays."""
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        for lo, hi in zip(offsets[:-1], offsets[1:]):
            self.positions.append(pos[lo:hi])
            self.types.append(types[lo:hi])
            self.charges.append(None if charges is None else charges[lo:hi])
        self.fault_step[start : start + len(sizes)] = fault



def record_faults(fault: torch.Tensor, pos: torch.Tensor, h: torch.Tensor, batch: torch.Tensor, num_graphs: int, step_index: int) -> None:
    """Set ``fault[k] = step_index`` for molecules whose atoms became non-finite at this step
    (first occurrence only). Faulty molecules are flagged, never repaired: their whole state
    ``pos``/``h`` is set to NaN in place, so that what comes out shows the fault (the network sees
    zeros in their place, :func:`network_inputs`, and would otherwise move them on finitely)."""
    bad_atom = ~(torch.isfinite(pos).all(-1) & torch.isfinite(h).all(-1))
    if bad_atom.any():
        bad_mol = num_nodes_per_graph(batch[bad_atom], num_graphs) > 0
        fault[bad_mol & (fault < 0)] = step_index
    if bool((fault >= 0).any()):
        rows = (fault >= 0)[batch].unsqueeze(-1)
        pos.masked_fill_(rows, float("nan"))
        h.masked_fill_(rows, float("nan"))


def network_inputs(fault: torch.Tensor, batch: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The states as the network should see them: rows of molecules that already faulted set to 0.

    A faulted molecule stays non-finite in the sampler's state (and flagged), but its NaNs must not
    reach the network: under bf16 autocast on CPU a NaN row in one matrix product can turn other
    rows of the same product into NaN (seen with oneDNN: one fault took its neighbour in the flat
    batch with it, docs/experiments.md session 8), so a fault would spread to healthy molecules.
    ``states``: ``(n, *)`` tensors indexed like ``batch``, or ``(E, *)`` with ``batch`` given per edge.
    """
    if not bool((fault >= 0).any()):
        return states
    out = []
    for x in states:
        rows = (fault >= 0)[batch]
        out.append(x.masked_fill(rows.view(-1, *([1] * (x.dim() - 1))), 0.0))
    return tuple(out)
