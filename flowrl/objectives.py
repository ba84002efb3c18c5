"""What the update step optimises: the objective registry's built-in ``policy_gradient`` (every
GRPO-type preset), its batched multi-chunk form, how processes normalise chunk losses, which
stored steps are trained, the learning-rate schedule, and the non-finite diagnostics.

Methods and the loop both import this module (it imports no loop code)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from flowrl.errors import ConfigError
from flowrl.advantages import estimator_reads
from flowrl.losses import LossInputs, policy_loss
from flowrl.plugins import OBJECTIVES
from flowrl.policy import Trajectories, slice_eval
from flowrl.sharding import is_sharded

if TYPE_CHECKING:
    from flowrl.algorithms import ResolvedConfig


@dataclass
class UpdateContext:
    """What an objective may read besides the batch (add fields with defaults only)."""

    resolved: "ResolvedConfig"
    iteration: int
    autocast: Callable[[], Any]
    extras: dict[str, Any] = field(default_factory=dict)


@OBJECTIVES.register("policy_gradient")
def policy_gradient_objective(policy: Any, batch: Trajectories, steps: Tensor, ctx: UpdateContext) -> tuple[Tensor, dict[str, float]]:
    """Ratio-based objective of every GRPO-type preset: evaluate the current policy on the stored
    steps, evaluate the reference if a KL term is on, and assemble ``preset.loss``."""
    return policy_gradient_chunks(policy, batch, [steps], ctx)[0]


def policy_gradient_chunks(policy: Any, batch: Trajectories, chunks: list[Tensor], ctx: UpdateContext) -> list[tuple[Tensor, dict[str, float]]]:
    """:func:`policy_gradient_objective` of several step chunks with one evaluation of their steps
    (one transformer call for all of them, and one for the reference): each chunk's loss is the
    one the per-chunk call would give; only the cost changes."""
    spec = ctx.resolved.preset.loss
    union = torch.cat(list(chunks))
    with ctx.autocast():
        current_all = policy.evaluate(batch, union)
    # one update per batch (the trainer marked it): the old log-probs are the current ones detached, as TRL
    on_policy = batch.meta.get("old_log_probs") == "current"
    reference_all = None
    if spec.kl and spec.beta > 0:
        with torch.no_grad(), policy.reference(), ctx.autocast():
            reference_all = policy.evaluate(batch, union)
    out, start = [], 0
    for steps in chunks:
        cols = slice(start, start + len(steps))
        start += len(steps)
        current = slice_eval(current_all, cols)
        adv = batch.advantages
        adv = adv[:, steps] if adv.dim() == 2 else adv[:, None].expand(-1, len(steps))
        inputs = LossInputs(
            log_prob=current.log_prob.float(),
            old_log_prob=current.log_prob.detach().float() if on_policy else batch.log_probs[:, steps].to(current.log_prob.device).float(),
            advantages=adv.to(current.log_prob.device).float(),
            mask=batch.mask[:, steps].to(current.log_prob.device).float(),
            current=current,
            reference=slice_eval(reference_all, cols),
            traj=batch,
            steps=steps,
            extras=ctx.extras,
            rewards=batch.meta["reward"].to(current.log_prob.device).float() if isinstance(batch.meta.get("reward"), Tensor) else None,
        )
        out.append(policy_loss(inputs, spec))
    return out


policy_gradient_objective.evaluate_chunks = policy_gradient_chunks  # type: ignore[attr-defined]
policy_gradient_objective.old_log_probs_from_current = True  # type: ignore[attr-defined]


def old_log_probs_reason(train: Any, batch_rows: int, estimator: Any, objective: Any) -> str | None:
    """Why an iteration needs the rollout's log-probs recomputed by a full forward pass, or None when
    they are exactly the current ones detached: one pass (``inner_epochs`` 1) and one optimizer step
    over the batch (``batch_rows`` ≤ ``train_batch_size``), an objective that takes the old log-probs
    from its own evaluation (``old_log_probs_from_current``), and an estimator that reads neither the
    stored log-probs nor the policy's drift. (TRL skips the pass under the same condition.)"""
    if train.inner_epochs > 1:
        return f"train.inner_epochs={train.inner_epochs}: the later passes are off-policy"
    if batch_rows > train.train_batch_size:
        return f"{batch_rows} samples over train.train_batch_size={train.train_batch_size}: the later optimizer steps are off-policy"
    inner = getattr(objective, "func", objective)
    if not getattr(inner, "old_log_probs_from_current", False):
        return "the objective reads the stored log-probs"
    if "log_probs" in estimator_reads(estimator)[0] or hasattr(estimator, "observe_shift"):
        return "the advantage estimator reads the stored log-probs"
    return None


