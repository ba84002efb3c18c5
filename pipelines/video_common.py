"""Plumbing shared by the video adapters (Wan, HunyuanVideo 1.5) and the large image families
(Qwen-Image): frame count, latent noise of any rank, adapter options, memory switches, and
chunked decoding.

Layout conventions: latents keep the transformer's own layout (``[B, C, F', h, w]`` for video,
packed ``[B, N, 4C]`` for Qwen-Image); decoded video is ``[B, F, C, H, W]`` float32 in [0, 1]
(frames first, so ``video[:, k]`` is frame k as an image batch); images stay ``[B, C, H, W]``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from flowrl.pipelines.sd3 import cfg_combine  # noqa: F401  (re-exported: one CFG rule for every family)


def decode_in_chunks(decode_one: Callable[[Tensor], Tensor], latents: Tensor, chunk: int | None) -> Tensor:
    """``decode_one`` on ``chunk`` samples at a time (all at once when ``chunk`` is None/0), results
    concatenated on the batch dim. Bounds VAE activation memory for video."""
    if not chunk or chunk >= latents.shape[0]:
        return decode_one(latents)
    return torch.cat([decode_one(latents[i : i + chunk]) for i in range(0, latents.shape[0], chunk)])


def to_unit_video(video: Tensor) -> Tensor:
    """VAE output ``[B, C, F, H, W]`` in [-1, 1] → ``[B, F, C, H, W]`` float32 in [0, 1] (the stock
    ``VideoProcessor.postprocess_video`` with ``output_type="pt"``: ``(x/2 + 0.5).clamp(0, 1)``)."""
    return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()


class VideoAdapterMixin:
    """Options and helpers of the video / large-image adapters (mixed in before ``FlowAdapter``).

    Options (``configure(**options)``, from the config: ``sampler.num_frames``,
    ``sampler.negative_prompt``, ``model.vae_tiling``, ``model.vae_slicing``,
    ``model.decode_batch_size``):

    - ``num_frames``: frames to generate (default: the family's stock default).
    - ``negative_prompt``: the negative prompt used by CFG (default: the stock one).
    - ``decode_batch_size``: videos per VAE decode call (1: one at a time, the least memory).
    """

    default_num_frames: int = 1
    num_frames: int | None = None
    negative_prompt: str = ""
    decode_batch_size: int | None = 1
    max_sequence_length: int | None = None

    OPTIONS = ("num_frames", "negative_prompt", "decode_batch_size", "max_sequence_length")

    @property
    def frames(self) -> int:
        return int(self.num_frames or self._pipe_defaults().get("num_frames") or self.default_num_frames)

    def _pipe_defaults(self) -> dict:
        """``pipe.flowrl_defaults`` (``{"size": (h, w), "num_frames": n}``): defaults a pipeline may
        carry instead of the family's stock ones (the tiny test builders set it)."""
        return dict(getattr(self.pipe, "flowrl_defaults", None) or {})

    @property
    def default_size(self) -> tuple[int, int]:
        """The generation size when none is given: ``pipe.flowrl_defaults["size"]``, else the stock default."""
        size = self._pipe_defaults().get("size")
        return tuple(size) if size else self.stock_size()

    def stock_size(self) -> tuple[int, int]:
        """The stock pipeline's default (height, width)."""
        raise NotImplementedError

    def configure(self, **options: Any) -> "VideoAdapterMixin":
        """Set adapter options (``None`` keeps the default); an unknown name raises with the list."""
        for k, v in options.items():
            if k not in self.OPTIONS:
                raise ValueError(f"{type(self).__name__} has no option '{k}'. Known: {', '.join(self.OPTIONS)}.")
            if v is not None:
                setattr(self, k, v)
        return self

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Per-sample latent shape in the transformer's layout."""
        raise NotImplementedError

    def initial_noise(self, batch: int, *, height: int, width: int, generator: torch.Generator | None) -> Tensor:
        """Standard normal latents ``[B, *latent_shape]`` drawn in float32 on the generator's device
        (the stock ``randn_tensor`` draw), then moved to the transformer's device and dtype."""
        from flowrl.seeding import randn

        z = randn((batch, *self.latent_shape(height, width)), generator)
        return z.to(self.device, self.dtype)
