"""Tiny, offline builders of the reward backbones (real architectures, random weights).

Each builder saves with the library's own writer (``save_pretrained`` / ``torch.save`` of a state
dict / an open_clip model config) so that the reward loads it through the same code path as a
real checkpoint.
"""

from __future__ import annotations

import functools
import gzip
import json
import os

import torch

OPENCLIP_TINY = "flowrl-test-tiny-ViT"
CLIP_H_PROCESSOR = dict(  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K preprocessor_config.json
    size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711], resample=3,
)


@functools.lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real 49,408-token CLIP BPE (vocab, merges) from the file bundled with open_clip,
    built exactly like ``open_clip.tokenizer.SimpleTokenizer``."""
    import open_clip.tokenizer as oct

    path = os.path.join(os.path.dirname(oct.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in lines]
    vocab = list(oct.bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe()
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=77)


def tiny_hf_clip_dir(root, *, projection_dim: int = 16, image_size: int = 224, seed: int = 0, processor: dict | None = None) -> str:
    """Tiny transformers ``CLIPModel`` + real CLIP tokenizer + ``CLIPImageProcessor`` in ``root``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77, eos_token_id=49407, bos_token_id=49406, pad_token_id=49407),
        vision_config=dict(image_size=image_size, patch_size=32, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=projection_dim,
    )
    model = CLIPModel(cfg).eval()
    root = str(root)
    model.save_pretrained(root)
    clip_tokenizer().save_pretrained(root)
    CLIPImageProcessor(**(processor or CLIP_H_PROCESSOR)).save_pretrained(root)
    return root


def register_tiny_openclip(root) -> str:
    """Register a tiny open_clip ViT config (image 224, patch 32, real 49,408 vocab) by name."""
    import open_clip

    if OPENCLIP_TINY not in open_clip.list_models():
        cfg = {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        }
        path = os.path.join(str(root), f"{OPENCLIP_TINY}.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        open_clip.add_model_config(path)
    return OPENCLIP_TINY


def sample_images():
    """scikit-learn's two bundled photos (china.jpg 427×640, flower.jpg 427×640) as PIL + float tensors."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    arrs = [np.array(a, copy=True) for a in load_sample_images().images]
    pils = [Image.fromarray(a) for a in arrs]
    tensors = [torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255 for a in arrs]
    return pils, tensors


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def tiny_qwen2vl_reward(*, output_dim: int = 1, seed: int = 0):
    """Tiny Qwen2-VL reward model (real architecture) + byte-level Qwen2 tokenizer + processor.

    Constraints of the architecture: vision hidden_size = text hidden size, mrope_section
    sums to head_dim/2, processor pixel limits small enough not to upscale frames.
    """
    from open_clip.tokenizer import bytes_to_unicode
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from flowrl.rewards.videoalign import SPECIAL_TOKENS, reward_model_class

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS + list(SPECIAL_TOKENS)], special_tokens=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS + list(SPECIAL_TOKENS)}
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}, max_position_embeddings=4096, pad_token_id=ids["<|endoftext|>"], bos_token_id=None, eos_token_id=ids["<|im_end|>"]),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    cfg.reward_output_dim = output_dim
    cfg.reward_token = "special"
    cfg.reward_special_token_ids = [ids[t] for t in SPECIAL_TOKENS]
    torch.manual_seed(seed)
    model = reward_model_class()(cfg).eval()
    pixels = dict(size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56 * 4})
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tok, video_processor=Qwen2VLVideoProcessor(**pixels))
    return model, processor


def tiny_mask2former_dir(root) -> str:
    """Tiny Mask2Former (Swin backbone, 80 COCO classes, 6 queries) + image processor in ``root``;
    every query predicts class 16 (GenEval's "dog") with certainty, masks stay random."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

    torch.manual_seed(0)
    bb = SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=bb, num_labels=80, hidden_dim=32, mask_feature_size=32, feature_size=32, encoder_feedforward_dim=32, dim_feedforward=32,
                            num_queries=6, decoder_layers=2, encoder_layers=1, num_attention_heads=2, common_stride=4)
    model = Mask2FormerForUniversalSegmentation(cfg).eval()
    with torch.no_grad():
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.fill_(-20.0)
        model.class_predictor.bias[16] = 20.0
    model.save_pretrained(str(root))
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}, size_divisor=32).save_pretrained(str(root))
    return str(root)


def tiny_geneval_models(root) -> tuple[str, str]:
    """``(detector_path, clip_path)`` for the ``geneval`` reward: :func:`tiny_mask2former_dir` and a
    tiny CLIP with 32-pixel inputs."""
    import pathlib

    root = pathlib.Path(root)
    clip_proc = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True, resample=3)
    return tiny_mask2former_dir(root / "det"), tiny_hf_clip_dir(root / "clip", image_size=32, processor=clip_proc)
