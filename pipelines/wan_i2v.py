"""Wan image-to-video adapter (``WanImageToVideoPipeline``): the prompt row's ``image`` is the first
frame.

Conditioning, as the stock pipeline builds it (its own ``prepare_latents`` and ``encode_image``
are called): the first frame followed by black frames is VAE-encoded (the latent distribution's
mode, normalised with the VAE's ``latents_mean``/``latents_std``) and stacked on channels after a
4-channel mask that marks the first frame as given → ``condition [4 + C, F', h, w]``; the
transformer input is ``cat([latents, condition])`` on channels (``in_channels = 2C + 4``). Wan 2.1
I2V also passes the CLIP vision features of the frame (penultimate hidden states) as
``encoder_hidden_states_image``. σ grid, timestep, CFG (the negative prompt shares the image
conditioning), Wan 2.2 A14B's two experts and decoding are :class:`~flowrl.pipelines.wan.WanAdapter`'s.

Differences from the stock call: the frame is resized to the generation size (the stock call does
the same with ``height``/``width`` given). Wan 2.2 TI2V-5B (``expand_timesteps``: the first latent
frame is replaced by the condition and gets timestep 0) and a last frame (first-last-frame video)
are not supported.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from flowrl.pipelines.base import register_adapter
from flowrl.pipelines.image_cond import ImageConditionMixin
from flowrl.prompts import load_source_images
from flowrl.pipelines.video_common import cfg_combine
from flowrl.pipelines.wan import WanAdapter

try:
    from diffusers import WanImageToVideoPipeline
except ImportError:  # pragma: no cover
    WanImageToVideoPipeline = None


@register_adapter(WanImageToVideoPipeline)
class WanI2VAdapter(ImageConditionMixin, WanAdapter):
    max_images = 1

    def __init__(self, pipe: Any):
        if pipe.config.get("expand_timesteps", False):
            raise ValueError("Wan 2.2 TI2V (expand_timesteps=True) image-to-video is not supported yet; Wan 2.1 I2V and Wan 2.2 A14B I2V are.")
        super().__init__(pipe)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        c, *rest = super().latent_shape(height, width)  # checks frames and sizes
        return (self.pipe.vae.config.z_dim, *rest)  # the transformer's in_channels also counts the condition

    def encode_images(self, paths: Sequence[str], *, height: int, width: int) -> dict[str, Tensor]:
        """``{"condition": [4 + C, F', h, w]}`` (+ ``"image_embeds": [S, D]`` for Wan 2.1) of one first frame."""
        p = self.pipe
        frame = load_source_images(paths[0])
        out: dict[str, Tensor] = {}
        if getattr(p, "image_encoder", None) is not None and self.transformer.config.image_dim is not None:
            out["image_embeds"] = p.encode_image(frame, self.device)[0].to(self.dtype)
        image = p.video_processor.preprocess(frame, height=height, width=width).to(self.device, dtype=torch.float32)
        placeholder = torch.zeros((1, *self.latent_shape(height, width)), dtype=torch.float32, device=self.device)  # skips the noise draw
        _, condition = p.prepare_latents(image, 1, p.vae.config.z_dim, height, width, self.frames, torch.float32, self.device, None, placeholder)
        out["condition"] = condition[0]
        return out

    def _forward(self, model: torch.nn.Module, latents: Tensor, sigma: Tensor, cond: dict[str, Tensor], guidance_scale: float) -> Tensor:
        t = self._timestep(latents, sigma)
        x = torch.cat([latents, cond["condition"].to(latents.dtype)], dim=1)
        img = cond.get("image_embeds")
        img = img.to(latents.dtype) if img is not None else None
        v = model(hidden_states=x, timestep=t, encoder_hidden_states=cond["prompt_embeds"], encoder_hidden_states_image=img, return_dict=False)[0]
        if guidance_scale > 1.0:
            v_u = model(hidden_states=x, timestep=t, encoder_hidden_states=cond["neg_prompt_embeds"], encoder_hidden_states_image=img, return_dict=False)[0]
            v = cfg_combine(v_u, v, guidance_scale)
        return v
