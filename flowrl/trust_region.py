"""SAGE-GRPO's dual trust region as a training objective (docs/algorithms.md "SAGE-GRPO").

L = mean(c_k · clipped PPO) + β·(1.0·KL_mov + 0.1·KL_step):

- c_k: the gradient-norm equalizer, a step weight (``flowrl.losses.equalizer_weights``).
- KL_mov = mean(‖μ_θ − μ_anchor‖²)/(2s² + 1e-6) against a *moving anchor*: a copy of the trainable
  weights (the LoRA state, or every weight of a full fine-tune) cloned every ``refresh_every``
  optimizer updates — a copy, never an alias of the live parameters, so it stays behind.
- KL_step = mean(log π_old − log π_θ) (``flowrl.losses.sage_dual_kl``).
- β adapts inside [beta_min, beta_max]: a linear ramp over ``ramp_updates`` updates, then ×1.1
  when the measured KL is above ``target_kl`` and ×0.9 below (the ramp length and the target are
  our choices: the paper gives the bounds and the multiplicative rule).

The anchor's evaluation runs *before* the current policy's (with the anchor swapped into the
parameters under ``no_grad``) so the autograd graph of the current evaluation never sees swapped
values.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterable

import torch
from torch import Tensor

from flowrl.losses import LossInputs, masked_mean, policy_loss, sage_dual_kl
from flowrl.plugins import OBJECTIVES


class MovingAnchor:
    """Cloned values of a list of parameters, swapped in on demand."""

    def __init__(self) -> None:
        self.values: list[Tensor] | None = None

    def refresh(self, params: Iterable[torch.nn.Parameter]) -> None:
        self.values = [p.detach().clone() for p in params]

    @contextlib.contextmanager
    def active(self, params: list[torch.nn.Parameter]):
        """Inside: the parameters hold the anchor's values (no autograd history); restored after."""
        if self.values is None:
            raise RuntimeError("the moving anchor has not been set; call refresh(params) first.")
        from flowrl.policy import weights_swapped

        with weights_swapped(params, self.values):
            yield

    def state_dict(self) -> list[Tensor] | None:
        return None if self.values is None else [v.clone() for v in self.values]

    def load_state_dict(self, state: list[Tensor] | None) -> None:
        self.values = None if state is None else [v.clone() for v in state]


