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

from flowrl.sharding import full_state, like, shard_like_params


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def prepare_run_dir(trainer: Any) -> None:
    """Create the run directory (main process only; the others wait): refuse a used one for a new
    run (:func:`check_fresh_run_dir`), write the resolved config, start ``metrics.jsonl``."""
    check_fresh_run_dir(trainer.run_dir, trainer.config.train.resume_from)
    acc = trainer.accelerator
    if not acc.is_main_process:
        acc.wait_for_everyone()
        return
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    (trainer.run_dir / "checkpoints").mkdir(exist_ok=True)
    resolved = trainer.config.to_dict()
    resolved["resolved"] = {
        "preset": jsonable(dataclasses.asdict(trainer.resolved.preset)),
        "learning_rate": trainer.resolved.learning_rate,
        "timestep_fraction": trainer.resolved.timestep_fraction,
        "timestep_selection": trainer.resolved.timestep_selection,
        "log_prob_reduce": trainer.config.sampler.log_prob_reduce,
        # inputs read from a config file are taken relative to its folder; outputs relative to the cwd
        "paths": {"output_dir": str(trainer.run_dir.resolve()), **getattr(trainer.config, "resolved_paths", {})},
    }
    import yaml

    atomic_write(trainer.run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    if not trainer.config.train.resume_from:
        (trainer.run_dir / "metrics.jsonl").write_text("")
    acc.wait_for_everyone()


def resolve_checkpoint(trainer: Any, spec: str) -> Path:
    if spec == "latest":
        ckpts = existing_checkpoints(trainer.run_dir)
        if not ckpts:
            raise FileNotFoundError(f"train.resume_from=latest but {trainer.run_dir / 'checkpoints'} holds no checkpoint.")
        return ckpts[-1]
    path = Path(spec)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"train.resume_from: {path} is not a flowrl checkpoint (no state.json).")
    return path


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
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from safetensors.torch import save_file

    if not sharded:
        named = {n: p.detach().cpu().contiguous() for n, p in trainer.policy.model.named_parameters() if p.requires_grad}
        optimizer_state = trainer.optimizer.state_dict()
        ema_state = trainer.ema.state_dict() if trainer.ema is not None else None
        obj_state = trainer.objective.state_dict() if hasattr(trainer.objective, "state_dict") else None
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
    state = {"iteration": it, "history": trainer.history}
    if sharded:  # the optimizer state is keyed by parameter name (torch.distributed.checkpoint's full form)
        state["optimizer_format"] = "full_by_name"
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    limit = trainer.config.train.save_total_limit
    if limit:
        for old in existing_checkpoints(trainer.run_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load_checkpoint(trainer: Any, path: Path) -> None:
    from flowrl.safeload import CheckpointError, load_safetensors, load_state

    try:
        state = json.loads((path / "state.json").read_text())
        int(state["iteration"]), list(state["history"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / 'state.json'}: unreadable checkpoint state ({type(exc).__name__}: {exc}); resume from another checkpoint.") from None
    weights = load_safetensors(path / "trainable.safetensors")
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
    trainer.start_iteration = int(state["iteration"])
    trainer.history = list(state["history"])
    # rewrite metrics.jsonl to exactly the checkpoint's history (drop records past it)
    if trainer.accelerator.is_main_process:
        atomic_write(trainer.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in trainer.history))
    trainer.accelerator.wait_for_everyone()


def export_lora(trainer: Any) -> Path | None:
    """Save the evaluated weights' LoRA — the EMA weights when ``train.ema_decay`` > 0, else the
    live ones — in the diffusers format (``pipe.load_lora_weights(dir)`` loads them), or the
    peft format for language models; ``<run>/weights.json`` records which."""
    out = trainer.run_dir / "lora"
    saver = getattr(trainer.policy, "save_lora", None)
    exported = None
    if trainer.config.train.lora_rank > 0 and saver is not None:
        weights = trainer.ema.active if trainer.ema is not None else contextlib.nullcontext
        if trainer.sharded:  # every process gathers its shards of the (EMA) weights; the main one writes
            with weights():
                state = trainer.trainable_state_dict()
            if trainer.accelerator.is_main_process:
                saver(out, state_dict=state)
        elif trainer.accelerator.is_main_process:
            with weights():
                saver(out)
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
