"""SD3 / SD3.5 adapter (``StableDiffusion3Pipeline``): latents ``[B, C, h, w]``, static shift,
CFG by batch concatenation, timestep σ·1000."""

from __future__ import annotations

import torch
from torch import Tensor

from flowrl.pipelines.base import FlowAdapter, register_adapter

try:
    from diffusers import StableDiffusion3Pipeline
except ImportError:  # pragma: no cover
    StableDiffusion3Pipeline = None


def cfg_combine(v_uncond: Tensor, v_cond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance: v = v_u + w·(v_c − v_u)."""
    return v_uncond + guidance_scale * (v_cond - v_uncond)


@register_adapter(StableDiffusion3Pipeline)
class SD3Adapter(FlowAdapter):
    """Defaults are the stock ``StableDiffusion3Pipeline.__call__``'s: T5 length 256, size
    ``default_sample_size × vae_scale_factor``, negative prompt "", timestep σ·1000 in float32."""

    max_sequence_length = 256

    def encode_texts(self, texts: list[str]) -> dict[str, Tensor]:
        pe, _, pooled, _ = self.pipe.encode_prompt(
            prompt=texts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": pe, "pooled": pooled}

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        f = self.pipe.vae_scale_factor
        return height // f, width // f

    def initial_noise(self, batch: int, *, height: int, width: int, generator: torch.Generator | None) -> Tensor:
        h, w = self._latent_hw(height, width)
        c = self.transformer.config.in_channels
        from flowrl.seeding import randn

        return randn((batch, c, h, w), generator).to(self.device, self.dtype)

    def sigmas(self, num_steps: int, *, height: int, width: int) -> Tensor:
        kwargs = {}
        if self.pipe.scheduler.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            h, w = self._latent_hw(height, width)
            p = self.transformer.config.patch_size
            c = self.pipe.scheduler.config
            kwargs["mu"] = calculate_shift((h // p) * (w // p), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.16))
        return self.scheduler_sigmas(num_steps, **kwargs)

    def velocity(self, latents: Tensor, sigma: Tensor, cond: dict[str, Tensor], *, guidance_scale: float, height: int, width: int) -> Tensor:
        # the stock call passes scheduler.timesteps (σ·num_train_timesteps, float32) uncast; a cast
        # to bf16 latents would round e.g. 913 to 912
        timestep = sigma.float() * float(self.pipe.scheduler.config.num_train_timesteps)
        if guidance_scale > 1.0:
            x = torch.cat([latents, latents])
            v = self.transformer(
                hidden_states=x, timestep=torch.cat([timestep, timestep]),
                encoder_hidden_states=torch.cat([cond["neg_prompt_embeds"], cond["prompt_embeds"]]),
                pooled_projections=torch.cat([cond["neg_pooled"], cond["pooled"]]), return_dict=False,
            )[0]
            v_u, v_c = v.chunk(2)
            return cfg_combine(v_u, v_c, guidance_scale)
        return self.transformer(
            hidden_states=latents, timestep=timestep, encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled"], return_dict=False,
        )[0]

    def decode(self, latents: Tensor, *, height: int, width: int) -> Tensor:
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        with torch.no_grad():
            img = vae.decode(z, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)
