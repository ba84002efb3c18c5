"""Offline tiny builders of the video / large-image families: Wan 2.1/2.2 text-to-video,
HunyuanVideo 1.5 and Qwen-Image, with their real diffusers / transformers architectures at tiny
random size (no hub, nothing downloaded). Tokenizers are built from in-memory vocabularies.

Sizes (chosen so a 4-step generation takes well under a second on one CPU thread):

- ``tiny_wan_pipeline``: VAE scale 8 in space, 4 in time → 64×64 pixels and 5 frames give latents
  ``[B, 16, 2, 8, 8]``; transformer patch (1, 2, 2), 2 layers, 2 heads of 12.
- ``tiny_hunyuan_video15_pipeline``: VAE scale 16 in space, 4 in time → 128×128 pixels and 5
  frames give latents ``[B, 8, 2, 8, 8]``; Qwen2.5-VL text model (3 layers: the pipeline reads
  ``hidden_states[-3]``), ByT5 glyph encoder, CFG through a ``ClassifierFreeGuidance`` guider.
- ``tiny_qwen_image_pipeline``: VAE scale 8 → 64×64 pixels give packed latents ``[B, 16, 64]``
  (8×8×16 latents in 2×2 patches); Qwen2.5-VL text encoder with a tiny vision tower.
"""

from __future__ import annotations

import torch

QWEN_CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

#: Qwen2 chat template (system turn given by the caller; HunyuanVideo 1.5 applies it to every prompt).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def qwen2_tokenizer(*, model_max_length: int = 2048):
    """A byte-level ``Qwen2Tokenizer`` (no merges) with the chat specials registered as special
    tokens (otherwise ``<|im_start|>`` is split into bytes) and the Qwen2 chat template."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    from flowrl.pipelines.tiny import _bytes_to_unicode

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=model_max_length)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_CHAT_SPECIALS], special_tokens=True)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def umt5_tokenizer(model_max_length: int = 512):
    """A small Unigram T5 tokenizer (Wan's text encoder is UMT5, which uses the same T5 tokenizer class)."""
    from flowrl.pipelines.tiny import t5_tokenizer

    return t5_tokenizer(model_max_length=model_max_length)


def tiny_wan_pipeline(*, seed: int = 0, shift: float = 3.0, unipc: bool = False):
    """A ``WanPipeline`` (Wan 2.1 text-to-video layout) with random tiny weights.

    ``unipc=True`` ships the released scheduler kind (``UniPCMultistepScheduler`` with flow sigmas
    and ``flow_shift``); the default is ``FlowMatchEulerDiscreteScheduler(shift)``, which the stock
    ``__call__`` also accepts, for ODE parity checks.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tok = umt5_tokenizer()
    _seeded(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16, text_dim=32,
        freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()
    _seeded(seed + 1)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]).eval()
    _seeded(seed + 2)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=2, relative_attention_num_buckets=8)).eval()
    if unipc:
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, num_train_timesteps=1000)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    return WanPipeline(tokenizer=tok, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler)


def tiny_wan_i2v_pipeline(*, seed: int = 0, shift: float = 3.0):
    """A ``WanImageToVideoPipeline`` (Wan 2.1 I2V layout) with random tiny weights: the transformer
    takes latents + mask + first-frame condition (in_channels 16 + 4 + 16) and CLIP vision features
    of the frame through its added key/value projections; a tiny ``CLIPVisionModel`` (32×32 input)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    base = tiny_wan_pipeline(seed=seed, shift=shift)
    _seeded(seed + 3)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16, text_dim=32,
        freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        image_dim=16, added_kv_proj_dim=24,
    ).eval()
    _seeded(seed + 4)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, projection_dim=16, num_hidden_layers=2, num_attention_heads=2,
                                                     image_size=32, intermediate_size=24, patch_size=8)).eval()
    image_processor = CLIPImageProcessor(crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32})
    return WanImageToVideoPipeline(
        tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        image_processor=image_processor, image_encoder=image_encoder, transformer=transformer,
    )


def tiny_hunyuan_video15_pipeline(*, seed: int = 0, shift: float = 5.0, guidance_scale: float = 6.0):
    """A ``HunyuanVideo15Pipeline`` with random tiny weights (text-to-video), ``shift`` 5 and a CFG
    guider at scale 6 as released."""
    from diffusers import AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    tok = qwen2_tokenizer()
    _seeded(seed)
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
    )).eval()
    tok2 = ByT5Tokenizer()
    _seeded(seed + 1)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=2, relative_attention_num_buckets=8)).eval()
    _seeded(seed + 2)
    transformer = _tiny_hunyuan_transformer(target_size=128, task_type="t2v")
    _seeded(seed + 3)
    vae = AutoencoderKLHunyuanVideo15(latent_channels=8, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1, spatial_compression_ratio=16, temporal_compression_ratio=4).eval()
    return HunyuanVideo15Pipeline(
        text_encoder=text_encoder, tokenizer=tok, transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        text_encoder_2=text_encoder_2, tokenizer_2=tok2, guider=ClassifierFreeGuidance(guidance_scale=guidance_scale),
    )


