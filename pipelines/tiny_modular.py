"""Offline tiny builders of the families flowrl runs through diffusers' Modular Pipelines, and the
family list of the conformance kit (``flowrl check-pipeline --table``, ``tests/test_modular_families.py``).

Each builder returns a *regular* diffusers pipeline with real architectures at tiny random size
(1–3 layers, hidden 16–32, 32×32 images or 5-frame 32×32 videos); the kit saves it with
``save_pretrained``, loads it back and wraps the modular pipeline diffusers has for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def _qwen3(*, causal: bool, vocab: int, hidden: int = 16, layers: int = 3, seed: int = 0, pad: int = 0, eos: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    _seeded(seed)
    cfg = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512, pad_token_id=pad, eos_token_id=eos, bos_token_id=None,
    )
    return (Qwen3ForCausalLM if causal else Qwen3Model)(cfg).eval()


def _qwen_tok():
    from flowrl.pipelines.tiny_video import qwen2_tokenizer

    tok = qwen2_tokenizer(model_max_length=512)
    return tok, tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")


def tiny_flux2_klein_pipeline(*, seed: int = 0, distilled: bool = True):
    """A ``Flux2KleinPipeline``: Qwen3 text encoder (3 layers; the kit passes
    ``text_encoder_out_layers=(1, 2, 3)``), ``AutoencoderKLFlux2`` (scale 2, 4 latent channels,
    2×2 patchified → 16 channels), ``Flux2Transformer2DModel`` (1 + 1 layers, 2 heads of 16).
    ``distilled=False`` is Klein base (CFG through a guider)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    tok, pad, eos = _qwen_tok()
    text_encoder = _qwen3(causal=True, vocab=len(tok), seed=seed + 2, pad=pad, eos=eos)
    _seeded(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * 16, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    ).eval()
    _seeded(seed + 1)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32, mid_block_add_attention=False,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer, is_distilled=distilled)


