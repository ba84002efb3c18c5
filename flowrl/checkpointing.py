"""The run directory and checkpoints: the resolved config, ``checkpoints/iter_NNNNNN`` (trainable
weights, optimizer, EMA, objective/estimator/selector state, fp16 loss-scaler state, history),
written to a temporary folder and renamed so a crash never leaves a half-written checkpoint.

Not accelerate's ``save_state``/``load_state``: its loader for objects registered with
``register_for_checkpointing`` unpickles with ``weights_only=False`` (a checkpoint file could run
code), and under FSDP it writes the whole model — the frozen base too — at every checkpoint of a
LoRA run. Here every pickle goes through :mod:`flowrl.safeload` (``weights_only=True``), a LoRA run
stores only its LoRA, and no random state is needed: every draw derives from the seed and the
iteration."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from flowrl.atomic import atomic_write, state_bytes, written_aside  # noqa: F401  (atomic_write: re-exported)
from flowrl.sharding import full_state, like, shard_like_params


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return repr(x)



def existing_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints of a run directory, oldest first (``.tmp`` leftovers excluded)."""
    return sorted(p for p in (Path(run_dir) / "checkpoints").glob("iter_*[0-9]") if p.is_dir())


def check_fresh_run_dir(run_dir: Path, resume_from: str | None) -> None:
    """A new run (no ``train.resume_from``) never starts in a folder that holds another run's
    checkpoints: it would mix two runs' metrics and let a later ``resume_from: latest`` pick up a
    stale checkpoint. Raises a :class:`~flowrl.config.ConfigError` naming the ways out."""
    from flowrl.errors import ConfigError

    if resume_from:
        return
    found = existing_checkpoints(run_dir)
    if found:
        raise ConfigError(
            f"train.output_dir={run_dir} already holds checkpoints of an earlier run ({found[-1].name}, {len(found)} in all). "
            "Resume that run with train.resume_from=latest, choose a new train.output_dir, or delete the folder."
        )


def resolved_yaml(config: Any, resolved: Any, run_dir: Path | None = None) -> str:
    """The config as a run records it (``<run>/config.yaml``; ``flowrl config show`` prints it): every
    section, then ``resolved:`` — the preset with the config's changes applied, the learning rate and
    timestep selection it settles on, the input paths rewritten relative to the config file, and
    ``overrides``: the preset-owned settings the config changes (:func:`flowrl.algorithms.preset_overrides`).
    Plain UTF-8 (``μ``, ``→`` as they are)."""
    import yaml

    from flowrl.algorithms import preset_overrides

    data = config.to_dict()
    paths = {"output_dir": str(Path(run_dir).resolve())} if run_dir is not None else {}
    data["resolved"] = {
        "preset": jsonable(dataclasses.asdict(resolved.preset)),
        "learning_rate": resolved.learning_rate,
        "timestep_fraction": resolved.timestep_fraction,
        "timestep_selection": resolved.timestep_selection,
        "log_prob_reduce": config.sampler.log_prob_reduce,
        # inputs read from a config file are taken relative to its folder; outputs relative to the cwd
        "paths": {**paths, **getattr(config, "resolved_paths", {})},
        # preset-owned settings this config changes (printed when the run starts)
        "overrides": jsonable(preset_overrides(config)),
    }
    from flowrl.secrets import redact

    return yaml.safe_dump(redact(data), sort_keys=False, allow_unicode=True)


