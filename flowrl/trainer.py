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

The loop's parts live beside it: :mod:`flowrl.objectives` (what a step optimises),
:mod:`flowrl.estimation` (the advantage phase over processes), :mod:`flowrl.distributed`
(collectives), :mod:`flowrl.builders` (model, rewards, accelerator, optimizer),
:mod:`flowrl.evaluation`, :mod:`flowrl.reporting` and :mod:`flowrl.checkpointing`.

Metrics: one record per iteration, every name listed in :mod:`flowrl.reporting`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowrl import checkpointing, estimation, evaluation, reporting, tracking
from flowrl.advantages import make_estimator
from flowrl.builders import (  # noqa: F401  (add_lora, load_pipeline, make_optimizer: re-exported)
    _build_reward_set, _load_prompt_set, add_lora, build_policy, load_pipeline, make_accelerator, make_optimizer, make_selector,
    setup_training,
)
from flowrl.config import TrainConfig
from flowrl.distributed import Collectives, GlobalRows
from flowrl.errors import ConfigError, NonFiniteUpdateError, TrainingInterrupted  # noqa: F401  (re-exported)
from flowrl.evaluation import eval_samples  # noqa: F401  (re-exported)
from flowrl.objectives import (  # noqa: F401  (loss_normaliser, policy_gradient_*: re-exported)
    UpdateContext, batched_form, grad_norm, learning_rate_at, loss_normaliser, nonfinite_where, objective_chunk_losses,
    old_log_probs_reason, policy_gradient_chunks, policy_gradient_objective, sample_chunk_share, select_train_steps,
    settle_old_log_probs, zero_weight_batch,
)
from flowrl.overlap import rollout_in_calls
from flowrl.track import after_evaluation, build_tracker
from flowrl.plugins import (  # noqa: F401  (re-exported: flowrl.trainer.OBJECTIVES etc.)
    OBJECTIVES, PIPELINE_SOURCES, POLICY_BUILDERS, REWARD_TRANSFORMS, import_builtin_components, make_objective,
)
from flowrl.policy import Trajectories, group_step_chunks
from flowrl.prompt_selection import fill_batch
from flowrl.preemption import stop_requests
from flowrl.preflight import check_environment
from flowrl.prompts import reward_meta
from flowrl.rewards.remote import check_remote_rewards
from flowrl.reporting import phase, progress_bar, progress_postfix  # noqa: F401  (progress_postfix: re-exported)
from flowrl.seeding import PromptGenerators, generator_for
from flowrl.sharding import full_tensor, gathered_parameters


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


@dataclass
class _Minibatch:
    """One minibatch of an update on this process: its rows here (``batch``, None when it has
    none), the counts ``[samples, Σ mask, Σ mask per step...]`` here and over all processes."""

    batch: Trajectories | None
    counts: Tensor
    global_counts: Tensor


def train(config: TrainConfig | str | Path, **kwargs: Any) -> TrainResult:
    """Run a training job from a :class:`TrainConfig` (or a YAML path)."""
    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_yaml(config)
    return Trainer(config, **kwargs).train()


