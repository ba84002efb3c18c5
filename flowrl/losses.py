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
    #: ``[B]`` combined scalar reward of each sample (rules that depend on correctness or group
    #: success rate, e.g. ETR); None if the trainer does not pass it.
    rewards: Tensor | None = None


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
    delta = (traj.sigmas[:, steps] - traj.sigmas_next[:, steps]).float()
    return delta.to(inputs.log_prob.device)  # trajectories live on the CPU; the loss on the model's device


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
    #: multiply the per-step KL by the importance ratio ρ of the ratio level (with its gradient), as
    #: TRL's ``use_bias_correction_kl`` (DeepSeek-V3.2): the k3 gradient then estimates ∇KL(π_θ‖π_ref)
    #: without bias off-policy too.
    kl_ratio_weight: bool = False


def loss_reads_entropy(spec: LossSpec) -> bool:
    """Whether :func:`policy_loss` with ``spec`` reads per-token entropies (``PolicyEval.entropy``):
    a registered piece declares it with a ``reads_entropy`` attribute, ``True`` or a function of its
    parameters. A token policy computes entropies (a softmax over the vocabulary per token) only then."""
    for registry, name, params in ((RATIOS, spec.ratio, {}), (CLIP_RULES, spec.clip, spec.clip_params),
                                   (STEP_WEIGHTS, spec.step_weight, spec.step_weight_params)):
        flag = getattr(registry.get(name), "reads_entropy", False)
        if callable(flag):
            flag = flag(dict(params or {}))
        if flag:
            return True
    return bool(spec.kl and spec.beta > 0 and getattr(KL_TERMS.get(spec.kl), "reads_entropy", False))