def _tiny_hunyuan_transformer(*, target_size: int, task_type: str):
    """The tiny HunyuanVideo 1.5 transformer both tiny pipelines use (8 latent channels, the
    conditioning channels and mask stacked on the input), for ``task_type`` t2v or i2v."""
    from diffusers import HunyuanVideo15Transformer3DModel

    return HunyuanVideo15Transformer3DModel(
        in_channels=2 * 8 + 1, out_channels=8, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_refiner_layers=1,
        mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=32, text_embed_2_dim=32, image_embed_dim=16,
        rope_axes_dim=(4, 6, 6), target_size=target_size, task_type=task_type,
    ).eval()


def tiny_hunyuan_video15_i2v_pipeline(*, seed: int = 0, shift: float = 5.0, guidance_scale: float = 6.0):
    """A ``HunyuanVideo15ImageToVideoPipeline`` with random tiny weights: the text-to-video tiny's
    text encoders, a transformer of ``task_type="i2v"`` with ``target_size`` 32 (a 32×32 frame
    generates 32×32 video, as the stock call picks its size from the frame), a VAE wide enough to
    encode (its encoder groups channels by 2·latent channels), a tiny ``SiglipVisionModel``."""
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15ImageToVideoPipeline
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    base = tiny_hunyuan_video15_pipeline(seed=seed, shift=shift, guidance_scale=guidance_scale)
    _seeded(seed + 5)
    transformer = _tiny_hunyuan_transformer(target_size=32, task_type="i2v")
    _seeded(seed + 6)
    vae = AutoencoderKLHunyuanVideo15(latent_channels=8, block_out_channels=(16,) * 5, layers_per_block=1, spatial_compression_ratio=16, temporal_compression_ratio=4).eval()
    _seeded(seed + 7)
    image_encoder = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)).eval()
    c = base.components
    return HunyuanVideo15ImageToVideoPipeline(
        text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], transformer=transformer, vae=vae, scheduler=c["scheduler"],
        text_encoder_2=c["text_encoder_2"], tokenizer_2=c["tokenizer_2"], guider=c["guider"], image_encoder=image_encoder,
        feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}),
    )


def tiny_qwen_image_pipeline(*, seed: int = 0):
    """A ``QwenImagePipeline`` with random tiny weights and the released scheduler settings
    (dynamic shift, ``shift_terminal`` 0.02, exponential time shift)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = qwen2_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_CHAT_SPECIALS}
    _seeded(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         pad_token_id=ids["<|endoftext|>"], bos_token_id=None, eos_token_id=ids["<|im_end|>"]),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=37, num_heads=2, out_hidden_size=32, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )).eval()
    _seeded(seed + 1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()
    _seeded(seed + 2)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
        shift=1.0, shift_terminal=0.02, stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
        use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False,
    )
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer)


def shrink_hunyuan_text_context(pipe, *, text_tokens: int = 24, glyph_tokens: int = 16, system_message: str = "Describe the video."):
    """Shorten a tiny HunyuanVideo 1.5 pipeline's text context (instance attributes the stock
    pipeline sets in ``__init__``, so ``from_pretrained`` resets them; call after loading).

    The released template crop (108 tokens) and lengths (1000 Qwen + 256 ByT5 tokens) assume the
    real tokenizer; with the byte-level test tokenizer the system message alone is ~600 tokens, so
    every prompt would be cut off. This sets a short system message, the crop to its exact token
    length (the prompt starts right after it) and short padded lengths (fast tests)."""
    prefix = f"<|im_start|>system\n{system_message}<|im_end|>\n<|im_start|>user\n"
    pipe.system_message = system_message
    pipe.prompt_template_encode_start_idx = len(pipe.tokenizer(prefix, add_special_tokens=False).input_ids)
    pipe.tokenizer_max_length = text_tokens
    pipe.tokenizer_2_max_length = glyph_tokens
    pipe.vision_num_semantic_tokens = 4  # the zero image tokens of text-to-video (729 in the release)
    return pipe


#: generation defaults of the tiny builders: latents of 2 frames × 4×4 (Wan), 2 × 2×2 (HunyuanVideo), 8×8 (Qwen-Image)
TEST_DEFAULTS = {
    "WanPipeline": {"size": (32, 32), "num_frames": 5},
    "WanImageToVideoPipeline": {"size": (32, 32), "num_frames": 5},
    "HunyuanVideo15Pipeline": {"size": (32, 32), "num_frames": 5},
    "HunyuanVideo15ImageToVideoPipeline": {"size": (32, 32), "num_frames": 5},
    "QwenImagePipeline": {"size": (64, 64)},
}


def with_test_defaults(pipe):
    """Give a (reloaded) tiny pipeline small generation defaults (``pipe.flowrl_defaults``, read by
    the adapters) and, for HunyuanVideo 1.5, a short text context (:func:`shrink_hunyuan_text_context`)."""
    name = type(pipe).__name__
    pipe.flowrl_defaults = dict(TEST_DEFAULTS.get(name, {}))
    if name in ("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline"):
        shrink_hunyuan_text_context(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe
