"""Evaluation: deterministic samples of the held-out prompts (the same in every evaluation of a
run, in ``flowrl eval`` and in the gallery), scored per reward column and per category."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import Tensor

from flowrl.config import TrainConfig
from flowrl.prompt_selection import shard_bounds
from flowrl.prompts import category_column, category_means, reward_meta
from flowrl.reporting import log_eval_images, phase
from flowrl.seeding import PromptGenerators


def eval_sampling_options(config: TrainConfig) -> dict[str, Any]:
    """Keywords of a flow policy's ``generate`` for evaluation: ``num_steps`` (``sampler.eval_num_steps``)
    and, where set, ``height``/``width``/``guidance_scale`` from ``sampler.eval_height``,
    ``eval_width``, ``eval_guidance_scale`` (evaluation at another size or CFG than training)."""
    if config.model.kind != "flow":
        return {}
    s = config.sampler
    out: dict[str, Any] = {"num_steps": s.eval_num_steps}
    for key, value in (("height", s.eval_height), ("width", s.eval_width), ("guidance_scale", s.eval_guidance_scale)):
        if value is not None:
            out[key] = value
    return out


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
    steps = eval_sampling_options(config)
    outputs = []
    for start in range(lo, hi, 64):
        stop = min(start + 64, hi)
        with autocast():
            outputs.append(policy.generate(expanded[start:stop], generator=noise.narrow(start, stop), **steps))
    outputs = torch.cat(outputs) if isinstance(outputs[0], Tensor) else [o for chunk in outputs for o in chunk]
    return outputs, expanded


@torch.no_grad()
def evaluate(trainer: Any, *, tag: str = "eval") -> dict[str, float]:
    """Score deterministic samples of the held-out prompts (EMA weights if enabled)."""
    t = trainer.config.train
    acc = trainer.accelerator
    n_samples = len(trainer.eval_prompts) * t.eval_samples_per_prompt
    metadata = [m for m in trainer.eval_set.metadata for _ in range(t.eval_samples_per_prompt)]
    weights = trainer.ema.active() if trainer.ema is not None else contextlib.nullcontext()
    # processes split the samples (each has its own noise stream, see eval_samples) and gather
    split = n_samples >= acc.num_processes > 1
    lo, hi = shard_bounds(n_samples, acc.process_index, acc.num_processes) if split else (0, n_samples)
    with weights, trainer.gathered_weights(), phase(f"eval ({tag}): {hi - lo} samples", enabled=t.progress and acc.is_main_process):
        outputs, prompts = eval_samples(trainer.policy, trainer.eval_prompts, trainer.config, autocast=trainer.autocast, rows=(lo, hi))
    meta = {**reward_meta(metadata[lo:hi]), "eval": True}
    table, names = trainer.reward_set.score(outputs, prompts[lo:hi], meta)
    if getattr(trainer, "track", None) is not None:  # reward.track: its columns join the table as track/<column>
        table, names = trainer.track.extend(table, names, outputs, prompts[lo:hi], meta)
    if split:
        table = trainer.dist.gather_uneven(table.float().cpu())
        outputs = trainer.dist.gather_uneven(outputs.float().cpu()) if isinstance(outputs, Tensor) else trainer.dist.gather_list(outputs)
    trainer._eval_outputs = getattr(trainer, "_eval_outputs", {})
    trainer._eval_outputs[tag] = (outputs, prompts)
    trainer._eval_tables = getattr(trainer, "_eval_tables", {})
    trainer._eval_tables[tag] = (table, list(names))  # per sample, for `flowrl eval` / the gallery
    result = {n: float(table[:, i].nanmean()) for i, n in enumerate(names)}
    result["num_prompts"] = float(len(trainer.eval_prompts))
    result["num_samples"] = float(len(prompts))
    key = category_column(metadata, t.eval_category)
    if key is not None:  # GenEval-style breakdown: <reward>/<category>, num_prompts/<category>
        labels = [m.get(key) for m in metadata]
        for i, n in enumerate(names):
            for label, (mean, _) in category_means(table[:, i], labels).items():
                result[f"{n}/{label}"] = mean
        for label, (_, count) in category_means(torch.zeros(len(labels)), labels).items():
            result[f"num_prompts/{label}"] = float(count // t.eval_samples_per_prompt)
    log_eval_images(trainer, tag, outputs, prompts)
    trainer._evals = getattr(trainer, "_evals", {})
    trainer._evals[tag] = result
    return result
