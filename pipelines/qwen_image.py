"""Qwen-Image adapter (``QwenImagePipeline``): packed 2×2 latents ``[B, (h/2)(w/2), 4C]``, timestep
σ (the pipeline's t/1000), σ grid ``linspace(1, 1/n, n)`` through the pipeline's scheduler with the
dynamic shift ``mu`` of the image sequence length (the released scheduler adds
``shift_terminal=0.02`` and an exponential time shift, both read from its config).

Text: Qwen2.5-VL last hidden states of the prompt in the pipeline's template (template tokens
dropped), padded to the longest prompt of the batch, with a mask; ``max_sequence_length`` 512
(stock). The mask is passed as ``None`` when every token is valid, as the stock pipeline does.

**CFG** is Qwen-Image's "true CFG": the stock pipeline applies it only when a negative prompt is
given, as ``v = v_u + w·(v_c − v_u)`` rescaled per token to the norm of ``v_c``
(``v·‖v_c‖/‖v‖`` over the channel dim). Here ``guidance_scale > 1`` turns it on with
``negative_prompt`` (default " ", the model card's choice when there is nothing to avoid).
Conditional and negative embeddings differ in length, so the two predictions are separate
transformer calls, as in the stock pipeline.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from flowrl.pipelines.base import FlowAdapter, register_adapter
from flowrl.pipelines.video_common import VideoAdapterMixin, cfg_combine, decode_in_chunks

try:
    from diffusers import QwenImagePipeline
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
except ImportError:  # pragma: no cover
    QwenImagePipeline = None


def norm_rescaled_cfg(v_uncond: Tensor, v_cond: Tensor, guidance_scale: float) -> Tensor:
    """Qwen-Image true CFG: ``v = v_u + w·(v_c − v_u)``, then ``v·‖v_c‖/‖v‖`` with norms over the last
    (channel) dim of the packed latents."""
    v = cfg_combine(v_uncond, v_cond, guidance_scale)
    return v * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(v, dim=-1, keepdim=True))


@register_adapter(QwenImagePipeline)
class QwenImageAdapter(VideoAdapterMixin, FlowAdapter):
    max_sequence_length = 512
    negative_prompt = " "
    decode_batch_size = None

    def stock_size(self) -> tuple[int, int]:
        s = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return (s, s)

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        f = self.pipe.vae_scale_factor
        return 2 * (int(height) // (f * 2)), 2 * (int(width) // (f * 2))

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        h, w = self._latent_hw(height, width)
        return ((h // 2) * (w // 2), self.transformer.config.in_channels)

    def initial_noise(self, batch: int, *, height: int, width: int, generator: torch.Generator | None) -> Tensor:
        """The stock draw: ``[B, 1, C, h, w]`` normal in float32, then packed 2×2."""
        h, w = self._latent_hw(height, width)
        c = self.transformer.config.in_channels // 4
        from flowrl.seeding import randn

        z = randn((batch, 1, c, h, w), generator)
        return self.pipe._pack_latents(z, batch, c, h, w).to(self.device, self.dtype)

    def encode_prompts(self, prompts: list[str], *, guidance_scale: float) -> dict[str, Tensor]:
        def enc(texts: list[str]) -> tuple[Tensor, Tensor]:
            pe, pm = self.pipe.encode_prompt(prompt=texts, device=self.device, max_sequence_length=self.max_sequence_length)
            if pm is None:  # every token valid: keep an explicit all-ones mask (rows must stay sliceable)
                pm = torch.ones(pe.shape[:2], dtype=torch.long, device=pe.device)
            return pe, pm

        with torch.no_grad(), self._text_encoders_on(self.device):
            pe, pm = enc(prompts)
            cond = {"prompt_embeds": pe, "prompt_mask": pm}
            if guidance_scale > 1.0:
                ne, nm = enc([self.negative_prompt] * len(prompts))
                cond.update(neg_prompt_embeds=ne, neg_prompt_mask=nm)
        return cond

    def sigmas(self, num_steps: int, *, height: int, width: int) -> Tensor:
        h, w = self._latent_hw(height, width)
        c = self.pipe.scheduler.config
        mu = calculate_shift((h // 2) * (w // 2), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        return self.scheduler_sigmas(None, sigmas=list(np.linspace(1.0, 1 / num_steps, num_steps)), mu=mu)

    def _forward(self, latents: Tensor, sigma: Tensor, embeds: Tensor, mask: Tensor, height: int, width: int) -> Tensor:
        h, w = self._latent_hw(height, width)
        img_shapes = [[(1, h // 2, w // 2)]] * latents.shape[0]
        guidance = None
        if self.transformer.config.guidance_embeds:
            raise ValueError("guidance-distilled Qwen-Image transformers (guidance_embeds=True) are not supported yet.")
        return self.transformer(
            hidden_states=latents, timestep=sigma.to(latents.dtype), guidance=guidance,
            encoder_hidden_states_mask=None if bool(mask.all()) else mask, encoder_hidden_states=embeds,
            img_shapes=img_shapes, return_dict=False,
        )[0]

    def velocity(self, latents: Tensor, sigma: Tensor, cond: dict[str, Tensor], *, guidance_scale: float, height: int, width: int) -> Tensor:
        v_c = self._forward(latents, sigma, cond["prompt_embeds"], cond["prompt_mask"], height, width)
        if guidance_scale <= 1.0:
            return v_c
        v_u = self._forward(latents, sigma, cond["neg_prompt_embeds"], cond["neg_prompt_mask"], height, width)
        return norm_rescaled_cfg(v_u, v_c, guidance_scale)

    def decode(self, latents: Tensor, *, height: int, width: int) -> Tensor:
        """Images ``[B, C, H, W]`` in [0, 1]."""
        vae = self.pipe.vae
        c = vae.config

        def one(z: Tensor) -> Tensor:
            z = self.pipe._unpack_latents(z, height, width, self.pipe.vae_scale_factor).to(vae.dtype)
            mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1).to(z.device, z.dtype)
            inv_std = (1.0 / torch.tensor(c.latents_std)).view(1, c.z_dim, 1, 1, 1).to(z.device, z.dtype)
            return vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]

        with torch.no_grad():
            img = decode_in_chunks(one, latents, self.decode_batch_size)
        return (img.float() / 2 + 0.5).clamp(0, 1)
