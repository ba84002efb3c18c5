"""Flux adapter (``FluxPipeline``): packed 2×2 latents ``[B, N, 4C]`` with RoPE position ids,
guidance embedding (``embedded_guidance``), dynamic shift ``mu`` from the image sequence length,
timestep passed as σ (the pipeline's t/1000). ``guidance_scale > 1`` is true CFG with an empty
negative prompt (the pipeline's ``true_cfg_scale``)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from flowrl.pipelines.base import FlowAdapter, register_adapter
from flowrl.pipelines.sd3 import cfg_combine

try:
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
except ImportError:  # pragma: no cover
    FluxPipeline = None


@register_adapter(FluxPipeline)
class FluxAdapter(FlowAdapter):
    """Defaults are the stock ``FluxPipeline.__call__``'s: T5 length 512 (Flux attends to the
    padding, so the length changes the output), size ``default_sample_size × vae_scale_factor``,
    distilled guidance 3.5, timestep (σ·1000 in the latents' dtype)/1000."""

    max_sequence_length = 512
    #: value of the distilled-guidance embedding (FLUX.1-dev default 3.5); ignored without guidance_embeds.
    embedded_guidance: float = 3.5

    def encode_texts(self, texts: list[str]) -> dict[str, Tensor]:
        pe, pooled, _ = self.pipe.encode_prompt(prompt=texts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": pe, "pooled": pooled}

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        f = self.pipe.vae_scale_factor
        return 2 * (height // (f * 2)), 2 * (width // (f * 2))

    def initial_noise(self, batch: int, *, height: int, width: int, generator: torch.Generator | None) -> Tensor:
        h, w = self._latent_hw(height, width)
        c = self.transformer.config.in_channels // 4
        from flowrl.seeding import randn

        z = randn((batch, c, h, w), generator)
        return self.pipe._pack_latents(z, batch, c, h, w).to(self.device, self.dtype)

    def sigmas(self, num_steps: int, *, height: int, width: int) -> Tensor:
        h, w = self._latent_hw(height, width)
        c = self.pipe.scheduler.config
        mu = calculate_shift((h // 2) * (w // 2), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        grid = np.linspace(1.0, 1 / num_steps, num_steps)
        return self.scheduler_sigmas(None, sigmas=list(grid), mu=mu)

    def _forward(self, latents: Tensor, sigma: Tensor, embeds: Tensor, pooled: Tensor, height: int, width: int) -> Tensor:
        h, w = self._latent_hw(height, width)
        img_ids = self.pipe._prepare_latent_image_ids(latents.shape[0], h // 2, w // 2, latents.device, latents.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((latents.shape[0],), self.embedded_guidance, device=latents.device, dtype=torch.float32)
        return self.transformer(
            hidden_states=latents, timestep=self._timestep(sigma, latents.dtype), guidance=guidance, pooled_projections=pooled,
            encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]

    def _timestep(self, sigma: Tensor, dtype: torch.dtype) -> Tensor:
        """What the stock call passes: ``t.to(latents.dtype) / 1000`` with t = σ·num_train_timesteps."""
        n = float(self.pipe.scheduler.config.num_train_timesteps)
        return (sigma.float() * n).to(dtype) / 1000

    def velocity(self, latents: Tensor, sigma: Tensor, cond: dict[str, Tensor], *, guidance_scale: float, height: int, width: int) -> Tensor:
        if guidance_scale > 1.0:
            v = self._forward(
                torch.cat([latents, latents]), torch.cat([sigma, sigma]),
                torch.cat([cond["neg_prompt_embeds"], cond["prompt_embeds"]]), torch.cat([cond["neg_pooled"], cond["pooled"]]), height, width,
            )
            v_u, v_c = v.chunk(2)
            return cfg_combine(v_u, v_c, guidance_scale)
        return self._forward(latents, sigma, cond["prompt_embeds"], cond["pooled"], height, width)

    def decode(self, latents: Tensor, *, height: int, width: int) -> Tensor:
        vae = self.pipe.vae
        z = self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)
        z = z.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        with torch.no_grad():
            img = vae.decode(z, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)
