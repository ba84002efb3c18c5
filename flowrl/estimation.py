"""The advantage phase of an iteration over every process: the estimator on the global batch
(rows in a one-process run's order), failed rewards left out of its statistics, ``reward.combine:
gdpo`` over the gathered table, drift observation (SPO) and the reward metrics. Functions of the
:class:`~flowrl.trainer.Trainer` (its estimator, reward set and collectives)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from flowrl.advantages import AdvantageInputs, estimator_reads
from flowrl.distributed import GlobalRows
from flowrl.policy import Trajectories, _index
from flowrl.rewards.base import column_metrics


def reward_metrics(trainer: Any, all_table: Tensor, names: list[str]) -> dict[str, float]:
    """The reward set's metrics over all processes: column mean/std of the gathered table,
    failure counts summed, a reward's own metrics averaged."""
    local = {f"reward/{k}" if not k.startswith("reward/") else k: v for k, v in trainer.reward_set.metrics().items()}
    for n in names:
        local.pop(f"reward/{n}", None), local.pop(f"reward/{n}/std", None)
    world = trainer.accelerator.num_processes
    summed = trainer.dist.sum_dicts({k: v for k, v in local.items() if math.isfinite(v)})
    out = {k: (v if k.startswith("reward/failures/") else v / world) for k, v in summed.items()}
    out.update(column_metrics(all_table, names))
    return out


def reward_weights(reward_set: Any, names: list[str]) -> Tensor | None:
    """Weight of each reward column in the combined reward (None for a reward set without them)."""
    fn = getattr(reward_set, "column_weights", None)
    try:
        return fn(list(names)) if fn is not None else None
    except (KeyError, ValueError):  # columns a reward transform renamed
        return None


def global_advantages(trainer: Any, traj: Trajectories, rewards: Tensor, groups: Tensor, table: Tensor, names: list[str], rows: GlobalRows) -> Tensor:
    """The estimator on the global batch: gathered rows in, advantages of the gathered rows out.

    One process: the batch itself. Several: the estimator sees the rows in a one-process run's
    order (``rows.canonical``; DAPO refill rounds interleave the processes' groups), with the
    trajectory fields and per-sample meta entries it declares (:func:`~flowrl.advantages.reads_rows`)
    gathered from every process, so estimators whose statistics span rows (batch z-scores,
    RiskPO bundles, unlikeliness ranks) and estimators with state (SPO's tracker, RiskPO's
    tracked quantiles, Trust-GRPO's step) compute exactly what one process computes, and their
    state stays identical on every process. Meta entries the estimator adds come back to
    ``traj.meta`` (``train_mask`` in gathered order)."""
    weights = reward_weights(trainer.reward_set, names)
    if trainer.accelerator.num_processes == 1:
        return run_estimator(trainer.estimator, AdvantageInputs(
            rewards=rewards, group_ids=groups, reward_table=table, reward_names=names, mask=None, traj=traj,
            prompts=traj.prompts, meta=traj.meta, reward_weights=weights,
        ))
    fields, row_keys = estimator_reads(trainer.estimator)
    order = torch.argsort(rows.canonical)  # canonical (one-process) row j is gathered row order[j]
    total = len(order)
    prompts = trainer.dist.gather_list(traj.prompts)
    view = None
    if fields:
        gathered = {f: trainer.dist.gather_rows(getattr(traj, f, None)) for f in fields}
        view = Trajectories(prompts=prompts, group_ids=groups, log_probs=gathered.pop("log_probs", None), mask=gathered.pop("mask", None), **gathered)
        view = view.select(order)
    meta = dict(traj.meta)
    for k in row_keys:
        if k in meta:
            meta[k] = _index(trainer.dist.gather_rows(meta[k]), order, total)
    adv = run_estimator(trainer.estimator, AdvantageInputs(
        rewards=rewards[order], group_ids=groups[order], reward_table=table[order] if len(table) == total else table,
        reward_names=names, mask=None, traj=view, prompts=[prompts[i] for i in order.tolist()], meta=meta, reward_weights=weights,
    ))
    for k in meta.keys() - traj.meta.keys():  # written by the estimator (global, canonical order)
        traj.meta[k] = meta[k][rows.canonical] if k == "train_mask" else meta[k]
    return adv[rows.canonical]


def combine_globally(trainer: Any, table: Tensor, names: list[str], group_ids: Tensor) -> Tensor:
    """This process's rows of ``reward.combine: gdpo`` over the gathered table: its last step
    z-scores the weighted sum over the whole batch, which each process alone would do over its
    share. (After DAPO refill rounds a one-process run combines each round on its own; here
    the kept batch is combined at once.)"""
    all_table = trainer.dist.gather_uneven(table.float().cpu())
    all_groups = trainer.dist.gather_uneven(group_ids.cpu().long())
    sizes = trainer.dist.gather_uneven(torch.tensor([len(group_ids)])).tolist()
    lo = int(sum(sizes[: trainer.accelerator.process_index]))
    return trainer.reward_set.combine(all_table, names, all_groups)[lo : lo + len(group_ids)]