def tiny_z_image_pipeline(*, seed: int = 0):
    """A ``ZImagePipeline``: Qwen3 text encoder (3 layers, hidden 16), the SD-style ``AutoencoderKL``
    (scale 2, 16 latent channels), ``ZImageTransformer2DModel`` (dim 32, 1 + 1 layers, 2 heads)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    from flowrl.pipelines.tiny import tiny_vae

    tok, pad, eos = _qwen_tok()
    text_encoder = _qwen3(causal=False, vocab=len(tok), seed=seed + 2, pad=pad, eos=eos)
    _seeded(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    ).eval()
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(latent_channels=16, seed=seed + 1),
        text_encoder=text_encoder, tokenizer=tok, transformer=transformer,
    )


def tiny_wan22_pipeline(*, seed: int = 0, boundary_ratio: float = 0.9):
    """Wan 2.2 A14B layout: the tiny Wan 2.1 pipeline plus a second expert (``transformer_2``, other
    random weights) used below ``boundary_ratio``·1000 (0.9: from the second step of a 2-step shifted
    schedule on), so a short schedule runs both experts."""
    from diffusers import WanPipeline, WanTransformer3DModel

    from flowrl.pipelines.tiny_video import tiny_wan_pipeline

    base = tiny_wan_pipeline(seed=seed)
    _seeded(seed + 7)
    second = WanTransformer3DModel.from_config(base.transformer.config).eval()
    return WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler,
                       transformer=base.transformer, transformer_2=second, boundary_ratio=boundary_ratio)


def _randomize_zero_init(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Give the zero-initialised parameters (adaLN modulation, final projection) random values, so a
    random tiny model's velocity is not identically 0 (which would make every check pass trivially)."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)


@dataclass
class TinyFamily:
    """One family of the kit: its tiny builder and the call inputs / guidance the kit uses."""

    build: Callable[[], Any]
    options: dict[str, Any] = field(default_factory=dict)
    guidance_scale: float = 1.0
    prompts: tuple[str, ...] = ("a cat", "a dog left of a 3")
    size: tuple[int, int] | None = None
    #: called on the modular pipeline after loading (test-size text contexts)
    modular_fix: Callable[[Any], Any] | None = None
    #: the regular pipeline class the builder makes (``flowrl check-pipeline FluxPipeline``)
    pipeline_class: str = ""
    #: the path the kit checks: the modular one (True) or the hand adapter against the stock
    #: regular call (False; the image-conditioned families)
    modular: bool = True
    #: extra inputs of the stock regular call (hand-adapter families)
    stock_kwargs: dict[str, Any] = field(default_factory=dict)
    #: called on the regular pipeline after loading (test-size defaults)
    after_load: Callable[[Any], Any] | None = None


def _tiny_sd3():
    from flowrl.pipelines.tiny import tiny_sd3_pipeline

    return tiny_sd3_pipeline()


def _tiny_flux():
    from flowrl.pipelines.tiny import tiny_flux_pipeline

    return tiny_flux_pipeline()


def _tiny_wan():
    from flowrl.pipelines.tiny_video import tiny_wan_pipeline

    return tiny_wan_pipeline()


def _tiny_qwen():
    from flowrl.pipelines.tiny_video import tiny_qwen_image_pipeline

    return tiny_qwen_image_pipeline()


def _tiny_hv15():
    from flowrl.pipelines.tiny_video import tiny_hunyuan_video15_pipeline

    return tiny_hunyuan_video15_pipeline()


def short_hunyuan_video15_context(mp: Any) -> Any:
    """Give a modular HunyuanVideo 1.5 pipeline the short text context of the tiny tests (its
    lengths are class properties: 1000 Qwen + 256 ByT5 tokens, a 108-token template crop; with the
    byte-level test tokenizer every prompt would be cut). Test plumbing: a subclass with short values."""
    from flowrl.pipelines.tiny_video import shrink_hunyuan_text_context

    class _Short:
        pass

    probe = _Short()
    probe.tokenizer = mp.tokenizer
    shrink_hunyuan_text_context(probe)
    values = {k: getattr(probe, k) for k in ("system_message", "prompt_template_encode_start_idx", "tokenizer_max_length", "tokenizer_2_max_length", "vision_num_semantic_tokens")}
    mp.__class__ = type("Short" + type(mp).__name__, (type(mp),), {k: property(lambda self, v=v: v) for k, v in values.items()})
    return mp


def _tiny_kontext():
    from flowrl.pipelines.tiny import tiny_flux_kontext_pipeline

    return tiny_flux_kontext_pipeline()


def _tiny_wan_i2v():
    from flowrl.pipelines.tiny_video import tiny_wan_i2v_pipeline

    return tiny_wan_i2v_pipeline()


def _tiny_hv15_i2v():
    from flowrl.pipelines.tiny_video import tiny_hunyuan_video15_i2v_pipeline

    return tiny_hunyuan_video15_i2v_pipeline()


def _test_defaults(pipe: Any) -> Any:
    from flowrl.pipelines.tiny_video import with_test_defaults

    return with_test_defaults(pipe)


def tiny_wan22_i2v_pipeline(*, seed: int = 0, boundary_ratio: float = 0.9):
    """Wan 2.2 A14B image-to-video layout: a ``WanImageToVideoPipeline`` with no CLIP image encoder
    (the transformer takes latents + mask + first-frame condition, in_channels 16 + 4 + 16, and no
    image features) and two experts (``transformer_2`` below ``boundary_ratio``·1000)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel

    from flowrl.pipelines.tiny_video import tiny_wan_pipeline

    base = tiny_wan_pipeline(seed=seed)
    experts = []
    for k in range(2):
        _seeded(seed + 3 + k)
        experts.append(WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16, text_dim=32,
            freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ).eval())
    return WanImageToVideoPipeline(
        tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        image_processor=None, image_encoder=None, transformer=experts[0], transformer_2=experts[1], boundary_ratio=boundary_ratio,
    )


VIDEO = {"num_frames": 5}
QWEN_TEXT = {"max_sequence_length": 32}

