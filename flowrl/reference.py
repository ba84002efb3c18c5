"""A moving KL reference for any preset: the reference of the KL term follows the policy.

``loss.reference: ema`` — after every ``every``-th optimizer step θ_ref ← d·θ_ref + (1 − d)·θ
(an exponential moving average of the trained weights, d = ``decay``);
``loss.reference: periodic`` — every ``every`` optimizer steps θ_ref ← θ (a hard refresh, as
GARDO's periodically updated reference). Both start from the initial weights (the base model
for LoRA), so before the first refresh the KL equals the one against the base model.

The option wraps the preset's own objective (``OBJECTIVES["moving_reference"]``, set up by
:func:`flowrl.algorithms.resolve`): the wrapped objective runs unchanged, except that the
policy it receives answers ``reference()`` with the moving weights. Those are applied without
touching the live parameters (``torch.func.functional_call``), so the current policy's autograd
graph stays valid. The shadow weights and the step count are checkpointed.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from flowrl.errors import ConfigError
from flowrl.plugins import OBJECTIVES, make_objective

#: the moving-reference modes of ``loss.reference`` (``base`` is the fixed base model)
MODES = ("ema", "periodic")


def moving_reference_update(shadow: list[Tensor], live: list[Tensor], step: int, *, mode: str, decay: float, every: int) -> bool:
    """Update ``shadow`` in place after optimizer step ``step`` (1-based); True when it moved.

    ema: on steps where step % every == 0, shadow ← decay·shadow + (1 − decay)·live;
    periodic: on those steps, shadow ← live."""
    if mode not in MODES:
        raise ValueError(f"unknown reference mode '{mode}'. Known: base, {', '.join(MODES)}.")
    if step % every:
        return False
    with torch.no_grad():
        for s, p in zip(shadow, live):
            if mode == "ema":
                s.lerp_(p.detach().to(s.dtype), 1.0 - decay)
            else:
                s.copy_(p.detach())
    return True


def check_unsharded(trainer: Any) -> None:
    """The moving reference keeps whole copies of the trainable weights: not under FSDP."""
    if getattr(trainer, "sharded", False):
        raise ConfigError("a moving KL reference (loss.reference ema/periodic, algorithm gardo) does not run under FSDP; "
                          "use DDP or one process, or leave loss.reference unset.")


class _FunctionalModule(torch.nn.Module):
    """``module`` called with some parameters replaced (``torch.func.functional_call``): nothing is
    written into the live parameters. Attribute reads fall through to ``module``."""

    def __init__(self, module: torch.nn.Module, overrides: dict[str, Tensor]):
        super().__init__()
        self.inner = module
        self._overrides = overrides

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.inner, self._overrides, args, kwargs, strict=False)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


class _MovingReferencePolicy:
    """The policy as the wrapped objective sees it: everything is the real policy's except
    ``reference()``, which runs the model with the moving reference weights."""

    def __init__(self, policy: Any, owner: "MovingReferenceObjective"):
        object.__setattr__(self, "_policy", policy)
        object.__setattr__(self, "_owner", owner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._policy, name, value)

    @contextlib.contextmanager
    def reference(self):
        policy, owner = self._policy, self._owner
        model = policy.model
        bare = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        params = owner.params(policy)
        ids = {id(p): i for i, p in enumerate(params)}
        overrides = {n: owner.shadow[ids[id(p)]] for n, p in bare.named_parameters() if id(p) in ids}
        if len(overrides) != len(params):
            raise RuntimeError("the moving reference could not find every trainable parameter in the policy's model.")
        policy.model = _FunctionalModule(bare, overrides)
        try:
            yield
        finally:
            policy.model = model


class MovingReferenceObjective:
    """``OBJECTIVES["moving_reference"]``: the objective ``inner`` (with ``inner_params``) whose KL
    reference is an EMA (``mode: ema``) or a periodic copy (``mode: periodic``) of the trained
    weights, updated every ``every`` optimizer steps (EMA decay ``decay``). Other hooks of the
    inner objective (``before_advantages``, ``sampling_weights``, ``on_iteration_end``, ...) pass
    through; metrics add ``ref/refreshes`` (reference updates so far)."""

    def __init__(self, *, inner: str = "policy_gradient", inner_params: dict[str, Any] | None = None, mode: str = "ema", decay: float = 0.99, every: int = 1):
        if mode not in MODES:
            raise ConfigError(f"loss.reference must be base, {' or '.join(MODES)}, got '{mode}'.")
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"loss.reference_options.decay must be in [0, 1), got {decay}.")
        if int(every) < 1:
            raise ConfigError(f"loss.reference_options.every must be ≥ 1 (optimizer steps), got {every}.")
        self.inner = make_objective(inner, **(inner_params or {}))
        self.mode, self.decay, self.every = mode, float(decay), int(every)
        self.shadow: list[Tensor] | None = None
        self.updates = self.refreshes = 0
        from flowrl.objectives import batched_form

        batched = batched_form(self.inner)
        if batched is not None:
            fn, kw = batched
            self.evaluate_chunks = lambda policy, batch, chunks, ctx: [self.observe(r) for r in fn(self._view(policy), batch, chunks, ctx, **kw)]
        declared = getattr(self.inner, "loss_aggregation", None) or getattr(getattr(self.inner, "func", None), "loss_aggregation", None)
        if declared is not None:
            self.loss_aggregation = declared

    def params(self, policy: Any) -> list[torch.nn.Parameter]:
        params = list(policy.trainable_parameters())
        if self.shadow is None:
            self.shadow = [p.detach().clone() for p in params]
        return params

    def _view(self, policy: Any) -> _MovingReferencePolicy:
        self.params(policy)
        return _MovingReferencePolicy(policy, self)

    def __call__(self, policy: Any, batch: Any, steps: Tensor, ctx: Any) -> tuple[Tensor, dict[str, float]]:
        return self.observe(self.inner(self._view(policy), batch, steps, ctx))

    def observe(self, result: tuple[Tensor, dict[str, float]]) -> tuple[Tensor, dict[str, float]]:
        """Every chunk's ``(loss, metrics)`` passes here (subclasses watch the KL)."""
        return result

    def inner_hook(self, name: str, *args: Any) -> Any:
        """The inner objective's hook ``name`` called with ``args`` (``None`` when it has none)."""
        fn = getattr(self.inner, name, None)
        return fn(*args) if fn is not None else None

    def __getattr__(self, name: str) -> Any:  # the inner objective's other hooks
        if name in ("inner", "shadow") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def before_advantages(self, trainer: Any, traj: Any) -> None:
        check_unsharded(trainer)
        self.inner_hook("before_advantages", trainer, traj)

    def on_update(self, trainer: Any) -> None:
        self.updates += 1
        params = self.params(trainer.policy)
        if moving_reference_update(self.shadow, params, self.updates, mode=self.mode, decay=self.decay, every=self.every):
            self.refreshes += 1
        self.inner_hook("on_update", trainer)

    def on_iteration_end(self, trainer: Any, it: int) -> dict[str, float]:
        out = dict(self.inner_hook("on_iteration_end", trainer, it) or {})
        out["ref/refreshes"] = float(self.refreshes)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": None if self.shadow is None else [s.clone() for s in self.shadow], "updates": self.updates,
                "refreshes": self.refreshes, "inner": self.inner_hook("state_dict")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow = None if state.get("shadow") is None else [s.clone() for s in state["shadow"]]
        self.updates, self.refreshes = int(state.get("updates", 0)), int(state.get("refreshes", 0))
        if state.get("inner") is not None and hasattr(self.inner, "load_state_dict"):
            self.inner.load_state_dict(state["inner"])


if "moving_reference" not in OBJECTIVES:
    OBJECTIVES.register("moving_reference", MovingReferenceObjective)