def observe_shift(trainer: Any, traj: Trajectories, rows: GlobalRows) -> None:
    """Show a drift-tracking estimator (SPO's ``observe_shift``) the policy's log-probs on this
    iteration's rows after the update. Several processes: each evaluates its own rows, the
    old/new log-probs and masks are gathered (padded to the widest completion, mask 0) and
    every process's estimator observes the global batch in one-process order — so its state
    moves identically everywhere (a per-process observation would make the trackers diverge)."""
    old, mask = traj.log_probs.float().cpu(), traj.mask.cpu()
    new = torch.zeros_like(old)
    with trainer.gathered_weights():  # every process enters (a collective under FSDP)
        if len(traj):
            with torch.no_grad(), trainer.autocast():
                new = trainer.policy.log_prob(traj).float().cpu()
    prompts = traj.prompts
    if trainer.accelerator.num_processes > 1:
        order = torch.argsort(rows.canonical)
        all_prompts = trainer.dist.gather_list(traj.prompts)
        prompts = [all_prompts[i] for i in order.tolist()]
        old, new, mask = (trainer.dist.gather_rows(x)[order] for x in (old, new, mask))
    trainer.estimator.observe_shift(prompts, old, new, mask)


def run_estimator(estimator: Any, inputs: AdvantageInputs) -> Tensor:
    """Run the estimator; rows whose reward failed (NaN, tolerated up to ``max_failures``) are
    left out of the statistics and get advantage 0."""
    valid = torch.isfinite(inputs.rewards)
    if bool(valid.all()):
        return estimator(inputs)
    if inputs.traj is not None and inputs.traj.meta.get("rollout_structure"):
        raise RuntimeError("a reward failed inside a structured rollout (tree/singular); its advantages need every leaf. Fix the reward or set reward.max_failures=0.")
    idx = torch.nonzero(valid).flatten()
    meta = dict(inputs.meta) if inputs.meta is not None else None
    for k in estimator_reads(estimator)[1]:  # declared per-sample meta entries: the same rows
        if meta is not None and k in meta:
            meta[k] = _index(meta[k], idx, len(valid))
    sub = dataclasses.replace(
        inputs, rewards=inputs.rewards[idx], group_ids=inputs.group_ids[idx],
        reward_table=inputs.reward_table[idx] if inputs.reward_table is not None else None,
        traj=inputs.traj.select(idx) if inputs.traj is not None else None,
        prompts=[inputs.prompts[i] for i in idx.tolist()] if inputs.prompts is not None else None,
        meta=meta,
    )
    adv_valid = estimator(sub)
    if meta is not None:
        for k in meta.keys() - inputs.meta.keys():  # entries the estimator wrote (over the valid rows)
            inputs.meta[k] = meta[k]
    out = adv_valid.new_zeros((len(inputs.rewards),) + tuple(adv_valid.shape[1:]))
    out[idx] = adv_valid
    return out


def iteration_advantages(trainer: Any, traj: Trajectories, combined: Tensor, g: dict[str, Any], rows: GlobalRows) -> Tensor:
    """Phase 3 of an iteration: set ``traj.advantages`` (this process's rows; ``traj.mask`` loses
    the steps an estimator pruned) and return every process's advantages. ``g``: the gathered
    rewards (:meth:`~flowrl.trainer.Trainer._gather_rewards`)."""
    prepare = getattr(trainer.objective, "before_advantages", None)
    if prepare is not None:  # objectives whose estimator reads policy evaluations (GRPO-CARE)
        with trainer.gathered_weights():
            prepare(trainer, traj)
    if trainer.accelerator.num_processes == 1 or not traj.meta.get("rollout_structure"):
        adv_all = global_advantages(trainer, traj, g["rewards"], g["groups"], g["table"], g["names"], rows)
        traj.advantages = adv_all[rows.lo : rows.hi]
        if "train_mask" in traj.meta:  # an estimator pruned trained steps (BranchGRPO width pruning)
            traj.mask = traj.mask & traj.meta.pop("train_mask")[rows.lo : rows.hi].to(traj.mask.device)
        return adv_all
    # structured rollouts (trees): the estimator needs the trajectory; whole trees are local
    traj.advantages = run_estimator(trainer.estimator, AdvantageInputs(
        rewards=combined.float().cpu(), group_ids=traj.group_ids.cpu(), reward_table=g["local_table"], reward_names=g["names"],
        mask=None, traj=traj, prompts=traj.prompts, meta=traj.meta,
        reward_weights=reward_weights(trainer.reward_set, g["names"]),
    ))
    if "train_mask" in traj.meta:
        traj.mask = traj.mask & traj.meta.pop("train_mask").to(traj.mask.device)
    return trainer.dist.gather_uneven(traj.advantages.float())