# ------------------------------------------------------------------------------------- Trainer
class Trainer:
    """Runs a :class:`TrainConfig`. ``policy`` / ``reward_set`` may be given to skip building them
    (tests, notebooks); otherwise they come from the config."""

    def __init__(self, config: TrainConfig, *, policy: Any = None, reward_set: Any = None, accelerator: Any = None):
        self.config = config
        self.resolved = config.resolved()
        from flowrl.rules import check_compatibility

        check_compatibility(self.resolved, rewards=reward_set is None)  # before anything loads
        t = config.train
        check_environment(config)  # output folder writable, device present, resolution fits: before any model loads
        if t.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        cpu = config.model.device == "cpu" or (config.model.device == "auto" and not torch.cuda.is_available())
        self.accelerator = accelerator or make_accelerator(cpu=cpu, mixed_precision=t.mixed_precision)
        self.dist = Collectives(self.accelerator)
        nproc = self.accelerator.num_processes
        if t.prompts_per_iteration % nproc:
            raise ConfigError(
                f"train.prompts_per_iteration={t.prompts_per_iteration} is not divisible by the {nproc} processes; "
                f"set it to a multiple of {nproc}."
            )
        self.run_dir = Path(t.output_dir)
        tracking.tracker_names(t.report_to)  # unknown or missing trackers fail before any work
        checkpointing.check_fresh_run_dir(self.run_dir, t.resume_from)
        if t.resume_from:  # the checkpoint is readable, reached by train.iterations, made with these settings
            checkpointing.check_resume_settings(config, self.run_dir)
        self.train_set = _load_prompt_set(t.prompts, "train.prompts", t.prompt_column)
        self.eval_set = _load_prompt_set(t.eval_prompts, "train.eval_prompts", t.prompt_column)
        self.train_prompts, self.eval_prompts = self.train_set.prompts, self.eval_set.prompts
        import_builtin_components()
        show = t.progress and self.accelerator.is_main_process
        with phase(f"loading rewards ({', '.join(map(str, config.reward.rewards))})", enabled=show and reward_set is None):
            self.reward_set = reward_set if reward_set is not None else _build_reward_set(config, process_device=self.accelerator.device)  # first: fails fast on a bad reward
            self.track = build_tracker(config)  # reward.track: scored at evaluations, never trained on
        check_remote_rewards(self.reward_set, announce=self.accelerator.is_main_process)  # servers answer, worst-case waits stated
        with phase(f"loading model {config.model.pipeline}", enabled=show and policy is None):
            if policy is None:  # the main process first: built-in tiny sources write <run>/base_model for the others to read
                with self.accelerator.main_process_first():
                    self.policy = build_policy(self.resolved, self.run_dir)
            else:
                self.policy = policy
        if policy is not None and hasattr(policy, "check_config"):  # a given policy must agree with the config
            policy.check_config(self.resolved)
        self.estimator = make_estimator(self.resolved.preset.advantage, **self.resolved.preset.advantage_params)
        self.objective = make_objective(self.resolved.preset.objective, **self.resolved.preset.objective_params)
        self.selector = make_selector(self)
        setup_training(self)  # LoRA / reference copy, optimizer, accelerate.prepare, EMA
        self.history: list[dict[str, float]] = []
        self.start_iteration = 0
        #: the run length the learning-rate schedule is planned over (a resumed run keeps its original plan)
        self.schedule_iterations = t.iterations

    # ---------------------------------------------------------------------------- the loop
    def train(self) -> TrainResult:
        t = self.config.train
        self._resume_plan = None
        if t.resume_from:  # everything checked before the run folder is touched
            path = self._resolve_checkpoint(t.resume_from)
            self._resume_plan = checkpointing.validate_resume(self, path)
        self._prepare_run_dir()
        if t.resume_from:
            self.load_checkpoint(path)
        writer = reporting.start_trackers(self)
        if self.start_iteration == 0:
            eval_before = self.evaluate(tag="base") if self.eval_prompts else {}
            reporting.check_report_column(self, eval_before)
            if eval_before:
                after_evaluation(self, 0, eval_before, "base")
                reporting.log(self, {"iteration": 0, **{f"eval/{k}": v for k, v in eval_before.items()}}, writer)
        else:  # resumed: the base evaluation the run made at iteration 0 (checkpoint state / metrics.jsonl)
            eval_before = dict(getattr(self, "_evals", {}).get("base") or {})
        bar = progress_bar(range(self.start_iteration + 1, t.iterations + 1), enabled=t.progress and self.accelerator.is_main_process, total=t.iterations, initial=self.start_iteration)
        last, stop_alarm = t.iterations, False
        with stop_requests() as stop:
            for it in bar:
                record = self.iteration(it)
                if self.eval_prompts and t.eval_every and it % t.eval_every == 0 and it != t.iterations:
                    result = self.evaluate(tag=f"iter{it}")
                    stop_alarm = after_evaluation(self, it, result, f"iter{it}")  # reward.track's alarm
                    record.update({f"eval/{k}": v for k, v in result.items()})
                reporting.log(self, record, writer)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(progress_postfix(record))
                saved = self.save_checkpoint(it) if t.save_every and it % t.save_every == 0 else None
                if self.dist.any_process(stop.signum is not None) and it < t.iterations:
                    # SIGTERM / SIGINT: the iteration is complete; keep it, then stop
                    path = saved or self.save_checkpoint(it)
                    tracking.finish(writer)
                    raise TrainingInterrupted(stop.name or "a signal on another process", it, path)
                if stop_alarm:  # reward.track_stop: the run ends here (final evaluation and checkpoint of this iteration)
                    last = it
                    break
        if last > self.start_iteration and not (t.save_every and last % t.save_every == 0):
            self.save_checkpoint(last)
        eval_after = {}
        if self.eval_prompts:
            eval_after = self.evaluate(tag="tuned")
            after_evaluation(self, last, eval_after, "tuned")
            reporting.log(self, {"iteration": last, **{f"eval/{k}": v for k, v in eval_after.items()}}, writer)
        self.export_lora()
        tracking.finish(writer)
        summary = reporting.summary(self, eval_before, eval_after)
        reporting.write_artifacts(self)
        return TrainResult(self.run_dir, self.history, eval_before, eval_after, self.policy, summary, reporting.breakdown(self, eval_before, eval_after))

    def iteration(self, it: int) -> dict[str, float]:
        """One rollout → reward → advantage → update iteration; returns its metrics (over all
        processes: every process returns the same record)."""
        t, preset = self.config.train, self.resolved.preset
        self.policy.iteration = it
        lr = learning_rate_at(min(it, self.schedule_iterations), self.schedule_iterations, self.resolved.learning_rate, t.lr_schedule, t.lr_min_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # 1. rollout + 2. rewards (the prompt selector may filter groups and refill: DAPO)
        t0 = time.perf_counter()
        traj, combined, select_metrics, rollout_time = self._rollout_and_score(it)
        t1 = time.perf_counter()
        # groups never span processes; statistics are computed on the gathered rewards
        rows = self.dist.global_rows(traj.group_ids, one_round=select_metrics.get("select/rounds", 1.0) <= 1)
        settle_old_log_probs(self, traj, rows.total)  # token policies: recompute only where inexact to skip
        gathered = self._gather_rewards(traj, combined)
        check = getattr(self.reward_set, "check_not_all_failed", None)
        if check is not None:  # a reward that failed on every sample: stop, never train on nothing
            check(gathered["raw"], gathered["raw_names"])
        # 3. advantages
        adv_all = estimation.iteration_advantages(self, traj, combined, gathered, rows)
        traj.mask = select_train_steps(
            traj.mask, self.resolved.timestep_fraction, self.resolved.timestep_selection, generator_for(t.seed, it, "steps"),
            rows=rows.canonical[rows.lo : rows.hi], total_rows=rows.total,
        )
        adv = traj.advantages
        keep = torch.isfinite(combined.cpu())  # samples whose reward failed (tolerated by max_failures) are not trained
        if preset.skip_zero_advantage:  # Flow-GRPO's diffusion presets; not the LLM ones (TRL/verl keep them)
            keep &= adv.abs().flatten(1).amax(1) > 0 if adv.dim() > 1 else adv.abs() > 0
        # 4. update
        update_metrics = self.update(traj, keep, it, rows=rows)
        if hasattr(self.estimator, "observe_shift"):  # stateful estimators that track policy drift (SPO)
            estimation.observe_shift(self, traj, rows)
        t2 = time.perf_counter()
        record = reporting.iteration_record(self, it, lr, traj, keep, gathered, adv_all, update_metrics)
        record.update(select_metrics)
        record["time/rollout"] = rollout_time
        record["time/rewards"] = (t1 - t0) - rollout_time
        record["time/update"] = t2 - t1
        self._last_traj = traj
        return record

    def update(self, traj: Trajectories, keep: Tensor, it: int, rows: GlobalRows | None = None) -> dict[str, float]:
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
        rows = rows if rows is not None else self.dist.global_rows(traj.group_ids, one_round=True)
        plan = self._minibatch_plan(traj, keep, rows)
        if plan is None:
            return {"update/steps": 0.0}
        idx_kept, local_of, all_groups = plan
        # stored steps differ between processes for token policies (completion widths): pad to the widest
        max_steps = int(self.dist.gather_uneven(torch.tensor([traj.num_steps if len(traj) else self._filler.num_steps])).max())
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
                    mb = self._minibatch(traj, local_of[order[start : start + t.train_batch_size]], max_steps)
                    if float(mb.global_counts[1]) == 0:
                        continue  # no trainable step in this minibatch on any process
                    bad = self._backward(mb, ctx, sums, wsums)
                    gn = self._clip_gradients()
                    if bad is None and not torch.isfinite(torch.as_tensor(gn)):
                        bad = f"gradient norm {float(gn)}"
                    if self.dist.any_process(bad is not None):  # skip the step: NaN/inf would corrupt weights and Adam state
                        self.optimizer.zero_grad(set_to_none=True)
                        skipped += 1
                        reporting.skip_nonfinite(self, it, start // t.train_batch_size, bad or "another process", skipped)
                        continue
                    if t.max_grad_norm > 0:
                        grad_norms.append(float(gn))
                    self._optimizer_step()
                    n_updates += 1
        self.policy.model.eval()
        return reporting.update_metrics(self, sums, wsums, grad_norms, n_updates, skipped)

    # ------------------------------------------------------------- 1-2. rollout and rewards
    def _rollout_and_score(self, it: int) -> tuple[Trajectories, Tensor, dict[str, float], float]:
        """Roll out this iteration's prompts and score them: ``(traj, combined reward [B], prompt
        selection metrics, seconds spent rolling out)``. Every process draws the same prompt
        indices and rolls out its contiguous share; each prompt's noise comes from its own stream
        keyed by its position in the global batch, so the samples do not depend on the number of
        processes. Calls of ``train.rollout_batch_size`` prompts: a call's rewards are scored while
        the next rolls out."""
        t, preset, acc = self.config.train, self.resolved.preset, self.accelerator
        self.policy.model.eval()
        timing = {"rollout": 0.0}

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
        sampling_weights = getattr(self.objective, "sampling_weights", None)
        weights = sampling_weights(self.policy) if sampling_weights is not None else contextlib.nullcontext()
        with weights, self.gathered_weights():
            traj, combined, _, select_metrics = fill_batch(
                self.selector, generate, t.prompts_per_iteration, generator=generator_for(t.seed, it, "prompts"),
                concat=getattr(self.policy, "concat_trajectories", None),
                rank=acc.process_index, world=acc.num_processes, gather=self.dist.gather_uneven,
            )
        table, names = traj.meta["reward_table"], traj.meta["reward_columns"]
        if acc.num_processes > 1 and getattr(self.reward_set, "combine_mode", None) == "gdpo" and table is not None:
            combined = estimation.combine_globally(self, table, list(names), traj.group_ids).to(combined.device)
        traj.meta["reward"] = combined  # [B] combined reward, sliced with the batch (LossInputs.rewards)
        return traj, combined, select_metrics, timing["rollout"]

    def _gather_rewards(self, traj: Trajectories, combined: Tensor) -> dict[str, Any]:
        """Every process's rewards: the combined reward, group ids, the (transformed) table the
        estimator reads and the reward models' own columns (for the metrics)."""
        table, names = traj.meta.pop("reward_table", None), list(traj.meta.pop("reward_columns", None) or [])
        raw_names = list(traj.reward_names)
        return {
            "rewards": self.dist.gather_uneven(combined.float().cpu()),
            "groups": self.dist.gather_uneven(traj.group_ids.cpu()),
            "table": self.dist.gather_uneven(table.float().cpu() if table is not None else torch.zeros(0, len(names))),
            "local_table": table, "names": names, "raw_names": raw_names,
            "raw": self.dist.gather_uneven(traj.rewards.float().cpu() if traj.rewards is not None else torch.zeros(0, len(raw_names))),
        }

    # ------------------------------------------------------------------------------ 4. update
    def _minibatch_plan(self, traj: Trajectories, keep: Tensor, rows: GlobalRows) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """``(kept rows in canonical order, canonical row → local row or -1, canonical row → its
        minibatch group or None)``, or None when no row is kept on any process."""
        all_keep = self.dist.gather_uneven(keep.to(torch.bool).cpu())
        canonical_keep = torch.zeros(rows.total, dtype=torch.bool)
        canonical_keep[rows.canonical] = all_keep
        idx_kept = torch.nonzero(canonical_keep).flatten()  # canonical (one-process) row numbers
        if len(idx_kept) == 0:
            return None
        local_of = torch.full((rows.total,), -1, dtype=torch.long)
        local_of[rows.canonical[rows.lo : rows.hi]] = torch.arange(rows.hi - rows.lo)
        groups = traj.meta.get("minibatch_groups")
        all_groups = None
        if groups is not None:  # rows that share states (a tree, a G²RPO step) stay contiguous
            offset = self.dist.group_offset(groups)
            gathered = self.dist.gather_uneven((groups.cpu().long() + offset))
            all_groups = torch.zeros(rows.total, dtype=torch.long)
            all_groups[rows.canonical] = gathered
        return idx_kept, local_of, all_groups

    def _minibatch(self, traj: Trajectories, local: Tensor, max_steps: int) -> _Minibatch:
        """This process's rows of a minibatch (``local``: local row numbers, -1 elsewhere) and its counts."""
        local = local[local >= 0]
        batch = traj.select(local) if len(local) else None
        counts = torch.zeros(2 + max_steps)  # [samples, Σ mask, Σ mask per step...]
        if batch is not None:
            m = batch.mask.float()
            counts[0], counts[1], counts[2 : 2 + m.shape[1]] = len(local), m.sum(), m.sum(0)
        return _Minibatch(batch, counts, self.dist.sum(counts))

    def _backward(self, mb: _Minibatch, ctx: UpdateContext, sums: dict[str, float], wsums: dict[str, float]) -> str | None:
        """Accumulate the minibatch's gradients over its step chunks (adding each chunk's metrics,
        weighted by its share, to ``sums``/``wsums``); returns where a loss was non-finite, or None."""
        acc, world, batch = self.accelerator, self.accelerator.num_processes, mb.batch
        normaliser = loss_normaliser(self.objective, self.resolved.preset.loss.aggregation)
        # (this process's rows, every process's rows) of the minibatch: objectives whose loss is a
        # mean over units the loop does not count (TRPA's pairs) rescale with them
        ctx.extras["minibatch_rows"] = (float(mb.counts[0]), float(mb.global_counts[0]))
        chunks = self.policy.step_chunks(batch if batch is not None else self._filler)
        real_chunks = len(chunks)
        if self.sharded and world > 1:
            # FSDP gathers each layer in every forward and backward (collectives): every process runs
            # every chunk, and as many chunks as the process with the most (the extra ones zero-weight)
            most = int(self.dist.gather_uneven(torch.tensor([len(chunks)])).max())
            chunks = chunks + [chunks[-1]] * (most - len(chunks))
        bad: str | None = None

        own_steps = batch.num_steps if batch is not None else 0

        def chunk_share(steps: Tensor, l_chunk: float) -> float:
            """This process's weight of a chunk's loss (``l_chunk``: its masked entries here)."""
            if normaliser == "token":
                return l_chunk / float(mb.global_counts[1])
            return sample_chunk_share(mb.global_counts[2:], steps, own_steps, float(mb.counts[0]), float(mb.global_counts[0]))

        def credit(metrics: dict[str, float], share: float) -> None:
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * share
                wsums[k] = wsums.get(k, 0.0) + share

        # chunks whose rows fit in train.max_rows_per_call share one transformer call and one backward
        # (each keeps its own loss and share: only the cost changes). One process or DDP (only the
        # last backward all-reduces); not FSDP, whose every forward and backward is a collective
        batched = batch is not None and batched_form(self.objective) is not None and not (self.sharded and world > 1)
        step_rows = getattr(self.policy, "rows_per_step", len)(batch) if batched else 0
        live = [c for c in chunks[:real_chunks] if float(batch.mask[:, c].sum()) > 0] if step_rows else []
        if live:  # (a process with no live chunk takes the per-chunk path: its zero-weight pass)
            groups = list(group_step_chunks(live, step_rows, self.config.train.max_rows_per_call))
            for gi, group in enumerate(groups):
                sync = contextlib.nullcontext() if (gi == len(groups) - 1 or world == 1) else acc.no_sync(self.prepared_model)
                with sync:
                    group_loss = 0.0
                    for steps, (loss, metrics) in zip(group, objective_chunk_losses(self.objective, self.policy, batch, group, ctx)):
                        if not torch.isfinite(loss) and bad is None:
                            bad = nonfinite_where(loss, batch, steps, metrics)
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
            data = batch if batch is not None and l_chunk > 0 else zero_weight_batch(batch, self._filler)
            # DDP all-reduces in the backward of the minibatch's last chunk only (forward and
            # backward of the others run under no_sync: local accumulation)
            sync = contextlib.nullcontext() if (last or world == 1) else acc.no_sync(self.prepared_model)
            with sync:
                loss, metrics = self.objective(self.policy, data, steps, ctx)
                if not torch.isfinite(loss) and bad is None:
                    bad = nonfinite_where(loss, data, steps, metrics)
                acc.backward(loss * (share * world))  # even when non-finite: every process joins the all-reduce
            if share > 0:
                credit(metrics, share)
        return bad

    def _clip_gradients(self) -> Any:
        """All-reduce gradients a DDP wrapper did not, clip to ``train.max_grad_norm``; the global
        gradient norm before clipping (unscaled under fp16 loss scaling)."""
        t = self.config.train
        if self.accelerator.num_processes > 1 and self.prepared_model is self._bare_model and not self.sharded:
            self.dist.all_reduce_gradients(self.params)  # a policy not called through forward: no DDP
        gn = self.accelerator.clip_grad_norm_(self.params, t.max_grad_norm) if t.max_grad_norm > 0 else grad_norm(self.params)
        return full_tensor(gn) if isinstance(gn, Tensor) else gn  # FSDP: the norm of the sharded gradients

    def _optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        on_update = getattr(self.objective, "on_update", None)
        if on_update is not None:  # per optimizer step (SAGE's moving anchor and adaptive β)
            on_update(self)

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

    # ------------------------------------------------------------------------------ access
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

    # --------------------------------------------------------------------------- evaluation
    def evaluate(self, *, tag: str = "eval") -> dict[str, float]:
        """Score deterministic samples of the held-out prompts (EMA weights if enabled): see
        :func:`flowrl.evaluation.evaluate`."""
        return evaluation.evaluate(self, tag=tag)

    # ---------------------------------------------------------------------- checkpointing
    def _prepare_run_dir(self) -> None:
        checkpointing.prepare_run_dir(self)

    def _resolve_checkpoint(self, spec: str) -> Path:
        return checkpointing.resolve_checkpoint(self, spec)

    def save_checkpoint(self, it: int) -> Path:
        """Write ``checkpoints/iter_NNNNNN`` atomically (see :mod:`flowrl.checkpointing`)."""
        return checkpointing.save_checkpoint(self, it)

    def load_checkpoint(self, path: Path) -> None:
        checkpointing.load_checkpoint(self, path, getattr(self, "_resume_plan", None))

    def export_lora(self) -> Path | None:
        """Save the evaluated weights' LoRA (see :func:`flowrl.checkpointing.export_lora`)."""
        return checkpointing.export_lora(self)
