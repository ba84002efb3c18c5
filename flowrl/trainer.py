"""The single training loop, for every algorithm and every policy (diffusion or language model).

Each iteration reads top to bottom::

    # 1. rollout      policy.rollout(prompts, group_size=G)         -> Trajectories
    # 2. rewards      reward_set.score + combine (+ preset transform) -> [B]
    # 3. advantages   estimator(AdvantageInputs)                    -> [B] or [B, T]
    # 4. update       OBJECTIVES[preset.objective] per step chunk, AdamW, grad clip, EMA

Nothing here branches on the algorithm's name: the preset's registered components decide.
Everything random derives from ``(seed, iteration)``, so the same config gives the same numbers
on CPU and a resumed run continues exactly (checkpoints hold weights, optimizer, EMA and
estimator state; they are written to a temporary folder and renamed, never half-written).

Several processes (``torchrun`` / ``accelerate launch``) train one model and get a one-process
run's result: prompts are drawn identically everywhere and split; each prompt's noise is keyed by
its global position (:class:`~flowrl.seeding.PromptGenerators`); rewards are gathered before
advantages; minibatches, trained-step subsets and loss normalisers are computed on the global
batch; the accelerate-prepared (DDP) module all-reduces gradients during the update, and every
process takes the same number of optimizer steps (zero-weight passes where it has no rows). Under
FSDP (accelerate's plugin, ``fsdp_version: 2``) the module is sharded in place: rollouts and
evaluation run inside one gather of its whole weights (:meth:`Trainer.gathered_weights`), and the
update runs the same number of step chunks on every process.

Metrics (``metrics.jsonl`` and TensorBoard, one record per iteration):
``reward/mean`` (combined reward, mean over samples whose reward did not fail), ``reward/std``,
``reward/<column>`` (each component, NaN-safe mean), ``reward/failures/<name>`` (failed samples so
far), ``adv/abs_mean`` (mean |A|), ``samples/generated`` (output rows this iteration),
``samples/trained`` (rows with non-zero advantage), ``loss/policy`` (aggregated surrogate),
``loss/kl`` (β·KL), ``kl/ref`` (masked mean per-step KL to the reference), ``ratio/mean``
(masked mean of π_θ/π_old), ``ratio/clipfrac`` (fraction of steps on the clipped branch),
``grad_norm`` (before clipping), ``update/steps`` (optimizer steps), ``update/skipped_nonfinite``
(optimizer steps skipped because a log-prob, the loss or a gradient was NaN/inf; past
``train.max_nonfinite_updates`` in a run the loop stops with :class:`NonFiniteUpdateError`), ``cost/model_evals_per_sample``
and ``cost/trained_steps_per_sample`` (transformer evaluations and trained steps per output),
``select/*`` (prompt selection rounds, drawn, kept), ``time/rollout``, ``time/rewards``,
``time/update`` (seconds; ``time/rewards`` is what the loop waited for rewards beyond the
rollout, so it shrinks when scoring overlaps later rollout calls: ``train.rollout_batch_size``), ``eval/<column>`` (held-out means, deterministic samples).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from flowrl.advantages import AdvantageInputs, estimator_reads, make_estimator
from flowrl.config import ConfigError, ResolvedConfig, TrainConfig
from flowrl.losses import LossInputs, policy_loss
from flowrl.policy import Trajectories, _index, group_step_chunks, slice_eval
from flowrl import checkpointing, tracking
from flowrl.builders import (  # noqa: F401  (re-exported: the loop's public helpers lived here)
    _build_reward_set, _device, _load_prompt_set, _load_prompts, add_lora, build_flow_policy, build_policy, load_pipeline,
)
from flowrl.checkpointing import atomic_write as _atomic_write, jsonable as _jsonable  # noqa: F401
from flowrl.ema import EMA
from flowrl.plugins import (  # noqa: F401  (re-exported for code written against flowrl.trainer)
    OBJECTIVES, PIPELINE_SOURCES, POLICY_BUILDERS, REWARD_TRANSFORMS, import_builtin_components, make_objective,
)
from flowrl.overlap import rollout_in_calls
from flowrl.prompt_selection import fill_batch, shard_bounds
from flowrl.prompts import category_column, category_means, reward_meta
from flowrl.track import after_evaluation, build_tracker
from flowrl.seeding import PromptGenerators, derive_seed, generator_for
from flowrl.sharding import fsdp_modules, full_state, full_tensor, gathered_parameters, is_sharded


# ----------------------------------------------------------------------------------- objectives
@dataclass
class UpdateContext:
    """What an objective may read besides the batch (add fields with defaults only)."""

    resolved: ResolvedConfig
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
            old_log_prob=batch.log_probs[:, steps].to(current.log_prob.device).float(),
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


def batched_form(objective: Any) -> tuple[Callable[..., Any], dict[str, Any]] | None:
    """The objective's multi-chunk form and the keywords it is bound with, or None."""
    fn = getattr(objective, "evaluate_chunks", None)
    if fn is not None:
        return fn, {}
    inner = getattr(objective, "func", None)  # functools.partial from make_objective
    if inner is not None and getattr(inner, "evaluate_chunks", None) is not None:
        return inner.evaluate_chunks, dict(objective.keywords)
    return None



# ------------------------------------------------------------------------------------ helpers
@torch.no_grad()
def eval_samples(policy: Any, prompts: list[str], config: TrainConfig, *, autocast: Callable[[], Any] = contextlib.nullcontext,
                 rows: tuple[int, int] | None = None) -> tuple[Any, list[str]]:
    """The deterministic evaluation samples of a run: ``train.eval_samples_per_prompt`` samples of
    each prompt (consecutive), ODE with ``sampler.eval_num_steps`` steps, sample ``i`` drawing its
    noise from its own stream ``(train.seed, "eval", i)`` (so samples depend neither on chunking nor
    on the number of processes). The same prompts and config give the same samples in every
    evaluation of a run (base, intermediate, tuned), in ``flowrl eval`` and in the gallery.
    ``rows``: only samples ``[lo, hi)`` (one process's share). Returns ``(outputs of those rows,
    every prompt repeated per sample)``."""
    t = config.train
    expanded = [p for p in prompts for _ in range(t.eval_samples_per_prompt)]
    lo, hi = rows if rows is not None else (0, len(expanded))
    noise = PromptGenerators(t.seed, "eval", keys=range(len(expanded)))
    steps = {"num_steps": config.sampler.eval_num_steps} if config.model.kind == "flow" else {}
    outputs = []
    for start in range(lo, hi, 64):
        stop = min(start + 64, hi)
        with autocast():
            outputs.append(policy.generate(expanded[start:stop], generator=noise.narrow(start, stop), **steps))
    outputs = torch.cat(outputs) if isinstance(outputs[0], Tensor) else [o for chunk in outputs for o in chunk]
    return outputs, expanded


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


@dataclass
class GlobalRows:
    """This process's rows ``[lo, hi)`` of the gathered batch (``total`` rows); ``canonical[i]`` is
    gathered row ``i``'s index in a one-process run's batch."""

    lo: int
    hi: int
    total: int
    canonical: Tensor


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict[str, float]]
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    policy: Any
    summary: str = ""
    #: the reported column per evaluation category (base → tuned, prompts, samples), or ""
    breakdown: str = ""


