"""Rewards overlapped with the next rollout.

An iteration's prompts are rolled out in calls of ``train.rollout_batch_size`` prompts; the
outputs of call k are scored by the reward set's background worker (one thread, so calls are
scored in order) while call k + 1 rolls out. The rollouts themselves run one after the other
on the same generator, so the numbers do not depend on whether scoring overlaps
(``train.overlap_rewards``): only the wall time does, ≈ max(rollout, rewards) + update when
rewards are slow (a remote judge, a large reward model on another device). This is the structure
of Flow-GRPO's sampling loop, which submits each sample batch's rewards to a thread pool.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Sequence

import torch
from torch import Tensor


def rollout_in_calls(
    rollout: Callable[[list[int]], Any],
    score: Callable[[Any], tuple[Tensor, list[str]]],
    indices: Sequence[int],
    *,
    prompts_per_call: int | None,
    score_async: Callable[[Any], "concurrent.futures.Future"] | None = None,
    concat: Callable[[list[Any]], Any] | None = None,
) -> tuple[Any, Tensor, list[str]]:
    """Roll out the prompts ``indices`` in calls of ``prompts_per_call`` (None: one call) and score
    every call's trajectories: with ``score_async(traj)`` (a ``Future``, scored in the background
    while the next call rolls out) when there are several calls and it is given, else in line with
    ``score(traj) -> (table, names)``.

    Returns ``(traj, table [B, K], names)``: the calls joined in order (``concat``, default
    ``Trajectories.concat``) with group ids renumbered 0…P−1 across calls.
    """
    from flowrl.policy import Trajectories

    indices = list(indices)
    step = len(indices) if not prompts_per_call else int(prompts_per_call)
    calls = [indices[i : i + step] for i in range(0, len(indices), step)]
    parts, pending = [], []
    for call in calls:
        traj = rollout(call)
        if len(calls) > 1 and (traj.meta.get("rollout_structure") or traj.meta.get("state_key") is not None):
            raise ValueError(
                "train.rollout_batch_size splits the rollout into several calls, but this rollout schedule "
                f"({traj.meta.get('rollout_structure', 'structured')}) shares states across its rows; leave "
                "train.rollout_batch_size unset (one call) for tree and singular rollouts."
            )
        parts.append(traj)
        pending.append(score_async(traj) if score_async is not None and len(calls) > 1 else score(traj))
    results = [p.result() if isinstance(p, concurrent.futures.Future) else p for p in pending]
    names = list(results[0][1])
    if len(parts) == 1:
        return parts[0], results[0][0], names
    offset = 0
    for part in parts:
        part.group_ids = part.group_ids + offset
        offset = int(part.group_ids.max()) + 1
    traj = (concat or Trajectories.concat)(parts)
    for key in ("model_evals_total", "transformer_calls"):  # totals of the rollout add up over its calls
        if all(isinstance(p.meta.get(key), (int, float)) for p in parts):
            traj.meta[key] = float(sum(p.meta[key] for p in parts))
    return traj, torch.cat([r[0] for r in results]), names
