"""Offline tiny builders: real diffusers/transformers architectures at tiny random size.

Used by tests and the quick-start smoke job. Everything is built in memory (no hub): tokenizers
from in-memory vocabularies (or open_clip's shipped CLIP BPE file for the real 49,408-token CLIP
tokenizer), models with seeded random weights. ``save_and_reload`` writes a pipeline with
``save_pretrained`` and loads it back with ``from_pretrained`` so the real loading path is used.
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=2)
def _clip_vocab(real: bool) -> tuple[dict[str, int], list[tuple[str, str]]]:
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    if real:
        import open_clip

        bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
        lines = gzip.open(bpe).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
        vocab_list += ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def clip_tokenizer(*, real: bool = False, model_max_length: int = 77):
    """A CLIPTokenizer without files. ``real=True`` builds the real 49,408-token CLIP BPE from
    open_clip's shipped merges (ids equal open_clip's); otherwise a byte-level vocab of 514 tokens."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab(real)
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int = 32):
    """A small Unigram T5 tokenizer over lowercase letters, digits and a few words."""
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>"] + ["▁" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + list("abcdefghijklmnopqrstuvwxyz0123456789")
    pieces += ["▁a", "▁the", "▁of", "▁left", "▁right", "▁above", "▁below", "▁two", "▁photo", "▁cat", "▁dog"]
    vocab = [(p, 0.0 if i < 3 else -float(i) / 100) for i, p in enumerate(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _seeded(seed: int):
    torch.manual_seed(seed)


def tiny_clip_text_encoder(*, vocab_size: int, hidden: int = 32, projection: int = 32, seed: int = 0, with_projection: bool = True):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _seeded(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=projection, hidden_act="gelu",
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg).eval()


def tiny_t5_encoder(*, vocab_size: int, d_model: int = 32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    _seeded(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=64, d_kv=8, num_layers=2, num_heads=2, relative_attention_num_buckets=8)
    return T5EncoderModel(cfg).eval()


def tiny_vae(*, latent_channels: int = 4, seed: int = 0, shift_factor: float = 0.0):
    from diffusers import AutoencoderKL

    _seeded(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(4, 8), latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=1, layers_per_block=1, sample_size=32, shift_factor=shift_factor, scaling_factor=1.0,
    ).eval()


def tiny_sd3_pipeline(*, seed: int = 0, shift: float = 3.0, real_clip_vocab: bool = False):
    """A ``StableDiffusion3Pipeline`` with random tiny weights (transformer ≈ 60k parameters).

    Generates at 16×16 pixels (latent 8×8×4; VAE scale factor 2) in tens of milliseconds.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok = clip_tokenizer(real=real_clip_vocab)
    vocab = len(tok)
    _seeded(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=tiny_vae(seed=seed + 1),
        text_encoder=tiny_clip_text_encoder(vocab_size=vocab, seed=seed + 2),
        tokenizer=tok,
        text_encoder_2=tiny_clip_text_encoder(vocab_size=vocab, seed=seed + 3),
        tokenizer_2=clip_tokenizer(real=real_clip_vocab),
        text_encoder_3=tiny_t5_encoder(vocab_size=len(t5_tokenizer()), seed=seed + 4),
        tokenizer_3=t5_tokenizer(),
    )
    return pipe


def tiny_flux_pipeline(*, seed: int = 0, guidance_embeds: bool = True, real_clip_vocab: bool = False):
    """A ``FluxPipeline`` with random tiny weights: packed 2×2 latents (16 channels), RoPE ids,
    guidance embedding, dynamic-shift scheduler. Generates at 16×16 pixels."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok = clip_tokenizer(real=real_clip_vocab)
    _seeded(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=tiny_vae(seed=seed + 1, shift_factor=0.0),
        text_encoder=tiny_clip_text_encoder(vocab_size=len(tok), seed=seed + 2, with_projection=False),
        tokenizer=tok,
        text_encoder_2=tiny_t5_encoder(vocab_size=len(t5_tokenizer()), seed=seed + 3),
        tokenizer_2=t5_tokenizer(),
    )


def tiny_flux_kontext_pipeline(*, seed: int = 0, real_clip_vocab: bool = False):
    """A ``FluxKontextPipeline`` (instruction editing) with the tiny Flux's random weights: the
    source image's packed latents are appended to the image tokens. Edits at 32×32 pixels."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**tiny_flux_pipeline(seed=seed, real_clip_vocab=real_clip_vocab).components)


def save_and_reload(pipe: Any, directory: str | os.PathLike) -> Any:
    """``pipe.save_pretrained(directory)`` then ``type(pipe).from_pretrained(directory)`` — the same
    path a user's checkpoint takes (offline; eval mode)."""
    directory = Path(directory)
    pipe.save_pretrained(directory)
    return type(pipe).from_pretrained(directory, local_files_only=True)


def tiny_amused_pipeline(*, seed: int = 0, codebook_size: int = 64, latent_size: int = 8):
    """An ``AmusedPipeline`` (masked-token image model) with random tiny weights: ``VQModel`` with 3
    blocks (scale 4, ``codebook_size`` codes), ``UVit2DModel`` (vocab = codebook + 1 mask token,
    downsampling, so ``latent_size`` is even), CLIP text encoder with projection,
    ``AmusedScheduler(mask_token_id=codebook_size)``. Generates ``4·latent_size`` pixels (32×32)."""
    import warnings

    from diffusers import AmusedScheduler, UVit2DModel, VQModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import AmusedPipeline

    tok = clip_tokenizer()
    text_encoder = tiny_clip_text_encoder(vocab_size=len(tok), hidden=16, projection=16, seed=seed + 2)
    _seeded(seed)
    micro = 2
    transformer = UVit2DModel(
        hidden_size=16, use_bias=False, hidden_dropout=0.0, cond_embed_dim=16, micro_cond_encode_dim=micro,
        micro_cond_embed_dim=5 * micro, encoder_hidden_size=16, vocab_size=codebook_size + 1, codebook_size=codebook_size,
        in_channels=16, block_out_channels=16, num_res_blocks=1, downsample=True, upsample=True, block_num_heads=1,
        num_hidden_layers=1, num_attention_heads=1, attention_dropout=0.0, intermediate_size=16, layer_norm_eps=1e-6,
        ln_elementwise_affine=True, sample_size=latent_size,
    ).eval()
    _seeded(seed + 1)
    vqvae = VQModel(
        act_fn="silu", block_out_channels=[8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 3, in_channels=3,
        latent_channels=4, layers_per_block=1, norm_num_groups=8, num_vq_embeddings=codebook_size, out_channels=3,
        sample_size=4 * latent_size, up_block_types=["UpDecoderBlock2D"] * 3, mid_block_add_attention=False,
        lookup_from_codebook=True,
    ).eval()
    return AmusedPipeline(vqvae=vqvae, tokenizer=tok, text_encoder=text_encoder, transformer=transformer,
                          scheduler=AmusedScheduler(mask_token_id=codebook_size))