# ------------------------------------------------------------------------------------- Trainer
class Trainer:
    """Runs a :class:`TrainConfig`. ``policy`` / ``reward_set`` may be given to skip building them
    (tests, notebooks); otherwise they come from the config."""

    def __init__(self, config: TrainConfig, *, policy: Any = None, reward_set: Any = None, accelerator: Any = None):
        from accelerate import Accelerator

        self.config = config
        self.resolved = config.resolved()
        t = config.train
        if t.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        cpu = config.model.device == "cpu" or (config.model.device == "auto" and not torch.cuda.is_available())
        self.accelerator = accelerator or _make_accelerator(cpu=cpu, mixed_precision=t.mixed_precision)
        nproc = self.accelerator.num_processes
        if t.prompts_per_iteration % nproc:
            raise ConfigError(
                f"train.prompts_per_iteration={t.prompts_per_iteration} is not divisible by the {nproc} processes; "
                f"set it to a multiple of {nproc}."
            )
        self.run_dir = Path(t.output_dir)
        tracking.tracker_names(t.report_to)  # unknown or missing trackers fail before any work
        self.train_set = _load_prompt_set(t.prompts, "train.prompts", t.prompt_column)
        self.eval_set = _load_prompt_set(t.eval_prompts, "train.eval_prompts", t.prompt_column)
        self.train_prompts, self.eval_prompts = self.train_set.prompts, self.eval_set.prompts
        import_builtin_components()
        show = t.progress and self.accelerator.is_main_process
        with _phase(f"loading rewards ({', '.join(map(str, config.reward.rewards))})", enabled=show and reward_set is None):
            self.reward_set = reward_set if reward_set is not None else _build_reward_set(config, process_device=self.accelerator.device)  # first: fails fast on a bad reward
            self.track = build_tracker(config)  # reward.track: scored at evaluations, never trained on
        with _phase(f"loading model {config.model.pipeline}", enabled=show and policy is None):
            if policy is None:  # the main process first: built-in tiny sources write <run>/base_model for the others to read
                with self.accelerator.main_process_first():
                    self.policy = build_policy(self.resolved, self.run_dir)
            else:
                self.policy = policy
        if policy is not None and hasattr(policy, "check_config"):  # a given policy must agree with the config
            policy.check_config(self.resolved)
        self.estimator = make_estimator(self.resolved.preset.advantage, **self.resolved.preset.advantage_params)
        self.objective = make_objective(self.resolved.preset.objective, **self.resolved.preset.objective_params)
        self.selector = self._make_selector()
        self._setup_training()
        self.history: list[dict[str, float]] = []
        self.start_iteration = 0

    # -------------------------------------------------------------------------------- setup
    def _setup_training(self) -> None:
        t = self.config.train
        model = self.policy.model
        if t.lora_rank > 0:
            targets = t.lora_targets or list(getattr(self.policy, "default_lora_targets", ("q_proj", "k_proj", "v_proj", "o_proj")))
            if not getattr(model, "peft_config", None):
                add_lora(model, rank=t.lora_rank, alpha=t.lora_alpha, targets=targets, seed=derive_seed(t.seed, "lora"))
        else:
            model.requires_grad_(True)
            if self.resolved.preset.loss.beta > 0 and self.resolved.preset.loss.kl:
                self.policy.set_reference_model(copy.deepcopy(model))
        for p in getattr(self.policy, "always_trainable_parameters", lambda: [])():
            p.requires_grad_(True)  # trained in full even when the rest of the model gets LoRA
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("the model has no trainable parameters; check train.lora_rank / train.lora_targets.")
        optimizer = make_optimizer(t.optimizer, self.params, lr=self.resolved.learning_rate, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        self._bare_model = model
        self.prepared_model, self.optimizer = _prepare(self.accelerator, model, optimizer, wrap=getattr(self.policy, "forward_calls_model", True))
        self.sharded = bool(fsdp_modules(model))
        if self.sharded:  # fully_shard replaced the parameters by sharded ones (DTensor), in place
            self.params = [p for p in model.parameters() if p.requires_grad]
        self.ema = EMA(self.params, t.ema_decay, ramp=t.ema_ramp, update_every=t.ema_update_every) if t.ema_decay > 0 else None

    def autocast(self):
        return self.accelerator.autocast()

    def gathered_weights(self):
        """Inside: the trained module holds its whole weights (FSDP: all-gathered once, then no
        collective per call, so rollouts and evaluation may differ in call counts between processes);
        a no-op without FSDP. Every process must enter it."""
        return gathered_parameters(self._bare_model) if self.sharded else contextlib.nullcontext()

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trainable weights by name, whole and on the CPU (gathered under FSDP: every process
        must call it)."""
        with self.gathered_weights():
            return {n: p.detach().cpu().clone().contiguous() for n, p in self._bare_model.named_parameters() if p.requires_grad}

    # ---------------------------------------------------------------------------- the loop
    def train(self) -> TrainResult:
        cfg, t = self.config, self.config.train
        self._prepare_run_dir()
        if t.resume_from:
            self.load_checkpoint(self._resolve_checkpoint(t.resume_from))
        writer = self._start_trackers()
        eval_before = self.evaluate(tag="base") if self.eval_prompts and self.start_iteration == 0 else {}
        if eval_before:
            after_evaluation(self, 0, eval_before, "base")
            self._log({"iteration": 0, **{f"eval/{k}": v for k, v in eval_before.items()}}, writer)
        bar = _progress(range(self.start_iteration + 1, t.iterations + 1), enabled=t.progress and self.accelerator.is_main_process, total=t.iterations, initial=self.start_iteration)
        last, stop = t.iterations, False
        for it in bar:
            record = self.iteration(it)
            if self.eval_prompts and t.eval_every and it % t.eval_every == 0 and it != t.iterations:
                result = self.evaluate(tag=f"iter{it}")
                stop = after_evaluation(self, it, result, f"iter{it}")  # reward.track's alarm
                record.update({f"eval/{k}": v for k, v in result.items()})
            self._log(record, writer)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(progress_postfix(record))
            if t.save_every and it % t.save_every == 0:
                self.save_checkpoint(it)
            if stop:
                last = it
                break
        if last > self.start_iteration and not (t.save_every and last % t.save_every == 0):
            self.save_checkpoint(last)
        eval_after = {}
        if self.eval_prompts:
            eval_after = self.evaluate(tag="tuned")
            after_evaluation(self, last, eval_after, "tuned")
            self._log({"iteration": last, **{f"eval/{k}": v for k, v in eval_after.items()}}, writer)
        self.export_lora()
        tracking.finish(writer)
        summary = self._summary(eval_before, eval_after)
        self._write_artifacts()
        return TrainResult(self.run_dir, self.history, eval_before, eval_after, self.policy, summary, self._breakdown(eval_before, eval_after))

    def iteration(self, it: int) -> dict[str, float]:
        """One rollout → reward → advantage → update iteration; returns its metrics (over all
        processes: every process returns the same record)."""
        cfg, t, preset = self.config, self.config.train, self.resolved.preset
        acc = self.accelerator
        self.policy.iteration = it
        lr = learning_rate_at(it, t.iterations, self.resolved.learning_rate, t.lr_schedule, t.lr_min_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # 1. rollout + 2. rewards (the prompt selector may filter groups and refill: DAPO) ------
        # Every process draws the same prompt indices and rolls out its contiguous share; each
        # prompt's noise comes from its own stream keyed by its position in the global batch, so
        # the samples do not depend on the number of processes.
        t0 = time.perf_counter()
        self.policy.model.eval()
        timing = {"rollout": 0.0}

        sampling_weights = getattr(self.objective, "sampling_weights", None)  # DiffusionNFT samples with θ_old

        def rollout_call(pairs: list[tuple[int, Any]]):
            indices, keys = [i for i, _ in pairs], [k for _, k in pairs]
            start = time.perf_counter()
            noise = PromptGenerators(t.seed, it, "rollout", keys=keys)
            with self.autocast():  # the same precision as recomputation, so the on-policy ratio is 1
                traj = self.policy.rollout([self.train_prompts[i] for i in indices], group_size=t.num_generations, generator=noise)
            timing["rollout"] += time.perf_counter() - start
            # each sample carries its own prompt's metadata (sliced and joined with the batch)
            order = torch.unique_consecutive(traj.group_ids.cpu(), return_inverse=True)[1]
            traj.meta["metadata"] = [self.train_set.metadata[indices[int(g)]] for g in order]
            return traj

        def score(traj, background: bool = False):
            fn = self.reward_set.score_async if background else self.reward_set.score
            meta = {**reward_meta(traj.meta["metadata"]), **traj.meta, "group_ids": traj.group_ids}
            return fn(traj.outputs, traj.prompts, meta)

        def generate(indices: list[int], keys: list[Any]):
            # calls of train.rollout_batch_size prompts; a call's rewards are scored while the next rolls
            # out (per-prompt noise: the numbers do not depend on the split)
            traj, table, names = rollout_in_calls(
                rollout_call, score, list(zip(indices, keys)), prompts_per_call=t.rollout_batch_size,
                concat=getattr(self.policy, "concat_trajectories", None),
                score_async=(lambda tr: score(tr, background=True)) if t.overlap_rewards else None,
            )
            traj.rewards, traj.reward_names = table, list(names)
            if preset.reward_transform:
                table, names = REWARD_TRANSFORMS.get(preset.reward_transform)(table, names, traj.group_ids, traj, **preset.reward_transform_params)
            combined = self.reward_set.combine(table, names, traj.group_ids)
            traj.meta["reward_table"], traj.meta["reward_columns"] = table, list(names)
            if self._filler is None:  # any real row: the input of zero-weight passes (equal step counts)
                self._filler = traj.select([0])
            return traj, combined

        self._filler = None
        # the sampling weights (DiffusionNFT: θ_old) for the whole rollout phase; under FSDP the
        # whole weights are gathered once, so processes may make different numbers of calls
        weights = sampling_weights(self.policy) if sampling_weights is not None else contextlib.nullcontext()
        with weights, self.gathered_weights():
            traj, combined, prompt_index, select_metrics = fill_batch(
                self.selector, generate, t.prompts_per_iteration, generator=generator_for(t.seed, it, "prompts"),
                concat=getattr(self.policy, "concat_trajectories", None),
                rank=acc.process_index, world=acc.num_processes, gather=self._gather_uneven,
            )
        table, names = traj.meta.pop("reward_table", None), traj.meta.pop("reward_columns", None)
        if acc.num_processes > 1 and getattr(self.reward_set, "combine_mode", None) == "gdpo" and table is not None:
            combined = self._combine_globally(table, list(names), traj.group_ids).to(combined.device)
        traj.meta["reward"] = combined  # [B] combined reward, sliced with the batch (LossInputs.rewards)
        t1 = time.perf_counter()
        # groups never span processes; statistics are computed on the gathered rewards
        rows = self._global_rows(traj.group_ids, one_round=select_metrics.get("select/rounds", 1.0) <= 1)
        all_rewards, all_groups = self._gather_uneven(combined.float().cpu()), self._gather_uneven(traj.group_ids.cpu())
        names = list(names or [])
        all_table = self._gather_uneven(table.float().cpu() if table is not None else torch.zeros(0, len(names)))
        # the reward models' own columns (before a preset's reward transform), for the metrics
        raw_names = list(traj.reward_names)
        all_raw = self._gather_uneven(traj.rewards.float().cpu() if traj.rewards is not None else torch.zeros(0, len(raw_names)))
        # 3. advantages ---------------------------------------------------------------------
        prepare = getattr(self.objective, "before_advantages", None)
        if prepare is not None:  # objectives whose estimator reads policy evaluations (GRPO-CARE)
            with self.gathered_weights():
                prepare(self, traj)
        single = acc.num_processes == 1
        if single or not traj.meta.get("rollout_structure"):
            adv_all = self._global_advantages(traj, all_rewards, all_groups, all_table, list(names), rows)
            adv = adv_all[rows.lo : rows.hi]
            if "train_mask" in traj.meta:  # an estimator pruned trained steps (BranchGRPO width pruning)
                traj.mask = traj.mask & traj.meta.pop("train_mask")[rows.lo : rows.hi].to(traj.mask.device)
        else:  # structured rollouts (trees): the estimator needs the trajectory; whole trees are local
            adv = self._advantages(AdvantageInputs(
                rewards=combined.float().cpu(), group_ids=traj.group_ids.cpu(), reward_table=table, reward_names=list(names),
                mask=None, traj=traj, prompts=traj.prompts, meta=traj.meta,
                reward_weights=self._reward_weights(names),
            ))
            if "train_mask" in traj.meta:
                traj.mask = traj.mask & traj.meta.pop("train_mask").to(traj.mask.device)
            adv_all = self._gather_uneven(adv.float())
        traj.advantages = adv
        traj.mask = select_train_steps(
            traj.mask, self.resolved.timestep_fraction, self.resolved.timestep_selection, generator_for(t.seed, it, "steps"),
            rows=rows.canonical[rows.lo : rows.hi], total_rows=rows.total,
        )
        keep = torch.isfinite(combined.cpu())  # samples whose reward failed (tolerated by max_failures) are not trained
        if preset.skip_zero_advantage:  # Flow-GRPO's diffusion presets; not the LLM ones (TRL/verl keep them)
            keep &= adv.abs().flatten(1).amax(1) > 0 if adv.dim() > 1 else adv.abs() > 0
        # 4. update -------------------------------------------------------------------------
        update_metrics = self.update(traj, keep, it, rows=rows)
        if hasattr(self.estimator, "observe_shift"):  # stateful estimators that track policy drift (SPO)
            self._observe_shift(traj, rows)
        t2 = time.perf_counter()
        ok = torch.isfinite(all_rewards)
        record: dict[str, float] = {"iteration": it, "reward/mean": float(all_rewards[ok].mean()), "reward/std": float(all_rewards[ok].std(unbiased=False))}
        for i, n in enumerate(raw_names):
            record[f"reward/{n}"] = float(all_raw[:, i].nanmean())
        record["lr"] = lr
        record["samples/generated"] = float(len(all_rewards))
        record["adv/abs_mean"] = float(adv_all.abs().mean())
        trained_steps = self._sum(torch.tensor([float(keep.sum()), float(traj.mask[keep].sum()) if len(traj) else 0.0]))
        record["samples/trained"] = float(trained_steps[0])
        for k in ("model_evals",):
            if k in traj.meta and isinstance(traj.meta[k], (int, float)):
                record[f"cost/{k}_per_sample"] = float(traj.meta[k])
        if isinstance(traj.meta.get("transformer_calls"), (int, float)):
            record["cost/transformer_calls"] = float(traj.meta["transformer_calls"])
        record["cost/trained_steps_per_sample"] = float(trained_steps[1] / max(float(trained_steps[0]), 1.0))
        record.update(update_metrics)
        hook = getattr(self.objective, "on_iteration_end", None)
        if hook is not None:
            record.update(hook(self, it) or {})
        record.update(self._reward_metrics(all_raw, raw_names))
        record.update(select_metrics)
        record["time/rollout"] = timing["rollout"]
        record["time/rewards"] = (t1 - t0) - timing["rollout"]
        record["time/update"] = t2 - t1
        self._last_traj = traj
        return record

    def _reward_metrics(self, all_table: Tensor, names: list[str]) -> dict[str, float]:
        """The reward set's metrics over all processes: column mean/std of the gathered table,
        failure counts summed, a reward's own metrics averaged."""
        local = {f"reward/{k}" if not k.startswith("reward/") else k: v for k, v in self.reward_set.metrics().items()}
        for n in names:
            local.pop(f"reward/{n}", None), local.pop(f"reward/{n}/std", None)
        world = self.accelerator.num_processes
        summed = self._sum_dicts({k: v for k, v in local.items() if math.isfinite(v)})
        out = {k: (v if k.startswith("reward/failures/") else v / world) for k, v in summed.items()}
        for i, n in enumerate(names):
            v = all_table[:, i]
            v = v[torch.isfinite(v)]
            out[f"reward/{n}"] = float(v.mean()) if v.numel() else math.nan
            out[f"reward/{n}/std"] = float(v.std(unbiased=False)) if v.numel() > 1 else 0.0
        return out

    def _reward_weights(self, names: list[str]) -> Tensor | None:
        """Weight of each reward column in the combined reward (None for a reward set without them)."""
        fn = getattr(self.reward_set, "column_weights", None)
        try:
            return fn(list(names)) if fn is not None else None
        except (KeyError, ValueError):  # columns a reward transform renamed
            return None

    def _global_advantages(self, traj: Trajectories, rewards: Tensor, groups: Tensor, table: Tensor, names: list[str], rows: "GlobalRows") -> Tensor:
        """The estimator on the global batch: gathered rows in, advantages of the gathered rows out.

        One process: the batch itself. Several: the estimator sees the rows in a one-process run's
        order (``rows.canonical``; DAPO refill rounds interleave the processes' groups), with the
        trajectory fields and per-sample meta entries it declares (:func:`~flowrl.advantages.reads_rows`)
        gathered from every process, so estimators whose statistics span rows (batch z-scores,
        RiskPO bundles, unlikeliness ranks) and estimators with state (SPO's tracker, RiskPO's
        tracked quantiles, Trust-GRPO's step) compute exactly what one process computes, and their
        state stays identical on every process. Meta entries the estimator adds come back to
        ``traj.meta`` (``train_mask`` in gathered order)."""
        weights = self._reward_weights(names)
        if self.accelerator.num_processes == 1:
            return self._advantages(AdvantageInputs(
                rewards=rewards, group_ids=groups, reward_table=table, reward_names=names, mask=None, traj=traj,
                prompts=traj.prompts, meta=traj.meta, reward_weights=weights,
            ))
        fields, row_keys = estimator_reads(self.estimator)
        order = torch.argsort(rows.canonical)  # canonical (one-process) row j is gathered row order[j]
        total = len(order)
        prompts = self._gather_list(traj.prompts)
        view = None
        if fields:
            gathered = {f: self._gather_rows(getattr(traj, f, None)) for f in fields}
            view = Trajectories(prompts=prompts, group_ids=groups, log_probs=gathered.pop("log_probs", None), mask=gathered.pop("mask", None), **gathered)
            view = view.select(order)
        meta = dict(traj.meta)
        for k in row_keys:
            if k in meta:
                meta[k] = _index(self._gather_rows(meta[k]), order, total)
        adv = self._advantages(AdvantageInputs(
            rewards=rewards[order], group_ids=groups[order], reward_table=table[order] if len(table) == total else table,
            reward_names=names, mask=None, traj=view, prompts=[prompts[i] for i in order.tolist()], meta=meta, reward_weights=weights,
        ))
        for k in meta.keys() - traj.meta.keys():  # written by the estimator (global, canonical order)
            traj.meta[k] = meta[k][rows.canonical] if k == "train_mask" else meta[k]
        return adv[rows.canonical]

    def _combine_globally(self, table: Tensor, names: list[str], group_ids: Tensor) -> Tensor:
        """This process's rows of ``reward.combine: gdpo`` over the gathered table: its last step
        z-scores the weighted sum over the whole batch, which each process alone would do over its
        share. (After DAPO refill rounds a one-process run combines each round on its own; here
        the kept batch is combined at once.)"""
        all_table = self._gather_uneven(table.float().cpu())
        all_groups = self._gather_uneven(group_ids.cpu().long())
        sizes = self._gather_uneven(torch.tensor([len(group_ids)])).tolist()
        lo = int(sum(sizes[: self.accelerator.process_index]))
        return self.reward_set.combine(all_table, names, all_groups)[lo : lo + len(group_ids)]

    def _observe_shift(self, traj: Trajectories, rows: "GlobalRows") -> None:
        """Show a drift-tracking estimator (SPO's ``observe_shift``) the policy's log-probs on this
        iteration's rows after the update. Several processes: each evaluates its own rows, the
        old/new log-probs and masks are gathered (padded to the widest completion, mask 0) and
        every process's estimator observes the global batch in one-process order — so its state
        moves identically everywhere (a per-process observation would make the trackers diverge)."""
        old, mask = traj.log_probs.float().cpu(), traj.mask.cpu()
        new = torch.zeros_like(old)
        with self.gathered_weights():  # every process enters (a collective under FSDP)
            if len(traj):
                with torch.no_grad(), self.autocast():
                    new = self.policy.log_prob(traj).float().cpu()
        prompts = traj.prompts
        if self.accelerator.num_processes > 1:
            order = torch.argsort(rows.canonical)
            all_prompts = self._gather_list(traj.prompts)
            prompts = [all_prompts[i] for i in order.tolist()]
            old, new, mask = (self._gather_rows(x)[order] for x in (old, new, mask))
        self.estimator.observe_shift(prompts, old, new, mask)

    def _gather_rows(self, value: Any) -> Any:
        """Every process's rows of a per-sample value in process order: tensors (``[B, T, ...]``
        padded with zeros along dim 1 to the widest process, e.g. token completions), lists."""
        if value is None:
            return None
        if not isinstance(value, Tensor):
            return self._gather_list(list(value))
        value = value.detach().cpu()
        if value.dim() >= 2:
            width = int(self._gather_uneven(torch.tensor([value.shape[1]])).max())
            if width > value.shape[1]:
                pad = value.new_zeros((value.shape[0], width - value.shape[1]) + tuple(value.shape[2:]))
                value = torch.cat([value, pad], dim=1)
        return self._gather_uneven(value)

    def _advantages(self, inputs: AdvantageInputs) -> Tensor:
        """Run the estimator; rows whose reward failed (NaN, tolerated up to ``max_failures``) are
        left out of the statistics and get advantage 0."""
        valid = torch.isfinite(inputs.rewards)
        if bool(valid.all()):
            return self.estimator(inputs)
        if inputs.traj is not None and inputs.traj.meta.get("rollout_structure"):
            raise RuntimeError("a reward failed inside a structured rollout (tree/singular); its advantages need every leaf. Fix the reward or set reward.max_failures=0.")
        idx = torch.nonzero(valid).flatten()
        meta = dict(inputs.meta) if inputs.meta is not None else None
        for k in estimator_reads(self.estimator)[1]:  # declared per-sample meta entries: the same rows
            if meta is not None and k in meta:
                meta[k] = _index(meta[k], idx, len(valid))
        sub = dataclasses.replace(
            inputs, rewards=inputs.rewards[idx], group_ids=inputs.group_ids[idx],
            reward_table=inputs.reward_table[idx] if inputs.reward_table is not None else None,
            traj=inputs.traj.select(idx) if inputs.traj is not None else None,
            prompts=[inputs.prompts[i] for i in idx.tolist()] if inputs.prompts is not None else None,
            meta=meta,
        )
        adv_valid = self.estimator(sub)
        if meta is not None:
            for k in meta.keys() - inputs.meta.keys():  # entries the estimator wrote (over the valid rows)
                inputs.meta[k] = meta[k]
        out = adv_valid.new_zeros((len(inputs.rewards),) + tuple(adv_valid.shape[1:]))
        out[idx] = adv_valid
        return out

    def update(self, traj: Trajectories, keep: Tensor, it: int, rows: "GlobalRows | None" = None) -> dict[str, float]:
        """Gradient steps over the kept samples: minibatches of ``train_batch_size`` samples,
        gradients accumulated over samples × step chunks, one AdamW step per minibatch.

        The minibatches are cut from the *global* batch (every process's kept samples, in the order
        of a one-process run, shuffled by ``(seed, iteration)``); each process backpropagates its own
        rows of each minibatch, scaled by its share of the minibatch's normaliser (masked steps for
        ``token-mean``, samples otherwise) times the process count, and the prepared (DDP) module
        averages the gradients — so the step equals a one-process step on the whole minibatch.
        Every process takes the same number of optimizer steps: one whose share of a minibatch is
        empty backpropagates a zero-weight pass on a filler row so the all-reduce never waits."""
        t = self.config.train
        acc = self.accelerator
        rows = rows if rows is not None else self._global_rows(traj.group_ids, one_round=True)
        world = acc.num_processes
        all_keep = self._gather_uneven(keep.to(torch.bool).cpu())
        canonical_keep = torch.zeros(rows.total, dtype=torch.bool)
        canonical_keep[rows.canonical] = all_keep
        idx_kept = torch.nonzero(canonical_keep).flatten()  # canonical (one-process) row numbers
        if len(idx_kept) == 0:
            return {"update/steps": 0.0}
        local_of = torch.full((rows.total,), -1, dtype=torch.long)  # canonical row -> local row (or -1)
        local_of[rows.canonical[rows.lo : rows.hi]] = torch.arange(rows.hi - rows.lo)
        groups = traj.meta.get("minibatch_groups")
        all_groups = None
        if groups is not None:  # rows that share states (a tree, a G²RPO step) stay contiguous
            offset = self._group_offset(groups)
            gathered = self._gather_uneven((groups.cpu().long() + offset))
            all_groups = torch.zeros(rows.total, dtype=torch.long)
            all_groups[rows.canonical] = gathered
        normaliser = loss_normaliser(self.objective, self.resolved.preset.loss.aggregation)
        # stored steps differ between processes for token policies (completion widths): pad to the widest
        max_steps = int(self._gather_uneven(torch.tensor([traj.num_steps if len(traj) else self._filler.num_steps])).max())
        sums: dict[str, float] = {}
        wsums: dict[str, float] = {}  # Σ chunk weights per key: 1 per update for keys every chunk reports
        grad_norms: list[float] = []
        self.policy.model.train()
        ctx = UpdateContext(resolved=self.resolved, iteration=it, autocast=self.autocast)
        n_updates = skipped = 0
        with self._prepared_model():
            for epoch in range(t.inner_epochs):
                order = idx_kept[torch.randperm(len(idx_kept), generator=generator_for(t.seed, it, "shuffle", epoch))]
                if all_groups is not None:
                    rank = torch.randperm(int(all_groups.max()) + 1, generator=generator_for(t.seed, it, "groups", epoch))
                    order = order[torch.argsort(rank[all_groups[order]], stable=True)]
                for start in range(0, len(order), t.train_batch_size):
                    local = local_of[order[start : start + t.train_batch_size]]
                    local = local[local >= 0]
                    batch = traj.select(local) if len(local) else None
                    counts = torch.zeros(2 + max_steps)  # [samples, Σ mask, Σ mask per step...]
                    if batch is not None:
                        m = batch.mask.float()
                        counts[0], counts[1], counts[2 : 2 + m.shape[1]] = len(local), m.sum(), m.sum(0)
                    global_counts = self._sum(counts)
                    if float(global_counts[1]) == 0:
                        continue  # no trainable step in this minibatch on any process
                    chunks = self.policy.step_chunks(batch if batch is not None else self._filler)
                    real_chunks = len(chunks)
                    if self.sharded and world > 1:
                        # FSDP gathers each layer in every forward and backward (collectives): every
                        # process runs every chunk, and as many chunks as the process with the most
                        # (the extra ones zero-weight passes)
                        most = int(self._gather_uneven(torch.tensor([len(chunks)])).max())
                        chunks = chunks + [chunks[-1]] * (most - len(chunks))
                    bad: str | None = None

                    def chunk_share(steps: Tensor, l_chunk: float) -> float:
                        """This process's weight of a chunk's loss (``l_chunk``: its masked entries here)."""
                        if normaliser == "token":
                            return l_chunk / float(global_counts[1])
                        return (float(global_counts[2 + steps].sum()) / float(global_counts[1])) * (float(counts[0]) / float(global_counts[0]))

                    def credit(metrics: dict[str, float], share: float) -> None:
                        for k, v in metrics.items():
                            sums[k] = sums.get(k, 0.0) + v * share
                            wsums[k] = wsums.get(k, 0.0) + share

                    # chunks whose rows fit in train.max_rows_per_call share one transformer call and one
                    # backward (each keeps its own loss and share: only the cost changes). One process or
                    # DDP (the groups may differ between processes: only the last backward all-reduces);
                    # not FSDP, whose every forward and backward is a collective (equal call counts)
                    batched = batch is not None and batched_form(self.objective) is not None and not (self.sharded and world > 1)
                    step_rows = getattr(self.policy, "rows_per_step", len)(batch) if batched else 0
                    live = [c for c in chunks[:real_chunks] if float(batch.mask[:, c].sum()) > 0] if step_rows else []
                    if live:  # (a process with no live chunk takes the per-chunk path: its zero-weight pass)
                        groups = list(group_step_chunks(live, step_rows, t.max_rows_per_call))
                        for gi, group in enumerate(groups):
                            sync = contextlib.nullcontext() if (gi == len(groups) - 1 or world == 1) else acc.no_sync(self.prepared_model)
                            with sync:
                                group_loss = 0.0
                                for steps, (loss, metrics) in zip(group, objective_chunk_losses(self.objective, self.policy, batch, group, ctx)):
                                    if not torch.isfinite(loss) and bad is None:
                                        bad = _nonfinite_where(loss, batch, steps, metrics)
                                    share = chunk_share(steps, float(batch.mask[:, steps].sum()))
                                    group_loss = group_loss + loss * share
                                    credit(metrics, share)
                                acc.backward(group_loss * world)  # DDP averages the gradients over processes
                        chunks = []
                    for ci, steps in enumerate(chunks):
                        last = ci == len(chunks) - 1
                        l_chunk = float(batch.mask[:, steps].sum()) if batch is not None and ci < real_chunks else 0.0
                        share = chunk_share(steps, l_chunk)
                        if batch is None or l_chunk == 0:
                            if not ((last or self.sharded) and world > 1):
                                continue
                            share = 0.0  # zero-weight pass: this process joins the gradient all-reduce
                        data = batch if batch is not None and l_chunk > 0 else self._zero_weight_batch(batch)
                        # DDP all-reduces in the backward of the minibatch's last chunk only (forward
                        # and backward of the others run under no_sync: local accumulation)
                        sync = contextlib.nullcontext() if (last or world == 1) else acc.no_sync(self.prepared_model)
                        with sync:
                            loss, metrics = self.objective(self.policy, data, steps, ctx)
                            if not torch.isfinite(loss) and bad is None:
                                bad = _nonfinite_where(loss, data, steps, metrics)
                            acc.backward(loss * (share * world))  # even when non-finite: every process joins the all-reduce
                        if share > 0:
                            credit(metrics, share)
                    if world > 1 and self.prepared_model is self._bare_model and not self.sharded:
                        self._all_reduce_gradients()  # a policy not called through forward: no DDP
                    # unscaled (fp16 loss scaling) and global (after the all-reduce / reduce-scatter)
                    gn = acc.clip_grad_norm_(self.params, t.max_grad_norm) if t.max_grad_norm > 0 else _grad_norm(self.params)
                    gn = full_tensor(gn) if isinstance(gn, Tensor) else gn  # FSDP: the norm of the sharded gradients
                    if bad is None and not torch.isfinite(torch.as_tensor(gn)):
                        bad = f"gradient norm {float(gn)}"
                    if self._any_process(bad is not None):  # skip the step: NaN/inf would corrupt weights and Adam state
                        self.optimizer.zero_grad(set_to_none=True)
                        skipped += 1
                        self._skip_nonfinite(it, start // t.train_batch_size, bad or "another process", skipped)
                        continue
                    if t.max_grad_norm > 0:
                        grad_norms.append(float(gn))
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.ema is not None:
                        self.ema.update()
                    n_updates += 1
                    on_update = getattr(self.objective, "on_update", None)
                    if on_update is not None:  # per optimizer step (SAGE's moving anchor and adaptive β)
                        on_update(self)
        self.policy.model.eval()
        sums, wsums = self._sum_dicts(sums), self._sum_dicts(wsums)
        out = {k: v / max(n_updates, 1) for k, v in sums.items()}
        for k, w in wsums.items():
            if w > 0 and abs(w - n_updates) > 1e-6:  # reported by some chunks only (e.g. ratio_step/<k>/*)
                out[k] = sums[k] / w
        if grad_norms:
            out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["update/steps"] = float(n_updates)
        out["update/skipped_nonfinite"] = float(skipped)
        return out

    def _any_process(self, flag: bool) -> bool:
        """``flag`` on any process (so every process skips the same optimizer steps)."""
        if self.accelerator.num_processes == 1:
            return flag
        total = self.accelerator.reduce(torch.tensor([float(flag)], device=self.accelerator.device), reduction="sum")
        return bool(total.item() > 0)

    def _skip_nonfinite(self, it: int, minibatch: int, where: str, skipped_now: int) -> None:
        """Count a skipped optimizer step, say where it happened, and stop past
        ``train.max_nonfinite_updates`` (counted over the whole run, resumes included)."""
        limit = self.config.train.max_nonfinite_updates
        total = skipped_now + int(sum(h.get("update/skipped_nonfinite", 0.0) for h in self.history))
        msg = f"iteration {it}, minibatch {minibatch}: {where}"
        if total > limit:
            raise NonFiniteUpdateError(
                f"{total} optimizer steps had NaN/inf values (more than train.max_nonfinite_updates={limit}); the last at {msg}. "
                "Lower train.learning_rate, use model.dtype=float32, check the rewards, or raise train.max_nonfinite_updates."
            )
        if self.accelerator.is_main_process:
            import sys

            from tqdm.auto import tqdm

            tqdm.write(f"[flowrl] skipped an optimizer step ({total}/{limit} allowed): NaN/inf at {msg}", file=sys.stderr)

    def _all_reduce_gradients(self) -> None:
        """Average the trainable gradients over processes in one flat buffer (what DDP does for
        policies it can wrap)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.detach().reshape(-1).float() for g in grads])
        flat = self.accelerator.reduce(flat.to(self.accelerator.device), "mean").to(self.params[0].device)
        i = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            p.grad = flat[i : i + n].view_as(p).to(p.dtype)
            i += n

    def _zero_weight_batch(self, batch: Trajectories | None) -> Trajectories:
        """One real row (finite loss) with zero advantage, for a zero-weight backward pass."""
        data = batch.select([0]) if batch is not None else self._filler.select([0])
        data.mask = torch.ones_like(data.mask)
        shape = data.advantages.shape if isinstance(data.advantages, Tensor) else (1,)
        data.advantages = torch.zeros(shape)
        if not isinstance(data.meta.get("reward"), Tensor):
            data.meta["reward"] = torch.zeros(1)
        return data

    @contextlib.contextmanager
    def _prepared_model(self):
        """Inside: the policy calls the accelerate-prepared module (DDP), whose backward
        all-reduces the gradients; rollouts and evaluation call the bare module (no collectives)."""
        if self.prepared_model is self.policy.model:
            yield
            return
        live = self.policy.model
        self.policy.model = self.prepared_model
        try:
            yield
        finally:
            self.policy.model = live

    # ------------------------------------------------------------------- across processes
    def _gather_uneven(self, x: Tensor) -> Tensor:
        """Concatenate every process's ``x`` (any number of rows each) in process order."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return x
        is_bool = x.dtype == torch.bool
        x = x.detach().cpu().to(torch.uint8 if is_bool else x.dtype).contiguous()
        sizes = [int(v) for v in acc.gather(torch.tensor([x.shape[0]], device=acc.device)).cpu().tolist()]
        m = max(sizes)
        padded = torch.cat([x, x.new_zeros((m - x.shape[0],) + tuple(x.shape[1:]))])
        out = acc.gather(padded.to(acc.device)).cpu()
        out = torch.cat([out[i * m : i * m + n] for i, n in enumerate(sizes)])
        return out.bool() if is_bool else out

    def _gather_list(self, items: list[Any]) -> list[Any]:
        if self.accelerator.num_processes == 1:
            return list(items)
        from accelerate.utils import gather_object

        return list(gather_object(list(items)))

    def _sum(self, x: Tensor) -> Tensor:
        """Σ over processes (float64 on the CPU)."""
        if self.accelerator.num_processes == 1:
            return x.double()
        return self.accelerator.reduce(x.double().to(self.accelerator.device), "sum").cpu()

    def _sum_dicts(self, d: dict[str, float]) -> dict[str, float]:
        """Key-wise Σ over processes (keys may differ between processes)."""
        if self.accelerator.num_processes == 1:
            return dict(d)
        out: dict[str, float] = {}
        for part in self._gather_list([d]):
            for k, v in part.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def _group_offset(self, groups: Tensor) -> int:
        """Offset that makes this process's group numbers (0…) global: Σ of earlier processes' counts."""
        n = int(groups.max()) + 1 if len(groups) else 0
        counts = self._gather_uneven(torch.tensor([n])).tolist()
        return int(sum(counts[: self.accelerator.process_index]))

    def _global_rows(self, group_ids: Tensor, *, one_round: bool = True) -> "GlobalRows":
        """Where this process's rows sit in the global batch: ``[lo, hi)`` in gathered (process)
        order, and each gathered row's number in a one-process run's order. One rollout round:
        the gathered order is that order (each process holds a contiguous share of the prompts).
        Several refill rounds (DAPO): a one-process run holds rows by kept group, so rows are
        sorted by their global group id (a group never spans processes)."""
        gids = self._gather_uneven(group_ids.cpu().long())
        sizes = self._gather_uneven(torch.tensor([len(group_ids)])).tolist()
        lo = int(sum(sizes[: self.accelerator.process_index]))
        canonical = torch.arange(len(gids))
        if not one_round:
            canonical[torch.argsort(gids, stable=True)] = torch.arange(len(gids))
        return GlobalRows(lo=lo, hi=lo + len(group_ids), total=len(gids), canonical=canonical)

    # --------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, *, tag: str = "eval") -> dict[str, float]:
        """Score deterministic samples of the held-out prompts (EMA weights if enabled)."""
        t = self.config.train
        acc = self.accelerator
        n_samples = len(self.eval_prompts) * t.eval_samples_per_prompt
        metadata = [m for m in self.eval_set.metadata for _ in range(t.eval_samples_per_prompt)]
        weights = self.ema.active() if self.ema is not None else contextlib.nullcontext()
        # processes split the samples (each has its own noise stream, see eval_samples) and gather
        split = n_samples >= acc.num_processes > 1
        lo, hi = shard_bounds(n_samples, acc.process_index, acc.num_processes) if split else (0, n_samples)
        with weights, self.gathered_weights(), _phase(f"eval ({tag}): {hi - lo} samples", enabled=t.progress and acc.is_main_process):
            outputs, prompts = eval_samples(self.policy, self.eval_prompts, self.config, autocast=self.autocast, rows=(lo, hi))
        meta = {**reward_meta(metadata[lo:hi]), "eval": True}
        table, names = self.reward_set.score(outputs, prompts[lo:hi], meta)
        if getattr(self, "track", None) is not None:  # reward.track: its columns join the table as track/<column>
            table, names = self.track.extend(table, names, outputs, prompts[lo:hi], meta)
        if split:
            table = self._gather_uneven(table.float().cpu())
            outputs = self._gather_uneven(outputs.float().cpu()) if isinstance(outputs, Tensor) else self._gather_list(outputs)
        self._eval_outputs = getattr(self, "_eval_outputs", {})
        self._eval_outputs[tag] = (outputs, prompts)
        self._eval_tables = getattr(self, "_eval_tables", {})
        self._eval_tables[tag] = (table, list(names))  # per sample, for `flowrl eval` / the gallery
        result = {n: float(table[:, i].nanmean()) for i, n in enumerate(names)}
        result["num_prompts"] = float(len(self.eval_prompts))
        result["num_samples"] = float(len(prompts))
        key = category_column(metadata, t.eval_category)
        if key is not None:  # GenEval-style breakdown: <reward>/<category>, num_prompts/<category>
            labels = [m.get(key) for m in metadata]
            for i, n in enumerate(names):
                for label, (mean, _) in category_means(table[:, i], labels).items():
                    result[f"{n}/{label}"] = mean
            for label, (_, count) in category_means(torch.zeros(len(labels)), labels).items():
                result[f"num_prompts/{label}"] = float(count // t.eval_samples_per_prompt)
        self._log_eval_images(tag, outputs, prompts)
        self._evals = getattr(self, "_evals", {})
        self._evals[tag] = result
        return result

    # ---------------------------------------------------------------------- checkpointing
    # ---------------------------------------------------------------------- checkpointing
    def _prepare_run_dir(self) -> None:
        checkpointing.prepare_run_dir(self)

    def _resolve_checkpoint(self, spec: str) -> Path:
        return checkpointing.resolve_checkpoint(self, spec)

    def save_checkpoint(self, it: int) -> Path:
        """Write ``checkpoints/iter_NNNNNN`` atomically (see :mod:`flowrl.checkpointing`)."""
        return checkpointing.save_checkpoint(self, it)

    def load_checkpoint(self, path: Path) -> None:
        checkpointing.load_checkpoint(self, path)

    def export_lora(self) -> Path | None:
        """Save the evaluated weights' LoRA — the EMA weights when ``train.ema_decay`` > 0, else the
        live ones — in the diffusers format (``pipe.load_lora_weights(dir)`` loads them), or the
        peft format for language models; ``<run>/weights.json`` records which."""
        out = self.run_dir / "lora"
        saver = getattr(self.policy, "save_lora", None)
        exported = None
        if self.config.train.lora_rank > 0 and saver is not None:
            weights = self.ema.active if self.ema is not None else contextlib.nullcontext
            if self.sharded:  # every process gathers its shards of the (EMA) weights; the main one writes
                with weights():
                    state = self.trainable_state_dict()
                if self.accelerator.is_main_process:
                    saver(out, state_dict=state)
            elif self.accelerator.is_main_process:
                with weights():
                    saver(out)
            exported = out
        if not self.accelerator.is_main_process:
            return None
        info = {
            "evaluated": "ema" if self.ema is not None else "live",
            "lora": "lora" if exported is not None else None,
            "lora_weights": ("ema" if self.ema is not None else "live") if exported is not None else None,
            "ema": self.ema.describe() if self.ema is not None else None,
        }
        _atomic_write(self.run_dir / "weights.json", json.dumps(info, indent=1) + "\n")
        return exported

    # ------------------------------------------------------------------------------- output
    def _make_selector(self):
        """The preset's prompt selector (``flowrl.prompt_selection``); a selector that takes a value
        ``tracker`` shares the advantage estimator's (SPO)."""
        import inspect

        from flowrl.prompt_selection import PROMPT_SELECTORS, make_selector

        name = self.resolved.preset.prompt_selection
        params = inspect.signature(PROMPT_SELECTORS.get(name).__init__).parameters
        kwargs: dict[str, Any] = {}
        if "tracker" in params and getattr(self.estimator, "tracker", None) is not None:
            kwargs["tracker"] = self.estimator.tracker
        if "prompts" in params:
            kwargs["prompts"] = self.train_prompts
        return make_selector(name, len(self.train_prompts), **kwargs)

    def _start_trackers(self) -> list[Any]:
        """accelerate trackers of ``train.report_to``, attached to the accelerator (main process)."""
        if not self.accelerator.is_main_process:
            return []
        trackers = tracking.start_trackers(self.config.train.report_to, self.run_dir, config=self.config.to_dict())
        self.accelerator.trackers = list(getattr(self.accelerator, "trackers", None) or []) + trackers
        self._trackers = trackers
        return trackers

    def _log_eval_images(self, tag: str, outputs: Any, prompts: list[str]) -> None:
        """A few evaluation images (one per prompt) to the trackers, at the evaluation's iteration."""
        trackers = getattr(self, "_trackers", None)
        t = self.config.train
        if not trackers or t.eval_images <= 0:
            return
        step = 0 if tag == "base" else t.iterations if tag == "tuned" else int(tag[4:]) if tag.startswith("iter") and tag[4:].isdigit() else None
        every = t.eval_samples_per_prompt  # the first sample of each prompt
        images = tracking.preview_images(outputs[::every] if isinstance(outputs, Tensor) else outputs, count=t.eval_images)
        if images is not None:
            tracking.log_images(trackers, images, prompts[::every][: len(images)], step)

    def _log(self, record: dict[str, float], writer: Any) -> None:
        if "reward/mean" in record:
            self.history.append(record)
        if not self.accelerator.is_main_process:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        tracking.log_metrics(writer or [], record, int(record["iteration"]))

    def _report_column(self, result: dict[str, float]) -> str | None:
        cols = [k for k in result if k != "num_prompts"]
        if self.config.train.report:
            return self.config.train.report
        return cols[0] if cols else None

    def _summary(self, before: dict[str, float], after: dict[str, float]) -> str:
        if not before or not after:
            return ""
        col = self._report_column(after)
        if col is None or col not in before:
            return ""
        label = f"{col.split('/')[0]} correctness" if col.endswith("/correct") else col
        return f"{label}: base {before[col]:.2f} -> tuned {after[col]:.2f} (held-out, {len(self.eval_prompts)} prompts)"

    def _breakdown(self, before: dict[str, float], after: dict[str, float]) -> str:
        """``<column> by category: a base B -> tuned T (P prompts, S samples); ...`` from the
        per-category evaluation (:meth:`evaluate`), or "" without categories."""
        col = self._report_column(after) if after else None
        if not before or col is None:
            return ""
        parts = []
        for k, n in after.items():
            if not k.startswith("num_prompts/"):
                continue
            label = k.split("/", 1)[1]
            if f"{col}/{label}" in after and f"{col}/{label}" in before:
                p, s = int(n), int(n) * self.config.train.eval_samples_per_prompt
                parts.append(f"{label} base {before[f'{col}/{label}']:.2f} -> tuned {after[f'{col}/{label}']:.2f} ({p} prompt{'s' * (p != 1)}, {s} samples)")
        if not parts:
            return ""
        return f"{col} by category: " + "; ".join(parts) + f"; all: {len(self.eval_prompts)} prompts, {int(after.get('num_samples', 0))} samples"

    def _write_artifacts(self) -> None:
        if not self.accelerator.is_main_process:
            return
        from flowrl import gallery

        self._evals = getattr(self, "_evals", {})

        try:
            evals: dict[str, list[tuple[float, float]]] = {}
            for it, result in ((0, self._evals.get("base")), (self.config.train.iterations, self._evals.get("tuned"))):
                for k, v in (result or {}).items():
                    if not k.startswith("num_"):
                        evals.setdefault(k, []).append((it, v))
            gallery.plot_reward_curve(self.history, self.run_dir / "reward_curve.png", evals=evals)
            outs = getattr(self, "_eval_outputs", {})
            if "base" in outs and "tuned" in outs and isinstance(outs["base"][0], Tensor):
                k, n = self.config.train.eval_samples_per_prompt, self.config.train.iterations
                tuned = f"tuned{' (EMA)' if self.ema is not None else ''}, iteration {n}"
                gallery.before_after_grid(  # the first sample of each prompt: same prompt, same noise
                    outs["base"][0][::k], outs["tuned"][0][::k], self.run_dir / "before_after.png", max_items=16,
                    prompts=outs["base"][1][::k], labels=("base", tuned), title=f"{self.run_dir.name}: base vs {tuned} (same noise)",
                )
        except Exception as exc:  # plots are a convenience; never lose a run for them
            print(f"[flowrl] could not write plots: {exc}")



def make_optimizer(name: str, params: list[torch.nn.Parameter], **kwargs: Any) -> torch.optim.Optimizer:
    """``adamw`` (torch.optim.AdamW) or ``adamw_8bit`` (bitsandbytes.optim.AdamW8bit: the two
    moment buffers quantised to 8 bits, Dettmers et al. 2022)."""
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if name == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("train.optimizer=adamw_8bit needs bitsandbytes: pip install 'flowrl[bnb]' (CUDA only), or set train.optimizer=adamw.") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    raise ConfigError(f"train.optimizer must be adamw or adamw_8bit, got '{name}'.")


def _prepare(accelerator: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, wrap: bool):
    """``accelerator.prepare`` the trained module and the optimizer. With several processes the
    module comes back wrapped (DDP): its backward all-reduces the gradients. The wrapper forwards
    unknown attributes (``config``, ``dtype``, peft's ``disable_adapters``) to the module, so a
    policy can call it in place of the bare module during the update. Policies whose model is not
    called through its ``forward`` (``forward_calls_model = False``) are not wrapped; the trainer
    all-reduces their gradients itself before each optimizer step.

    FSDP (accelerate's plugin, ``fsdp_version: 2``): ``fully_shard`` is applied to the module in
    place (each transformer block, then the whole); its parameters become shards, the optimizer
    holds shards of its state, and backward reduce-scatters the gradients."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ConfigError(
            f"the accelerate config selects {kind.value}, which flowrl does not support: it cannot be tested without GPUs "
            "(on the CPU accelerate's DeepSpeed integration gives every process rank 0 of 1). Shard with FSDP instead "
            "(assets/accelerate/fsdp.yaml: distributed_type FSDP, fsdp_version 2 — parameters, gradients and optimizer state "
            "sharded like ZeRO-3), or use DDP (assets/accelerate/ddp.yaml); memory: LoRA, train.gradient_checkpointing, adamw_8bit."
        )
    if kind == DistributedType.FSDP:
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise ConfigError(
                f"the accelerate config selects FSDP with fsdp_version {version}; flowrl supports FSDP2 only "
                "(torch's fully_shard). Set fsdp_config.fsdp_version: 2 (see assets/accelerate/fsdp.yaml)."
            )
        if not wrap:
            raise ConfigError(
                "FSDP shards a model that the policy calls through its forward; this policy calls its model's "
                "parts directly (forward_calls_model = False). Launch it with a DDP config (assets/accelerate/ddp.yaml)."
            )
    if not wrap or (accelerator.num_processes == 1 and kind != DistributedType.FSDP):  # FSDP2: model and optimizer together, always
        return model, accelerator.prepare(optimizer)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    inner = getattr(wrapped, "module", wrapped)
    if "_original_forward" in inner.__dict__:  # the trainer autocasts itself; keep the module's own forward
        inner.forward = inner.__dict__.pop("_original_forward")
    if wrapped is not model:
        cls = type(wrapped)

        def __getattr__(self, name):
            try:
                return cls.__getattr__(self, name)
            except AttributeError:
                return getattr(self.module, name)

        wrapped.__class__ = type(cls.__name__, (cls,), {"__getattr__": __getattr__, "__module__": cls.__module__})
    return wrapped, optimizer


def _make_accelerator(*, cpu: bool, mixed_precision: str):
    """An ``Accelerator``; in a single process, a previous trainer's state (accelerate keeps one per
    process) is reset when this run asks for another precision or device."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if state and PartialState().num_processes == 1:
        same = str(state.get("_mixed_precision", "no")) == mixed_precision and bool(state.get("_cpu", False)) == cpu
        if not same:
            AcceleratorState._reset_state(reset_partial_state=True)
    from accelerate.utils import DistributedDataParallelKwargs

    # find_unused_parameters: LoRA may sit on a projection a model skips (SD3's last context block);
    # broadcast_buffers=False: no collective in forward passes (processes run different numbers)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)
    fsdp = _fsdp_plugin_from_env()
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, kwargs_handlers=[ddp], fsdp_plugin=fsdp)
    if fsdp is not None:
        from accelerate.utils import DistributedType

        if accelerator.distributed_type == DistributedType.MULTI_CPU:
            # accelerate applies its FSDP plugin on accelerators only and silently falls back to DDP on
            # the CPU; torch's fully_shard runs on the CPU too (gloo), so shard as the config asks
            from accelerate.state import PartialState

            accelerator.state.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does for GPUs
            accelerator.state.fsdp_plugin = fsdp
    return accelerator


def _fsdp_plugin_from_env():
    """accelerate's FSDP plugin when the launch asks for FSDP (``accelerate launch`` with an FSDP
    config exports ``ACCELERATE_USE_FSDP=true`` and ``FSDP_*``; with ``torchrun`` set them
    yourself), else None."""
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin()


def train(config: TrainConfig | str | Path, **kwargs: Any) -> TrainResult:
    """Run a training job from a :class:`TrainConfig` (or a YAML path)."""
    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_yaml(config)
    return Trainer(config, **kwargs).train()



def _progress(it, *, enabled: bool, total: int, initial: int = 0, desc: str = "flowrl", **kwargs: Any):
    """A tqdm bar over ``it`` (or a manual one when ``it`` is None); ``it`` itself (None) when disabled."""
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, initial=initial, desc=desc, dynamic_ncols=True, **kwargs)