def settle_old_log_probs(trainer: Any, traj: Trajectories, batch_rows: int) -> None:
    """A token policy samples without recomputing its log-probs (``meta["old_log_probs"] ==
    "sampling"``): mark the batch ``"current"`` when that is exact (:func:`old_log_probs_reason`;
    the policy-gradient loss then takes the current log-probs detached), else recompute them once
    (one forward pass, before the advantages). Every process decides alike (``batch_rows`` is global)."""
    if traj.meta.get("old_log_probs") != "sampling":
        return
    if old_log_probs_reason(trainer.config.train, batch_rows, trainer.estimator, trainer.objective) is None:
        traj.meta["old_log_probs"] = "current"
        return
    with trainer.gathered_weights(), torch.no_grad(), trainer.autocast():
        if len(traj):
            traj.log_probs = trainer.policy.old_log_probs(traj)


def objective_chunk_losses(objective: Any, policy: Any, batch: Trajectories, chunks: list[Tensor], ctx: UpdateContext) -> list[tuple[Tensor, dict[str, float]]]:
    """``(loss, metrics)`` of each step chunk: in one evaluation when the objective has an
    ``evaluate_chunks`` form (:func:`policy_gradient_chunks`), else one call per chunk."""
    batched = batched_form(objective)
    if batched is not None and len(chunks) > 1:
        fn, kwargs = batched
        return fn(policy, batch, chunks, ctx, **kwargs)
    return [objective(policy, batch, steps, ctx) for steps in chunks]


def loss_normaliser(objective: Any, aggregation: str | None) -> str:
    """How a process scales its chunk losses so that several processes sum to the one-process loss:
    ``token`` when the objective's chunk loss is a mean over all masked (sample, step) entries of
    its rows (``token-mean``: the policy-gradient objectives with that aggregation, and objectives
    that declare ``loss_aggregation = "token-mean"``, e.g. DiffusionNFT), so each process weighs
    its chunk by its share of the masked entries; ``sample`` (a mean over samples) otherwise. The
    two agree when every sample has the same masked steps; they differ with per-sample random step
    subsets (DanceGRPO, DiffusionNFT's 9 of 10)."""
    declared = getattr(objective, "loss_aggregation", None) or getattr(getattr(objective, "func", None), "loss_aggregation", None)
    return "token" if (declared or aggregation or "token-mean") == "token-mean" else "sample"


def sample_chunk_share(step_counts: Tensor, steps: Tensor, own_steps: int, samples: float, global_samples: float) -> float:
    """A process's weight of a chunk's loss under a per-sample (``seq-mean-*``) aggregation:
    (share of the stored steps in the chunk) × (its samples / all samples).

    The step share is Σ_{t∈chunk} n_t / Σ_{t<own_steps} n_t, with ``n_t`` the global masked
    entries at step t and ``own_steps`` this process's stored steps: a chunk loss is a mean over
    the process's samples of a per-sample quantity over the chunk's steps, so a process whose one
    chunk covers all its steps weighs it by its share of the samples alone. Token policies store
    as many steps as their widest completion, which differs between processes; normalising by the
    steps of every process instead would scale a process with shorter completions by (tokens
    before its width)/(all tokens) < 1, training a different loss than one process."""
    if own_steps == 0 or global_samples == 0:
        return 0.0
    total = float(step_counts[:own_steps].sum())
    if total == 0:
        return 0.0
    return float(step_counts[steps].sum()) / total * (samples / global_samples)


