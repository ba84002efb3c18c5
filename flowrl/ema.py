"""Exponential moving average of the trainable parameters."""

from __future__ import annotations

import torch
from torch import Tensor


class EMA:
    """Exponential moving average of the trainable parameters, swapped in for evaluation."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - self.decay)

    def active(self):
        """Inside: the parameters hold the EMA weights; the live weights come back on exit."""
        from flowrl.policy import weights_swapped

        return weights_swapped(self.params, self.shadow)

    def state_dict(self) -> list[Tensor]:
        return [s.clone() for s in self.shadow]

    def load_state_dict(self, state: list[Tensor]) -> None:
        for s, v in zip(self.shadow, state):
            s.copy_(v)