@contextlib.contextmanager
def _phase(desc: str, *, enabled: bool):
    """A one-step bar around a long silent phase (model loading): shows what runs and how long."""
    bar = _progress(None, enabled=enabled, total=1, desc=desc, leave=False, bar_format="{desc}: {elapsed}")
    try:
        yield
    finally:
        if bar is not None:
            bar.update(1)
            bar.close()


def progress_postfix(record: dict[str, float]) -> dict[str, str]:
    """What the progress bar shows: the mean reward, and the KL to the reference only when it was
    measured (β > 0); a run without a KL term shows no ``kl`` rather than a made-up 0."""
    out = {"reward": f"{record['reward/mean']:.3f}"}
    if "kl/ref" in record and math.isfinite(record["kl/ref"]):
        out["kl"] = f"{record['kl/ref']:.2e}"
    if record.get("update/skipped_nonfinite"):
        out["skipped"] = f"{int(record['update/skipped_nonfinite'])}"
    return out


class NonFiniteUpdateError(FloatingPointError):
    """More optimizer steps than ``train.max_nonfinite_updates`` had NaN/inf log-probs, loss or gradients."""


def _grad_norm(params: list[Tensor]) -> Tensor:
    """Total 2-norm of the gradients (NaN/inf if any gradient is); 0 when there are none."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if any(is_sharded(g) for g in grads):  # FSDP: a norm over every process's shards
        return torch.nn.utils.get_total_norm(grads)
    norms = [torch.linalg.vector_norm(g.float()) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def _nonfinite_where(loss: Tensor, batch: Trajectories, steps: Tensor, metrics: dict[str, float]) -> str:
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