def policy_loss(inputs: LossInputs, spec: LossSpec) -> tuple[Tensor, dict[str, float]]:
    """ratio → clip rule → step weights → aggregation (+ β·KL, optionally ρ-weighted). Returns
    ``(scalar, metrics)``.

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
        if spec.kl_ratio_weight:
            kl = kl * torch.exp(log_ratio)
        kl_loss = aggregate(kl, mask, spec.aggregation, max_len=spec.max_len)
        loss = loss + spec.beta * kl_loss
        metrics["kl/ref"] = float(masked_mean(kl.detach(), mask))
        metrics["loss/kl"] = float(spec.beta * kl_loss.detach())
    return loss, metrics


# =============================================================================== language models
# Ratio levels, clip/weight rules for the LLM GRPO family (docs/algorithms.md). Every rule keeps the
# CLIP_RULES signature ``fn(log_ratio [B, T], inputs, **hp) -> (loss [B, T], metrics)``; a
# per-sequence loss is broadcast over the sequence's tokens so the aggregation picks the weighting.


def sequence_log_ratio(log_prob: Tensor, old_log_prob: Tensor, mask: Tensor) -> Tensor:
    """GSPO sequence log-ratio log s_i = (1/|o_i|) Σ_t m_t (log π_θ − log π_old), ``[B, T] → [B]``.

    s_i = (π_θ(o_i)/π_old(o_i))^{1/|o_i|} (Zheng et al. 2025, GSPO eq. 7). An empty mask gives 0.
    """
    return masked_mean(log_prob - old_log_prob, mask.to(log_prob.dtype), dim=-1)


@RATIOS.register("sequence")
def sequence_ratio(inputs: LossInputs) -> Tensor:
    """GSPO: the sequence log-ratio :func:`sequence_log_ratio` broadcast to every token, ``[B, T]``."""
    seq = sequence_log_ratio(inputs.log_prob, inputs.old_log_prob, inputs.mask)
    return seq[:, None].expand_as(inputs.log_prob)


@RATIOS.register("gspo_token")
def gspo_token_ratio(inputs: LossInputs) -> Tensor:
    """GSPO-token: log s_{i,t} = sg[log s_i] + log π_θ(a_t) − sg[log π_θ(a_t)] (GSPO eq. 13).

    Its value equals the sequence ratio; its gradient is the token's own ∇log π_θ(a_t) scaled by
    s_i, which lets per-token advantages steer single tokens.
    """
    seq = sequence_log_ratio(inputs.log_prob, inputs.old_log_prob, inputs.mask).detach()
    return seq[:, None] + inputs.log_prob - inputs.log_prob.detach()


def segment_ids_of(inputs: LossInputs) -> Tensor:
    """``[B, T']`` sub-sentence index of each token: ``traj.meta["segment_ids"]`` (TokenPolicy
    stores it, splitting after sentence punctuation), else one segment per sequence."""
    traj = inputs.traj
    seg = None if traj is None else getattr(traj, "meta", {}).get("segment_ids")
    if seg is None:
        return torch.zeros_like(inputs.log_prob, dtype=torch.long)
    seg = seg.to(inputs.log_prob.device)
    return seg[:, inputs.steps.to(seg.device)] if inputs.steps is not None else seg


def segment_mean(values: Tensor, mask: Tensor, segment_ids: Tensor) -> Tensor:
    """Masked mean of ``values`` inside each (row, segment), broadcast back to ``[B, T]``."""
    B, T = values.shape
    n_seg = int(segment_ids.max()) + 1 if segment_ids.numel() else 1
    flat = segment_ids + torch.arange(B, device=values.device)[:, None] * n_seg  # [B, T]
    m = mask.to(values.dtype)
    sums = torch.zeros(B * n_seg, dtype=values.dtype, device=values.device).index_add(0, flat.reshape(-1), (values * m).reshape(-1))
    counts = torch.zeros(B * n_seg, dtype=values.dtype, device=values.device).index_add(0, flat.reshape(-1), m.reshape(-1))
    return (sums / counts.clamp(min=1.0))[flat]


@RATIOS.register("segment")
def segment_ratio(inputs: LossInputs) -> Tensor:
    """SSPO (inferred form): the ratio of each sub-sentence is the mean token log-ratio inside it,
    broadcast to its tokens, ``[B, T]`` — between GRPO's token and GSPO's sequence granularity."""
    return segment_mean(inputs.log_prob - inputs.old_log_prob, inputs.mask, segment_ids_of(inputs))


def _correct(inputs: LossInputs, threshold: float) -> Tensor:
    """``[B, 1]`` bool: the sample counts as correct (reward > threshold if rewards are given,
    else advantage > 0, which coincides for 0/1 rewards in mixed groups)."""
    if inputs.rewards is not None:
        return (inputs.rewards.to(inputs.advantages.device) > threshold)[:, None]
    adv = inputs.advantages
    return (adv if adv.dim() == 1 else adv.mean(-1))[:, None] > 0


@CLIP_RULES.register("dispo")
def dispo_rule(
    log_ratio: Tensor,
    inputs: LossInputs,
    *,
    eps_up_correct: float = 0.28,
    eps_down_correct: float = 0.2,
    eps_up_incorrect: float = 0.2,
    eps_down_incorrect: float = 0.28,
    correct_threshold: float = 0.5,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DISPO: REINFORCE-style l = −sg[w]·A·log π_θ(a_t), w = clip(ρ, 1 − ε_down, 1 + ε_up), with
    separate (ε_up, ε_down) for correct and incorrect responses (Karaman et al. 2026; four
    regimes). Mechanism certain; the loss form (CISPO-like, sg on the clipped weight) and the
    default bounds are inferred.
    """
    ratio = torch.exp(log_ratio)
    ok = _correct(inputs, correct_threshold)
    lo = torch.where(ok, torch.tensor(1.0 - eps_down_correct), torch.tensor(1.0 - eps_down_incorrect)).to(ratio)
    hi = torch.where(ok, torch.tensor(1.0 + eps_up_correct), torch.tensor(1.0 + eps_up_incorrect)).to(ratio)
    w = torch.minimum(torch.maximum(ratio, lo), hi).detach()
    loss = -w * inputs.advantages * inputs.log_prob
    return loss, {"ratio": ratio.detach(), "clipped": ((ratio < lo) | (ratio > hi)).detach()}


