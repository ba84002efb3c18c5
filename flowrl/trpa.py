"""TRPA (Su et al. 2025, "Trust Region Preference Approximation: A simple and stable reinforcement
learning algorithm for LLM reasoning"): a preference objective over the group's responses.

Rule-based rewards become preference levels (a higher reward = a better level); every pair of
responses of one prompt at different levels is a preference pair (winner = the better level), and

    h = β_w·(log r_w − log r_l),   log r = mean_t (log π_θ − log π_old) over the response's tokens,
    L = mean over pairs of −log σ(h)   (the minibatch's pairs on every process together),

with β_w = anisotropy·β when the winner is at the top level of its group (Kahneman–Tversky-style
anisotropy: gains at the top count more), β otherwise. The ratio to the policy that sampled the
group keeps each update in a trust region around it. ``OBJECTIVES["trpa"]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flowrl.errors import ConfigError
from flowrl.losses import masked_mean
from flowrl.matching import _GroupedObjective
from flowrl.plugins import OBJECTIVES


def trpa_pairs(rewards: Tensor, groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(winners, losers, top)``: every pair of one group with different rewards (the higher one
    wins), and whether the winner holds the group's best reward."""
    win, lose, top = [], [], []
    for g in torch.unique(groups):
        rows = torch.nonzero(groups == g).flatten()
        r = rewards[rows]
        best = r.max()
        for i in range(len(rows)):
            for j in range(len(rows)):
                if r[i] > r[j]:
                    win.append(int(rows[i]))
                    lose.append(int(rows[j]))
                    top.append(bool(r[i] == best))
    return torch.tensor(win, dtype=torch.long), torch.tensor(lose, dtype=torch.long), torch.tensor(top, dtype=torch.bool)


def trpa_loss(log_ratio: Tensor, winners: Tensor, losers: Tensor, top: Tensor, *, beta: float, anisotropy: float) -> Tensor:
    """Per-pair −log σ(β_w·(log r_w − log r_l)) ``[P]`` with β_w = anisotropy·β for pairs whose
    winner is at the top level, β otherwise; ``log_ratio`` ``[B]`` per response."""
    scale = torch.where(top.to(log_ratio.device), anisotropy * beta, beta)
    return -torch.nn.functional.logsigmoid(scale * (log_ratio[winners] - log_ratio[losers]))


def global_sum(values: list[float], device: Any) -> list[float]:
    """``values`` summed over every process (``torch.distributed``; themselves on one process).
    Every process must call it the same number of times (once per minibatch here: the loop
    calls the objective once per minibatch on each process, a zero-weight pass included)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def pair_mean_scale(local_rows: float, global_rows: float, global_pairs: float) -> float:
    """Factor on this process's Σ pair losses so that the loop's per-sample weighting
    (local_rows / global_rows, summed over processes) yields the mean over every process's pairs:
    (global_rows / local_rows) / global_pairs. 0 where this process has no rows or nobody has pairs."""
    if local_rows <= 0 or global_pairs <= 0:
        return 0.0
    return global_rows / local_rows / global_pairs


class TRPAObjective(_GroupedObjective):
    """The TRPA update of a minibatch of whole groups. Args: ``trpa_beta`` β (0.1, *inferred*),
    ``anisotropy`` (2.5, the reference code's). Metrics: ``loss/policy``, ``trpa/pairs``,
    ``trpa/margin`` (mean log r_w − log r_l)."""

    loss_aggregation = "sample-mean"

    def __init__(self, *, trpa_beta: float = 0.1, anisotropy: float = 2.5):
        if trpa_beta <= 0 or anisotropy <= 0:
            raise ConfigError(f"loss.objective_options trpa_beta and anisotropy must be > 0, got {trpa_beta}, {anisotropy}.")
        self.beta, self.anisotropy = float(trpa_beta), float(anisotropy)

    def __call__(self, policy: Any, batch: Any, steps: Tensor, ctx: Any) -> tuple[Tensor, dict[str, float]]:
        if len(steps) != batch.mask.shape[1]:
            raise ConfigError("the 'trpa' objective compares whole responses: leave sampler.steps_per_backward unset for it.")
        with ctx.autocast():
            current = policy.evaluate(batch, steps)
        lp = current.log_prob.float()
        mask = batch.mask[:, steps].to(lp.device).float()
        old = batch.log_probs[:, steps].to(lp.device).float()
        log_ratio = masked_mean(lp - old, mask, dim=-1)
        rewards = batch.meta["reward"].float().cpu()
        win, lose, top = trpa_pairs(rewards, batch.group_ids.cpu())
        # the loss is the mean over the minibatch's pairs on every process together: a process's
        # pairs are weighed by the global count (before: each process's mean, weighted by its
        # rows — with 2 processes and every pair on one, half the one-process gradient)
        local_rows, global_rows = (ctx.extras.get("minibatch_rows") if ctx is not None else None) or (float(len(rewards)),) * 2
        global_pairs = global_sum([float(len(win))], lp.device)[0]
        scale = pair_mean_scale(local_rows, global_rows, global_pairs)
        if len(win) == 0:
            return log_ratio.sum() * 0.0, {"loss/policy": 0.0, "trpa/pairs": global_pairs}
        per = trpa_loss(log_ratio, win.to(lp.device), lose.to(lp.device), top, beta=self.beta, anisotropy=self.anisotropy)
        loss = per.sum() * scale
        margin = (log_ratio[win.to(lp.device)] - log_ratio[lose.to(lp.device)]).detach()
        # (weighted by this process's rows, the logged loss/policy is the global pair mean too)
        return loss, {"loss/policy": float(loss.detach()), "trpa/pairs": global_pairs, "trpa/margin": float(margin.mean())}


if "trpa" not in OBJECTIVES:
    OBJECTIVES.register("trpa", TRPAObjective)
