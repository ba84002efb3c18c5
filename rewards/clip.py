"""CLIP-family backbones (transformers and open_clip) and CLIPScore.

Both backbones take float images ``[B, C, H, W]`` in [0, 1] and reproduce the reference
preprocessing with tensor ops (:mod:`flowrl.rewards.preprocess`), so the scores are also
differentiable with respect to the images. Weights load from a local directory/file or the local
Hugging Face cache (``local_files_only=True``): nothing is downloaded.

CLIPScore (Hessel et al. 2021, without their ``2.5·max(·, 0)`` rescaling) is the cosine similarity
of the L2-normalised image and text embeddings; output scale ~0.2–0.4 for matching pairs.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .base import Reward, register
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess, longest_pad_preprocess, normalize, resize

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float16`` or one of the names float32/fp32/float16/fp16/bfloat16/bf16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype '{dtype}'; known: {', '.join(_DTYPES)}.") from None


def pooled(out: Any) -> Tensor:
    """Features from ``get_*_features`` (a tensor in transformers 4, an output with
    ``pooler_output`` in transformers 5)."""
    return out if isinstance(out, Tensor) else out.pooler_output


def l2n(x: Tensor) -> Tensor:
    """``x / ‖x‖₂`` over the last dim."""
    return x / x.norm(dim=-1, keepdim=True)


def image_config_from_hf(processor: Any) -> dict:
    """The preprocessing settings of a transformers ``CLIPImageProcessor`` as keyword arguments
    of :func:`~flowrl.rewards.preprocess.clip_preprocess` (plus ``squash`` for ``{height, width}`` sizes)."""
    size = dict(processor.size)
    cfg: dict[str, Any] = {
        "mean": tuple(processor.image_mean) if processor.do_normalize else (0.0, 0.0, 0.0),
        "std": tuple(processor.image_std) if processor.do_normalize else (1.0, 1.0, 1.0),
        "interpolation": int(getattr(processor.resample, "value", processor.resample)),
    }
    if "shortest_edge" in size and size["shortest_edge"]:
        cfg["size"] = int(size["shortest_edge"])
        if processor.do_center_crop:
            crop = dict(processor.crop_size)
            cfg["crop_size"] = (int(crop["height"]), int(crop["width"]))
        else:
            raise ValueError("CLIP image processor with do_center_crop=False is not supported; set do_center_crop=True.")
    elif "height" in size:
        cfg["squash"] = (int(size["height"]), int(size["width"]))
    else:
        raise ValueError(f"unsupported image processor size {size}; expected shortest_edge or height/width.")
    return cfg


def hf_image_preprocess(images: Tensor, image_cfg: dict) -> Tensor:
    """Preprocess ``[B, C, H, W]`` in [0, 1] with the settings of :func:`image_config_from_hf`:
    a squash to ``{height, width}``, or shortest-edge resize + centre crop (offsets: floor); normalised."""
    cfg = dict(image_cfg)
    squash = cfg.pop("squash", None)
    if squash is not None:
        return normalize(resize(images.float(), squash, cfg["interpolation"]), cfg["mean"], cfg["std"])
    return clip_preprocess(images, crop="floor", **cfg)


def flatten_video(outputs: Tensor) -> tuple[Tensor, int]:
    """``[B, F, C, H, W]`` → ``([B·F, C, H, W], F)``; images pass with F = 1."""
    if outputs.dim() == 5:
        return outputs.flatten(0, 1), outputs.shape[1]
    return outputs, 1


class HFCLIP:
    """transformers ``CLIPModel`` + tokenizer + image-processor settings, frozen, in eval mode.

    ``path``: model directory or hub id already in the local cache; ``processor_path``: where the
    tokenizer and ``preprocessor_config.json`` live (default: ``path``).
    """

    def __init__(self, path: str, processor_path: str | None = None, *, device="cpu", dtype=torch.float32, max_length: int = 77):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.device, self.dtype = torch.device(device), as_dtype(dtype)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=self.dtype)
        self.model.to(self.device).eval().requires_grad_(False)
        proc = processor_path or path
        self.tokenizer = AutoTokenizer.from_pretrained(proc, local_files_only=True)
        self.image_cfg = image_config_from_hf(CLIPImageProcessor.from_pretrained(proc, local_files_only=True))
        self.max_length = max_length

    def preprocess(self, images: Tensor) -> Tensor:
        """Tensor equivalent of the model's ``CLIPImageProcessor`` (crop offsets: floor)."""
        return hf_image_preprocess(images, self.image_cfg)

    def tokenize(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}

    def image_features(self, images: Tensor) -> Tensor:
        """L2-normalised projected image embeddings ``[B, D]``."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        return l2n(pooled(self.model.get_image_features(pixel_values=pixels)).float())

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised projected text embeddings ``[B, D]``."""
        return l2n(pooled(self.model.get_text_features(**self.tokenize(prompts))).float())


