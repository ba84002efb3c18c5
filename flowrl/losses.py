"""Policy losses as composable registered pieces, shared by diffusion and language policies.

A policy-gradient loss is assembled from four plug points (verl ``core_algos`` style):

1. **ratio level** (``RATIOS``): ``fn(inputs) -> log_ratio [B, T]`` — per step/token, per sequence
   (GSPO), ...
2. **clip / weight rule** (``CLIP_RULES``): ``fn(log_ratio, inputs, **hp) -> (loss [B, T], metrics)``
   — PPO clip, asymmetric clip, ...
3. **step weights** (``STEP_WEIGHTS``): ``fn(inputs, **hp) -> [B, T] or [T]`` multiplying the
   per-step loss (GRPO-Guard's 1/|dt|, SAGE's equalizer); default none.
4. **aggregation** (:func:`aggregate`): ``[B, T] → scalar`` with a mask.

plus a **KL term** (``KL_TERMS``): ``fn(inputs) -> [B, T]`` against the reference policy, weighted by
``beta`` and aggregated the same way.

Each piece has one signature over :class:`LossInputs`, so adding an input breaks no sibling.
:func:`policy_loss` runs them in order and returns ``(loss, metrics)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from flowrl.policy import PolicyEval
from flowrl.registry import Registry

RATIOS: Registry[Callable[..., Tensor]] = Registry("ratio level")
CLIP_RULES: Registry[Callable[..., Any]] = Registry("clip rule")
STEP_WEIGHTS: Registry[Callable[..., Tensor]] = Registry("step weight")
KL_TERMS: Registry[Callable[..., Tensor]] = Registry("KL term")

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclass
class LossInputs:
    """Everything a loss piece may read, for one chunk of ``T'`` stored steps.

    log_prob, old_log_prob: ``[B, T']`` current and rollout log-probs.
    advantages: ``[B, T']`` (a ``[B]`` advantage broadcast over steps).
    mask: ``[B, T']`` float, 1 where the step is trained.
    current: the :class:`PolicyEval` of the current weights (means/stds/entropies if any).
    reference: the reference policy's :class:`PolicyEval` on the same steps (for KL), or None.
    traj: the :class:`~flowrl.policy.Trajectories` rows being trained; steps: ``[T']`` indices.
    extras: free per-call data (e.g. moving-anchor evals for SAGE).
    """

    log_prob: Tensor
    old_log_prob: Tensor
    advantages: Tensor
    mask: Tensor
    current: PolicyEval | None = None
    reference: PolicyEval | None = None
    traj: Any = None
    steps: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ x·m / Σ m (over ``dim`` or everything); 0 where the mask is empty."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def aggregate(loss: Tensor, mask: Tensor, mode: str = "token-mean", *, max_len: int | None = None) -> Tensor:
    """Reduce a ``[B, T]`` per-step loss to a scalar.

    - ``token-mean``: Σ l·m / Σ m over the whole batch (DAPO; Flow-GRPO's mean over samples × steps).
    - ``seq-mean-token-mean``: mean over sequences of each sequence's masked mean (GRPO).
    - ``seq-mean-token-sum``: mean over sequences of each sequence's masked sum.
    - ``seq-mean-token-sum-norm``: mean over sequences of masked sum / ``max_len`` (Dr.GRPO's constant
      normaliser; ``max_len`` defaults to T).
    """
    mask = mask.to(loss.dtype)
    if mode == "token-mean":
        return masked_mean(loss, mask)
    if mode == "seq-mean-token-mean":
        return masked_mean(loss, mask, dim=-1).mean()
    if mode == "seq-mean-token-sum":
        return (loss * mask).sum(-1).mean()
    if mode == "seq-mean-token-sum-norm":
        norm = float(max_len if max_len is not None else loss.shape[-1])
        return (loss * mask).sum(-1).mean() / norm
    raise ValueError(f"unknown aggregation '{mode}'. Known: {', '.join(AGGREGATIONS)}")


# ---------------------------------------------------------------------------------- ratio level
@RATIOS.register("token")
def token_log_ratio(inputs: LossInputs) -> Tensor:
    """Per-step log-ratio log π_θ − log π_old, ``[B, T]`` (PPO, GRPO, Flow-GRPO)."""
    return inputs.log_prob - inputs.old_log_prob


# ------------------------------------------------------------------------------- clip / weights
def ppo_clip_loss(log_ratio: Tensor, advantages: Tensor, *, clip_range: float, clip_range_high: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate per step: l = max(−A·ρ, −A·clip(ρ, 1−ε_lo, 1+ε_hi)), ρ = exp(log_ratio).

    Schulman et al. (2017) eq. 7; Flow-GRPO uses ε = 1e-4 on mean-reduced Gaussian log-probs.
    Returns ``([B, T] loss, metrics)`` with ``ratio`` and ``clipped`` (bool) tensors in metrics.
    """
    hi = clip_range if clip_range_high is None else clip_range_high
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + hi)
    loss = torch.maximum(unclipped, clipped)
    return loss, {"ratio": ratio.detach(), "clipped": (clipped > unclipped).detach()}


@CLIP_RULES.register("ppo_clip")
def ppo_clip_rule(log_ratio: Tensor, inputs: LossInputs, *, clip_range: float = 0.2, clip_range_high: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Registered :func:`ppo_clip_loss` (symmetric, or clip-higher with ``clip_range_high``)."""
    return ppo_clip_loss(log_ratio, inputs.advantages, clip_range=clip_range, clip_range_high=clip_range_high)


@STEP_WEIGHTS.register("none")
def no_step_weight(inputs: LossInputs) -> Tensor:
    return torch.ones_like(inputs.log_prob)


# ------------------------------------------------------------------------------------ KL terms
def _step_delta(inputs: LossInputs) -> Tensor:
    traj, steps = inputs.traj, inputs.steps
    return (traj.sigmas[:, steps] - traj.sigmas_next[:, steps]).float()


def _mean_sq_diff(a: Tensor, b: Tensor) -> Tensor:
    """mean over latent dims of (a − b)², ``[B, T, *latent] → [B, T]``."""
    d = (a.float() - b.float()) ** 2
    return d.flatten(2).mean(-1)


@KL_TERMS.register("gaussian")
def gaussian_kl(inputs: LossInputs) -> Tensor:
    """Exact per-step KL between equal-std Gaussians, mean_dims((μ_θ − μ_ref)²)/(2s²), s = σ_t·√Δ.

    This is KL(π_θ ‖ π_ref) of the step (averaged over dims, the log-prob reduction)."""
    cur, ref = inputs.current, inputs.reference
    if cur is None or ref is None or cur.mean is None or ref.mean is None:
        raise ValueError("the 'gaussian' KL needs Gaussian means of the policy and the reference (diffusion policies).")
    return _mean_sq_diff(cur.mean, ref.mean) / (2 * cur.std.float() ** 2)


@KL_TERMS.register("gaussian_reference")
def gaussian_kl_reference_form(inputs: LossInputs) -> Tensor:
    """Flow-GRPO reference code's KL, mean_dims((μ_θ − μ_ref)²)/(2σ_t²): it divides by the diffusion
    coefficient σ_t² rather than the step variance s² = σ_t²·Δ, i.e. it is the exact KL times Δ
    (smaller on fine grids). Kept for reproducing published β values."""
    return gaussian_kl(inputs) * _step_delta(inputs)


@KL_TERMS.register("k3")
def k3_kl(inputs: LossInputs) -> Tensor:
    """Schulman's k3 estimator per token: π_ref/π − log(π_ref/π) − 1 ≥ 0 (GRPO, DeepSeekMath eq. 4)."""
    if inputs.reference is None:
        raise ValueError("the 'k3' KL needs the reference policy's log-probs.")
    d = inputs.reference.log_prob.float() - inputs.log_prob.float()
    return torch.exp(d) - d - 1.0


# ------------------------------------------------------------------------------------ assembly
@dataclass
class LossSpec:
    """How :func:`policy_loss` assembles the pieces (names index the registries above)."""

    ratio: str = "token"
    clip: str = "ppo_clip"
    clip_params: dict[str, Any] = field(default_factory=lambda: {"clip_range": 1e-4})
    step_weight: str = "none"
    step_weight_params: dict[str, Any] = field(default_factory=dict)
    aggregation: str = "token-mean"
    max_len: int | None = None
    kl: str | None = None
    beta: float = 0.0


def policy_loss(inputs: LossInputs, spec: LossSpec) -> tuple[Tensor, dict[str, float]]:
    """ratio → clip rule → step weights → aggregation (+ β·KL). Returns ``(scalar, metrics)``.

    Metrics: ``loss/policy``, ``ratio/mean`` (masked mean of ρ), ``ratio/clipfrac`` (fraction of
    masked steps where the clipped branch was taken), ``kl/ref`` (masked mean KL, if any),
    ``loss/kl`` (β·KL aggregated).
    """
    mask = inputs.mask.float()
    log_ratio = RATIOS.get(spec.ratio)(inputs)
    per_step, info = CLIP_RULES.get(spec.clip)(log_ratio, inputs, **spec.clip_params)
    weights = STEP_WEIGHTS.get(spec.step_weight)(inputs, **spec.step_weight_params)
    per_step = per_step * weights
    loss = aggregate(per_step, mask, spec.aggregation, max_len=spec.max_len)
    metrics: dict[str, float] = {"loss/policy": float(loss.detach())}
    if "ratio" in info:
        metrics["ratio/mean"] = float(masked_mean(info["ratio"].float(), mask))
        metrics["ratio/max_abs_log"] = float((log_ratio.detach().abs() * mask).max())
    if "clipped" in info:
        metrics["ratio/clipfrac"] = float(masked_mean(info["clipped"].float(), mask))
    for k, v in info.items():
        if k not in ("ratio", "clipped") and isinstance(v, Tensor) and v.numel() == 1:
            metrics[k] = float(v)
    if spec.kl and spec.beta > 0:
        kl = KL_TERMS.get(spec.kl)(inputs)
        kl_loss = aggregate(kl, mask, spec.aggregation, max_len=spec.max_len)
        loss = loss + spec.beta * kl_loss
        metrics["kl/ref"] = float(masked_mean(kl.detach(), mask))
        metrics["loss/kl"] = float(spec.beta * kl_loss.detach())
    return loss, metrics
