"""The digits base model: a tiny text-to-image flow-matching pipeline on 16×16 digit scenes.

Built from stock components so ``FlowPolicy`` wraps it exactly like SD3:

* ``transformer`` — diffusers ``SD3Transformer2DModel`` (MM-DiT) working directly in pixel space:
  1 channel, 16×16, patch 4 (16 image tokens), 4 joint blocks of width 64, no VAE. Pixels are
  mapped ``x = 2·img − 1``.
* ``scheduler`` — ``FlowMatchEulerDiscreteScheduler`` (rectified flow; σ from 1 to 0).
* ``text_encoder`` — transformers ``CLIPTextModelWithProjection`` (2 layers, width 64); its last
  hidden states feed the joint attention and its projected EOS embedding is the pooled vector.
* ``tokenizer`` — a word-level ``CLIPTokenizer`` built offline (:func:`build_tokenizer`) over the
  closed vocabulary of :mod:`flowrl.digits_data` prompts.

>>> from flowrl.pipelines.digits import load_default_digits_pipeline
>>> pipe = load_default_digits_pipeline()          # assets/digits/pipeline
>>> images = pipe(["a 3 left of a 7"] * 4, num_inference_steps=8,
...               generator=torch.Generator().manual_seed(0)).images   # [4, 1, 16, 16] in [0, 1]

The empty prompt ``""`` is the unconditional input (10 % prompt dropout in pretraining), so
classifier-free guidance works with ``guidance_scale > 1``; the shipped model is meant to be
sampled without it (``guidance_scale=1``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.loaders import SD3LoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from flowrl.pipelines.base import FlowAdapter, register_adapter

#: the closed vocabulary of digits prompts (CLIP's pre-tokenizer splits "5s" into "5", "s").
WORDS = ("a", "two", "left", "of", "above", "s") + tuple(str(d) for d in range(10))
MAX_LENGTH = 10  # <bos> + at most 7 words ("a 3 left of a 7" is 6) + <eos>/pad


def build_tokenizer(max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """A word-level ``CLIPTokenizer`` for the digits grammar, built without any file.

    CLIP's BPE marks a word's last character with ``</w>``; the merges below rebuild each word of
    :data:`WORDS` letter by letter, so every word is one token (``"left"`` → ``left</w>``) while
    unknown words still fall back to characters. Ids 0/1 are ``<|startoftext|>``/``<|endoftext|>``;
    padding uses ``<|endoftext|>`` like CLIP.
    """
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[tuple[str, str]] = []
    chars: set[str] = set()
    for word in WORDS:
        chars.update(word)
        chars.update(c + "</w>" for c in word)
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    for c in sorted(chars):
        vocab.setdefault(c, len(vocab))
    merges = list(dict.fromkeys(merges))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, pad_token="<|endoftext|>")


def build_digits_pipeline(
    *,
    num_layers: int = 4,
    num_attention_heads: int = 4,
    attention_head_dim: int = 16,
    text_hidden_size: int = 64,
    text_layers: int = 2,
    patch_size: int = 4,
    shift: float = 1.0,
    seed: int = 0,
    zero_init: bool = True,
) -> "DigitsPipeline":
    """A randomly initialised :class:`DigitsPipeline` (seeded), ready for pretraining.

    ``zero_init`` zeroes every adaLN modulation and the output projection (DiT's "adaLN-Zero",
    Peebles & Xie 2023, §3.2): each block starts as the identity and the model predicts v = 0,
    which trains several times faster here than diffusers' default initialisation.
    """
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden_size,
        intermediate_size=2 * text_hidden_size,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=text_hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModelWithProjection(text_config)
    inner = num_attention_heads * attention_head_dim
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=patch_size,
        in_channels=1,
        out_channels=1,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=text_hidden_size,
        caption_projection_dim=inner,
        pooled_projection_dim=text_hidden_size,
        pos_embed_max_size=16 // patch_size,
    )
    if zero_init:
        for name, module in transformer.named_modules():
            if name.endswith(("norm1.linear", "norm1_context.linear", "norm_out.linear")) or name == "proj_out":
                torch.nn.init.zeros_(module.weight)
                torch.nn.init.zeros_(module.bias)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    pipe = DigitsPipeline(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.text_encoder.eval()
    pipe.transformer.eval()
    return pipe


class DigitsPipeline(DiffusionPipeline, SD3LoraLoaderMixin):
    """Text → 16×16 digit scene, rectified flow in pixel space (see the module docstring).

    LoRA loads and saves like SD3's (``SD3LoraLoaderMixin``): ``pipe.load_lora_weights(run / "lora")``
    puts a run's exported adapter on the transformer, ``DigitsPipeline.save_lora_weights`` writes one.
    """

    model_cpu_offload_seq = "text_encoder->transformer"
    default_size = (16, 16)
    _lora_loadable_modules = ["transformer", "text_encoder"]
    text_encoder_2 = None  # SD3's loader also visits a second text encoder; this model has one

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)

    # -- 1. prompts -----------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """``(prompt_embeds [B, L, D], pooled_prompt_embeds [B, D])``; ``""`` is unconditional."""
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.text_encoder.device)
        out = self.text_encoder(input_ids=ids)
        return out.last_hidden_state, out.text_embeds

    # -- 2. the denoiser ------------------------------------------------------------------------
    def predict_velocity(self, latents: Tensor, sigma: Tensor, prompt_embeds: Tensor, pooled: Tensor) -> Tensor:
        """v(x_σ, σ) = ε − x0 for latents ``[B, 1, H, W]`` and ``sigma [B]`` (timestep = σ·1000)."""
        return self.transformer(
            hidden_states=latents,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            timestep=sigma * 1000.0,
            return_dict=False,
        )[0]

    @staticmethod
    def to_images(latents: Tensor) -> Tensor:
        """Pixel-space latents (2·img − 1) → images in [0, 1]."""
        return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    # -- 3. plain inference ---------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 8,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        height: int = 16,
        width: int = 16,
        latents: Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Euler ODE sampling. ``output_type``: ``"pt"`` (``[B, 1, H, W]`` in [0, 1]), ``"np"``, ``"pil"``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = self.transformer.device
        adapter = DigitsAdapter(self)
        cond = adapter.encode_prompts(prompts, guidance_scale=guidance_scale)
        if latents is None:
            latents = adapter.initial_noise(len(prompts), height=height, width=width, generator=generator)
        latents = latents.to(device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.scheduler.timesteps:
            sigma = (t / 1000.0).expand(latents.shape[0]).to(latents.dtype)
            v = adapter.velocity(latents, sigma, cond, guidance_scale=guidance_scale, height=height, width=width)
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
        images = self.to_images(latents)
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
        elif output_type == "pil":
            from PIL import Image

            images = [Image.fromarray((im[0].cpu().numpy() * 255).round().astype("uint8"), mode="L") for im in images]
        elif output_type != "pt":
            raise ValueError(f"output_type must be 'pt', 'np' or 'pil'; got '{output_type}'.")
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


@register_adapter(DigitsPipeline)
class DigitsAdapter(FlowAdapter):
    """FlowPolicy plumbing for :class:`DigitsPipeline`: latents are pixels ``[B, 1, 16, 16]``."""

    default_size = (16, 16)

    negative_keys = {"prompt_embeds": "negative_prompt_embeds", "pooled_prompt_embeds": "negative_pooled_prompt_embeds"}

    def encode_texts(self, texts: list[str]) -> dict[str, Tensor]:
        embeds, pooled = self.pipe.encode_prompt(texts)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def initial_noise(self, batch: int, *, height: int, width: int, generator: torch.Generator | None) -> Tensor:
        from flowrl.seeding import randn

        noise = randn((batch, 1, height, width), generator)
        return noise.to(device=self.device, dtype=self.dtype)

    def sigmas(self, num_steps: int, *, height: int, width: int) -> Tensor:
        return self.scheduler_sigmas(num_steps)

    def velocity(self, latents: Tensor, sigma: Tensor, cond: dict[str, Tensor], *, guidance_scale: float, height: int, width: int) -> Tensor:
        sigma = sigma.to(device=latents.device, dtype=latents.dtype).expand(latents.shape[0])
        if guidance_scale > 1.0:
            embeds = torch.cat([cond["negative_prompt_embeds"], cond["prompt_embeds"]])
            pooled = torch.cat([cond["negative_pooled_prompt_embeds"], cond["pooled_prompt_embeds"]])
            v_uncond, v_cond = self.pipe.predict_velocity(torch.cat([latents, latents]), sigma.repeat(2), embeds, pooled).chunk(2)
            return v_uncond + guidance_scale * (v_cond - v_uncond)
        return self.pipe.predict_velocity(latents, sigma, cond["prompt_embeds"], cond["pooled_prompt_embeds"])

    def decode(self, latents: Tensor, *, height: int, width: int) -> Tensor:
        return self.pipe.to_images(latents)


def default_pipeline_dir() -> Path:
    from flowrl.paths import assets_dir

    return assets_dir() / "digits" / "pipeline"


def load_digits_pipeline(path: str | Path | None = None, device: str | torch.device | None = None, **kwargs: Any) -> DigitsPipeline:
    """A saved :class:`DigitsPipeline` (default: the shipped one, ``assets/digits/pipeline``), in eval mode.

    ``DiffusionPipeline.from_pretrained`` cannot resolve the custom class named in
    ``model_index.json``; load digits folders through this function (or
    ``DigitsPipeline.from_pretrained``).
    """
    path = Path(path) if path is not None else default_pipeline_dir()
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no digits pipeline at {path}. The default one ships with flowrl's assets; rebuild it with `flowrl pretrain-digits`."
        )
    pipe = DigitsPipeline.from_pretrained(str(path), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    return pipe


def load_default_digits_pipeline(device: str | torch.device | None = None, **kwargs: Any) -> DigitsPipeline:
    """The shipped pretrained digits model (``assets/digits/pipeline``), in eval mode."""
    return load_digits_pipeline(None, device=device, **kwargs)