def batched_form(objective: Any) -> tuple[Callable[..., Any], dict[str, Any]] | None:
    """The objective's multi-chunk form and the keywords it is bound with, or None."""
    fn = getattr(objective, "evaluate_chunks", None)
    if fn is not None:
        return fn, {}
    inner = getattr(objective, "func", None)  # functools.partial from make_objective
    if inner is not None and getattr(inner, "evaluate_chunks", None) is not None:
        return inner.evaluate_chunks, dict(objective.keywords)
    return None


def select_train_steps(mask: Tensor, fraction: float, selection: str, generator: torch.Generator, *, rows: Tensor | None = None, total_rows: int | None = None) -> Tensor:
    """Trainable-step mask ``[B, T]``: the first ⌊T·fraction⌋ stored steps (Flow-GRPO, 0.99 drops
    the last), or a random ⌊T·fraction⌋ subset per sample (DanceGRPO). At least one step.

    ``rows``/``total_rows``: these ``B`` samples are rows ``rows`` of a ``total_rows`` batch spread
    over processes; the random subsets are drawn for the whole batch, so a sample's steps do not
    depend on the process count."""
    b, t = mask.shape
    k = max(1, int(math.floor(t * fraction))) if fraction < 1.0 else t
    out = torch.zeros_like(mask)
    if selection == "first":
        out[:, :k] = True
    elif selection == "random":
        scores = torch.rand(total_rows if rows is not None else b, t, generator=generator)
        scores = scores[rows] if rows is not None else scores
        idx = scores.argsort(dim=1)[:, :k]
        out.scatter_(1, idx, True)
    else:
        raise ConfigError(f"loss.timestep_selection must be first or random, got '{selection}'.")
    return out & mask.bool()


def learning_rate_at(iteration: int, num_iterations: int, base: float, schedule: str, min_ratio: float) -> float:
    """The learning rate of an iteration (1-based): ``constant``, or ``cosine``
    lr = base·(m + (1 − m)·½(1 + cos(π·(it − 1)/(N − 1)))) from base at the first iteration to
    m·base at the last. A pure function of the iteration, so a resumed run needs no scheduler state."""
    if schedule == "constant" or num_iterations <= 1:
        return base
    if schedule == "cosine":
        frac = (iteration - 1) / (num_iterations - 1)
        return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
    raise ConfigError(f"train.lr_schedule must be constant or cosine, got '{schedule}'.")


def grad_norm(params: list[Tensor]) -> Tensor:
    """Total 2-norm of the gradients (NaN/inf if any gradient is); 0 when there are none."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if any(is_sharded(g) for g in grads):  # FSDP: a norm over every process's shards
        return torch.nn.utils.get_total_norm(grads)
    norms = [torch.linalg.vector_norm(g.float()) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def nonfinite_where(loss: Tensor, batch: Trajectories, steps: Tensor, metrics: dict[str, float]) -> str:
    """Where a non-finite loss comes from: the rollout's log-probs, the recomputed ones, or the loss."""
    rows = ", ".join(repr(p) for p in list(dict.fromkeys(batch.prompts))[:3])
    parts = [f"loss {float(loss.detach())} on prompts {rows}, steps {steps.tolist() if isinstance(steps, Tensor) else steps}"]
    old = batch.log_probs[:, steps]
    if not torch.isfinite(old).all():
        parts.append(f"rollout log-probs non-finite in {int((~torch.isfinite(old)).any(1).sum())} samples")
    bad_metrics = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad_metrics:
        parts.append("non-finite " + ", ".join(bad_metrics))
    return "; ".join(parts)


def zero_weight_batch(batch: Trajectories | None, filler: Trajectories) -> Trajectories:
    """One real row (finite loss) with zero advantage, for a zero-weight backward pass."""
    data = batch.select([0]) if batch is not None else filler.select([0])
    data.mask = torch.ones_like(data.mask)
    shape = data.advantages.shape if isinstance(data.advantages, Tensor) else (1,)
    data.advantages = torch.zeros(shape)
    if not isinstance(data.meta.get("reward"), Tensor):
        data.meta["reward"] = torch.zeros(1)
    return data
