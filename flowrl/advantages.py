"""Advantage estimators: small registered functions (or stateful classes) over one input object.

Every estimator has the signature ``fn(inputs: AdvantageInputs, **hparams) -> Tensor`` returning
``[B]`` (broadcast to every trained step by the trainer) or ``[B, T]`` (per-step advantages).
A stateful estimator is a registered *class*: constructed once with its hyper-parameters, called
like a function, and exposing ``state_dict()`` / ``load_state_dict()`` so a resumed run continues
exactly. ``make_estimator(name, **hparams)`` returns a ready callable either way.

Register your own with ``@register_advantage("name")`` or name ``"pkg.module:fn"`` in the config.
An estimator that reads per-sample trajectory data (old log-probs, masks, tokens, completions) or
per-sample ``meta`` entries declares them with ``@reads_rows(traj=..., meta=...)``: under several
processes the trainer gathers exactly those, so the estimator sees the global batch as in one
process. Estimator state (``state_dict``) must change only through what the estimator sees, so it
stays identical on every process.
"""

from __future__ import annotations

import functools
import math
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
    reward_weights: ``[K]`` weight of each ``reward_table`` column in the combined reward (None:
    unknown, e.g. a hand-made reward set).
    """

    rewards: Tensor
    group_ids: Tensor
    reward_table: Tensor | None = None
    reward_names: list[str] = field(default_factory=list)
    mask: Tensor | None = None
    traj: Any = None
    prompts: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    reward_weights: Tensor | None = None


STD_ESTIMATORS = ("population", "unbiased")


def _check_std_estimator(std_estimator: str) -> None:
    if std_estimator not in STD_ESTIMATORS:
        raise ValueError(f"unknown std_estimator '{std_estimator}'. Known: {', '.join(STD_ESTIMATORS)}.")


def group_stats(values: Tensor, group_ids: Tensor, *, std_estimator: str = "population") -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample mean, std and size of the sample's group, each ``[B]``.

    ``std_estimator="population"`` divides the squared deviations by n (``np.std``, the Flow-GRPO
    reference); ``"unbiased"`` by n − 1 (``torch.std``: TRL's ``GRPOTrainer`` and verl).
    """
    _check_std_estimator(std_estimator)
    values = values.float()
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    means = sums / counts.to(values.dtype)
    sq = torch.zeros_like(means).index_add_(0, inverse, (values - means[inverse]) ** 2)
    dof = counts.to(values.dtype) - (1.0 if std_estimator == "unbiased" else 0.0)
    stds = torch.sqrt(sq / dof.clamp(min=1.0))
    return means[inverse], stds[inverse], counts[inverse]


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    std: str = "group",
    eps: float = 1e-4,
    clip: float | None = 5.0,
    std_estimator: str = "population",
) -> Tensor:
    """Flow-GRPO / DanceGRPO advantage: A = (r − mean_prompt) / (std + eps), clipped to ±clip.

    ``std="group"`` uses each prompt's std (Flow-GRPO per-prompt stat tracking), ``"global"`` the
    std over the whole batch (Flow-GRPO ``global_std``; TRL ``scale_rewards="batch"``), ``"none"`` no
    scaling (Dr.GRPO: A = r − mean). ``std_estimator``: ``population`` (÷n, Flow-GRPO's ``np.std``) or
    ``unbiased`` (÷(n − 1), TRL's and verl's ``torch.std``).
    Liu et al., Flow-GRPO (2025), §4; Shao et al., DeepSeekMath (2024) eq. 3.  Shapes: ``[B] → [B]``.
    """
    rewards = rewards.float()
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards and group_ids must both be [B]; got {tuple(rewards.shape)} and {tuple(group_ids.shape)}")
    if torch.isnan(rewards).any():
        raise ValueError("rewards contain NaN; the reward set should have stopped the run (see reward/failures/*).")
    mean, group_std, counts = group_stats(rewards, group_ids, std_estimator=std_estimator)
    if torch.any(counts < 2):
        raise ValueError(
            "a group has a single sample, so its advantage is undefined. Set num_generations (group size) ≥ 2."
        )
    centred = rewards - mean
    if std == "group":
        adv = centred / (group_std + eps)
    elif std == "global":
        adv = centred / (rewards.std(unbiased=std_estimator == "unbiased") + eps)
    elif std == "none":
        adv = centred
    else:
        raise ValueError(f"unknown std mode '{std}'. Known: group, global, none.")
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv


def reward_columns(inputs: AdvantageInputs, weights: dict[str, float] | None = None) -> list[tuple[Tensor, float]]:
    """``(column, weight)`` of each reward model in ``inputs.reward_table`` with a nonzero weight
    (``weights`` by column name, else the reward set's weights, else 1); the combined reward with
    weight 1 when there is no table."""
    table = inputs.reward_table
    if table is None or table.dim() != 2 or table.shape[1] == 0:
        return [(inputs.rewards, 1.0)]
    names = inputs.reward_names or [str(c) for c in range(table.shape[1])]
    if weights is not None:
        w = [float(weights.get(n, 1.0)) for n in names]
    elif inputs.reward_weights is not None and len(inputs.reward_weights) == table.shape[1]:
        w = [float(x) for x in inputs.reward_weights]
    else:
        w = [1.0] * table.shape[1]
    return [(table[:, c], w[c]) for c in range(table.shape[1]) if w[c] != 0]


@register_advantage("group")
def group_estimator(inputs: AdvantageInputs, *, std: str = "group", eps: float = 1e-4, clip: float | None = 5.0, std_estimator: str = "population", per_reward: bool = False) -> Tensor:
    """Registered form of :func:`group_advantages` (GRPO, Flow-GRPO, DanceGRPO).

    ``per_reward`` (MixGRPO's multi-reward form, after DanceGRPO's code): z-score each reward
    model's column within its group on its own and sum with the reward weights,
    A = clip(Σ_c w_c·(r_c − mean_c)/(std_c + eps)); otherwise the combined reward Σ_c w_c·r_c is
    z-scored. The two differ when the reward models' spreads differ: the combined form lets the
    widest one dominate. With one reward model they agree."""
    if per_reward:
        columns = reward_columns(inputs)
        if len(columns) > 1:
            adv = sum(w * group_advantages(col.to(inputs.rewards.device), inputs.group_ids, std=std, std_estimator=std_estimator, eps=eps, clip=None) for col, w in columns)
            return adv.clamp(-clip, clip) if clip is not None else adv
    return group_advantages(inputs.rewards, inputs.group_ids, std=std, std_estimator=std_estimator, eps=eps, clip=clip)


