"""Advantage estimators: small registered functions (or stateful classes) over one input object.

Every estimator has the signature ``fn(inputs: AdvantageInputs, **hparams) -> Tensor`` returning
``[B]`` (broadcast to every trained step by the trainer) or ``[B, T]`` (per-step advantages).
A stateful estimator is a registered *class*: constructed once with its hyper-parameters, called
like a function, and exposing ``state_dict()`` / ``load_state_dict()`` so a resumed run continues
exactly. ``make_estimator(name, **hparams)`` returns a ready callable either way.

Register your own with ``@register_advantage("name")`` or name ``"pkg.module:fn"`` in the config.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from flowrl.registry import Registry

ADVANTAGES: Registry[Any] = Registry("advantage estimator")
register_advantage = ADVANTAGES.register


@dataclass
class AdvantageInputs:
    """What an estimator may read. Add fields with defaults; never change existing ones.

    rewards: ``[B]`` combined scalar reward per sample.
    group_ids: ``[B]`` long; samples of one prompt share an id.
    reward_table: ``[B, K]`` per-component rewards (``reward_names`` name the columns).
    mask: ``[B, T]`` trainable steps; traj: the full :class:`~flowrl.policy.Trajectories`.
    prompts: the ``B`` prompts (for per-prompt state such as SPO's value tracker).
    meta: free per-batch data (e.g. tree structure for BranchGRPO).
    """

    rewards: Tensor
    group_ids: Tensor
    reward_table: Tensor | None = None
    reward_names: list[str] = field(default_factory=list)
    mask: Tensor | None = None
    traj: Any = None
    prompts: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def group_stats(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample mean, (population) std and size of the sample's group, each ``[B]``.

    The std is the biased (population) one, as ``np.std`` in the Flow-GRPO reference.
    """
    values = values.float()
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    means = sums / counts.to(values.dtype)
    sq = torch.zeros_like(means).index_add_(0, inverse, (values - means[inverse]) ** 2)
    stds = torch.sqrt(sq / counts.to(values.dtype))
    return means[inverse], stds[inverse], counts[inverse]


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    std: str = "group",
    eps: float = 1e-4,
    clip: float | None = 5.0,
) -> Tensor:
    """Flow-GRPO / DanceGRPO advantage: A = (r − mean_prompt) / (std + eps), clipped to ±clip.

    ``std="group"`` uses each prompt's std (Flow-GRPO per-prompt stat tracking), ``"global"`` the
    std over the whole batch (Flow-GRPO ``global_std``), ``"none"`` no scaling (Dr.GRPO: A = r − mean).
    Liu et al., Flow-GRPO (2025), §4; Shao et al., DeepSeekMath (2024) eq. 3.  Shapes: ``[B] → [B]``.
    """
    rewards = rewards.float()
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards and group_ids must both be [B]; got {tuple(rewards.shape)} and {tuple(group_ids.shape)}")
    if torch.isnan(rewards).any():
        raise ValueError("rewards contain NaN; the reward set should have stopped the run (see reward/failures/*).")
    mean, group_std, counts = group_stats(rewards, group_ids)
    if torch.any(counts < 2):
        raise ValueError(
            "a group has a single sample, so its advantage is undefined. Set num_generations (group size) ≥ 2."
        )
    centred = rewards - mean
    if std == "group":
        adv = centred / (group_std + eps)
    elif std == "global":
        adv = centred / (rewards.std(unbiased=False) + eps)
    elif std == "none":
        adv = centred
    else:
        raise ValueError(f"unknown std mode '{std}'. Known: group, global, none.")
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv


@register_advantage("group")
def group_estimator(inputs: AdvantageInputs, *, std: str = "group", eps: float = 1e-4, clip: float | None = 5.0) -> Tensor:
    """Registered form of :func:`group_advantages` (GRPO, Flow-GRPO, DanceGRPO)."""
    return group_advantages(inputs.rewards, inputs.group_ids, std=std, eps=eps, clip=clip)


def make_estimator(name: str, **hparams: Any) -> Callable[[AdvantageInputs], Tensor]:
    """A ready estimator: registered classes are instantiated with ``hparams`` (stateful ones keep
    their state across calls); functions are bound with ``hparams``. Unknown hyper-parameters are an
    error naming the estimator and its accepted names."""
    obj = ADVANTAGES.get(name)
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = inspect.signature(target).parameters
    accepts_var = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in hparams if k not in params and not accepts_var]
    if unknown:
        known = [k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        raise ValueError(f"advantage estimator '{name}' has no option(s) {unknown}; it accepts {known}.")
    if inspect.isclass(obj):
        return obj(**hparams)
    return functools.partial(obj, **hparams)
