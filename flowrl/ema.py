"""Exponential moving average of the trainable parameters (evaluated and exported when enabled).

After optimizer step t (1-based) the shadow weights move toward the live ones,
``shadow ← shadow + (1 − d_t)·(θ − shadow)``, on the steps where ``t % update_every == 0``:

- constant (``ramp=False``): d_t = d;
- Flow-GRPO's warm-up (``ramp=True``): d_t = min(d, (1 + t)/(10 + t)) — the shadow follows the
  live weights closely at first (d_1 = 2/11) and settles at d. Flow-GRPO uses d = 0.9 updated
  every 8 optimizer steps (its ``EMAModuleWrapper``), which averages over ~80 steps; a constant
  d = 0.9 updated every step averages over ~10.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def ema_decay_at(step: int, decay: float, *, ramp: bool) -> float:
    """d_t of optimizer step ``step`` (1-based): ``decay``, or min(decay, (1 + t)/(10 + t)) with ``ramp``."""
    return min(decay, (1 + step) / (10 + step)) if ramp else decay


class EMA:
    """EMA of ``params``, swapped in for evaluation and export (:meth:`active`).

    Args:
        params: the trainable parameters (the LoRA weights, or all weights of a full fine-tune).
        decay: d (config ``train.ema_decay``).
        ramp: Flow-GRPO's warm-up d_t = min(d, (1 + t)/(10 + t)) (``train.ema_ramp``).
        update_every: update after every N-th optimizer step (``train.ema_update_every``).

    ``state_dict`` holds the shadow weights and the optimizer-step count, so a resumed run continues
    the same average (and the same ramp)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, *, ramp: bool = False, update_every: int = 1):
        if update_every < 1:
            raise ValueError(f"train.ema_update_every must be ≥ 1, got {update_every}.")
        self.params = params
        self.decay = float(decay)
        self.ramp = bool(ramp)
        self.update_every = int(update_every)
        self.steps = 0  # optimizer steps seen
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        """Call after every optimizer step."""
        self.steps += 1
        if self.steps % self.update_every:
            return
        d = ema_decay_at(self.steps, self.decay, ramp=self.ramp)
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - d)

    def active(self):
        """Inside: the parameters hold the EMA weights; the live weights come back on exit."""
        from flowrl.policy import weights_swapped

        return weights_swapped(self.params, self.shadow)

    def describe(self) -> dict[str, Any]:
        return {"decay": self.decay, "ramp": self.ramp, "update_every": self.update_every, "optimizer_steps": self.steps}

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": [s.clone() for s in self.shadow], "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any] | list[Tensor]) -> None:
        shadow = state if isinstance(state, list) else state["shadow"]  # a list: checkpoints before the step count
        if len(shadow) != len(self.shadow):
            raise ValueError(f"the EMA state has {len(shadow)} tensors for {len(self.shadow)} parameters; was it made with another LoRA setup?")
        for s, v in zip(self.shadow, shadow):
            s.copy_(v)
        self.steps = 0 if isinstance(state, list) else int(state.get("steps", 0))
