"""Likelihood-free objectives on the model's own samples: the flow-matching error of the current
velocity on x_t = (1−t)·x0 + t·ε, with x0 an ODE sample of the policy and ε fresh noise.

All of them read the ``x0_only`` rollout (:func:`flowrl.nft.x0_rollout`: clean latents x0 in
``meta["final_latents"]``, one ε per training slot in ``actions``, slot times t in ``sigmas``), so
none needs SDE log-probs and any deterministic solver samples.

- ``OBJECTIVES["awm"]`` — Advantage Weighted Matching (Xue et al. 2025, "Advantage Weighted
  Matching: Aligning RL with Pretraining in Diffusion Models"): the pretraining flow-matching loss,
  each sample weighted by its advantage.
- ``OBJECTIVES["flow_dpo"]`` — online Diffusion-DPO (Wallace et al. 2023) / Flow-DPO (Liu et al.
  2025, "Improving Video Generation with Human Feedback") on pairs formed inside each group.
- ``OBJECTIVES["dgpo"]`` — group-level DPO (DGPO, Luo et al. 2025, "Reinforcing Diffusion Models
  by Direct Group Preference Optimization"): one Bradley–Terry term per group between its
  advantage-weighted positive and negative sets.

The preference objectives need every member of a group in one minibatch: their
``before_advantages`` hook marks the groups (``meta["minibatch_groups"]``) so the trainer keeps
them contiguous, and ``train.train_batch_size`` must be a multiple of ``train.num_generations``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from flowrl.errors import ConfigError
from flowrl.losses import masked_mean
from flowrl.plugins import OBJECTIVES
from flowrl.policy import Trajectories

#: AWM's per-sample weightings of the flow-matching error e (t the slot's noise level)
AWM_WEIGHTINGS = ("uniform", "t", "ghuber")


# ------------------------------------------------------------------------------------ pure math
def flow_matching_error(v: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
    """e = mean over non-batch dims of (v − (ε − x0))² — the rectified-flow (pretraining) loss of a
    velocity v at x_t = (1−t)·x0 + t·ε, whose target is u = ε − x0. Shapes ``[B, ...]`` → ``[B]``."""
    return ((v.float() - (eps.float() - x0.float())) ** 2).flatten(1).mean(1)


def awm_weighted_error(err: Tensor, t: Tensor, *, weighting: str = "ghuber", power: float = 0.25, floor: float = 1e-10) -> Tensor:
    """The per-sample matching loss AWM weights by the advantage, from the error e ``[B]``:

    - ``uniform``: e (the paper's loss);
    - ``t``: t·e;
    - ``ghuber``: t·((e + δ)^p − δ^p)/p with δ = 1e-10 (the reference code's default, p = 0.25): a
      generalised Huber that grows like e^p, so outlier samples pull less.
    """
    if weighting == "uniform":
        return err
    if weighting == "t":
        return err * t
    if weighting == "ghuber":
        if power <= 0:
            raise ValueError(f"ghuber power must be > 0, got {power}.")
        return ((err + floor) ** power - floor**power) * t / power
    raise ValueError(f"unknown AWM weighting '{weighting}'. Known: {', '.join(AWM_WEIGHTINGS)}.")


def awm_loss(weighted_err: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """L = Σ_{b,j} m_bj·A_b·ℓ_bj / Σ m_bj (Xue et al. 2025, eq. of AWM): the advantage-weighted
    flow-matching loss, ℓ the (weighted) error of sample b at slot j. A > 0 pulls the velocity
    towards the sample's flow (as pretraining on it), A < 0 pushes it away. ``[B, J]`` inputs."""
    return masked_mean(advantages * weighted_err, mask)


def dpo_pairs(advantages: Tensor, groups: Tensor, *, pairing: str = "best_worst") -> tuple[Tensor, Tensor]:
    """Preference pairs ``(winners, losers)`` (row indices) inside each group from the advantages:
    ``best_worst`` — one pair per group, the highest against the lowest; ``all`` — every pair with
    different advantages, the higher one winning. A group whose advantages are all equal gives none."""
    win, lose = [], []
    for g in torch.unique(groups):
        rows = torch.nonzero(groups == g).flatten()
        a = advantages[rows]
        if pairing == "best_worst":
            hi, lo = int(a.argmax()), int(a.argmin())
            if a[hi] > a[lo]:
                win.append(int(rows[hi]))
                lose.append(int(rows[lo]))
        elif pairing == "all":
            for i in range(len(rows)):
                for j in range(len(rows)):
                    if a[i] > a[j]:
                        win.append(int(rows[i]))
                        lose.append(int(rows[j]))
        else:
            raise ValueError(f"unknown pairing '{pairing}'. Known: best_worst, all.")
    return torch.tensor(win, dtype=torch.long), torch.tensor(lose, dtype=torch.long)


def flow_dpo_loss(err_w: Tensor, ref_err_w: Tensor, err_l: Tensor, ref_err_l: Tensor, *, beta: float) -> Tensor:
    """Per-pair Diffusion-/Flow-DPO loss ``[P]`` (Wallace et al. 2023, eq. 14; Flow-DPO with a
    constant β): −log σ(−β/2·[(e_θ^w − e_ref^w) − (e_θ^l − e_ref^l)]), e the flow-matching errors
    of winner and loser at the same (t, ε). Lowering the winner's error relative to the reference
    and raising the loser's lowers the loss; at θ = ref it is log 2."""
    inside = -0.5 * beta * ((err_w - ref_err_w) - (err_l - ref_err_l))
    return -torch.nn.functional.logsigmoid(inside)


def dgpo_loss(err: Tensor, ref_err: Tensor, advantages: Tensor, groups: Tensor, *, beta: float) -> Tensor:
    """Per-group DGPO loss ``[K]`` (Luo et al. 2025; the group form of Diffusion-DPO):

        r_i = −β·(e_θ,i − e_ref,i)                    (implicit reward of sample i)
        w_i = |A_i| / Σ_{j: sign A_j = sign A_i} |A_j|  (weights within the positive / negative set)
        L_g = −log σ( Σ_{A_i>0} w_i·r_i − Σ_{A_i<0} w_i·r_i ).

    A group without a positive or without a negative member contributes nothing (it is left out).
    The advantage weighting follows the paper's description (weights ∝ |A| inside each set); the
    normalisation of the weights per set is *inferred*."""
    r = -beta * (err - ref_err)
    out = []
    for g in torch.unique(groups):
        sel = groups == g
        a, rg = advantages[sel], r[sel]
        pos, neg = a > 0, a < 0
        if not pos.any() or not neg.any():
            continue
        wp = a[pos].abs() / a[pos].abs().sum()
        wn = a[neg].abs() / a[neg].abs().sum()
        out.append(-torch.nn.functional.logsigmoid((wp * rg[pos]).sum() - (wn * rg[neg]).sum()))
    return torch.stack(out) if out else r.new_zeros(0)


# ------------------------------------------------------------------------------------ shared part
def _slot_errors(policy: Any, batch: Trajectories, steps: Tensor, ctx: Any, *, reference: bool, eps_rows: Tensor | None = None):
    """Per slot j of ``steps``: (t ``[B]``, e_θ ``[B]``, e_ref ``[B]`` or None, (v_θ, v_ref)).

    ``eps_rows``: take row ``eps_rows[b]``'s ε for row b (pairs share their noise)."""
    if "final_latents" not in batch.meta or batch.actions is None:
        raise ConfigError("this objective needs x0 (meta['final_latents']) and ε per slot (actions): set sampler.rollout=x0_only.")
    autocast = ctx.autocast if ctx is not None else contextlib.nullcontext
    dev = policy.device
    dtype = getattr(getattr(policy, "adapter", None), "dtype", torch.float32)
    x0 = batch.meta["final_latents"].to(dev).float()
    shape = (-1,) + (1,) * (x0.dim() - 1)
    for j in steps.tolist():
        t = batch.sigmas[:, j].to(dev).float()
        eps = batch.actions[:, j].to(dev).float()
        if eps_rows is not None:
            eps, t = eps[eps_rows.to(dev)], t[eps_rows.to(dev)]
        x_t = ((1 - t.view(shape)) * x0 + t.view(shape) * eps).to(dtype)
        with autocast():
            v = policy.velocity(x_t, t, batch.cond).float()
        v_ref = err_ref = None
        if reference:
            with torch.no_grad(), policy.reference(), autocast():
                v_ref = policy.velocity(x_t, t, batch.cond).float()
            err_ref = flow_matching_error(v_ref, x0, eps)
        yield t, flow_matching_error(v, x0, eps), err_ref, (v, v_ref)


def _row_advantages(batch: Trajectories, dev: Any) -> Tensor:
    a = batch.advantages.to(dev).float()
    return a.mean(-1) if a.dim() > 1 else a


class _GroupedObjective:
    """Marks each group as one minibatch unit (the pair/group losses need every member)."""

    def before_advantages(self, trainer: Any, traj: Trajectories) -> None:
        t = trainer.config.train
        if t.train_batch_size % t.num_generations:
            raise ConfigError(
                f"train.train_batch_size={t.train_batch_size} must be a multiple of train.num_generations={t.num_generations} "
                "for a preference objective (each group's pairs train in one minibatch)."
            )
        traj.meta["minibatch_groups"] = traj.group_ids.clone()


# ------------------------------------------------------------------------------------ objectives
def awm_objective(policy: Any, batch: Trajectories, steps: Tensor, ctx: Any, *, weighting: str = "ghuber", ghuber_power: float = 0.25) -> tuple[Tensor, dict[str, float]]:
    """``OBJECTIVES["awm"]``: :func:`awm_loss` over the chunk's slots plus β·mean((v_θ − v_ref)²)
    to the reference (β = the preset's ``loss.beta``; velocity space, as the reference code's KL)."""
    beta = float(ctx.resolved.preset.loss.beta) if ctx is not None else 0.0
    dev = policy.device
    adv = _row_advantages(batch, dev)
    errs, raw, kls = [], [], []
    for t, err, _, (v, v_ref) in _slot_errors(policy, batch, steps, ctx, reference=beta > 0):
        errs.append(awm_weighted_error(err, t, weighting=weighting, power=ghuber_power))
        raw.append(err.detach())
        if v_ref is not None:
            kls.append(((v - v_ref) ** 2).flatten(1).mean(1))
    mask = batch.mask[:, steps].to(dev).float()
    policy_loss = awm_loss(torch.stack(errs, 1), adv[:, None], mask)
    loss = policy_loss
    metrics = {"loss/policy": float(policy_loss.detach()), "awm/fm_error": float(masked_mean(torch.stack(raw, 1), mask))}
    if kls:
        kl = masked_mean(torch.stack(kls, 1), mask)
        loss = loss + beta * kl
        metrics["kl/ref"], metrics["loss/kl"] = float(kl.detach()), float(beta * kl.detach())
    return loss, metrics


awm_objective.loss_aggregation = "token-mean"  # type: ignore[attr-defined]
if "awm" not in OBJECTIVES:
    OBJECTIVES.register("awm", awm_objective)


def _group_errors(policy: Any, batch: Trajectories, steps: Tensor, ctx: Any):
    """Per slot: (e_θ, e_ref, mask ``[B]``) with every group member at its group's first ε (the
    members of a pair or group are compared at the same x-noise, as Diffusion-DPO's pairs)."""
    groups = batch.group_ids.cpu()
    first = torch.zeros(len(groups), dtype=torch.long)
    for g in torch.unique(groups):
        rows = torch.nonzero(groups == g).flatten()
        first[rows] = rows[0]
    for k, (_, err, err_ref, _) in enumerate(_slot_errors(policy, batch, steps, ctx, reference=True, eps_rows=first)):
        yield err, err_ref, batch.mask[:, int(steps[k])].to(err.device).bool()


class FlowDPOObjective(_GroupedObjective):
    """``OBJECTIVES["flow_dpo"]``: online Diffusion-DPO / Flow-DPO on pairs inside each group.

    Args:
        dpo_beta: β of :func:`flow_dpo_loss` (constant over t, as Flow-DPO).
        pairing: ``best_worst`` (one pair per group) or ``all`` (every ordered pair).

    The chunk loss is the mean of the per-pair losses over the chunk's slots where both members are
    trained. Metrics: ``loss/policy``, ``dpo/pairs`` (pairs per slot), ``dpo/margin`` (mean
    −[(e_θ^w − e_ref^w) − (e_θ^l − e_ref^l)], > 0 when the winner gained on the loser) and
    ``dpo/accuracy`` (share of pairs with a positive margin)."""

    loss_aggregation = "sample-mean"

    def __init__(self, *, dpo_beta: float = 5000.0, pairing: str = "best_worst"):
        if dpo_beta <= 0:
            raise ConfigError(f"loss.objective_options.dpo_beta must be > 0, got {dpo_beta}.")
        dpo_pairs(torch.zeros(1), torch.zeros(1, dtype=torch.long), pairing=pairing)  # validates
        self.dpo_beta, self.pairing = float(dpo_beta), pairing

    def __call__(self, policy: Any, batch: Trajectories, steps: Tensor, ctx: Any) -> tuple[Tensor, dict[str, float]]:
        adv = _row_advantages(batch, "cpu")
        win, lose = dpo_pairs(adv, batch.group_ids.cpu(), pairing=self.pairing)
        losses, margins, zero = [], [], None
        for err, ref, m in _group_errors(policy, batch, steps, ctx):
            zero = err.sum() * 0.0 if zero is None else zero
            both = (m[win.to(m.device)] & m[lose.to(m.device)]) if len(win) else m.new_zeros(0)
            w, l_ = win.to(err.device)[both], lose.to(err.device)[both]
            if len(w):
                losses.append(flow_dpo_loss(err[w], ref[w], err[l_], ref[l_], beta=self.dpo_beta))
                margins.append(-((err[w] - ref[w]) - (err[l_] - ref[l_])).detach())
        if not losses:
            return zero, {"loss/policy": 0.0, "dpo/pairs": 0.0}
        loss = torch.cat(losses).mean()
        margin = torch.cat(margins)
        return loss, {"loss/policy": float(loss.detach()), "dpo/pairs": float(len(margin)) / len(steps),
                      "dpo/margin": float(margin.mean()), "dpo/accuracy": float((margin > 0).float().mean())}


class DGPOObjective(_GroupedObjective):
    """``OBJECTIVES["dgpo"]``: :func:`dgpo_loss` per group and slot, averaged. Args: ``dgpo_beta``.
    Metrics: ``loss/policy``, ``dgpo/groups`` (groups with both signs per slot)."""

    loss_aggregation = "sample-mean"

    def __init__(self, *, dgpo_beta: float = 5000.0):
        if dgpo_beta <= 0:
            raise ConfigError(f"loss.objective_options.dgpo_beta must be > 0, got {dgpo_beta}.")
        self.dgpo_beta = float(dgpo_beta)

    def __call__(self, policy: Any, batch: Trajectories, steps: Tensor, ctx: Any) -> tuple[Tensor, dict[str, float]]:
        adv = _row_advantages(batch, policy.device)
        groups = batch.group_ids.to(policy.device)
        losses, zero = [], None
        for err, ref, m in _group_errors(policy, batch, steps, ctx):
            zero = err.sum() * 0.0 if zero is None else zero
            losses.append(dgpo_loss(err[m], ref[m], adv[m], groups[m], beta=self.dgpo_beta))
        per = torch.cat(losses)
        if len(per) == 0:
            return zero, {"loss/policy": 0.0, "dgpo/groups": 0.0}
        loss = per.mean()
        return loss, {"loss/policy": float(loss.detach()), "dgpo/groups": float(len(per)) / len(steps)}


for _name, _obj in (("flow_dpo", FlowDPOObjective), ("dgpo", DGPOObjective)):
    if _name not in OBJECTIVES:
        OBJECTIVES.register(_name, _obj)