def etr_clip_range(advantages: Tensor, success: Tensor, *, clip_range: float, adv_scale: float, var_scale: float) -> Tensor:
    """ETR (inferred form): ε_i = ε·(1 + κ_A·|A_i|)·(1 + κ_v·4·p_g(1 − p_g)); ``p_g`` is the success
    rate of the sample's group, so the budget widens with |A| and near p ≈ 0.5. ``[B] → [B]``."""
    return clip_range * (1.0 + adv_scale * advantages.abs()) * (1.0 + var_scale * 4.0 * success * (1.0 - success))


@CLIP_RULES.register("etr")
def etr_rule(
    log_ratio: Tensor,
    inputs: LossInputs,
    *,
    clip_range: float = 0.2,
    adv_scale: float = 0.1,
    var_scale: float = 0.5,
    correct_threshold: float = 0.5,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ETR: PPO clip with a per-sample bound from :func:`etr_clip_range` (inferred form)."""
    adv = inputs.advantages
    adv_seq = adv if adv.dim() == 1 else masked_mean(adv, inputs.mask.float(), dim=-1)
    success = torch.full_like(adv_seq, 0.5)
    if inputs.rewards is not None and inputs.traj is not None:
        from flowrl.advantages import group_stats

        success = group_stats((inputs.rewards > correct_threshold).float(), inputs.traj.group_ids.to(adv_seq.device))[0]
    eps = etr_clip_range(adv_seq, success, clip_range=clip_range, adv_scale=adv_scale, var_scale=var_scale)[:, None]
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.minimum(torch.maximum(ratio, 1.0 - eps), 1.0 + eps)
    loss = torch.maximum(unclipped, clipped)
    return loss, {"ratio": ratio.detach(), "clipped": (clipped > unclipped).detach(), "etr/clip_range_mean": eps.mean().detach()}


@CLIP_RULES.register("dhpo")
def dhpo_rule(
    log_ratio: Tensor,
    inputs: LossInputs,
    *,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    seq_clip_range: float = 3e-4,
    seq_clip_range_high: float | None = 4e-4,
    mix: str = "average",
) -> tuple[Tensor, dict[str, Tensor]]:
    """DHPO (inferred form): mix a token-level and a sequence-level PPO surrogate, each clipped
    with its own range before mixing. ``mix="average"``: ½·(l_tok + l_seq); ``"entropy"``: weight
    the token branch by w_t = H_t / (H_t + mean H) (uncertain tokens lean on their own ratio).

    ``log_ratio`` must be the token log-ratio (``ratio="token"``).
    """
    mask = inputs.mask.float()
    l_tok, info_tok = ppo_clip_loss(log_ratio, inputs.advantages, clip_range=clip_range, clip_range_high=clip_range_high)
    seq = masked_mean(log_ratio, mask, dim=-1)[:, None].expand_as(log_ratio)
    l_seq, _ = ppo_clip_loss(seq, inputs.advantages, clip_range=seq_clip_range, clip_range_high=seq_clip_range_high)
    if mix == "average":
        w = torch.full_like(l_tok, 0.5)
    elif mix == "entropy":
        if inputs.current is None or inputs.current.entropy is None:
            raise ValueError("dhpo mix='entropy' needs per-token entropies (PolicyEval.entropy).")
        h = inputs.current.entropy.detach().float()
        w = h / (h + masked_mean(h, mask)).clamp(min=1e-8)
    else:
        raise ValueError(f"unknown dhpo mix '{mix}'. Known: average, entropy.")
    return w * l_tok + (1 - w) * l_seq, {"ratio": info_tok["ratio"], "clipped": info_tok["clipped"]}


dhpo_rule.reads_entropy = lambda params: params.get("mix", "average") == "entropy"  # type: ignore[attr-defined]


@CLIP_RULES.register("sspo")
def sspo_rule(
    log_ratio: Tensor,
    inputs: LossInputs,
    *,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    entropy_min_scale: float = 0.5,
    entropy_max_scale: float = 2.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SSPO (inferred form): PPO clip on the sub-sentence ratio (``ratio="segment"``) with the clip
    width of each sub-sentence scaled by its mean entropy relative to the batch,
    ε_k = ε·clamp(H̄_k / H̄, min_scale, max_scale) (without entropies: plain ε)."""
    mask = inputs.mask.float()
    scale = torch.ones_like(log_ratio)
    if inputs.current is not None and inputs.current.entropy is not None:
        h = inputs.current.entropy.detach().float()
        seg_h = segment_mean(h, mask, segment_ids_of(inputs))
        scale = (seg_h / masked_mean(h, mask).clamp(min=1e-8)).clamp(entropy_min_scale, entropy_max_scale)
    lo = clip_range * scale
    hi = (clip_range if clip_range_high is None else clip_range_high) * scale
    ratio = torch.exp(log_ratio)
    adv = inputs.advantages
    unclipped = -adv * ratio
    clipped = -adv * torch.minimum(torch.maximum(ratio, 1.0 - lo), 1.0 + hi)
    return torch.maximum(unclipped, clipped), {"ratio": ratio.detach(), "clipped": (clipped > unclipped).detach()}


sspo_rule.reads_entropy = True  # type: ignore[attr-defined]


@CLIP_RULES.register("reg_grpo")
def reg_grpo_rule(log_ratio: Tensor, inputs: LossInputs, *, tau: float = 0.1) -> tuple[Tensor, dict[str, Tensor]]:
    """Reg-GRPO (inferred form): regress the advantage onto the normalised log-ratio,
    l = (A − log ρ / τ)², no clip. Use with ``ratio="sequence"`` (length-normalised log-ratio).
    At ρ = 1 the gradient is −(2A/τ)·∇log ρ: the policy-gradient direction."""
    pred = log_ratio / tau
    return (inputs.advantages - pred) ** 2, {"ratio": torch.exp(log_ratio).detach()}


@CLIP_RULES.register("real")
def real_rule(log_ratio: Tensor, inputs: LossInputs, *, tau: float = 0.1, margin: float = 0.0, correct_threshold: float = 0.5) -> tuple[Tensor, dict[str, Tensor]]:
    """REAL (inferred form): rewards as class labels, y = 1 for correct, 0 for incorrect; binary
    cross-entropy on the anchored logit z = log ρ / τ − margin (anchor: the rollout policy, z = 0 ⇒
    p = ½). Use with ``ratio="sequence"`` (length-normalised log-ratio)."""
    y = _correct(inputs, correct_threshold).to(log_ratio.dtype).expand_as(log_ratio)
    z = log_ratio / tau - margin
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
    return loss, {"ratio": torch.exp(log_ratio).detach()}


# =================================================================================== GRPO-Guard
# GRPO-Guard (2025): store μ_old at rollout, RatioNorm (the guarded log-ratio), the
# 1/|dt| step reweighting and per-step ratio statistics.


def guard_log_ratio(log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, old_mean: Tensor, std: Tensor, *, reduce: str = "mean") -> Tensor:
    """GRPO-Guard RatioNorm: the guarded log-ratio of one Gaussian step, ``[B]`` (or ``[B, T]``).

    b = mean_dims((μ_θ − μ_old)²)/(2s²);  ρ̃ = (log π_θ − log π_old + b)·s
      = mean_dims((x' − μ_old)(μ_θ − μ_old))/s           (same std s for both policies).

    The raw log-ratio of a step sampled from π_old has mean −b ("left shift": ratios below 1 even
    on-policy-ish, so PPO's lower clip fires asymmetrically); ρ̃ has mean 0 and its gradient
    w.r.t. μ_θ is the whitened noise over the dims, independent of s.  Shapes: ``log_prob`` ``[*N]``,
    ``mean``/``old_mean`` ``[*N, *latent]``, ``std`` broadcastable to ``[*N]``. ``reduce`` must
    match the log-prob reduction (``mean``: Flow-GRPO's; ``sum`` sums b over dims).
    """
    lead = log_prob.dim()
    diff = (mean.float() - old_mean.float()) ** 2
    dims = tuple(range(lead, diff.dim()))
    if reduce == "mean":
        sq = diff.mean(dim=dims) if dims else diff
    elif reduce == "sum":
        sq = diff.sum(dim=dims) if dims else diff
    else:
        raise ValueError(f"unknown log-prob reduction '{reduce}'. Known: mean, sum.")
    s = std.float()
    while s.dim() > lead:
        s = s.flatten(lead).mean(-1)
    b = sq / (2 * s**2)
    return (log_prob.float() - old_log_prob.float() + b) * s


def _guard_inputs(inputs: LossInputs) -> tuple[Tensor, Tensor]:
    cur, traj = inputs.current, inputs.traj
    if cur is None or cur.mean is None or cur.std is None:
        raise ValueError("the 'guard' ratio needs the Gaussian means and stds of the current policy (diffusion policies).")
    if traj is None or getattr(traj, "means", None) is None:
        raise ValueError(
            "the 'guard' ratio needs μ_old stored at rollout (Trajectories.means); build the FlowPolicy with "
            "store_means=True (the trainer does this for presets whose loss.ratio is 'guard')."
        )
    steps = inputs.steps if inputs.steps is not None else torch.arange(traj.means.shape[1])
    return traj.means[:, steps].to(cur.mean.device), cur.std


@RATIOS.register("guard")
def guard_ratio(inputs: LossInputs) -> Tensor:
    """GRPO-Guard: :func:`guard_log_ratio` per stored step, ``[B, T]`` (needs ``traj.means``)."""
    old_mean, std = _guard_inputs(inputs)
    reduce = (getattr(inputs.traj, "meta", None) or {}).get("log_prob_reduce", "mean")
    return guard_log_ratio(inputs.log_prob, inputs.old_log_prob, inputs.current.mean, old_mean, std, reduce=reduce)


def mdpo_token_loss(log_ratio: Tensor, advantages: Tensor, *, kl_coef: float) -> Tensor:
    """Mirror-descent policy optimisation per token (Tomar et al. 2022, "Mirror Descent Policy
    Optimization", on-policy form): −ρ·A + (1/t)·(ρ·log ρ − ρ + 1) with ρ = π_θ/π_old and
    1/t = ``kl_coef``. No clipping — the KL keeps the step in a trust region.

    KL(π_θ ‖ π_old) = E_old[ρ·log ρ]; the control variate −(ρ − 1) (E_old[ρ − 1] = 0) leaves that
    expectation unchanged but makes each sample's term ≥ 0 with zero gradient at ρ = 1, as the
    exact KL's is at θ = θ_old. Without it a sample's gradient at ρ = 1 is (−A + 1/t)·∇log π: with
    zero advantages every update would still push the sampled tokens down by 1/t. With it the
    gradient at ρ = 1 is the policy gradient −A·∇log π. (The paper computes the KL of its Gaussian
    policies in closed form; this per-token estimator is *inferred* for token policies.)"""
    ratio = torch.exp(log_ratio)
    return -ratio * advantages + kl_coef * (ratio * log_ratio - ratio + 1.0)


@CLIP_RULES.register("mdpo")
def mdpo_rule(log_ratio: Tensor, inputs: LossInputs, *, kl_coef: float = 1.0, **other: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """Registered :func:`mdpo_token_loss` (``loss.clip_params.kl_coef``: 1/t; 1.0 *inferred* — the
    paper anneals t_k = 1 − k/K over the inner steps)."""
    if other:
        raise ValueError(f"the 'mdpo' rule does not clip; it takes only kl_coef (loss.clip_params), got {', '.join(sorted(other))}.")
    loss = mdpo_token_loss(log_ratio, inputs.advantages, kl_coef=kl_coef)
    return loss, {"ratio": torch.exp(log_ratio.detach())}


@STEP_WEIGHTS.register("inv_dt")
def inv_dt_weight(inputs: LossInputs) -> Tensor:
    """GRPO-Guard gradient reweighting: the step's loss × 1/|dt| = 1/(σ − σ'), ``[B, T]``.

    With the guarded ratio and the flow kernel the gradient w.r.t. the velocity then has weight
    |∂μ/∂v|/Δ = 1 + a²/2 at every step with σ < 1 (1 at σ = 1, where x̂1 drops out of μ), where vanilla
    Flow-GRPO's |∂μ/∂v|/s ranges 0.057 → 1.49 over 10 steps at shift 3, a = 0.7."""
    return 1.0 / _step_delta(inputs).to(inputs.log_prob.device)


def noise_aware_weights(std: Tensor, mask: Tensor) -> Tensor:
    """TempFlow-GRPO's noise-aware weighting (He et al. 2025, "TempFlow-GRPO: When Timing Matters
    for GRPO in Flow Models"): each entry's policy loss × s/mean(s), s the step's noise std σ_t·√Δ
    (its exploration), the mean over the chunk's masked entries — the reference code's
    ``std_dev_t / mean(std_dev_t)`` over the batch. Detached (a weight, not a path for gradients).
    ``[B, T']`` in and out; an empty mask gives ones."""
    s = std.detach().float()
    m = mask.float()
    if float(m.sum()) == 0:
        return torch.ones_like(s)
    return s / masked_mean(s, m).clamp(min=1e-12)


@STEP_WEIGHTS.register("noise_aware")
def noise_aware_weight(inputs: LossInputs) -> Tensor:
    """Registered :func:`noise_aware_weights` on the recomputed step stds (diffusion policies)."""
    if inputs.current is None or inputs.current.std is None:
        raise ValueError("the 'noise_aware' step weight needs the Gaussian step std of the policy (diffusion policies).")
    return noise_aware_weights(inputs.current.std.to(inputs.log_prob.device), inputs.mask)


def per_step_ratio_stats(log_ratio: Tensor, raw_log_ratio: Tensor, clipped: Tensor, mask: Tensor, steps: Tensor | None) -> dict[str, Tensor]:
    """Per-timestep statistics of one chunk, as scalar tensors named ``ratio_step/<k>/<stat>``
    (k = the stored step index): ``mean`` and ``std`` of ρ, ``clipfrac``, and ``raw_log_mean``
    (mean of the unguarded log π_θ − log π_old: its drift below 0 is the left shift)."""
    out: dict[str, Tensor] = {}
    idx = steps.tolist() if steps is not None else list(range(log_ratio.shape[1]))
    ratio = torch.exp(log_ratio.detach().float())
    for col, k in enumerate(idx):
        m = mask[:, col].float()
        if m.sum() == 0:
            continue
        r = ratio[:, col]
        mu = masked_mean(r, m)
        out[f"ratio_step/{k}/mean"] = mu
        out[f"ratio_step/{k}/std"] = torch.sqrt(masked_mean((r - mu) ** 2, m))
        out[f"ratio_step/{k}/clipfrac"] = masked_mean(clipped[:, col].float(), m)
        out[f"ratio_step/{k}/raw_log_mean"] = masked_mean(raw_log_ratio[:, col].detach().float(), m)
    return out


@CLIP_RULES.register("ppo_clip_step_stats")
def ppo_clip_step_stats_rule(log_ratio: Tensor, inputs: LossInputs, *, clip_range: float = 2e-6, clip_range_high: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clip (:func:`ppo_clip_loss`) that also logs :func:`per_step_ratio_stats` for every
    stored step (GRPO-Guard; the trainer averages ``ratio_step/*`` over the chunks holding that step)."""
    loss, info = ppo_clip_loss(log_ratio, inputs.advantages, clip_range=clip_range, clip_range_high=clip_range_high)
    stats = per_step_ratio_stats(log_ratio, inputs.log_prob - inputs.old_log_prob, info["clipped"], inputs.mask, inputs.steps)
    return loss, {**info, **stats}


# ===================================================================================== SAGE-GRPO
# SAGE-GRPO trust region and equalizer: the gradient-norm equalizer (a step
# weight) and the dual trust-region KL (moving anchor + stepwise term). The moving anchor and the
# adaptive β are state, kept by the ``sage_trust_region`` objective (flowrl.trust_region).


def kernel_std(kind: str, sigma: Tensor, sigma_next: Tensor, noise_level: float) -> Tensor:
    """The std s of a kernel's step (it does not depend on x or v), shaped like ``sigma``."""
    from flowrl.sde import KERNELS

    zeros = torch.zeros_like(sigma)
    std = KERNELS.get(kind)(zeros, zeros, sigma, sigma_next, float(noise_level))[1]
    return torch.as_tensor(std, dtype=sigma.dtype, device=sigma.device).expand_as(sigma)


def equalizer_weights(kind: str, sigma: Tensor, sigma_next: Tensor, noise_level: float, *, std: Tensor | None = None) -> Tensor:
    """SAGE-GRPO gradient-norm equalizer c_k = median_j(g_j)/g_k over the last dim (the steps).

    g_k = |∂μ/∂v|/s_k is the size of ∂log π/∂v at step k (the whitened noise times ∂μ/∂v over s;
    sage: ∂μ/∂v = dt − ½·Var·(1−σ)/σ). After weighting, every step's log-prob gradient has the
    same expected magnitude median(g). Shapes: ``sigma``/``sigma_next`` ``[..., T]`` → ``[..., T]``.
    ``std`` overrides the kernel's std (e.g. scaled split noise). The median interpolates for even T.
    """
    from flowrl.sde import mean_velocity_gain

    gain = mean_velocity_gain(kind, sigma, sigma_next, noise_level).abs()
    s = kernel_std(kind, sigma, sigma_next, noise_level) if std is None else std
    g = gain / s
    if not torch.isfinite(g).all() or (g <= 0).any():
        raise ValueError(f"the equalizer needs a positive finite |∂μ/∂v|/s at every step; the '{kind}' kernel gives {g.tolist()}.")
    return torch.quantile(g, 0.5, dim=-1, keepdim=True) / g


@STEP_WEIGHTS.register("sage_equalizer")
def sage_equalizer_weight(inputs: LossInputs) -> Tensor:
    """Registered :func:`equalizer_weights` over each row's stored steps (the median runs over all
    of them, not just the chunk), ``[B, T']``; kernel and noise level from ``traj.meta``."""
    traj = inputs.traj
    meta = getattr(traj, "meta", None) or {}
    sigma, sigma_next = traj.sigmas.float(), traj.sigmas_next.float()
    kind, level = meta.get("kernel", "sage"), meta.get("noise_level", 0.5)
    std = None
    if meta.get("std_scale") is not None:
        std = kernel_std(kind, sigma, sigma_next, level) * meta["std_scale"].float()
    w = equalizer_weights(kind, sigma, sigma_next, level, std=std)
    steps = inputs.steps if inputs.steps is not None else torch.arange(w.shape[1])
    return w[:, steps].to(inputs.log_prob.device)


@KL_TERMS.register("sage_dual")
def sage_dual_kl(inputs: LossInputs) -> Tensor:
    """SAGE-GRPO dual trust region per step, ``[B, T]``: w_mov·KL_mov + w_step·KL_step with
    KL_mov = mean_dims((μ_θ − μ_anchor)²)/(2s² + 1e-6) against the moving anchor (passed as
    ``inputs.reference``) and KL_step = log π_old − log π_θ. Weights ``extras["sage_kl_weights"]``
    (default (1.0, 0.1), the paper's)."""
    cur, anchor = inputs.current, inputs.reference
    if cur is None or anchor is None or cur.mean is None or anchor.mean is None:
        raise ValueError("the 'sage_dual' KL needs the Gaussian means of the policy and of the moving anchor (objective sage_trust_region).")
    w_mov, w_step = inputs.extras.get("sage_kl_weights", (1.0, 0.1))
    mov = _mean_sq_diff(cur.mean, anchor.mean) / (2 * cur.std.float() ** 2 + inputs.extras.get("sage_kl_eps", 1e-6))
    step = inputs.old_log_prob.float() - inputs.log_prob.float()
    return w_mov * mov + w_step * step


# ================================================================================== DiffusionNFT
def nft_loss_per_sample(v_theta: Tensor, v_old: Tensor, v_target: Tensor, r: Tensor, *, beta: float, x0_adaptive: bool = False, t: Tensor | None = None) -> Tensor:
    """Per-sample DiffusionNFT loss ``[B]`` (see :func:`nft_loss`)."""
    if beta <= 0:
        raise ValueError(f"nft_beta must be > 0, got {beta}.")
    f = (lambda x: x if x.dtype == torch.float64 else x.float())  # float32 at least
    v_theta, v_old, v_target = f(v_theta), f(v_old).detach(), f(v_target)
    r = torch.as_tensor(r, device=v_theta.device).to(v_theta.dtype).reshape(-1)
    v_pos = (1.0 - beta) * v_old + beta * v_theta  # implicit positive policy
    v_neg = (1.0 + beta) * v_old - beta * v_theta  # implicit negative policy
    dims = tuple(range(1, v_theta.dim()))
    if x0_adaptive:
        if t is None:
            raise ValueError("nft_loss(x0_adaptive=True) needs t ([B] noise levels) to map velocities to x̂0 = x_t − t·v.")
        tt = torch.as_tensor(t, device=v_theta.device).to(v_theta.dtype).reshape(-1, *([1] * len(dims)))
        terms = []
        for v_pm in (v_pos, v_neg):
            err = tt * (v_pm - v_target)  # x̂0(v±) − x0 = −t·(v± − v)
            w = err.detach().abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)  # stop-gradient adaptive weight
            terms.append((err**2 / w).mean(dim=dims))
        pos, neg = terms
    else:
        pos = ((v_pos - v_target) ** 2).mean(dim=dims)
        neg = ((v_neg - v_target) ** 2).mean(dim=dims)
    return (r * pos + (1.0 - r) * neg) / beta


def nft_loss(v_theta: Tensor, v_old: Tensor, v_target: Tensor, r: Tensor, *, beta: float, x0_adaptive: bool = False, t: Tensor | None = None) -> Tensor:
    """DiffusionNFT forward-process loss (Zheng et al. 2025, "DiffusionNFT", eq. 6), a scalar.

    v⁺ = (1−β)·v_old + β·v_θ,  v⁻ = (1+β)·v_old − β·v_θ  (implicit positive / negative policies),
    L = mean_B[ r·‖v⁺ − v‖² + (1−r)·‖v⁻ − v‖² ] / β,  v = ε − x0 the forward-process target,
    r ∈ [0, 1] the optimality probability. ‖·‖² is a mean over non-batch dims; the 1/β keeps the
    gradient scale independent of β (as the reference code). Per sample the minimiser is
    v_θ = v_old + (2r − 1)(v − v_old)/β; with r ≡ ½ the gradient at v_θ = v_old is 0.
    ``x0_adaptive=True`` (the reference's form): each term is computed on x̂0 = x_t − t·v± instead,
    i.e. on t·(v± − v), divided by its stop-gradient mean |error| (clamped at 1e-5); needs ``t`` [B].
    ``beta`` here is DiffusionNFT's β (config ``nft_beta``), never the KL coefficient.
    Shapes: velocities ``[B, ...]``, ``r`` ``[B]``.
    """
    return nft_loss_per_sample(v_theta, v_old, v_target, r, beta=beta, x0_adaptive=x0_adaptive, t=t).mean()
