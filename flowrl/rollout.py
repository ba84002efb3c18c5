"""Rollout schedules: which denoising steps are stochastic, and how samples share prefixes.

A schedule is a registered function ``fn(policy, prompts, *, group_size, generator, **params) ->
Trajectories`` over a :class:`~flowrl.pipelines.flow_policy.FlowPolicy`; the policy's
``rollout_name`` / ``rollout_params`` pick it. ``full`` makes every step an SDE step (Flow-GRPO,
DanceGRPO).
"""

from __future__ import annotations

from typing import Any, Callable

from flowrl.registry import Registry

SCHEDULES: Registry[Callable[..., Any]] = Registry("rollout schedule")
register_schedule = SCHEDULES.register


@register_schedule("full")
def full_schedule(policy, prompts, *, group_size, generator=None):
    """SDE at every step; all steps stored (training may still drop some: ``timestep_fraction``)."""
    from flowrl.pipelines.flow_policy import chain_rollout

    return chain_rollout(policy, prompts, group_size=group_size, generator=generator)
