"""Flux Kontext adapter (``FluxKontextPipeline``): instruction editing of a source image.

The source image is VAE-encoded (the latent distribution's mode, shifted and scaled as the stock
pipeline does), packed 2×2 like the latents, and appended to the image tokens with position ids
whose first axis is 1; the transformer's prediction for the appended tokens is dropped. Everything
else (text, σ grid with the dynamic shift of the *generated* tokens, distilled guidance 3.5, true
CFG) is :class:`~flowrl.pipelines.flux.FluxAdapter`'s.

Difference from the stock call: the source is resized to the generation size
(``sampler.height``/``width``) — the stock call picks the preferred Kontext resolution nearest the
source's aspect ratio and generates at that size unless told otherwise; with ``height``/``width``
given and a source of that size (``_auto_resize=False``) the two agree (tested to float rounding).
One source image per prompt.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from flowrl.pipelines.base import register_adapter
from flowrl.pipelines.flux import FluxAdapter
from flowrl.pipelines.image_cond import ImageConditionMixin
from flowrl.prompts import load_source_images
from flowrl.pipelines.sd3 import cfg_combine

try:
    from diffusers import FluxKontextPipeline
except ImportError:  # pragma: no cover
    FluxKontextPipeline = None


@register_adapter(FluxKontextPipeline)
class FluxKontextAdapter(ImageConditionMixin, FluxAdapter):
    max_images = 1

    def encode_images(self, paths: Sequence[str], *, height: int, width: int) -> dict[str, Tensor]:
        """``{"image_latents": [M, 4C]}``: the packed VAE latents of the source at the generation size."""
        p = self.pipe
        h, w = self._latent_hw(height, width)
        img = p.image_processor.resize(load_source_images(paths[0]), h * p.vae_scale_factor, w * p.vae_scale_factor)
        img = p.image_processor.preprocess(img, h * p.vae_scale_factor, w * p.vae_scale_factor).to(self.device, self.dtype)
        lat = p._encode_vae_image(image=img, generator=None)
        c = lat.shape[1]
        return {"image_latents": p._pack_latents(lat, 1, c, lat.shape[2], lat.shape[3])[0]}

    def _forward(self, latents: Tensor, sigma: Tensor, embeds: Tensor, pooled: Tensor, height: int, width: int, image_latents: Tensor | None = None) -> Tensor:
        h, w = self._latent_hw(height, width)
        b, n = latents.shape[:2]
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        if image_latents is not None:
            src_ids = img_ids.clone()  # the source has the generation size: the same grid, first axis 1
            src_ids[..., 0] = 1
            img_ids = torch.cat([img_ids, src_ids], dim=0)
            latents = torch.cat([latents, image_latents.to(latents.dtype)], dim=1)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.embedded_guidance, device=latents.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=latents, timestep=self._timestep(sigma, latents.dtype), guidance=guidance, pooled_projections=pooled,
            encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]
        return out[:, :n]

    def velocity(self, latents: Tensor, sigma: Tensor, cond: dict[str, Tensor], *, guidance_scale: float, height: int, width: int) -> Tensor:
        src = cond["image_latents"]
        if guidance_scale > 1.0:
            v = self._forward(
                torch.cat([latents, latents]), torch.cat([sigma, sigma]), torch.cat([cond["neg_prompt_embeds"], cond["prompt_embeds"]]),
                torch.cat([cond["neg_pooled"], cond["pooled"]]), height, width, torch.cat([src, src]),
            )
            v_u, v_c = v.chunk(2)
            return cfg_combine(v_u, v_c, guidance_scale)
        return self._forward(latents, sigma, cond["prompt_embeds"], cond["pooled"], height, width, src)
