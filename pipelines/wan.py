"""Wan 2.1 / 2.2 text-to-video adapter (``WanPipeline``).

Latents ``[B, C, F', H/8, W/8]`` with ``F' = (F − 1)/4 + 1`` (``num_frames`` must be 4k + 1, sizes
multiples of 16); the transformer takes the timestep σ·1000; CFG runs the negative prompt through
the same transformer and mixes ``v_u + w·(v_c − v_u)`` (the stock pipeline's rule; the stock
negative prompt is "" unless one is given, and text is encoded with ``max_sequence_length`` 512).
Decoded video: ``[B, F, C, H, W]`` in [0, 1] (latents de-normalised with the VAE's
``latents_mean``/``latents_std`` first, as the stock pipeline does).

**Scheduler.** Released Wan checkpoints ship ``UniPCMultistepScheduler`` (flow sigmas, ``flow_shift``
3.0 for 480p / 5.0 for 720p), a multistep solver whose steps are not single Gaussian transitions.
Rollouts therefore use the flow-matching Euler grid with the *same shift*
(``FlowMatchEulerDiscreteScheduler(shift=flow_shift)``), on which every SDE kernel is defined; with
a ``FlowMatchEulerDiscreteScheduler`` already in the pipeline its own grid is used and the ODE
kernel reproduces the stock ``__call__`` exactly.

**Wan 2.2.** ``expand_timesteps`` (TI2V-5B) passes the timestep per latent token; with two experts
(A14B: ``transformer_2`` and ``boundary_ratio``) steps with σ·1000 below the boundary use
``transformer_2`` as the stock pipeline does. Only ``transformer`` is trained (LoRA goes there);
``transformer_2`` is used as loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flowrl.pipelines.base import FlowAdapter, register_adapter
from flowrl.pipelines.video_common import VideoAdapterMixin, cfg_combine, decode_in_chunks, to_unit_video

try:
    from diffusers import WanPipeline
except ImportError:  # pragma: no cover
    WanPipeline = None


def euler_scheduler_like(scheduler: Any):
    """A ``FlowMatchEulerDiscreteScheduler`` with the shift of ``scheduler``: itself if it already is
    one, else (UniPC with ``use_flow_sigmas``) one with ``shift = flow_shift``. Raises for others."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return scheduler
    cfg = scheduler.config
    if cfg.get("use_flow_sigmas", False) or cfg.get("prediction_type") == "flow_prediction":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.get("num_train_timesteps", 1000), shift=float(cfg.get("flow_shift", 1.0) or 1.0))
    raise TypeError(
        f"pipe.scheduler is a {type(scheduler).__name__} without flow sigmas; flowrl needs a flow-matching σ grid. "
        "Set `pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=...)` (Wan 2.1: shift 3.0 at 480p, 5.0 at 720p)."
    )


