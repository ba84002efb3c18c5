"""Experiment trackers through accelerate (``train.report_to``).

accelerate's tracker classes (``accelerate.tracking``: TensorBoard, Weights & Biases, MLflow,
Comet, Aim, ClearML, DVCLive, SwanLab, Trackio) are built for the run, started, and attached to
the trainer's ``Accelerator``, so ``accelerator.log`` and ``accelerator.get_tracker(name)`` reach
them as in any accelerate script (only the main process writes). TensorBoard writes to
``<run>/tensorboard``; the others to their own default places, with project ``flowrl`` and the
run folder's name as the run name.

Logged: every per-iteration metric record (finite numbers), and at every evaluation a few
evaluation images (``eval/images``, one per prompt, upscaled to ≥ 64 px with nearest neighbour)
with their prompts as text (``eval/prompts``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from flowrl.errors import ConfigError


def tracker_names(report_to: str | Sequence[str] | None) -> list[str]:
    """``train.report_to`` → the tracker names to start (validated: known and installed)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    names = [str(n).strip().lower() for n in names]
    if names in (["none"], []):
        return []
    available = [str(t) for t in get_available_trackers()]
    if "all" in names:
        return available
    out: list[str] = []
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(
                f"train.report_to: unknown tracker '{name}'. Known: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}, all, none."
            )
        if name not in available:
            package = {"comet_ml": "comet-ml"}.get(name, name)
            raise ConfigError(
                f"train.report_to: tracker '{name}' is not installed. Install it (pip install {package}) "
                "or remove it from train.report_to (default: tensorboard; 'none' logs to metrics.jsonl only)."
            )
        if name not in out:
            out.append(name)
    return out


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
    return out


def start_trackers(report_to: str | Sequence[str] | None, run_dir: str | Path, *, config: dict[str, Any] | None = None) -> list[Any]:
    """Build and start accelerate trackers for ``report_to`` (call on the main process only)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    run_dir = Path(run_dir)
    trackers = []
    for name in tracker_names(report_to):
        cls = LOGGER_TYPE_TO_CLASS[name]
        if name == "tensorboard":
            tracker = cls("tensorboard", run_dir)  # → <run>/tensorboard, where runs always logged
        elif name == "mlflow":
            tracker = cls(experiment_name="flowrl", run_name=run_dir.name)
        elif getattr(cls, "requires_logging_directory", False):
            tracker = cls("flowrl", logging_dir=str(run_dir))
        elif name == "wandb":
            tracker = cls("flowrl", name=run_dir.name)
        else:
            tracker = cls("flowrl")
        tracker.start()
        if config is not None and name != "tensorboard":  # TensorBoard's hparams writes a folder per call
            tracker.store_init_configuration(_flat(config))
        trackers.append(tracker)
    return trackers


def log_metrics(trackers: Sequence[Any], record: dict[str, Any], step: int) -> None:
    """Every finite number of ``record`` (``iteration`` is the step, not a metric)."""
    values = {k: float(v) for k, v in record.items() if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if not values:
        return
    for tracker in trackers:
        tracker.log(values, step=step)


def preview_images(outputs: Any, *, count: int, min_size: int = 64) -> Tensor | None:
    """The first ``count`` images of ``outputs`` as ``[N, C, H, W]`` float in [0, 1], upscaled with
    nearest neighbour to at least ``min_size`` px (video: first frame; text outputs: None)."""
    if count <= 0 or not isinstance(outputs, Tensor) or outputs.dim() not in (4, 5):
        return None
    images = outputs[:count].detach().float().cpu()
    if images.dim() == 5:  # [N, F, C, H, W] video → first frame
        images = images[:, 0]
    side = min(images.shape[-2:])
    if 0 < side < min_size:
        images = torch.nn.functional.interpolate(images, scale_factor=math.ceil(min_size / side), mode="nearest")
    return images.clamp(0, 1)


def log_images(trackers: Sequence[Any], images: Tensor, prompts: Sequence[str], step: int, *, tag: str = "eval/images") -> None:
    """``images`` ``[N, C, H, W]`` in [0, 1] to every tracker that takes images, prompts as text."""
    import numpy as np

    caption = "\n".join(f"{i}: {p}" for i, p in enumerate(prompts))
    for tracker in trackers:
        if getattr(tracker, "name", "") == "tensorboard":
            tracker.log_images({tag: images}, step=step, dataformats="NCHW")
        elif hasattr(tracker, "log_images"):
            arrays = [(img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for img in images]
            tracker.log_images({tag: arrays}, step=step)
        tracker.log({tag.rsplit("/", 1)[0] + "/prompts": caption}, step=step)


def finish(trackers: Sequence[Any]) -> None:
    for tracker in trackers:
        tracker.finish()
