"""HunyuanVideo 1.5 text-to-video adapter (``HunyuanVideo15Pipeline``).

Latents ``[B, C, F', H/16, W/16]`` (``F' = (F − 1)/4 + 1``); the transformer input is the latents
concatenated on channels with zero condition latents and a zero mask (``in_channels = 2C + 1``,
the text-to-video case), zero image embeddings, timestep σ·1000. Text: Qwen2.5-VL hidden states of
the chat-formatted prompt (the pipeline's system message and template crop) plus ByT5 glyph
embeddings of quoted text; both with attention masks. σ grid: ``linspace(1, 0, n + 1)[:-1]``
passed as ``sigmas`` to the pipeline's scheduler (static ``shift``, 5 in SAGE-GRPO's setting).

**CFG.** The stock pipeline applies CFG through ``pipe.guider`` (``ClassifierFreeGuidance``; the
negative prompt is "" unless one is given). Here the policy's ``guidance_scale`` replaces the
guider's scale and 1 turns CFG off; the guider's other settings are kept:
``use_original_formulation`` (``v_c + w·(v_c − v_u)`` instead of ``v_u + w·(v_c − v_u)``) and
``guidance_rescale`` (diffusers' ``rescale_noise_cfg``). A guider active only in part of the
schedule (``start > 0`` or ``stop < 1``) is not supported: that makes CFG depend on the step index,
which a stored transition does not carry.

**Decoding.** The 1.5 VAE decodes one video per call (with two or more its causal attention mask
has the wrong batch shape, in the stock pipeline too), so ``decode_batch_size`` is always 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowrl.pipelines.base import FlowAdapter, register_adapter
from flowrl.pipelines.video_common import VideoAdapterMixin, decode_in_chunks, to_unit_video

try:
    from diffusers import HunyuanVideo15Pipeline
except ImportError:  # pragma: no cover
    HunyuanVideo15Pipeline = None


def guided_velocity(v_cond: Tensor, v_uncond: Tensor, guidance_scale: float, *, original_formulation: bool = False, guidance_rescale: float = 0.0) -> Tensor:
    """``ClassifierFreeGuidance`` of diffusers' guiders: ``v_u + w·(v_c − v_u)`` (or from ``v_c`` with
    ``original_formulation``), then optionally rescaled toward the conditional prediction's std
    (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16)."""
    base = v_cond if original_formulation else v_uncond
    v = base + guidance_scale * (v_cond - v_uncond)
    if guidance_rescale > 0.0:
        from diffusers.guiders.guider_utils import rescale_noise_cfg

        v = rescale_noise_cfg(v, v_cond, guidance_rescale)
    return v


@register_adapter(HunyuanVideo15Pipeline)
class HunyuanVideo15Adapter(VideoAdapterMixin, FlowAdapter):
    default_num_frames = 121
    negative_prompt = ""

    def __init__(self, pipe: Any):
        super().__init__(pipe)
        g = getattr(pipe, "guider", None)
        if g is not None and (float(g.config.get("start", 0.0)) > 0.0 or float(g.config.get("stop", 1.0)) < 1.0):
            raise ValueError(
                f"pipe.guider applies CFG only between start={g.config.start} and stop={g.config.stop} of the schedule; "
                "flowrl needs CFG that does not depend on the step: set `pipe.guider = pipe.guider.new(start=0.0, stop=1.0)`."
            )

    def stock_size(self) -> tuple[int, int]:
        """The stock default: the 16:9 bucket of the transformer's ``target_size``."""
        p = self.pipe
        return tuple(int(x) for x in p.video_processor.calculate_default_height_width(p.default_aspect_ratio[1], p.default_aspect_ratio[0], p.target_size))

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        p = self.pipe
        f = self.frames
        if (f - 1) % p.vae_scale_factor_temporal:
            raise ValueError(f"sampler.num_frames={f}: HunyuanVideo 1.5 needs 4k + 1 frames.")
        s = p.vae_scale_factor_spatial
        if height % s or width % s:
            raise ValueError(f"sampler.height/width {height}×{width}: HunyuanVideo 1.5 needs multiples of {s}.")
        return (p.num_channels_latents, (f - 1) // p.vae_scale_factor_temporal + 1, height // s, width // s)

    def encode_prompts(self, prompts: list[str], *, guidance_scale: float) -> dict[str, Tensor]:
        n = len(prompts)
        with torch.no_grad(), self._text_encoders_on(self.device):
            pe, pm, pe2, pm2 = self.pipe.encode_prompt(prompt=prompts, device=self.device, dtype=self.dtype, batch_size=n)
            cond = {"prompt_embeds": pe, "prompt_mask": pm, "prompt_embeds_2": pe2, "prompt_mask_2": pm2}
            if guidance_scale > 1.0:
                ne, nm, ne2, nm2 = self.pipe.encode_prompt(prompt=[self.negative_prompt] * n, device=self.device, dtype=self.dtype, batch_size=n)
                cond.update(neg_prompt_embeds=ne, neg_prompt_mask=nm, neg_prompt_embeds_2=ne2, neg_prompt_mask_2=nm2)
        return cond

    def sigmas(self, num_steps: int, *, height: int, width: int) -> Tensor:
        return self.scheduler_sigmas(None, sigmas=list(np.linspace(1.0, 0.0, num_steps + 1)[:-1]))

    def _image_inputs(self, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        """Image conditioning rows of ``cond`` for :meth:`_forward` (none for text-to-video)."""
        return {}

    def _forward(self, latents: Tensor, sigma: Tensor, embeds: Tensor, mask: Tensor, embeds_2: Tensor, mask_2: Tensor, *,
                 cond_latents: Tensor | None = None, cond_mask: Tensor | None = None, image_embeds: Tensor | None = None) -> Tensor:
        """The transformer on ``[latents, condition latents, mask]``; text-to-video: zero condition,
        zero mask and zero image embeddings (image-to-video passes its own)."""
        b = latents.shape[0]
        cond_latents = torch.zeros_like(latents) if cond_latents is None else cond_latents.to(latents.dtype)
        cond_mask = torch.zeros_like(latents[:, :1]) if cond_mask is None else cond_mask.to(latents.dtype)
        x = torch.cat([latents, cond_latents, cond_mask], dim=1)
        if image_embeds is None:
            image_embeds = torch.zeros(b, self.pipe.vision_num_semantic_tokens, self.pipe.vision_states_dim, dtype=latents.dtype, device=latents.device)
        image_embeds = image_embeds.to(latents.dtype)
        return self.transformer(
            hidden_states=x, image_embeds=image_embeds, timestep=(sigma * 1000.0).to(latents.dtype),
            encoder_hidden_states=embeds, encoder_attention_mask=mask, encoder_hidden_states_2=embeds_2,
            encoder_attention_mask_2=mask_2, return_dict=False,
        )[0]

    def velocity(self, latents: Tensor, sigma: Tensor, cond: dict[str, Tensor], *, guidance_scale: float, height: int, width: int) -> Tensor:
        keys = ("prompt_embeds", "prompt_mask", "prompt_embeds_2", "prompt_mask_2")
        image = self._image_inputs(cond)
        if guidance_scale <= 1.0:
            return self._forward(latents, sigma, *(cond[k] for k in keys), **image)
        both = [torch.cat([cond[k], cond[f"neg_{k}"]]) for k in keys]
        v = self._forward(torch.cat([latents, latents]), torch.cat([sigma, sigma]), *both, **{k: torch.cat([t, t]) for k, t in image.items()})
        v_c, v_u = v.chunk(2)
        g = getattr(self.pipe, "guider", None)
        cfg = g.config if g is not None else {}
        return guided_velocity(v_c, v_u, guidance_scale, original_formulation=bool(cfg.get("use_original_formulation", False)), guidance_rescale=float(cfg.get("guidance_rescale", 0.0)))

    def decode(self, latents: Tensor, *, height: int, width: int) -> Tensor:
        vae = self.pipe.vae

        def one(z: Tensor) -> Tensor:
            return vae.decode(z.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]

        with torch.no_grad():
            video = decode_in_chunks(one, latents, 1)  # the 1.5 VAE decodes one video per call
        return to_unit_video(video)
