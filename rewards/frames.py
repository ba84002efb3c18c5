"""Image rewards on video: score chosen frames of each video and aggregate them.

Any reward spec accepts four extra keys, handled here (``get`` and ``build_rewards`` wrap the
reward in :class:`FrameReward` when one of them is given)::

    reward:
      pickscore: {weight: 1.0, path: /models/PickScore_v1, frames: first}
      aesthetic: {weight: 0.5, head_path: ..., frames: every_k, frame_every: 8, frame_aggregate: min}

- ``frames``: ``first`` | ``middle`` | ``last`` | ``all`` | ``every_k`` (frames 0, k, 2k, …) or a
  list of frame indices (negative counts from the end). Default ``all``.
- ``frame_every``: k for ``every_k`` (default 4).
- ``frame_aggregate``: ``mean`` (default) or ``min`` over the chosen frames, per sample (and per
  component for rewards returning several).
- ``frame_batch_size``: frames per call of the wrapped reward (default: its own ``batch_size``),
  so a long video never reaches the image model all at once.

Images ``[B, C, H, W]`` pass through unchanged, so one config serves image and video models. The
wrapped reward sees frames as an image batch ``[B·K, C, H, W]`` with each prompt (and each
batch-first ``meta`` entry) repeated K times.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .interface import Reward

FRAME_OPTIONS = ("frames", "frame_every", "frame_aggregate", "frame_batch_size")
FRAME_CHOICES = ("first", "middle", "last", "all", "every_k")
AGGREGATES = ("mean", "min")


def select_frames(num_frames: int, frames: str | Sequence[int] = "all", *, every: int = 4) -> Tensor:
    """Indices (long ``[K]``) of the frames to score out of ``num_frames``."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("frames: an empty list selects nothing; give frame indices such as [0, -1].")
        idx = [int(i) + num_frames if int(i) < 0 else int(i) for i in frames]
        bad = [i for i in frames if not -num_frames <= int(i) < num_frames]
        if bad:
            raise ValueError(f"frames {bad} are out of range for videos of {num_frames} frames.")
        return torch.tensor(idx, dtype=torch.long)
    if frames == "first":
        return torch.tensor([0])
    if frames == "last":
        return torch.tensor([num_frames - 1])
    if frames == "middle":
        return torch.tensor([num_frames // 2])
    if frames == "all":
        return torch.arange(num_frames)
    if frames == "every_k":
        if every < 1:
            raise ValueError(f"frame_every must be ≥ 1, got {every}.")
        return torch.arange(0, num_frames, every)
    raise ValueError(f"frames must be one of {', '.join(FRAME_CHOICES)} or a list of indices; got {frames!r}.")


def aggregate_frames(scores: Tensor, how: str) -> Tensor:
    """``[B, K]`` per-frame scores → ``[B]`` (``mean`` or ``min``; NaN in any frame stays NaN)."""
    if how == "mean":
        return scores.mean(dim=1)
    if how == "min":
        return torch.where(torch.isnan(scores).any(1), torch.full_like(scores[:, 0], float("nan")), scores.min(dim=1).values)
    raise ValueError(f"frame_aggregate must be one of {', '.join(AGGREGATES)}; got {how!r}.")


def _repeat_meta(meta: dict | None, batch: int, k: int) -> dict | None:
    if not meta:
        return meta
    out: dict[str, Any] = {}
    for key, v in meta.items():
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch:
            out[key] = v.repeat_interleave(k, dim=0)
        elif isinstance(v, (list, tuple)) and len(v) == batch:
            out[key] = [x for x in v for _ in range(k)]
        else:
            out[key] = v
    return out


class FrameReward(Reward):
    """An image reward applied to chosen frames of videos ``[B, F, C, H, W]``, aggregated per sample
    (see the module docstring for the options). Returns what the wrapped reward returns (a ``[B]``
    tensor or a dict of ``[B]`` components)."""

    batch_size = None  # frames are chunked by frame_batch_size instead

    def __init__(self, reward: Any, *, frames: str | Sequence[int] = "all", frame_every: int = 4, frame_aggregate: str = "mean", frame_batch_size: int | None = None):
        if isinstance(frames, str) and frames not in FRAME_CHOICES:
            raise ValueError(f"frames must be one of {', '.join(FRAME_CHOICES)} or a list of indices; got {frames!r}.")
        if frame_aggregate not in AGGREGATES:
            raise ValueError(f"frame_aggregate must be one of {', '.join(AGGREGATES)}; got {frame_aggregate!r}.")
        self.reward = reward
        self.frames, self.every, self.how = frames, int(frame_every), frame_aggregate
        self.frame_batch_size = frame_batch_size or getattr(reward, "batch_size", None)
        self.name = getattr(reward, "name", "reward")
        self.device = getattr(reward, "device", "cpu")
        self.dtype = getattr(reward, "dtype", torch.float32)
        self.differentiable = getattr(reward, "differentiable", False)
        self.scale = f"{getattr(reward, 'scale', 'unspecified')} ({frame_aggregate} over frames: {frames})"
        self.component_weights = getattr(reward, "component_weights", None)

    def __call__(self, outputs: Any, prompts: list[str], meta: dict | None = None):
        if not isinstance(outputs, Tensor) or outputs.dim() != 5:
            return self.reward(outputs, prompts, meta)  # images (or anything not a video): unchanged
        b, f = outputs.shape[:2]
        idx = select_frames(f, self.frames, every=self.every).to(outputs.device)
        k = len(idx)
        flat = outputs.index_select(1, idx).flatten(0, 1)  # [B·K, C, H, W], sample-major
        flat_prompts = [p for p in prompts for _ in range(k)]
        flat_meta = _repeat_meta(meta, b, k)
        n = flat.shape[0]
        step = self.frame_batch_size or n
        pieces = []
        for s in range(0, n, step):
            from .interface import slice_batch

            pieces.append(self.reward(flat[s : s + step], flat_prompts[s : s + step], slice_batch(flat_meta, s, s + step, n) if flat_meta else flat_meta))
        if isinstance(pieces[0], dict):
            return {c: aggregate_frames(torch.cat([torch.as_tensor(p[c]).float().flatten() for p in pieces]).view(b, k), self.how) for c in pieces[0]}
        return aggregate_frames(torch.cat([torch.as_tensor(p).float().flatten() for p in pieces]).view(b, k), self.how)

    def metrics(self) -> dict[str, float]:
        fn = getattr(self.reward, "metrics", None)
        return dict(fn()) if callable(fn) else {}

    def __repr__(self) -> str:
        return f"FrameReward({self.reward!r}, frames={self.frames!r}, aggregate={self.how!r})"


def split_frame_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(reward kwargs, frame options)`` of a reward spec."""
    opts = {k: kwargs[k] for k in FRAME_OPTIONS if k in kwargs}
    rest = {k: v for k, v in kwargs.items() if k not in FRAME_OPTIONS}
    return rest, opts
