"""EDM's adaptive gradient clipping: clip at 1.5 x mean + 2 x std of the last 50 gradient norms."""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

__all__ = ["AdaptiveClipper"]


class AdaptiveClipper:
    """Tracks recent gradient norms; ``clip(params)`` returns ``(norm, threshold, clipped)``.

    The queue starts with one large value (3000) as in EDM, so early steps are barely clipped.
    """

    def __init__(self, window: int = 50, initial: float = 3000.0):
        self.norms: deque[float] = deque([initial], maxlen=window)

    def threshold(self) -> float:
        a = np.asarray(self.norms)
        return float(1.5 * a.mean() + 2.0 * a.std())

    def clip(self, params) -> tuple[float, float, bool]:
        limit = self.threshold()
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm=limit, norm_type=2.0))
        clipped = norm > limit
        # EDM records the clipped value so that one huge spike does not raise the threshold.
        self.norms.append(min(norm, limit))
        return norm, limit, clipped

    def state_dict(self) -> dict:
        return {"norms": list(self.norms), "window": self.norms.maxlen}

    def load_state_dict(self, state: dict) -> None:
        self.norms = deque(state["norms"], maxlen=state["window"])