def prepare_run_dir(trainer: Any) -> None:
    """Create the run directory (main process only; the others wait): refuse a used one for a new
    run (:func:`check_fresh_run_dir`), write the resolved config, start ``metrics.jsonl``.

    Called only after a resume was validated (:func:`validate_resume`): a failed resume leaves the
    folder as it was. A resume with changed settings keeps the previous record as
    ``config.iter_NNNNNN.yaml`` (the settings in force up to that checkpoint)."""
    check_fresh_run_dir(trainer.run_dir, trainer.config.train.resume_from)
    acc = trainer.accelerator
    if not acc.is_main_process:
        acc.wait_for_everyone()
        return
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    (trainer.run_dir / "checkpoints").mkdir(exist_ok=True)
    # leftovers of a write that was killed (kill -9, power loss): never a finished checkpoint
    for old in [*(trainer.run_dir / "checkpoints").glob("iter_*.old"), trainer.run_dir / "lora.old"]:
        folder = old.with_name(old.name[: -len(".old")])
        if old.is_dir() and not folder.exists():  # killed between the two renames: the old one is the one
            os.replace(old, folder)
    for stale in [*(trainer.run_dir / "checkpoints").glob("iter_*.tmp"), *(trainer.run_dir / "checkpoints").glob("iter_*.old"), trainer.run_dir / "lora.tmp", trainer.run_dir / "lora.old"]:
        shutil.rmtree(stale, ignore_errors=True)
    text = resolved_yaml(trainer.config, trainer.resolved, trainer.run_dir)
    record = trainer.run_dir / "config.yaml"
    plan = getattr(trainer, "_resume_plan", None)
    if plan is not None and record.is_file() and record.read_text() != text:
        keep = trainer.run_dir / f"config.iter_{int(plan.state['iteration']):06d}.yaml"
        if not keep.exists():
            atomic_write(keep, record.read_text())
    atomic_write(record, text)
    if not trainer.config.train.resume_from:
        atomic_write(trainer.run_dir / "metrics.jsonl", "")
    acc.wait_for_everyone()


#: settings a resume may change without --allow-config-change: where and how long the run goes, how
#: it reports; none of them changes what an iteration computes
RESUME_FREE_SETTINGS = (
    "train.resume_from", "train.iterations", "train.output_dir", "train.progress", "train.report_to", "train.save_every",
    "train.save_total_limit", "train.eval_every", "train.eval_images", "train.allow_config_change", "model.device",
)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def changed_settings(recorded: dict, config: Any) -> list[str]:
    """``field: old -> new`` for every setting of ``config`` that differs from a run's recorded
    ``config.yaml`` (minus :data:`RESUME_FREE_SETTINGS`; a redacted secret counts as unchanged)."""
    from flowrl.secrets import REDACTED, redact

    old = _flatten({k: v for k, v in (recorded or {}).items() if k != "resolved"})
    new = _flatten(jsonable(redact(config.to_dict())))
    out = []
    for key in sorted(set(old) | set(new)):
        if key in RESUME_FREE_SETTINGS:
            continue
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, tuple):
            a = list(a)
        if a != b and REDACTED not in (a, b):
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


@dataclasses.dataclass
class ResumePlan:
    """What :func:`validate_resume` read and checked; :func:`load_checkpoint` applies it."""

    path: Path
    state: dict
    weights: dict


def checkpoint_to_resume(run_dir: Path, spec: str) -> Path:
    """The checkpoint ``train.resume_from`` names (``latest``: the run's newest)."""
    if spec == "latest":
        ckpts = existing_checkpoints(run_dir)
        if not ckpts:
            raise FileNotFoundError(f"train.resume_from=latest but {Path(run_dir) / 'checkpoints'} holds no checkpoint.")
        return ckpts[-1]
    path = Path(spec)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"train.resume_from: {path} is not a flowrl checkpoint (no state.json).")
    return path