class AdaptiveBeta:
    """β in [beta_min, beta_max]: linear ramp over ``ramp_updates`` updates, then ×up / ×down toward
    ``target_kl``."""

    def __init__(self, *, beta_min: float = 1e-7, beta_max: float = 1e-5, target_kl: float = 1e-3, ramp_updates: int = 10, up: float = 1.1, down: float = 0.9):
        if not 0 < beta_min <= beta_max:
            raise ValueError(f"need 0 < beta_min ≤ beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max, self.target_kl = float(beta_min), float(beta_max), float(target_kl)
        self.ramp_updates, self.up, self.down = int(ramp_updates), float(up), float(down)
        self.updates = 0
        self.value = self.beta_min

    def update(self, kl: float | None) -> float:
        self.updates += 1
        if self.updates <= self.ramp_updates:
            self.value = self.beta_min + (self.beta_max - self.beta_min) * self.updates / max(self.ramp_updates, 1)
        elif kl is not None:
            self.value *= self.up if kl > self.target_kl else self.down
        self.value = min(max(self.value, self.beta_min), self.beta_max)
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"updates": self.updates, "value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.updates, self.value = int(state["updates"]), float(state["value"])


@OBJECTIVES.register("sage_trust_region")
class SageTrustRegion:
    """SAGE-GRPO objective: PPO clip with the preset's step weight (the equalizer) plus
    β·(mov_weight·KL_mov + step_weight·KL_step) against the moving anchor; ``on_update`` (after
    every optimizer step) adapts β and refreshes the anchor every ``refresh_every`` updates.
    State (anchor, β, counters) is checkpointed through ``state_dict``."""

    def __init__(self, *, refresh_every: int = 10, mov_weight: float = 1.0, step_weight: float = 0.1, beta_min: float = 1e-7, beta_max: float = 1e-5, target_kl: float = 1e-3, ramp_updates: int = 10, kl_eps: float = 1e-6):
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be ≥ 1, got {refresh_every}")
        self.refresh_every = int(refresh_every)
        self.weights = (float(mov_weight), float(step_weight))
        self.kl_eps = float(kl_eps)
        self.anchor = MovingAnchor()
        self.beta = AdaptiveBeta(beta_min=beta_min, beta_max=beta_max, target_kl=target_kl, ramp_updates=ramp_updates)
        self.updates = 0
        self._kl_sum, self._kl_n = 0.0, 0

    def anchor_eval(self, policy: Any, batch: Any, steps: Tensor, autocast: Any = contextlib.nullcontext):
        params = list(policy.trainable_parameters())
        if self.anchor.values is None:
            self.anchor.refresh(params)
        with torch.no_grad(), self.anchor.active(params), autocast():
            return policy.evaluate(batch, steps)

    def anchor_kl(self, policy: Any, batch: Any, steps: Tensor | None = None) -> Tensor:
        """Masked mean KL_mov of the live policy to the anchor (a diagnostic; no gradient)."""
        steps = torch.arange(batch.num_steps) if steps is None else steps
        anchor = self.anchor_eval(policy, batch, steps)
        with torch.no_grad():
            cur = policy.evaluate(batch, steps)
        mask = batch.mask[:, steps].float().to(cur.log_prob.device)
        mov = ((cur.mean.float() - anchor.mean.float()) ** 2).flatten(2).mean(-1) / (2 * cur.std.float() ** 2 + self.kl_eps)
        return masked_mean(mov, mask)

    def __call__(self, policy: Any, batch: Any, steps: Tensor, ctx: Any) -> tuple[Tensor, dict[str, float]]:
        spec = ctx.resolved.preset.loss
        anchor = self.anchor_eval(policy, batch, steps, ctx.autocast)  # before the graph is built
        with ctx.autocast():
            current = policy.evaluate(batch, steps)
        dev = current.log_prob.device
        adv = batch.advantages
        adv = adv[:, steps] if adv.dim() == 2 else adv[:, None].expand(-1, len(steps))
        inputs = LossInputs(
            log_prob=current.log_prob.float(), old_log_prob=batch.log_probs[:, steps].to(dev).float(),
            advantages=adv.to(dev).float(), mask=batch.mask[:, steps].to(dev).float(), current=current,
            reference=anchor, traj=batch, steps=steps,
            extras={**ctx.extras, "sage_kl_weights": self.weights, "sage_kl_eps": self.kl_eps},
        )
        spec = dataclasses.replace(spec, kl=spec.kl or "sage_dual", beta=self.beta.value)
        loss, metrics = policy_loss(inputs, spec)
        with torch.no_grad():
            kl = float(masked_mean(sage_dual_kl(inputs), inputs.mask))
        self._kl_sum += kl
        self._kl_n += 1
        metrics["kl/anchor"] = kl
        metrics["kl/beta"] = self.beta.value
        return loss, metrics

    def on_update(self, trainer: Any) -> None:
        """After each optimizer step: adapt β to the KL measured since the last step, refresh the
        anchor every ``refresh_every`` updates (a clone of the new weights)."""
        self.updates += 1
        self.beta.update(self._kl_sum / self._kl_n if self._kl_n else None)
        self._kl_sum, self._kl_n = 0.0, 0
        if self.updates % self.refresh_every == 0:
            self.anchor.refresh(trainer.policy.trainable_parameters())

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor.state_dict(), "beta": self.beta.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor.load_state_dict(state["anchor"])
        self.beta.load_state_dict(state["beta"])
        self.updates = int(state["updates"])