class OpenCLIP:
    """open_clip model (``create_model``) + its tokenizer + tensor version of its eval transform.

    ``pretrained``: a checkpoint file, or a tag/``hf-hub:`` name already in the local cache.
    ``checkpoint``: optional extra state-dict file loaded on top (HPSv2 style:
    ``{"state_dict": ...}`` or a bare state dict, ``module.`` prefixes stripped).
    ``resize_mode``: override the model's (``shortest``, ``longest``, ``squash``).
    """

    def __init__(self, model_name: str, pretrained: str | None = None, *, checkpoint: str | None = None, device="cpu", dtype=torch.float32, resize_mode: str | None = None, cache_dir: str | None = None):
        import open_clip

        self.device, self.dtype = torch.device(device), as_dtype(dtype)
        self.model = open_clip.create_model(model_name, pretrained=pretrained, device="cpu", cache_dir=cache_dir)
        if checkpoint is not None:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
            state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
            self.model.load_state_dict(state)
        self.model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = dict(getattr(self.model.visual, "preprocess_cfg", {}) or {})
        size = cfg.get("size", getattr(self.model.visual, "image_size", 224))
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.image_cfg = {
            "size": int(size),
            "mean": tuple(cfg.get("mean", OPENAI_CLIP_MEAN)),
            "std": tuple(cfg.get("std", OPENAI_CLIP_STD)),
            "interpolation": cfg.get("interpolation", "bicubic"),
            "resize_mode": resize_mode or cfg.get("resize_mode", "shortest"),
            "fill": float(cfg.get("fill_color", 0)) / 255.0,
        }

    def preprocess(self, images: Tensor) -> Tensor:
        """Tensor equivalent of open_clip's ``image_transform(size, is_train=False, ...)``."""
        c = self.image_cfg
        if c["resize_mode"] == "shortest":
            return clip_preprocess(images, size=c["size"], mean=c["mean"], std=c["std"], interpolation=c["interpolation"], crop="round")
        if c["resize_mode"] == "longest":
            return longest_pad_preprocess(images, size=c["size"], mean=c["mean"], std=c["std"], interpolation=c["interpolation"], fill=c["fill"])
        if c["resize_mode"] == "squash":
            return normalize(resize(images.float(), (c["size"], c["size"]), c["interpolation"]), c["mean"], c["std"])
        raise ValueError(f"unknown resize_mode '{c['resize_mode']}'; known: shortest, longest, squash.")

    def image_features(self, images: Tensor) -> Tensor:
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        return l2n(self.model.encode_image(pixels).float())

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        return l2n(self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float())


def video_mean(fn, outputs: Tensor, prompts: Sequence[str]) -> Tensor:
    """Score video ``[B, F, C, H, W]`` as the mean over frames of the image score ``fn``."""
    images, frames = flatten_video(outputs)
    if frames == 1:
        return fn(images, list(prompts))
    per = fn(images, [p for p in prompts for _ in range(frames)])
    return per.view(-1, frames).mean(dim=1)


@register("clipscore")
class CLIPScore(Reward):
    """CLIPScore with a transformers ``CLIPModel``: ``cos(E_img(x), E_txt(prompt))``.

    Default ``path="openai/clip-vit-large-patch14"`` (from the local HF cache). Preprocessing: the
    model's ``CLIPImageProcessor`` (shortest edge, centre crop, CLIP mean/std). Video: mean over
    frames. Output: cosine in [−1, 1], ~0.2–0.4 for matching pairs.
    """

    name = "clipscore"
    modalities = ("image", "video")
    differentiable = True
    scale = "cosine, ~0.2-0.4"

    def __init__(self, path: str = "openai/clip-vit-large-patch14", processor_path: str | None = None, *, device="cpu", dtype="float32", batch_size: int | None = None):
        self.clip = HFCLIP(path, processor_path, device=device, dtype=dtype)
        self.device, self.dtype, self.batch_size = self.clip.device, self.clip.dtype, batch_size

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return (self.clip.image_features(images) * self.clip.text_features(prompts)).sum(-1)

    def __call__(self, outputs, prompts, meta=None):
        return video_mean(self._score, outputs, prompts)


@register("clipscore_openclip")
class OpenCLIPScore(Reward):
    """CLIPScore with an open_clip model (e.g. ``model_name="ViT-H-14-quickgelu",
    pretrained="dfn5b"`` from the cache, or a checkpoint file). Preprocessing: the model's eval
    transform. Output: cosine, ~0.2–0.4."""

    name = "clipscore_openclip"
    modalities = ("image", "video")
    differentiable = True
    scale = "cosine, ~0.2-0.4"

    def __init__(self, model_name: str = "ViT-H-14", pretrained: str | None = None, *, device="cpu", dtype="float32", batch_size: int | None = None, cache_dir: str | None = None):
        if pretrained is None:
            raise ValueError("clipscore_openclip needs `pretrained`: a checkpoint file or a cached tag (e.g. 'laion2b_s32b_b79k').")
        self.clip = OpenCLIP(model_name, pretrained, device=device, dtype=dtype, cache_dir=cache_dir)
        self.device, self.dtype, self.batch_size = self.clip.device, self.clip.dtype, batch_size

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return (self.clip.image_features(images) * self.clip.text_features(prompts)).sum(-1)

    def __call__(self, outputs, prompts, meta=None):
        return video_mean(self._score, outputs, prompts)