@register_adapter(WanPipeline)
class WanAdapter(VideoAdapterMixin, FlowAdapter):
    default_num_frames = 81
    #: the stock ``__call__`` default (its ``encode_prompt`` alone defaults to 226).
    max_sequence_length = 512
    #: stock: "" when CFG is on and no negative prompt is given.
    negative_prompt = ""

    def __init__(self, pipe: Any):
        if getattr(pipe, "transformer", None) is None:
            raise TypeError("this WanPipeline has no `transformer` (only transformer_2?); flowrl trains `transformer`.")
        self.pipe = pipe
        self.euler = euler_scheduler_like(pipe.scheduler)

    # -- shapes --------------------------------------------------------------------------------
    def stock_size(self) -> tuple[int, int]:
        return (480, 832)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        p = self.pipe
        f = self.frames
        if (f - 1) % p.vae_scale_factor_temporal:
            raise ValueError(f"sampler.num_frames={f}: Wan needs 4k + 1 frames (e.g. {(f // p.vae_scale_factor_temporal) * p.vae_scale_factor_temporal + 1}).")
        mult = p.vae_scale_factor_spatial * self.transformer.config.patch_size[1]
        if height % mult or width % mult:
            raise ValueError(f"sampler.height/width {height}×{width}: Wan needs multiples of {mult}.")
        c = self.transformer.config.in_channels
        return (c, (f - 1) // p.vae_scale_factor_temporal + 1, height // p.vae_scale_factor_spatial, width // p.vae_scale_factor_spatial)

    # -- conditioning --------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], *, guidance_scale: float) -> dict[str, Tensor]:
        cfg = guidance_scale > 1.0
        with torch.no_grad(), self._text_encoders_on(self.device):
            pe, npe = self.pipe.encode_prompt(
                prompt=prompts, negative_prompt=[self.negative_prompt] * len(prompts) if cfg else None,
                do_classifier_free_guidance=cfg, max_sequence_length=self.max_sequence_length, device=self.device,
            )
        cond = {"prompt_embeds": pe}
        if cfg:
            cond["neg_prompt_embeds"] = npe
        return cond

    def sigmas(self, num_steps: int, *, height: int, width: int) -> Tensor:
        sched = type(self.euler).from_config(self.euler.config)
        sched.set_timesteps(num_steps, device="cpu")
        return sched.sigmas.detach().float().cpu()

    # -- the denoiser --------------------------------------------------------------------------
    def _timestep(self, latents: Tensor, sigma: Tensor) -> Tensor:
        t = (sigma * 1000.0).to(latents.dtype)
        if self.pipe.config.get("expand_timesteps", False):  # Wan 2.2 TI2V: one timestep per latent token
            _, _, f, h, w = latents.shape
            p = self.transformer.config.patch_size
            t = t[:, None].expand(-1, (f // p[0]) * (h // p[1]) * (w // p[2]))
        return t

    def _expert_rows(self, sigma: Tensor) -> Tensor | None:
        """Rows (bool ``[B]``) that the low-noise expert ``transformer_2`` handles (Wan 2.2 A14B)."""
        ratio = self.pipe.config.get("boundary_ratio", None)
        if ratio is None or getattr(self.pipe, "transformer_2", None) is None:
            return None
        return (sigma * 1000.0) < ratio * self.euler.config.num_train_timesteps

    def _forward(self, model: torch.nn.Module, latents: Tensor, sigma: Tensor, cond: dict[str, Tensor], guidance_scale: float) -> Tensor:
        t = self._timestep(latents, sigma)
        v = model(hidden_states=latents, timestep=t, encoder_hidden_states=cond["prompt_embeds"], return_dict=False)[0]
        if guidance_scale > 1.0:
            v_u = model(hidden_states=latents, timestep=t, encoder_hidden_states=cond["neg_prompt_embeds"], return_dict=False)[0]
            v = cfg_combine(v_u, v, guidance_scale)
        return v

    def velocity(self, latents: Tensor, sigma: Tensor, cond: dict[str, Tensor], *, guidance_scale: float, height: int, width: int) -> Tensor:
        low = self._expert_rows(sigma)
        if low is None or not bool(low.any()):
            return self._forward(self.transformer, latents, sigma, cond, guidance_scale)
        if bool(low.all()):
            return self._forward(self.pipe.transformer_2, latents, sigma, cond, guidance_scale)
        v = torch.empty_like(latents)
        for rows, model in ((~low, self.transformer), (low, self.pipe.transformer_2)):
            sub = {k: c[rows] for k, c in cond.items()}
            v[rows] = self._forward(model, latents[rows], sigma[rows], sub, guidance_scale).to(v.dtype)
        return v

    # -- output --------------------------------------------------------------------------------
    def decode(self, latents: Tensor, *, height: int, width: int) -> Tensor:
        vae = self.pipe.vae
        c = vae.config
        mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1)
        std = torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1)

        def one(z: Tensor) -> Tensor:
            z = z.to(vae.dtype)
            z = z / (1.0 / std).to(z.device, z.dtype) + mean.to(z.device, z.dtype)  # the stock expression, bit for bit
            return vae.decode(z, return_dict=False)[0]

        with torch.no_grad():
            video = decode_in_chunks(one, latents, self.decode_batch_size)  # [B, C, F, H, W] in [-1, 1]
        return to_unit_video(video)
