"""aMUSEd adapter (``AmusedPipeline``: ``UVit2DModel`` + ``VQModel`` + CLIP) for Co-GRPO.

Implements :class:`flowrl.co_grpo.MaskedTokenModel`: prompt encoding as the pipeline does it (CLIP
``text_embeds`` pooled, ``hidden_states[-2]`` per token; the empty prompt as the negative for CFG),
micro-conditioning (width, height, crop 0 0, aesthetic 6), the transformer's logits reshaped
``[B, V, h, w] → [B, h·w, V]``, and VQ decoding of token grids. The stateful
``AmusedScheduler.step`` is never called: it returns no logits, so :class:`~flowrl.co_grpo.CoGRPOPolicy`
runs the same unmasking loop itself.

The trainer builds it for ``model.kind: masked`` (``POLICY_BUILDERS["masked"]``); ``model.pipeline``
is a local aMUSEd folder or the built-in ``tiny-amused``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowrl.co_grpo import CoGRPOPolicy, SchedulePolicy


class AmusedAdapter:
    """An ``AmusedPipeline`` as a masked-token model; ``height``/``width`` in pixels (default: the
    transformer's ``sample_size`` × the VQ scale factor)."""

    def __init__(self, pipe: Any, *, height: int | None = None, width: int | None = None, aesthetic_score: float = 6.0, crop: tuple[int, int] = (0, 0)):
        for name in ("transformer", "vqvae", "text_encoder", "tokenizer", "scheduler"):
            if getattr(pipe, name, None) is None:
                raise TypeError(f"{type(pipe).__name__} has no `{name}`; the aMUSEd adapter needs an AmusedPipeline.")
        self.pipe = pipe
        f = pipe.vae_scale_factor
        size = pipe.transformer.config.sample_size * f
        self.height, self.width = int(height or size), int(width or size)
        self.h, self.w = self.height // f, self.width // f
        self.mask_id = int(pipe.scheduler.config.mask_token_id)
        self.vocab_size = int(pipe.transformer.config.codebook_size)
        self.seq_len = self.h * self.w
        self.micro = [self.width, self.height, crop[0], crop[1], aesthetic_score]

    @property
    def module(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def device(self) -> torch.device:
        return next(self.pipe.transformer.parameters()).device

    def _text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        tok = self.pipe.tokenizer
        ids = tok(prompts, return_tensors="pt", padding="max_length", truncation=True, max_length=tok.model_max_length).input_ids.to(self.device)
        out = self.pipe.text_encoder(ids, return_dict=True, output_hidden_states=True)
        return out.text_embeds, out.hidden_states[-2]

    @torch.no_grad()
    def encode(self, prompts: list[str], *, cfg: bool) -> dict[str, Tensor]:
        pooled, hidden = self._text(list(prompts))
        cond = {"pooled": pooled, "hidden": hidden}
        if cfg:
            npooled, nhidden = self._text([""] * len(prompts))
            cond.update(neg_pooled=npooled, neg_hidden=nhidden)
        return cond

    def logits_pair(self, tokens: Tensor, cond: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """Conditional and (with CFG conditioning) unconditional logits ``[B, L, V]`` in one batch."""
        b = tokens.shape[0]
        ids = tokens.view(b, self.h, self.w)
        tr = self.pipe.transformer
        cfg = "neg_pooled" in cond
        pooled = torch.cat([cond["neg_pooled"], cond["pooled"]]) if cfg else cond["pooled"]
        hidden = torch.cat([cond["neg_hidden"], cond["hidden"]]) if cfg else cond["hidden"]
        ids = torch.cat([ids, ids]) if cfg else ids
        micro = torch.tensor(self.micro, device=self.device, dtype=hidden.dtype)[None].expand(ids.shape[0], -1)
        out = tr(ids, micro_conds=micro, pooled_text_emb=pooled.to(tr.dtype), encoder_hidden_states=hidden.to(tr.dtype))
        logits = out.reshape(ids.shape[0], out.shape[1], -1).permute(0, 2, 1).float()  # [B', L, V]
        if cfg:
            u, c = logits.chunk(2)
            return c, u
        return logits, None

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        vq = self.pipe.vqvae
        b = tokens.shape[0]
        img = vq.decode(tokens.view(b, self.h, self.w).to(self.device), force_not_quantize=True, shape=(b, self.h, self.w, vq.config.latent_channels)).sample
        return img.float().clamp(0, 1)


def co_grpo_policy(pipe: Any, *, num_steps: int = 12, guidance_scale: float = 10.0, height: int | None = None, width: int | None = None, **kwargs: Any) -> CoGRPOPolicy:
    """A :class:`~flowrl.co_grpo.CoGRPOPolicy` over an ``AmusedPipeline`` (aMUSEd defaults: 12 steps,
    CFG 10). ``kwargs`` go to the policy (``schedule``, ``train_tokens``, ``train_schedule``)."""
    return CoGRPOPolicy(AmusedAdapter(pipe, height=height, width=width), num_steps=num_steps, guidance_scale=guidance_scale, **kwargs)


def _register() -> None:
    from flowrl.devices import choose_device
    from flowrl.pipelines.sources import load_pipeline
    from flowrl.plugins import PIPELINE_SOURCES, POLICY_BUILDERS

    def tiny_amused(run_dir: Path):
        from flowrl.pipelines import tiny

        return tiny.save_and_reload(tiny.tiny_amused_pipeline(), Path(run_dir) / "base_model")

    def build(resolved: Any, run_dir: Path) -> CoGRPOPolicy:
        cfg = resolved.config
        pipe = load_pipeline(cfg.model.pipeline, run_dir, getattr(torch, cfg.model.dtype))
        pipe.to(choose_device(cfg))
        s = cfg.sampler
        opts = dict(resolved.preset.rollout_params)
        sched = SchedulePolicy(**{k: opts.pop(k) for k in ("hidden", "init_std", "residual", "min_remask_temperature") if k in opts})
        return co_grpo_policy(pipe, num_steps=s.num_steps, guidance_scale=s.guidance_scale, height=s.height, width=s.width, schedule=sched, **opts)

    if "tiny-amused" not in PIPELINE_SOURCES:
        PIPELINE_SOURCES.register("tiny-amused", tiny_amused)
    if "masked" not in POLICY_BUILDERS:
        POLICY_BUILDERS.register("masked", build)


_register()