def check_resume_settings(config: Any, run_dir: Path) -> None:
    """Before any model loads: the checkpoint exists, its state is readable, ``train.iterations``
    reaches it, and the settings equal the run's recorded ones (or ``train.allow_config_change``).
    Raises a one-line :class:`~flowrl.config.ConfigError` / ``CheckpointError``; writes nothing."""
    from flowrl.errors import ConfigError

    t = config.train
    path = checkpoint_to_resume(run_dir, t.resume_from)
    state = read_state(path)
    done = int(state["iteration"])
    if t.iterations < done:
        raise ConfigError(
            f"train.iterations={t.iterations} is below the checkpoint's iteration {done} ({path}); the run's metrics "
            f"would be relabelled. Set train.iterations ≥ {done} (the run's total length)."
        )
    record = path.parent.parent / "config.yaml"
    if not record.is_file():
        return
    import yaml

    try:
        recorded = yaml.safe_load(record.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{record}: unreadable run record ({type(exc).__name__}); resume with the config file you trained with.") from None
    diff = changed_settings(recorded, config)
    if diff and not t.allow_config_change:
        raise ConfigError(
            f"train.resume_from: these settings differ from the run's ({record}): {'; '.join(diff)}. "
            "Resume with the run's settings, or pass --allow-config-change (train.allow_config_change=true) to continue with the new ones."
        )


def read_state(path: Path) -> dict:
    from flowrl.safeload import CheckpointError

    try:
        state = json.loads((path / "state.json").read_text())
        int(state["iteration"]), list(state["history"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / 'state.json'}: unreadable checkpoint state ({type(exc).__name__}: {exc}); resume from another checkpoint.") from None
    return state


def validate_resume(trainer: Any, path: Path) -> ResumePlan:
    """After the model is built, before anything is written: the checkpoint's files are readable
    and its trainable weights have this model's names and shapes (same LoRA rank and targets)."""
    from flowrl.errors import ConfigError
    from flowrl.safeload import load_safetensors, load_state

    state = read_state(path)
    weights = load_safetensors(path / "trainable.safetensors")
    params = {n: p for n, p in trainer.policy.model.named_parameters() if p.requires_grad}
    missing = sorted(set(weights) - set(params))
    absent = sorted(set(params) - set(weights))
    t = trainer.config.train
    setup = f"train.lora_rank={t.lora_rank}, train.lora_targets={t.lora_targets}"
    if missing or absent:
        example = missing[0] if missing else absent[0]
        raise ConfigError(
            f"train.resume_from: {path} holds other trainable weights than this model with {setup} "
            f"({len(missing)} not in the model, {len(absent)} not in the checkpoint, e.g. {example}); resume with the LoRA "
            "rank, targets and model the checkpoint was made with."
        )
    for n, v in weights.items():
        shape = tuple(params[n].shape)  # a DTensor (FSDP) reports its whole shape
        if tuple(v.shape) != shape:
            raise ConfigError(
                f"train.resume_from: {path} has {n} of shape {tuple(v.shape)}, this model {shape} with {setup}; "
                "resume with the LoRA rank the checkpoint was made with."
            )
    for name in ("optimizer.pt", "ema.pt", "objective.pt", "estimator.pt", "selector.pt", "scaler.pt"):
        if (path / name).is_file() or name == "optimizer.pt":
            load_state(path / name)  # readable (weights_only=True) before anything is written
    return ResumePlan(path=path, state=state, weights=weights)


def resolve_checkpoint(trainer: Any, spec: str) -> Path:
    return checkpoint_to_resume(trainer.run_dir, spec)


def save_checkpoint(trainer: Any, it: int) -> Path:
    """Write ``checkpoints/iter_NNNNNN`` atomically: trainable weights, optimizer, EMA,
    estimator state, history. A crash mid-write leaves only a ``.tmp`` folder behind.

    With several processes the main one writes (after every update all processes hold the same
    weights, optimizer and estimator state, and every random draw derives from the seed and the
    iteration, so there is no per-process state to keep); the others wait until it is complete.
    ``train.save_total_limit`` deletes the oldest checkpoints beyond the limit."""
    acc = trainer.accelerator
    sharded = getattr(trainer, "sharded", False)
    if sharded:  # FSDP: gather whole tensors on every process (collectives), then the main one writes
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        named = trainer.trainable_state_dict()
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        optimizer_state = get_optimizer_state_dict(trainer._bare_model, inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        ema_state = full_state(trainer.ema.state_dict()) if trainer.ema is not None else None
        obj_state = full_state(trainer.objective.state_dict()) if hasattr(trainer.objective, "state_dict") else None
    if not acc.is_main_process:
        acc.wait_for_everyone()
        return trainer.run_dir / "checkpoints" / f"iter_{it:06d}"
    final = trainer.run_dir / "checkpoints" / f"iter_{it:06d}"
    from safetensors.torch import save_file

    if not sharded:
        named = {n: p.detach().cpu().contiguous() for n, p in trainer.policy.model.named_parameters() if p.requires_grad}
        optimizer_state = trainer.optimizer.state_dict()
        ema_state = trainer.ema.state_dict() if trainer.ema is not None else None
        obj_state = trainer.objective.state_dict() if hasattr(trainer.objective, "state_dict") else None
    needed = state_bytes([named, optimizer_state, ema_state, obj_state])
    # written aside (iter_NNNNNN.tmp) and renamed: a crash or a full disk never leaves half a checkpoint
    with written_aside(final, folder=True, needed_bytes=needed) as tmp:
        save_file(named, str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        if ema_state is not None:
            torch.save(ema_state, tmp / "ema.pt")
        if obj_state is not None:
            torch.save(obj_state, tmp / "objective.pt")
        est_state = trainer.estimator.state_dict() if hasattr(trainer.estimator, "state_dict") else None
        if est_state is not None:
            torch.save(est_state, tmp / "estimator.pt")
        if hasattr(trainer.selector, "state_dict"):
            torch.save(trainer.selector.state_dict(), tmp / "selector.pt")
        scaler = getattr(acc, "scaler", None)
        if scaler is not None:  # fp16 loss scaling: the current scale and growth counter (else a resume restarts at 2^16)
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        state = {"iteration": it, "history": trainer.history,
                 # the story a resume continues: the schedule's planned length and the base evaluation
                 "schedule_iterations": int(getattr(trainer, "schedule_iterations", trainer.config.train.iterations)),
                 "eval_base": (getattr(trainer, "_evals", None) or {}).get("base")}
        if sharded:  # the optimizer state is keyed by parameter name (torch.distributed.checkpoint's full form)
            state["optimizer_format"] = "full_by_name"
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    limit = trainer.config.train.save_total_limit
    if limit:
        for old in existing_checkpoints(trainer.run_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load_checkpoint(trainer: Any, path: Path, plan: ResumePlan | None = None) -> None:
    from flowrl.safeload import CheckpointError, load_safetensors, load_state

    if plan is None or plan.path != path:
        state = read_state(path)
        weights = load_safetensors(path / "trainable.safetensors")
    else:
        state, weights = plan.state, plan.weights
    params = dict(trainer.policy.model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"checkpoint {path} has weights this model lacks (e.g. {missing[0]}); was it made with another model or LoRA setup?")
    with torch.no_grad():
        for n, v in weights.items():
            params[n].copy_(like(params[n], v))  # this process's shard under FSDP
    optimizer_state = load_state(path / "optimizer.pt")  # weights_only=True: no pickled code runs
    if state.get("optimizer_format") == "full_by_name" or getattr(trainer, "sharded", False):
        if state.get("optimizer_format") != "full_by_name":
            raise CheckpointError(f"{path}: this checkpoint's optimizer state was saved without FSDP; resume it with the launch config it was made with (DDP or one process).")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        set_optimizer_state_dict(trainer._bare_model, inner, optimizer_state, options=StateDictOptions(full_state_dict=True))
    else:
        trainer.optimizer.load_state_dict(optimizer_state)
    shard = lambda st: shard_like_params(st, trainer.params)  # noqa: E731  (whole tensors -> this process's shards)
    if trainer.ema is not None and (path / "ema.pt").is_file():
        trainer.ema.load_state_dict(shard(load_state(path / "ema.pt")))
    if (path / "objective.pt").is_file() and hasattr(trainer.objective, "load_state_dict"):
        trainer.objective.load_state_dict(shard(load_state(path / "objective.pt")))
    if (path / "estimator.pt").is_file() and hasattr(trainer.estimator, "load_state_dict"):
        trainer.estimator.load_state_dict(load_state(path / "estimator.pt"))
    if (path / "selector.pt").is_file() and hasattr(trainer.selector, "load_state_dict"):
        trainer.selector.load_state_dict(load_state(path / "selector.pt"))
    scaler = getattr(trainer.accelerator, "scaler", None)
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(load_state(path / "scaler.pt"))
    trainer.start_iteration = it = int(state["iteration"])
    trainer.history = list(state["history"])
    rows = resumed_metrics(trainer.run_dir / "metrics.jsonl", it, trainer.history, extending=trainer.config.train.iterations > it)
    base = state.get("eval_base") or next(({k[5:]: v for k, v in r.items() if k.startswith("eval/")} for r in rows if r.get("iteration") == 0 and "reward/mean" not in r), None)
    if base:
        trainer._evals = {**(getattr(trainer, "_evals", None) or {}), "base": base}
    note = plan_schedule(trainer, state.get("schedule_iterations"), it)
    if trainer.accelerator.is_main_process:
        # metrics.jsonl keeps the run's story up to the checkpoint: the base evaluation, every
        # iteration and evaluation before it (records past it — a crash's leftovers — are dropped)
        atomic_write(trainer.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        if note:
            print(note, flush=True)
    trainer.accelerator.wait_for_everyone()


def resumed_metrics(path: Path, iteration: int, history: list[dict[str, Any]], *, extending: bool) -> list[dict[str, Any]]:
    """The ``metrics.jsonl`` records a run resumed at ``iteration`` keeps: every record before it,
    the iteration's own record, and an evaluation-only record at it (the final evaluation of the run
    being extended) when the run goes on past it. Without a readable file: the checkpoint's
    ``history`` (training records only)."""
    rows: list[dict[str, Any]] = []
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if not isinstance(r, dict) or not isinstance(r.get("iteration"), (int, float)):
                continue
            i = int(r["iteration"])
            if i < iteration or (i == iteration and ("reward/mean" in r or extending)) or (i == 0 and "reward/mean" not in r):
                rows.append(r)
    trained = {int(r["iteration"]) for r in rows if "reward/mean" in r}
    if trained == {int(r["iteration"]) for r in history if "iteration" in r}:
        return rows
    # the file does not match the checkpoint (missing, cut, or edited): its base evaluation, then the checkpoint's history
    base = [r for r in rows if "reward/mean" not in r and int(r["iteration"]) == 0]
    return base + list(history)


def plan_schedule(trainer: Any, planned: int | None, iteration: int) -> str:
    """Set ``trainer.schedule_iterations`` for a resumed run and say what happens to the learning
    rate when ``train.iterations`` changed: a cosine schedule keeps its original plan (the extra
    iterations run at its final rate, ``lr_min_ratio × learning_rate``); a checkpoint without the
    record (older flowrl) re-plans over the new length, and says so."""
    from flowrl.objectives import learning_rate_at

    t = trainer.config.train
    total = t.iterations
    if planned is None:
        trainer.schedule_iterations = total
        if t.lr_schedule != "constant" and total != iteration:
            return (f"[flowrl] resume: this checkpoint does not record its learning-rate plan; the {t.lr_schedule} schedule is "
                    f"re-planned over train.iterations={total} from iteration {iteration + 1} "
                    f"(lr {learning_rate_at(iteration + 1, total, trainer.resolved.learning_rate, t.lr_schedule, t.lr_min_ratio):.3g}).")
        return ""
    trainer.schedule_iterations = int(planned)
    if t.lr_schedule == "constant" or total == planned:
        return ""
    lr = lambda i: learning_rate_at(min(i, planned), planned, trainer.resolved.learning_rate, t.lr_schedule, t.lr_min_ratio)  # noqa: E731
    if total > planned:
        return (f"[flowrl] resume: train.iterations {planned} -> {total}. The {t.lr_schedule} learning-rate schedule keeps its "
                f"original plan over {planned} iterations; iterations {max(planned, iteration) + 1}-{total} run at its final rate "
                f"{lr(planned):.3g} (lr_min_ratio × learning_rate). For a new schedule, start a new run from this one's weights.")
    return (f"[flowrl] resume: train.iterations {planned} -> {total}. The {t.lr_schedule} learning-rate schedule keeps its plan "
            f"over {planned} iterations, so the run stops at lr {lr(total):.3g}, before the schedule's end.")


def export_lora(trainer: Any) -> Path | None:
    """Save the evaluated weights' LoRA — the EMA weights when ``train.ema_decay`` > 0, else the
    live ones — in the diffusers format (``pipe.load_lora_weights(dir)`` loads them), or the
    peft format for language models; ``<run>/weights.json`` records which."""
    out = trainer.run_dir / "lora"
    saver = getattr(trainer.policy, "save_lora", None)
    exported = None
    if trainer.config.train.lora_rank > 0 and saver is not None:
        weights = trainer.ema.active if trainer.ema is not None else contextlib.nullcontext
        # written aside (lora.tmp) and renamed over lora/: never half a LoRA folder
        if trainer.sharded:  # every process gathers its shards of the (EMA) weights; the main one writes
            with weights():
                state = trainer.trainable_state_dict()
            if trainer.accelerator.is_main_process:
                with written_aside(out, folder=True) as tmp:
                    saver(tmp, state_dict=state)
        elif trainer.accelerator.is_main_process:
            with weights(), written_aside(out, folder=True) as tmp:
                saver(tmp)
        exported = out
    if not trainer.accelerator.is_main_process:
        return None
    info = {
        "evaluated": "ema" if trainer.ema is not None else "live",
        "lora": "lora" if exported is not None else None,
        "lora_weights": ("ema" if trainer.ema is not None else "live") if exported is not None else None,
        "ema": trainer.ema.describe() if trainer.ema is not None else None,
    }
    atomic_write(trainer.run_dir / "weights.json", json.dumps(info, indent=1) + "\n")
    return exported
