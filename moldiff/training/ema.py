"""Exponential moving average of parameters (EDM uses decay 0.999)."""

from __future__ import annotations

import copy

import torch

__all__ = ["EMA"]


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after each optimiser step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for shadow, p in zip(self.model.parameters(), model.parameters()):
            shadow.lerp_(p.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