#: the kit's families (name → TinyFamily)
TINY_FAMILIES: dict[str, TinyFamily] = {
    "SD3": TinyFamily(_tiny_sd3, guidance_scale=4.5, size=(16, 16), pipeline_class="StableDiffusion3Pipeline"),
    "Flux": TinyFamily(_tiny_flux, size=(16, 16), pipeline_class="FluxPipeline"),
    "Flux.2 Klein": TinyFamily(tiny_flux2_klein_pipeline, options={"text_encoder_out_layers": (1, 2, 3), **QWEN_TEXT}, size=(32, 32), pipeline_class="Flux2KleinPipeline"),
    "Flux.2 Klein base": TinyFamily(lambda: tiny_flux2_klein_pipeline(distilled=False), options={"text_encoder_out_layers": (1, 2, 3), **QWEN_TEXT}, guidance_scale=4.0, size=(32, 32)),
    "Qwen-Image": TinyFamily(_tiny_qwen, size=(64, 64), pipeline_class="QwenImagePipeline"),
    "Z-Image": TinyFamily(tiny_z_image_pipeline, options=QWEN_TEXT, size=(32, 32), pipeline_class="ZImagePipeline"),
    "Wan 2.1 T2V": TinyFamily(_tiny_wan, options=VIDEO, size=(32, 32), pipeline_class="WanPipeline"),
    "Wan 2.2 T2V (two experts)": TinyFamily(tiny_wan22_pipeline, options=VIDEO, size=(32, 32)),
    "LTX-Video T2V": TinyFamily(lambda: tiny_ltx_pipeline(), options={"num_frames": 9, "max_sequence_length": 32}, guidance_scale=3.0, size=(32, 32), pipeline_class="LTXPipeline"),
    "HunyuanVideo 1.5 T2V": TinyFamily(_tiny_hv15, options=VIDEO, guidance_scale=6.0, prompts=("a cat",), size=(32, 32), modular_fix=short_hunyuan_video15_context, pipeline_class="HunyuanVideo15Pipeline"),
    # the byte-level test tokenizer spends 149 tokens on Krea 2's fixed template prefix (34 with the real one)
    "Krea 2": TinyFamily(lambda: tiny_krea2_pipeline(), options={"max_sequence_length": 160}, guidance_scale=4.0, size=(32, 32), pipeline_class="Krea2Pipeline"),
    "Krea 2 Turbo": TinyFamily(lambda: tiny_krea2_pipeline(distilled=True), options={"max_sequence_length": 160}, size=(32, 32)),
    "ERNIE-Image": TinyFamily(lambda: tiny_ernie_image_pipeline(), guidance_scale=4.0, size=(32, 32), pipeline_class="ErnieImagePipeline"),
    # image-conditioned: hand adapters against the stock regular call, the kit makes the source images
    "Flux Kontext": TinyFamily(_tiny_kontext, size=(32, 32), modular=False, stock_kwargs={"_auto_resize": False, "max_area": 32 * 32},
                               pipeline_class="FluxKontextPipeline"),
    "Wan 2.1 I2V": TinyFamily(_tiny_wan_i2v, options=VIDEO, size=(32, 32), modular=False, stock_kwargs={"guidance_scale": 1.0, **VIDEO},
                              after_load=_test_defaults, pipeline_class="WanImageToVideoPipeline"),
    "Wan 2.2 A14B I2V (two experts)": TinyFamily(tiny_wan22_i2v_pipeline, options=VIDEO, size=(32, 32), modular=False,
                                                 stock_kwargs={"guidance_scale": 1.0, "guidance_scale_2": 1.0, **VIDEO}, after_load=_test_defaults),
    "HunyuanVideo 1.5 I2V": TinyFamily(_tiny_hv15_i2v, options=VIDEO, guidance_scale=6.0, prompts=("a cat",), size=(32, 32), modular=False,
                                       stock_kwargs=VIDEO, after_load=_test_defaults, pipeline_class="HunyuanVideo15ImageToVideoPipeline"),
}


def family_of(name: str) -> str | None:
    """The kit family called ``name`` (case-insensitive), or whose tiny builder makes pipeline class
    ``name`` (e.g. ``FluxPipeline``, ``Flux2KleinPipeline``); None when there is none."""
    low = name.lower()
    for fam in TINY_FAMILIES:
        if fam.lower() == low:
            return fam
    for fam, spec in TINY_FAMILIES.items():
        if spec.pipeline_class.lower() in (low, low.replace("modular", "")):
            return fam
    return None