def reads_rows(*, traj: tuple[str, ...] = (), meta: tuple[str, ...] = ()) -> Callable[[Any], Any]:
    """Declare the per-sample data an estimator reads besides rewards, group ids, the reward table
    and prompts: fields of ``inputs.traj`` (``log_probs``, ``mask``, ``actions``, ``outputs``) and
    per-sample keys of ``inputs.meta``. Under several processes the trainer gathers exactly these
    from every process, in a one-process run's row order, so the estimator sees the global batch
    (``inputs.traj`` is then a :class:`~flowrl.policy.Trajectories` holding only the declared fields;
    it is None for an estimator that declares none)."""

    import dataclasses

    from flowrl.policy import Trajectories

    unknown = sorted(set(traj) - {f.name for f in dataclasses.fields(Trajectories)})
    if unknown:
        raise ValueError(f"reads_rows: Trajectories has no field(s) {unknown}; use log_probs, mask, actions, outputs, ...")

    def mark(obj: Any) -> Any:
        obj.traj_fields, obj.row_meta = tuple(traj), tuple(meta)
        return obj

    return mark


def estimator_reads(estimator: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(traj fields, per-sample meta keys)`` an estimator declared with :func:`reads_rows`
    (a ``functools.partial`` from :func:`make_estimator` or an instance of a registered class)."""
    target = getattr(estimator, "func", estimator)
    return tuple(getattr(target, "traj_fields", ())), tuple(getattr(target, "row_meta", ()))


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


# =============================================================================== language models
# Estimators of the LLM GRPO family (docs/algorithms.md). All read AdvantageInputs; the ones that only
# transform rewards before the group z-score keep that transform in one small function.


def _column(inputs: AdvantageInputs, name: str | int | None, what: str) -> Tensor:
    """One reward column ``[B]`` by name (or index) from ``inputs.reward_table``."""
    if inputs.reward_table is None:
        raise ValueError(f"{what} needs the per-reward table (AdvantageInputs.reward_table).")
    if isinstance(name, int):
        return inputs.reward_table[:, name].float()
    if name not in inputs.reward_names:
        raise ValueError(f"{what}: no reward column '{name}'. Columns: {inputs.reward_names}.")
    return inputs.reward_table[:, inputs.reward_names.index(name)].float()


def _seq_lengths(inputs: AdvantageInputs) -> Tensor:
    mask = inputs.mask if inputs.mask is not None else getattr(inputs.traj, "mask", None)
    if mask is None:
        raise ValueError("this estimator needs completion lengths: pass AdvantageInputs.mask (or traj).")
    return mask.float().sum(-1)


def ngrpo_advantages(rewards: Tensor, group_ids: Tensor, *, max_reward: float = 1.0, eps: float = 1e-4) -> Tensor:
    """NGRPO: each group's mean and (population) std include one virtual sample with ``max_reward``.

    μ' = (Σ_g r + r_max)/(n + 1), σ' = sqrt((Σ_g (r − μ')² + (r_max − μ')²)/(n + 1)),
    A = (r − μ')/(σ' + eps). An all-wrong group (0/1 rewards, n = 4) gets μ' = 0.2, σ' = 0.4,
    A = −0.5 for every member, so it still teaches; an all-correct group gets A = 0.
    Nan et al., NGRPO (2025), §3.  Shapes ``[B] → [B]``.
    """
    rewards = rewards.float()
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n = counts.to(rewards.dtype)
    sums = torch.zeros_like(n).index_add_(0, inverse, rewards)
    mean = (sums + max_reward) / (n + 1)
    sq = torch.zeros_like(n).index_add_(0, inverse, (rewards - mean[inverse]) ** 2) + (max_reward - mean) ** 2
    std = torch.sqrt(sq / (n + 1))
    return (rewards - mean[inverse]) / (std[inverse] + eps)


@register_advantage("ngrpo")
def ngrpo_estimator(inputs: AdvantageInputs, *, max_reward: float = 1.0, eps: float = 1e-4) -> Tensor:
    """Registered :func:`ngrpo_advantages`."""
    return ngrpo_advantages(inputs.rewards, inputs.group_ids, max_reward=max_reward, eps=eps)


@register_advantage("gdpo")
def gdpo_estimator(inputs: AdvantageInputs, *, weights: dict[str, float] | None = None, eps: float = 1e-4) -> Tensor:
    """GDPO: z-score each reward column inside its group, weighted sum (w_k = 1 unless given by
    column name), then re-normalise over the batch — :func:`flowrl.rewards.base.gdpo` applied to
    the reward table (the combined ``inputs.rewards`` is ignored). With one column it is the group
    z-score followed by a batch z-score."""
    from flowrl.normalization import gdpo

    if inputs.reward_table is None or inputs.reward_table.shape[1] == 0:
        raise ValueError("the 'gdpo' estimator needs the per-reward table (AdvantageInputs.reward_table).")
    names = inputs.reward_names or [str(k) for k in range(inputs.reward_table.shape[1])]
    w = torch.tensor([float((weights or {}).get(n, 1.0)) for n in names], dtype=torch.float32)
    return gdpo(inputs.reward_table.float(), w, inputs.group_ids, eps=eps)


class BetaValueTracker:
    """SPO's per-prompt success estimate: a discounted Beta(α, β) posterior, v̂ = α/(α + β).

    Update after observing rewards r ∈ [0, 1] of a prompt: α ← ρα + Σr, β ← ρβ + Σ(1 − r), with
    ρ = clip(2^(−D/D_half), ρ_min, ρ_max) and D = mean |log π_old − log π| of that prompt's tokens
    from the last update (:meth:`observe_shift`; 0 when never observed, i.e. ρ = ρ_max).
    Xu et al., Single-stream Policy Optimization (2025), §3.2.  Unseen prompts start at
    Beta(prior_alpha, prior_beta).
    """

    def __init__(self, *, prior_alpha: float = 1.0, prior_beta: float = 1.0, d_half: float = 0.06, rho_min: float = 0.875, rho_max: float = 0.96):
        self.prior_alpha, self.prior_beta = float(prior_alpha), float(prior_beta)
        self.d_half, self.rho_min, self.rho_max = float(d_half), float(rho_min), float(rho_max)
        self.alpha: dict[str, float] = {}
        self.beta: dict[str, float] = {}
        self.shift: dict[str, float] = {}

    def value(self, prompt: str) -> float:
        a = self.alpha.get(prompt, self.prior_alpha)
        b = self.beta.get(prompt, self.prior_beta)
        return a / (a + b)

    def discount(self, prompt: str) -> float:
        d = self.shift.get(prompt, 0.0)
        return min(max(2.0 ** (-d / self.d_half), self.rho_min), self.rho_max)

    def update(self, prompts: list[str], rewards: Tensor) -> None:
        totals: dict[str, list[float]] = {}
        for p, r in zip(prompts, rewards.float().tolist()):
            totals.setdefault(p, []).append(r)
        for p, rs in totals.items():
            rho = self.discount(p)
            self.alpha[p] = rho * self.alpha.get(p, self.prior_alpha) + sum(rs)
            self.beta[p] = rho * self.beta.get(p, self.prior_beta) + sum(1.0 - r for r in rs)

    def observe_shift(self, prompts: list[str], old_log_prob: Tensor, log_prob: Tensor, mask: Tensor) -> None:
        """Record D = mean |log π_old − log π| over each prompt's masked tokens (call after an update)."""
        diff = ((old_log_prob.float() - log_prob.float()).abs() * mask.float()).detach()
        num: dict[str, float] = {}
        den: dict[str, float] = {}
        for p, d, m in zip(prompts, diff.sum(-1).tolist(), mask.float().sum(-1).tolist()):
            num[p] = num.get(p, 0.0) + d
            den[p] = den.get(p, 0.0) + m
        for p in num:
            self.shift[p] = num[p] / max(den[p], 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": dict(self.alpha), "beta": dict(self.beta), "shift": dict(self.shift)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha = dict(state["alpha"])
        self.beta = dict(state["beta"])
        self.shift = dict(state.get("shift", {}))


@register_advantage("spo")
class SPOAdvantage:
    """SPO (no groups): A = r − v̂(prompt) with the tracker's value *before* this batch, then
    normalised over the whole batch, (A − mean)/(std + eps); afterwards the tracker absorbs the
    rewards. Stateful: ``state_dict()`` / ``load_state_dict()`` checkpoint the tracker.
    Xu et al., Single-stream Policy Optimization (2025), eq. 5–6.  ``[B] → [B]``.
    """

    def __init__(self, *, prior_alpha: float = 1.0, prior_beta: float = 1.0, d_half: float = 0.06, rho_min: float = 0.875, rho_max: float = 0.96, normalize: bool = True, eps: float = 1e-4):
        self.tracker = BetaValueTracker(prior_alpha=prior_alpha, prior_beta=prior_beta, d_half=d_half, rho_min=rho_min, rho_max=rho_max)
        self.normalize = normalize
        self.eps = eps

    def __call__(self, inputs: AdvantageInputs) -> Tensor:
        if inputs.prompts is None:
            raise ValueError("the 'spo' estimator tracks values per prompt: pass AdvantageInputs.prompts.")
        rewards = inputs.rewards.float()
        baseline = torch.tensor([self.tracker.value(p) for p in inputs.prompts], dtype=rewards.dtype, device=rewards.device)
        adv = rewards - baseline
        if self.normalize and adv.numel() > 1:
            adv = (adv - adv.mean()) / (adv.std(unbiased=False) + self.eps)
        self.tracker.update(list(inputs.prompts), rewards.cpu())
        return adv

    def observe_shift(self, prompts: list[str], old_log_prob: Tensor, log_prob: Tensor, mask: Tensor) -> None:
        self.tracker.observe_shift(prompts, old_log_prob, log_prob, mask)

    def state_dict(self) -> dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state)


def noisy_verifier_correction(rewards: Tensor, *, false_positive: float, false_negative: float) -> Tensor:
    """Backward correction of a noisy binary verifier: r̂ = (r̃ − ρ0)/(1 − ρ0 − ρ1), ρ0 = P(r̃=1 | wrong),
    ρ1 = P(r̃=0 | right); E[r̂] equals the clean reward (Natarajan et al. 2013)."""
    if false_positive + false_negative >= 1:
        raise ValueError(f"false_positive + false_negative must be < 1 (got {false_positive} + {false_negative}).")
    return (rewards.float() - false_positive) / (1.0 - false_positive - false_negative)


@register_advantage("noisy_verifier")
def noisy_verifier_estimator(inputs: AdvantageInputs, *, false_positive: float = 0.1, false_negative: float = 0.1, std: str = "none", eps: float = 1e-4, clip: float | None = None, std_estimator: str = "population") -> Tensor:
    """Group advantages of backward-corrected rewards (:func:`noisy_verifier_correction`). The
    correction is affine, so with ``std="group"`` it cancels (up to eps); hence ``std="none"``."""
    r = noisy_verifier_correction(inputs.rewards, false_positive=false_positive, false_negative=false_negative)
    return group_advantages(r, inputs.group_ids, std=std, std_estimator=std_estimator, eps=eps, clip=clip)


def unlikeliness_rewards(rewards: Tensor, seq_log_prob: Tensor, group_ids: Tensor, *, beta_rank: float = 0.25, threshold: float = 0.0) -> Tensor:
    """Unlikeliness reward: r̃ = r·(1 − β_rank·rank/G) where ``rank`` counts the correct (r > threshold)
    members of the group that are *less* likely (mean token log-prob under π_old) — the least likely
    correct answer keeps its full reward, likely ones are discounted. He et al., Rewarding the
    Unlikely (2025), §4.  ``[B] → [B]``."""
    out = rewards.float().clone()
    for g in torch.unique(group_ids):
        idx = (group_ids == g).nonzero(as_tuple=True)[0]
        size = len(idx)
        ok = idx[rewards[idx] > threshold]
        for i in ok.tolist():
            rank = int((seq_log_prob[ok] < seq_log_prob[i]).sum())
            out[i] = rewards[i] * (1.0 - beta_rank * rank / size)
    return out


@register_advantage("unlikeliness")
@reads_rows(traj=("log_probs", "mask"))
def unlikeliness_estimator(inputs: AdvantageInputs, *, beta_rank: float = 0.25, threshold: float = 0.0, std: str = "group", eps: float = 1e-4, clip: float | None = 5.0, std_estimator: str = "population") -> Tensor:
    """Group z-score of :func:`unlikeliness_rewards` (π_old log-probs from ``inputs.traj``)."""
    traj = inputs.traj
    if traj is None:
        raise ValueError("the 'unlikeliness' estimator needs the trajectories (old log-probs and masks).")
    seq_lp = (traj.log_probs.float() * traj.mask.float()).sum(-1) / traj.mask.float().sum(-1).clamp(min=1)
    r = unlikeliness_rewards(inputs.rewards, seq_lp.cpu(), inputs.group_ids.cpu(), beta_rank=beta_rank, threshold=threshold)
    return group_advantages(r, inputs.group_ids, std=std, std_estimator=std_estimator, eps=eps, clip=clip)


def semantic_entropy(answers: list[str], group_ids: Tensor) -> Tensor:
    """Per-sample normalised semantic entropy of its group: answers are clustered by equality,
    SE = −Σ_c p_c log p_c over cluster frequencies, divided by log G (1 = all different). ``[B]``."""
    out = torch.zeros(len(answers))
    for g in torch.unique(group_ids):
        idx = (group_ids == g).nonzero(as_tuple=True)[0].tolist()
        counts: dict[str, int] = {}
        for i in idx:
            counts[answers[i]] = counts.get(answers[i], 0) + 1
        p = torch.tensor(list(counts.values()), dtype=torch.float32) / len(idx)
        se = float(-(p * p.log()).sum())
        out[idx] = se / math.log(len(idx)) if len(idx) > 1 else 0.0
    return out


@register_advantage("seed_grpo")
@reads_rows(traj=("outputs",), meta=("answers",))
def seed_grpo_estimator(inputs: AdvantageInputs, *, alpha: float = 0.5, std: str = "group", eps: float = 1e-4, clip: float | None = 5.0, std_estimator: str = "population") -> Tensor:
    """SEED-GRPO: A·(1 − α·SE/log G): uncertain prompts (many distinct answers) get smaller updates.
    Answers: ``meta["answers"]`` if given, else extracted from ``traj.outputs`` with
    :func:`flowrl.rewards.verifiers.extract_answer`. Mechanism certain; the linear f is inferred."""
    answers = inputs.meta.get("answers")
    if answers is None:
        from flowrl.answers import extract_answer, normalize_answer

        outputs = getattr(inputs.traj, "outputs", None)
        if outputs is None:
            raise ValueError("'seed_grpo' needs the completions (traj.outputs) or meta['answers'].")
        answers = [normalize_answer(extract_answer(o)) or o.strip() for o in outputs]
    adv = group_advantages(inputs.rewards, inputs.group_ids, std=std, std_estimator=std_estimator, eps=eps, clip=clip)
    se = semantic_entropy(list(answers), inputs.group_ids.cpu()).to(adv.device)
    return adv * (1.0 - alpha * se)


def grpo_lambda_rewards(correct: Tensor, lengths: Tensor, group_ids: Tensor, *, threshold: float = 0.5, lam: float = 0.5) -> Tensor:
    """GRPO-λ: inside a group whose fraction of correct answers is ≥ ``threshold``, correct answers
    get r = 1 − λ·(ℓ − ℓ_min)/(ℓ_max − ℓ_min) (shorter is better); other groups keep 0/1
    correctness, which avoids the early accuracy collapse of always-on length penalties.
    Mechanism certain; the linear penalty is inferred.  ``[B] → [B]``."""
    correct = correct.float()
    out = correct.clone()
    for g in torch.unique(group_ids):
        idx = (group_ids == g).nonzero(as_tuple=True)[0]
        if correct[idx].mean() < threshold:
            continue
        ln = lengths[idx].float()
        span = (ln.max() - ln.min()).clamp(min=1.0)
        out[idx] = correct[idx] * (1.0 - lam * (ln - ln.min()) / span)
    return out


@register_advantage("grpo_lambda")
@reads_rows(traj=("mask",))
def grpo_lambda_estimator(inputs: AdvantageInputs, *, threshold: float = 0.5, lam: float = 0.5, correct_threshold: float = 0.5, std: str = "group", eps: float = 1e-4, clip: float | None = 5.0, std_estimator: str = "population") -> Tensor:
    """Group z-score of :func:`grpo_lambda_rewards` (correct = reward > ``correct_threshold``)."""
    r = grpo_lambda_rewards((inputs.rewards > correct_threshold).float(), _seq_lengths(inputs).cpu(), inputs.group_ids.cpu(), threshold=threshold, lam=lam)
    return group_advantages(r.to(inputs.rewards.device), inputs.group_ids, std=std, std_estimator=std_estimator, eps=eps, clip=clip)


@register_advantage("posterior_grpo")
def posterior_grpo_estimator(inputs: AdvantageInputs, *, outcome: str | int = 0, process: str | int = 1, threshold: float = 0.5, weight: float = 1.0, std: str = "group", eps: float = 1e-4, clip: float | None = 5.0, std_estimator: str = "population") -> Tensor:
    """Posterior-GRPO: r = r_outcome + 1[r_outcome > threshold]·w·r_process — the process
    (reasoning-quality) reward counts only for rollouts whose outcome is correct, so it cannot be
    hacked by wrong answers. Columns by name or index of the reward table."""
    r_out = _column(inputs, outcome, "posterior_grpo")
    r_proc = _column(inputs, process, "posterior_grpo")
    r = r_out + (r_out > threshold).float() * weight * r_proc
    return group_advantages(r, inputs.group_ids, std=std, std_estimator=std_estimator, eps=eps, clip=clip)


def s_grpo_rewards(correct: Tensor) -> Tensor:
    """S-GRPO serial-group reward of one chain's ``m`` early exits in order: a correct exit k gets
    1/2^(N_k − 1), N_k = correct exits up to and including k; wrong exits 0 (Dai et al. 2025).
    e.g. correct [0, 1, 1, 0, 1] → [0, 1, 0.5, 0, 0.25]."""
    correct = correct.float()
    n = torch.cumsum(correct, 0)
    return torch.where(correct > 0, 0.5 ** (n - 1).clamp(min=0), torch.zeros_like(correct))


@register_advantage("s_grpo")
def s_grpo_estimator(inputs: AdvantageInputs, *, correct_threshold: float = 0.5, std: str = "none", eps: float = 1e-4, std_estimator: str = "population") -> Tensor:
    """S-GRPO: each group is one chain's exits in rollout order; rewards via :func:`s_grpo_rewards`,
    then A = r − mean (``std="none"``). Needs a rollout that cuts one chain at m exits (not built in)."""
    r = torch.zeros_like(inputs.rewards, dtype=torch.float32)
    for g in torch.unique(inputs.group_ids):
        idx = (inputs.group_ids == g).nonzero(as_tuple=True)[0]
        r[idx] = s_grpo_rewards((inputs.rewards[idx] > correct_threshold).float())
    return group_advantages(r, inputs.group_ids, std=std, std_estimator=std_estimator, eps=eps, clip=None)


def tempo_token_bonus(actions: Tensor, mask: Tensor, rewards: Tensor, group_ids: Tensor) -> Tensor:
    """TEMPO prefix-tree bonus ``[B, T]``: in each group build the tree of completions' prefixes,
    V(prefix) = mean reward of the members through it; at a branch token (its parent prefix has
    more than one child) the bonus is V(s_{t+1}) − V(s_t), elsewhere 0. Inferred scaling."""
    B, T = actions.shape
    bonus = torch.zeros(B, T)
    acts, m, r = actions.tolist(), mask.bool().tolist(), rewards.float().tolist()
    for g in torch.unique(group_ids).tolist():
        members = [i for i in range(B) if int(group_ids[i]) == g]
        node_of: dict[tuple[int, int], int] = {}
        value_sum, count, children = [0.0], [0], [set()]  # node 0 = the prompt
        paths: dict[int, list[int]] = {}
        for i in members:
            node, path = 0, [0]
            value_sum[0] += r[i]
            count[0] += 1
            for t in range(T):
                if not m[i][t]:
                    break
                key = (node, acts[i][t])
                if key not in node_of:
                    node_of[key] = len(count)
                    value_sum.append(0.0)
                    count.append(0)
                    children.append(set())
                child = node_of[key]
                children[node].add(child)
                value_sum[child] += r[i]
                count[child] += 1
                node = child
                path.append(node)
            paths[i] = path
        for i in members:
            path = paths[i]
            for t in range(len(path) - 1):
                parent, child = path[t], path[t + 1]
                if len(children[parent]) > 1:
                    bonus[i, t] = value_sum[child] / count[child] - value_sum[parent] / count[parent]
    return bonus


@register_advantage("tempo")
@reads_rows(traj=("actions", "mask"))
def tempo_estimator(inputs: AdvantageInputs, *, bonus_scale: float = 1.0, std: str = "group", eps: float = 1e-4, clip: float | None = 5.0, std_estimator: str = "population") -> Tensor:
    """TEMPO: per-token A_{i,t} = A_i (group z-score) + λ·(V(s_{t+1}) − V(s_t)) at branch tokens of the
    group's prefix tree (:func:`tempo_token_bonus`), ``[B, T]``. Inferred scaling (λ = bonus_scale)."""
    traj = inputs.traj
    if traj is None or traj.actions is None:
        raise ValueError("the 'tempo' estimator needs the token trajectories (traj.actions, traj.mask).")
    adv = group_advantages(inputs.rewards, inputs.group_ids, std=std, std_estimator=std_estimator, eps=eps, clip=clip)
    bonus = tempo_token_bonus(traj.actions.cpu(), traj.mask.cpu(), inputs.rewards.cpu(), inputs.group_ids.cpu()).to(adv.device)
    return adv[:, None] + bonus_scale * bonus


@register_advantage("trust_grpo")
class TrustGRPOAdvantage:
    """Trust-GRPO: r = r_ans + λ_t·γ·r_think, then the group z-score. γ ∈ [0, 1] is the trust in the
    thinking reward: over all (correct, wrong) pairs inside groups, the fraction where the correct
    answer's thinking scored higher (ties ½; 1 if no pair exists). λ_t = λ_0·max(0, 1 − t/anneal_steps)
    is annealed with the number of calls t (stateful: ``state_dict`` holds t). Mechanism certain;
    γ's pairwise form and the linear annealing are inferred."""

    def __init__(self, *, answer: str | int = 0, think: str | int = 1, lambda0: float = 1.0, anneal_steps: int = 100, correct_threshold: float = 0.5, std: str = "group", eps: float = 1e-4, clip: float | None = 5.0, std_estimator: str = "population"):
        self.std_estimator = std_estimator
        self.answer, self.think = answer, think
        self.lambda0, self.anneal_steps = float(lambda0), int(anneal_steps)
        self.correct_threshold = correct_threshold
        self.std, self.eps, self.clip = std, eps, clip
        self.step = 0

    @staticmethod
    def trust(r_ans: Tensor, r_think: Tensor, group_ids: Tensor, threshold: float) -> float:
        wins, pairs = 0.0, 0
        for g in torch.unique(group_ids):
            idx = (group_ids == g).nonzero(as_tuple=True)[0]
            ok = r_ans[idx] > threshold
            good, bad = r_think[idx][ok], r_think[idx][~ok]
            if len(good) and len(bad):
                diff = good[:, None] - bad[None, :]
                wins += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
                pairs += diff.numel()
        return wins / pairs if pairs else 1.0

    def __call__(self, inputs: AdvantageInputs) -> Tensor:
        r_ans = _column(inputs, self.answer, "trust_grpo")
        r_think = _column(inputs, self.think, "trust_grpo")
        gamma = self.trust(r_ans.cpu(), r_think.cpu(), inputs.group_ids.cpu(), self.correct_threshold)
        lam = self.lambda0 * max(0.0, 1.0 - self.step / max(self.anneal_steps, 1))
        self.step += 1
        self.last = {"trust/gamma": gamma, "trust/lambda": lam}
        return group_advantages(r_ans + lam * gamma * r_think, inputs.group_ids, std=self.std, std_estimator=self.std_estimator, eps=self.eps, clip=self.clip)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


# ================================================================================ G²RPO / BranchGRPO
# Estimators of structured rollouts (flowrl.rollout "singular" and "tree"): rows are one output image
# each, the structure is in traj.meta; they return per-row ([B]) or per-edge ([B, T]) advantages.


def multi_granularity_advantages(rewards: Tensor, *, eps: float = 1e-4, std: str = "population") -> Tensor:
    """G²RPO multi-granularity advantage integration: ``rewards [G, K, Gr] → [G, K]``.

    For each SDE step k and ODE-suffix granularity g, z-score the rewards over the G members,
    z = (r − mean_G)/(std_G + eps) (``std``: ``population`` or ``unbiased``, the reference's
    ``torch.std``), and sum over g: A_k = Σ_g z_{k,g} (summed, not averaged: equal granularities
    give 2·z). A (k, g) column whose rewards are all equal gives 0.
    G²RPO (Zhou et al. 2025, "Multi-Granularity Advantage Integration").
    """
    rewards = rewards.float()
    if rewards.dim() != 3:
        raise ValueError(f"rewards must be [G, K, Gr] (members, SDE steps, granularities); got {tuple(rewards.shape)}")
    if rewards.shape[0] < 2:
        raise ValueError("multi-granularity advantages need at least 2 members per group (train.num_generations ≥ 2).")
    if std not in ("population", "unbiased"):
        raise ValueError(f"multi_granularity std must be population or unbiased, got '{std}'.")
    mean = rewards.mean(0, keepdim=True)
    sd = rewards.std(0, unbiased=std == "unbiased", keepdim=True)
    return ((rewards - mean) / (sd + eps)).sum(-1)


@register_advantage("multi_granularity")
def multi_granularity_estimator(inputs: AdvantageInputs, *, eps: float = 1e-4, clip: float | None = None, std: str = "population", per_reward: bool = True, weights: dict[str, float] | None = None) -> Tensor:
    """G²RPO estimator over a ``singular`` rollout: rows (prompt, k, g, member) → the row with the
    first granularity of each (member, k) gets A_k = Σ_g z_{k,g}
    (:func:`multi_granularity_advantages`); the other granularities' rows get 0 (their step is the
    same SDE step, trained once). ``[B]``.

    ``per_reward`` (the reference): with several reward columns, z-score each reward model's column
    on its own and sum, A = Σ_c w_c·Σ_g z_{c,k,g}, w_c the column's weight (``weights`` by column
    name, else the reward set's weights, else 1; weight-0 columns are left out). Otherwise (or with
    one column and no table) the combined reward is z-scored. ``clip`` bounds |A| (reference 5)."""
    meta = inputs.meta
    if "g2rpo_k" not in meta:
        raise ValueError("the 'multi_granularity' estimator needs a G²RPO rollout: set sampler.rollout=singular (algorithm g2rpo).")
    k, g, m = meta["g2rpo_k"], meta["g2rpo_g"], meta["g2rpo_member"]
    local, blocks = len(k), int(inputs.rewards.shape[0]) // len(k)
    if blocks * local != inputs.rewards.shape[0]:
        raise ValueError(f"'multi_granularity': {inputs.rewards.shape[0]} rewards for a layout of {local} rows.")
    columns = reward_columns(inputs, weights) if per_reward else [(inputs.rewards, 1.0)]
    K, Gr, G = int(k.max()) + 1, int(g.max()) + 1, int(m.max()) + 1
    P = local // (K * Gr * G)
    p = torch.arange(local) // (K * Gr * G)
    out = torch.zeros(inputs.rewards.shape[0], dtype=torch.float32)
    for b in range(blocks):
        adv = torch.zeros(P, G, K)
        for values, weight in columns:
            r = values[b * local : (b + 1) * local].float().cpu()
            grid = torch.empty(P, G, K, Gr)
            grid[p, m, k, g] = r
            adv += weight * torch.stack([multi_granularity_advantages(grid[i], eps=eps, std=std) for i in range(P)])  # [P, G, K]
        if clip is not None:
            adv = adv.clamp(-clip, clip)
        a = adv[p, m, k]
        out[b * local : (b + 1) * local] = torch.where(g == 0, a, torch.zeros_like(a))
    return out.to(inputs.rewards.device)


def depth_advantages(node_rewards: Tensor, depth: Tensor, tree_id: Tensor, *, eps: float = 1e-8, min_std: float = 1e-6) -> Tensor:
    """BranchGRPO depth-wise advantage: ``[N] → [N]``.

    Inside each (tree, depth): A(n) = (r(n) − mean_d)/(std_d + eps) with the sample (n − 1) std;
    0 where the depth holds one node or std_d < ``min_std``. Leaf rewards 0…15 of a tree split at
    0, 3, 6, 9 (branch 2) give ±0.707 after the first split (means 3.5, 11.5; std 5.657),
    ±1.162/±0.387 after the second (means 1.5, 5.5, 9.5, 13.5; std 5.164) and the leaves' plain
    z-scores; each depth sums to 0. BranchGRPO (2025), depth-wise advantage.
    """
    node_rewards = node_rewards.float()
    key = tree_id.long() * (int(depth.max()) + 1) + depth.long()
    _, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    n = counts.float()
    sums = torch.zeros_like(n).index_add_(0, inverse, node_rewards)
    mean = sums / n
    sq = torch.zeros_like(n).index_add_(0, inverse, (node_rewards - mean[inverse]) ** 2)
    std = torch.sqrt(sq / (n - 1).clamp(min=1))
    adv = (node_rewards - mean[inverse]) / (std[inverse] + eps)
    flat = (counts[inverse] < 2) | (std[inverse] < min_std)
    return torch.where(flat, torch.zeros_like(adv), adv)


@register_advantage("tree_depth")
def tree_depth_estimator(inputs: AdvantageInputs, *, fusion: str = "mean", temperature: float = 1.0, clip: float | None = 5.0, width_prune: str | None = None, width_keep: float = 0.5) -> Tensor:
    """BranchGRPO estimator over a ``tree`` rollout → per-edge advantages ``[B, T]``.

    Leaf rewards (one per row) are fused up the tree (``fusion``: ``mean`` of descendants, or
    ``log_prob`` = softmax of child-edge log-probs / temperature at splits), z-scored per depth
    (:func:`depth_advantages`), clipped to ±``clip``; each stored edge parent → child gets the
    child's advantage on the row that owns it (0 elsewhere). ``width_prune`` (``top``: the best
    ``width_keep`` of each last-split sibling group; ``extremes``: best and worst ``width_keep``/2 of
    the tree) drops the post-split chains of the other leaves from training via
    ``meta["train_mask"]`` — it cuts backward cost only: the advantages are unchanged.
    """
    from flowrl.tree import fuse_rewards, width_prune_leaves

    info = inputs.meta.get("tree")
    if info is None:
        raise ValueError("the 'tree_depth' estimator needs a tree rollout: set sampler.rollout=tree (algorithm branch_grpo).")
    layout, P, cols = info.layout, info.num_trees, list(info.columns)
    L = layout.num_leaves
    local = P * L
    total = int(inputs.rewards.shape[0])
    if total % local or (fusion != "mean" and total != local):
        raise ValueError(f"'tree_depth': {total} rewards for {P} trees of {L} leaves (log_prob fusion needs one process).")
    sizes = layout.level_sizes
    leaf = torch.arange(L)
    adv_out, mask_out = [], []
    for b in range(total // local):
        r = inputs.rewards[b * local : (b + 1) * local].float().cpu().view(P, L)
        levels = fuse_rewards(layout, r, fusion=fusion, edge_log_probs=info.edge_log_probs, temperature=temperature)
        flat = torch.cat([lv.reshape(-1) for lv in levels])
        depth = torch.cat([torch.full((P * n,), d) for d, n in enumerate(sizes)])
        tree = torch.cat([torch.arange(P).repeat_interleave(n) for n in sizes])
        node_adv = depth_advantages(flat, depth, tree)
        if clip is not None:
            node_adv = node_adv.clamp(-clip, clip)
        per_level = list(torch.split(node_adv, [P * n for n in sizes]))
        adv = torch.zeros(P, L, len(cols))
        train = torch.ones(P, L, len(cols), dtype=torch.bool)
        keep_leaf = width_prune_leaves(layout, r, mode=width_prune, keep=width_keep) if width_prune else None
        for j, i in enumerate(cols):
            child = layout.ancestor(i + 1, leaf)
            owner = (leaf % layout.subtree_leaves(i + 1) == 0).float()
            adv[:, :, j] = per_level[i + 1].view(P, sizes[i + 1])[:, child] * owner
            if keep_leaf is not None and i > layout.last_split:
                train[:, :, j] = keep_leaf
        adv_out.append(adv.reshape(local, len(cols)))
        mask_out.append(train.reshape(local, len(cols)))
    inputs.meta["train_mask"] = torch.cat(mask_out)
    return torch.cat(adv_out).to(inputs.rewards.device)


# ======================================================================================= RiskPO
# Ren et al., "RiskPO: Risk-based Policy Optimization via Verifiable Reward for LLM Post-Training"
# (2025). Questions are bundled; a "paper" is the j-th answer of every question in a bundle and its
# score the sum of their rewards; the Mixed Value-at-Risk advantage of a paper credits its answers.


def riskpo_papers(group_ids: Tensor, bundle_size: int) -> tuple[Tensor, Tensor]:
    """Bundle the groups (questions) and form the papers, ``[B] → ([B] bundle id, [B] paper id)``.

    Groups are bundled in order of first appearance, ``bundle_size`` per bundle (the last bundle may be
    smaller); paper j of a bundle is the j-th member of each of its groups, so a bundle has as many
    papers as its smallest group has members. Members beyond that get paper id −1 (no paper)."""
    if bundle_size < 1:
        raise ValueError(f"bundle_size must be ≥ 1, got {bundle_size}")
    order: dict[int, int] = {}
    for g in group_ids.tolist():
        order.setdefault(int(g), len(order))
    group_rank = torch.tensor([order[int(g)] for g in group_ids.tolist()], dtype=torch.long)
    bundle = group_rank // bundle_size
    member = torch.zeros_like(group_rank)
    seen: dict[int, int] = {}
    for i, g in enumerate(group_rank.tolist()):
        member[i] = seen.get(g, 0)
        seen[g] = member[i].item() + 1
    paper = member.clone()
    for b in torch.unique(bundle).tolist():
        groups = torch.unique(group_rank[bundle == b])
        n_papers = min(seen[int(g)] for g in groups)
        paper[(bundle == b) & (member >= n_papers)] = -1
    return bundle, paper


def mixed_var_advantage(scores: Tensor, q_low: Tensor | float, q_high: Tensor | float, *, alpha: float, beta: float, weight: float, eps: float = 1e-6) -> Tensor:
    """RiskPO's Mixed Value-at-Risk advantage of paper scores X (RiskPO eq. for MVaR, released code):

    A_RVaR = ((X − q_α)⁺ − (X − q_β)⁺ + (q_α − q_β)) / (β − α)      (range VaR over [α, β], natural baseline)
    A_CVaR = −(q_α − X)⁺ / α                                      (lower-tail CVaR)
    A = (w·A_CVaR + A_RVaR) / (w + 1)

    Both parts are ≤ 0: papers in the lower tail are pushed down hardest, papers above q_β get 0."""
    X = scores.float()
    q_low = torch.as_tensor(q_low, dtype=X.dtype)
    q_high = torch.as_tensor(q_high, dtype=X.dtype)
    rvar = ((X - q_low).clamp(min=0) - (X - q_high).clamp(min=0) + (q_low - q_high)) / (beta - alpha + eps)
    cvar = -(q_low - X).clamp(min=0) / (alpha + eps)
    return (weight * cvar + rvar) / (weight + 1.0)


@register_advantage("riskpo")
class RiskPOAdvantage:
    """RiskPO (Ren et al. 2025): bundle ``bundle_size`` questions, score each paper (the j-th answer of
    every question in the bundle) by its summed reward, take the quantiles q_α, q_β of the bundle's
    paper scores, the Mixed-VaR advantage :func:`mixed_var_advantage`, divided by the bundle's
    (unbiased) paper-score std (1 for a one-paper bundle); each answer of the paper gets it, divided by
    its question's reward std (``credit="std"``; std ≤ 1e-3 counts as 1) or unchanged (``uniform``).
    Defaults are the released Qwen2.5 math script's: α 0.2, β 0.9, w 1.5, bundle 5, credit std.

    ``quantiles="batch"`` (default) takes q_α, q_β from each bundle's own papers — what the released code
    computes the advantage with (its tracked quantiles are written after the advantage and only
    logged). ``"tracked"`` is the paper's description: one pair (q_α, q_β) over all bundles, set to the
    batch quantiles the first time and then moved after every batch by SGD on the pinball loss,
    q ← q + lr_q·(τ − mean(X < q)); the advantage uses the pair from before the batch (inferred:
    the paper does not say which batch's estimate the advantage reads). Stateful (``state_dict``)."""

    def __init__(self, *, bundle_size: int = 5, alpha: float = 0.2, beta: float = 0.9, weight: float = 1.5, quantiles: str = "batch", lr_q: float = 0.1, credit: str = "std", normalize: bool = True, eps: float = 1e-6):
        if not 0 < alpha < beta < 1:
            raise ValueError(f"RiskPO needs 0 < alpha < beta < 1, got alpha={alpha}, beta={beta}.")
        if quantiles not in ("batch", "tracked"):
            raise ValueError(f"riskpo quantiles must be batch or tracked, got '{quantiles}'.")
        if credit not in ("std", "uniform"):
            raise ValueError(f"riskpo credit must be std or uniform, got '{credit}'.")
        self.bundle_size, self.alpha, self.beta, self.weight = int(bundle_size), float(alpha), float(beta), float(weight)
        self.quantiles, self.lr_q, self.credit, self.normalize, self.eps = quantiles, float(lr_q), credit, bool(normalize), float(eps)
        self.tracked: Tensor | None = None  # [2]: q_α, q_β

    def __call__(self, inputs: AdvantageInputs) -> Tensor:
        rewards = inputs.rewards.float().cpu()
        group_ids = inputs.group_ids.cpu()
        bundle, paper = riskpo_papers(group_ids, self.bundle_size)
        adv = torch.zeros_like(rewards)
        all_scores = []
        for b in torch.unique(bundle).tolist():
            rows = (bundle == b) & (paper >= 0)
            ids = paper[rows]
            n = int(ids.max()) + 1
            scores = torch.zeros(n).index_add_(0, ids, rewards[rows])  # paper scores
            all_scores.append(scores)
            if n == 1:
                q_lo = q_hi = scores[0]
                std = torch.tensor(1.0)
            else:
                q_lo, q_hi = torch.quantile(scores, torch.tensor([self.alpha, self.beta]))
                std = scores.std()
            if self.quantiles == "tracked" and self.tracked is not None:
                q_lo, q_hi = self.tracked[0], self.tracked[1]
            a = mixed_var_advantage(scores, q_lo, q_hi, alpha=self.alpha, beta=self.beta, weight=self.weight, eps=self.eps)
            if self.normalize:
                a = a / (std + self.eps)
            adv[rows] = a[ids]
        if self.credit == "std":
            for g in torch.unique(group_ids):
                idx = group_ids == g
                s = rewards[idx].std() if int(idx.sum()) > 1 else torch.tensor(0.0)
                adv[idx] = adv[idx] / ((s if s > 1e-3 else torch.tensor(1.0)) + self.eps)
        if self.quantiles == "tracked":
            self._track(torch.cat(all_scores))
        return adv.to(inputs.rewards.device)

    def _track(self, scores: Tensor) -> None:
        levels = torch.tensor([self.alpha, self.beta])
        if self.tracked is None:
            self.tracked = torch.quantile(scores, levels)
        else:
            below = (scores[None, :] < self.tracked[:, None]).float().mean(1)
            self.tracked = self.tracked + self.lr_q * (levels - below)

    def state_dict(self) -> dict[str, Any]:
        return {"tracked": None if self.tracked is None else self.tracked.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracked = None if state.get("tracked") is None else state["tracked"].clone()


# ===================================================================================== GRPO-CARE
def care_bonus(accuracy: Tensor, confidence: Tensor, group_ids: Tensor, *, bonus: float = 0.5, margin: float = 0.01, min_accuracy: float = 0.1) -> Tensor:
    """GRPO-CARE consistency bonus (Chen et al. 2025, "GRPO-CARE: Consistency-Aware Reinforcement
    Learning for Multimodal Reasoning"; the released trainer), ``[B] → [B]``. Inside each group:

    - accurate = accuracy > ``min_accuracy`` and accuracy ≥ the group's mean accuracy;
    - confident = confidence ≥ (mean confidence of the group's accurate members) − ``margin``;
    - bonus = ``bonus``·accuracy for members both accurate and confident, else 0.

    ``confidence`` is the slowly moving (EMA) reference model's likelihood of the answer given the
    member's own reasoning (see ``flowrl.care``); a group without accurate members gets no bonus."""
    acc, conf = accuracy.float(), confidence.float()
    out = torch.zeros_like(acc)
    for g in torch.unique(group_ids):
        idx = (group_ids == g).nonzero(as_tuple=True)[0]
        a, c = acc[idx], conf[idx]
        accurate = (a > min_accuracy) & (a >= a.mean())
        if not bool(accurate.any()):
            continue
        confident = c >= c[accurate].mean() - margin
        out[idx] = torch.where(accurate & confident, bonus * a, torch.zeros_like(a))
    return out


@register_advantage("grpo_care")
@reads_rows(meta=("care_confidence",))
def grpo_care_estimator(inputs: AdvantageInputs, *, bonus: float = 0.5, margin: float = 0.01, accuracy: str | int = 0, min_accuracy: float = 0.1, std: str = "group", std_estimator: str = "unbiased", eps: float = 1e-4, clip: float | None = None) -> Tensor:
    """GRPO-CARE: r = (combined reward) + :func:`care_bonus` (accuracy = reward column ``accuracy``,
    confidence = ``meta["care_confidence"]``, written by the ``grpo_care`` objective before the
    advantages), then the group z-score. Needs the ``grpo_care`` objective (preset ``grpo_care``)."""
    conf = inputs.meta.get("care_confidence")
    if conf is None:
        raise ValueError("the 'grpo_care' estimator needs meta['care_confidence'] (the EMA reference's answer likelihoods): use the preset grpo_care, whose objective computes them.")
    if len(conf) != len(inputs.rewards):
        raise ValueError(f"'grpo_care': {len(conf)} confidences for {len(inputs.rewards)} rewards.")
    b = care_bonus(_column(inputs, accuracy, "grpo_care"), conf.to(inputs.rewards.device), inputs.group_ids, bonus=bonus, margin=margin, min_accuracy=min_accuracy)
    inputs.meta["care_bonus"] = b
    return group_advantages(inputs.rewards.float() + b, inputs.group_ids, std=std, std_estimator=std_estimator, eps=eps, clip=clip)


# ===================================================================================== issue 27
def focal_weights(rewards: Tensor, group_ids: Tensor, *, gamma: float = 1.0, threshold: float = 0.5) -> Tensor:
    """F-GRPO's difficulty-aware scale g = (1 − μ̂_pos)^γ per sample ``[B]``, μ̂_pos the share of the
    sample's group with reward > ``threshold`` (the empirical success rate of its prompt).
    Plyusov et al. 2026, "F-GRPO: Don't Let Your Policy Learn the Obvious and Forget the Rare", §4."""
    if gamma < 0:
        raise ValueError(f"F-GRPO's gamma must be ≥ 0, got {gamma}.")
    success, _, _ = group_stats((rewards.float() > threshold).float(), group_ids)
    return (1.0 - success).clamp(min=0.0) ** gamma


@register_advantage("fgrpo")
def fgrpo_estimator(inputs: AdvantageInputs, *, gamma: float = 1.0, threshold: float = 0.5, std: str = "group", eps: float = 1e-4,
                    clip: float | None = None, std_estimator: str = "unbiased") -> Tensor:
    """F-GRPO: the group advantage (:func:`group_advantages`) × (1 − μ̂_pos)^γ (:func:`focal_weights`):
    prompts the policy already solves often get smaller updates, so rare correct solutions are not
    crowded out. γ = 1 is *inferred* (the paper sweeps it). The paper's rewards are binary; here a
    sample counts as correct when its reward exceeds ``threshold`` 0.5 (*inferred*: the same split
    for 0/1 and ±1 rewards, and a verifier's 1 + a small shaping bonus still counts as correct where
    a threshold of 0 would call every sample correct and zero every advantage)."""
    adv = group_advantages(inputs.rewards, inputs.group_ids, std=std, std_estimator=std_estimator, eps=eps, clip=clip)
    return adv * focal_weights(inputs.rewards, inputs.group_ids, gamma=gamma, threshold=threshold).to(adv.device)


def lagrangian_reward(helpful: Tensor, cost: Tensor, lam: float) -> Tensor:
    """Safe RLHF's combined reward (Dai et al. 2024, "Safe RLHF", eq. 11 normalised): (R − λ·C)/(1 + λ),
    R the helpfulness reward, C the cost (> 0 unsafe), λ ≥ 0 the Lagrange multiplier."""
    return (helpful.float() - lam * cost.float()) / (1.0 + lam)


def lagrange_update(lam: float, mean_cost: float, *, limit: float, lr: float) -> float:
    """Dual ascent on λ: λ ← max(0, λ + η·(E[C] − d)) — λ grows while the constraint E[C] ≤ d is
    violated and decays to 0 once it holds (Safe RLHF §3.3; the log-λ form of the paper is an
    implementation detail we do not follow)."""
    return max(0.0, lam + lr * (mean_cost - limit))


@register_advantage("lagrangian")
class LagrangianAdvantage:
    """Multi-objective safety: a helpfulness reward against a safety constraint, combined by a
    Lagrange multiplier that is learnt alongside the policy.

    The cost of a sample is C = −(safety column) (``cost_sign`` −1: a safety *score*, higher =
    safer) or the column itself (``cost_sign`` +1). The advantage is the group z-score of
    (R − λ·C)/(1 + λ) with the λ of this iteration; then λ ← max(0, λ + η·(mean C − d)) over the
    batch. Options: ``helpful``/``safety`` (reward column names; default the first two columns),
    ``limit`` d (0), ``lambda_init`` (1), ``lambda_lr`` η (0.1; *inferred*), ``std``/``std_estimator``.
    Stateful: λ is checkpointed."""

    def __init__(self, *, helpful: str | None = None, safety: str | None = None, cost_sign: float = -1.0, limit: float = 0.0,
                 lambda_init: float = 1.0, lambda_lr: float = 0.1, std: str = "group", eps: float = 1e-4, clip: float | None = None,
                 std_estimator: str = "unbiased"):
        if lambda_init < 0 or lambda_lr < 0:
            raise ValueError(f"lambda_init and lambda_lr must be ≥ 0, got {lambda_init}, {lambda_lr}.")
        self.helpful, self.safety, self.cost_sign = helpful, safety, float(cost_sign)
        self.limit, self.lam, self.lr = float(limit), float(lambda_init), float(lambda_lr)
        self.group_kw = {"std": std, "eps": eps, "clip": clip, "std_estimator": std_estimator}

    def _column(self, inputs: AdvantageInputs, name: str | None, default: int, option: str) -> Tensor:
        names = list(inputs.reward_names)
        if inputs.reward_table is None or len(names) < 2:
            raise ValueError("the 'lagrangian' estimator needs two reward columns (helpfulness and safety) in reward.rewards.")
        if name is None:
            return inputs.reward_table[:, default]
        if name not in names:
            raise ValueError(f"loss.options.{option} '{name}' is not a reward column; columns: {', '.join(names)}.")
        return inputs.reward_table[:, names.index(name)]

    def __call__(self, inputs: AdvantageInputs) -> Tensor:
        helpful = self._column(inputs, self.helpful, 0, "helpful").float()
        cost = self.cost_sign * self._column(inputs, self.safety, 1, "safety").float()
        combined = lagrangian_reward(helpful, cost, self.lam)
        adv = group_advantages(combined, inputs.group_ids, **self.group_kw)
        self.lam = lagrange_update(self.lam, float(cost.mean()), limit=self.limit, lr=self.lr)
        return adv

    def state_dict(self) -> dict[str, Any]:
        return {"lambda": self.lam}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam = float(state["lambda"])
