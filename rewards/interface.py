"""The reward interface: the :class:`Reward` base class, :class:`RewardError`, and the helpers
that cut batch-first values (what every reward module, the frame wrapper and the reward set share)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor


class RewardError(RuntimeError):
    """A reward failed (raised, or returned NaN/inf) on more samples than allowed."""


class Reward:
    """Base class of a reward model; subclass and implement :meth:`__call__`.

    Attributes (class-level defaults; override per class or instance):

    - ``name``: short name, used as the metric suffix ``reward/<name>``.
    - ``differentiable``: True if gradients flow from the score back into ``outputs``.
    - ``device`` / ``dtype``: where and in which precision the model runs; inputs are moved there.
    - ``batch_size``: the largest batch one call may receive (``None``: any).
    - ``scale``: a note of the output range, e.g. ``"cosine ~0.2-0.4"``.
    - ``component_weights``: for dict-returning rewards, default weight of each component inside
      the reward's total (missing components weigh 1; 0 logs a component without using it).
    - ``modalities``: what the reward scores — ``("text",)``, ``("image",)``, ``("image", "video")``,
      ... (None: anything); a run stops before loading anything when no model output fits.
    - ``isolate_failures``: when a call on a batch raises, score its samples one by one so only the
      failing ones become NaN (True); False for rewards whose score depends on the whole batch
      (in-group comparisons).
    """

    name: str = "reward"
    differentiable: bool = False
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    batch_size: int | None = None
    scale: str = "unspecified"
    component_weights: Mapping[str, float] | None = None
    isolate_failures: bool = True
    modalities: tuple[str, ...] | None = None

    def __call__(self, outputs: Any, prompts: list[str], meta: dict | None = None) -> Tensor | dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(outputs, prompts, meta=None).")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={str(self.device)!r}, scale={self.scale!r})"


def batch_size_of(outputs: Any) -> int:
    """Number of samples in ``outputs`` (tensor: first dim; sequence: its length)."""
    if isinstance(outputs, Tensor):
        return int(outputs.shape[0])
    return len(outputs)


def slice_batch(value: Any, start: int, stop: int, batch: int) -> Any:
    """Rows ``start:stop`` of anything batch-first (tensor/list/tuple of length ``batch``; dicts
    recursively); other values pass through unchanged."""
    if isinstance(value, Tensor):
        return value[start:stop] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, (list, tuple)) and len(value) == batch:
        return value[start:stop]
    if isinstance(value, dict):
        return {k: slice_batch(v, start, stop, batch) for k, v in value.items()}
    return value