def build_family(name: str, directory: str) -> Any:
    """The tiny regular pipeline of ``name``, saved to ``directory`` and loaded back."""
    from flowrl.pipelines.tiny import save_and_reload

    if name not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family '{name}'. Known: {', '.join(TINY_FAMILIES)}.")
    fam = TINY_FAMILIES[name]
    pipe = save_and_reload(fam.build(), directory)
    if fam.after_load is not None:
        pipe = fam.after_load(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_ltx_pipeline(*, seed: int = 0):
    """An ``LTXPipeline`` (LTX-Video 0.9): T5 text encoder (2 layers, d_model 32),
    ``AutoencoderKLLTXVideo`` (2 levels, one spatio-temporal downsampling, patch 4: spatial scale 8,
    temporal 2 → 9 frames of 32×32 give latents ``[B, 8, 5, 4, 4]``), ``LTXVideoTransformer3DModel``
    (1 layer, 2 heads of 8)."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    from flowrl.pipelines.tiny import t5_tokenizer, tiny_t5_encoder

    tok = t5_tokenizer(model_max_length=32)
    text_encoder = tiny_t5_encoder(vocab_size=len(tok), seed=seed + 2)
    _seeded(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, num_layers=1, caption_channels=32,
    ).eval()
    _seeded(seed + 1)
    vae = AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1), spatio_temporal_scaling=(True, False), decoder_spatio_temporal_scaling=(True, False),
        decoder_inject_noise=(False, False, False), upsample_residual=(False, False), upsample_factor=(1, 1),
        down_block_types=("LTXVideoDownBlock3D",) * 2, downsample_type=("conv", "conv"),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024, max_image_seq_len=4096)
    return LTXPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer)


def tiny_krea2_pipeline(*, seed: int = 0, distilled: bool = False):
    """A ``Krea2Pipeline`` (the base, CFG-guided checkpoint layout; ``distilled=True``: the turbo
    layout, no guider, fixed shift ``mu`` 1.15): a ``Qwen3VLModel`` text encoder
    (35 text layers of hidden 16 — diffusers' modular Krea 2 encoder taps the released layers 2, 5,
    …, 35 — and a one-block vision part it does not use), the tiny Qwen-Image VAE (scale 8, 16 latent
    channels, packed 2×2 → 64), ``Krea2Transformer2DModel`` (1 layer, 2 heads of 16)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel
    from transformers import Qwen3VLConfig, Qwen3VLModel

    from flowrl.pipelines.tiny_video import QWEN_CHAT_SPECIALS

    tok, pad, eos = _qwen_tok()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_CHAT_SPECIALS}
    _seeded(seed + 2)
    text_encoder = Qwen3VLModel(Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=35, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8, max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                         pad_token_id=pad, bos_token_id=None, eos_token_id=eos),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=16, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, deepstack_visual_indexes=[]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )).eval()
    _seeded(seed)
    transformer = Krea2Transformer2DModel(
        in_channels=64, num_layers=1, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=48,
        timestep_embed_dim=32, text_hidden_dim=16, num_text_layers=12, text_num_attention_heads=2, text_num_key_value_heads=2,
        text_intermediate_size=24, num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6),
    ).eval()
    _seeded(seed + 1)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return Krea2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer, is_distilled=distilled)


def tiny_ernie_image_pipeline(*, seed: int = 0):
    """An ``ErnieImagePipeline`` without its optional prompt enhancer: a ``Mistral3Model`` text
    encoder (3 text layers of hidden 16 and a one-layer Pixtral vision part it does not use; the
    pipeline reads the penultimate hidden states of the plain tokenized prompt), the tiny Flux.2 VAE
    (4 latent channels, 2×2 patchified → 16), ``ErnieImageTransformer2DModel`` (1 layer, 2 heads of 16)."""
    from diffusers import AutoencoderKLFlux2, ErnieImagePipeline, ErnieImageTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import Mistral3Config, Mistral3Model

    tok, pad, eos = _qwen_tok()
    _seeded(seed + 2)
    text_encoder = Mistral3Model(Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8, max_position_embeddings=512, pad_token_id=pad, bos_token_id=None, eos_token_id=eos),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                           image_size=32, patch_size=8),
        image_token_index=pad, spatial_merge_size=2, projector_hidden_act="gelu", vision_feature_layer=-1,
    )).eval()
    _seeded(seed)
    transformer = ErnieImageTransformer2DModel(
        hidden_size=32, num_attention_heads=2, num_layers=1, ffn_hidden_size=48, in_channels=16, out_channels=16, text_in_dim=16, rope_axes_dim=(4, 6, 6),
    ).eval()
    _randomize_zero_init(transformer, seed)
    _seeded(seed + 1)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32, mid_block_add_attention=False,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return ErnieImagePipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tok, scheduler=scheduler)
