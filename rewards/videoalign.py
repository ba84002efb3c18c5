"""VideoAlign / VideoReward (Liu et al. 2025, "Improving Video Generation with Human Feedback",
``KwaiVGI/VideoAlign``): a Qwen2-VL-2B reward model scoring Visual Quality (VQ), Motion Quality
(MQ) and Text Alignment (TA).

Model (VideoAlign ``trainer.py``, ``Qwen2VLRewardModelBT``): Qwen2-VL with a bias-free linear
head ``rm_head: hidden → output_dim`` on the last hidden states. With ``reward_token="special"``
the head is read at the three special tokens ``<|VQ_reward|>``, ``<|MQ_reward|>``,
``<|TA_reward|>`` placed in the prompt: logits ``[B, 3, N]``, diagonal when ``N = 3``, else
flattened (the release uses ``N = 1`` → ``[B, 3]`` = VQ, MQ, TA in prompt order).
``reward_token="last"`` reads the last non-padding token (``[B, N]``).

Inputs (VideoAlign ``inference.py`` + ``vision_process.py``): frames sampled at ``fps`` (2) or
``num_frames`` evenly spaced, rounded to a multiple of 2; each frame resized with Qwen2-VL's
``smart_resize`` (multiples of 28, ``min_pixels ≤ h·w ≤ max_pixels``; ``max_pixels`` from the
checkpoint config) by antialiased bicubic interpolation on float tensors; then the Qwen2-VL video
processor (CLIP mean/std, 2×14×14 patches); the user turn is the video followed by the prompt
template with the caption, in the Qwen2-VL chat format with the generation prompt.

Outputs: dict ``{"VQ", "MQ", "TA"}`` of raw logits, optionally normalised with the checkpoint's
means/stds (``(r − mean) / std``, VideoAlign ``use_norm``); Overall = VQ + MQ + TA is what the
RewardSet's sum over components gives (component weights 1).

Checkpoint form loaded here: a directory written by :meth:`VideoAlign.save` (``save_pretrained``
of the model with its ``rm_head`` and special tokens, the Qwen2-VL processor, and
``videoalign.json`` with template, sampling and normalisation). The original release
(LoRA adapter + ``non_lora_state_dict.pth`` under ``checkpoint-*/``) must be merged into that form
once; that converter is not part of this module (not verifiable offline).

**Prompt template.** Real VideoReward scores need the exact prompt the model was trained with
(VideoAlign ``prompt_template.py``, ``DETAILED_PROMPT_WITH_SPECIAL_TOKEN``); put it in
``videoalign.json`` (``"template"``, with ``{text_prompt}``). The default below is a short
stand-in with the same special tokens, fine for tests and for models trained with it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Reward, register
from .clip import as_dtype

SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
DIMENSIONS = ("VQ", "MQ", "TA")
DEFAULT_TEMPLATE = (
    "Rate the generated video from 0 to 10 for each criterion.\n"
    "Visual quality (clarity, detail, aesthetics): <|VQ_reward|>\n"
    "Motion quality (stability, naturalness, amplitude): <|MQ_reward|>\n"
    "Text alignment with the prompt \"{text_prompt}\": <|TA_reward|>\n"
)
SYSTEM_PROMPT = "You are a helpful assistant."  # Qwen2-VL chat template default
IMAGE_FACTOR, FRAME_FACTOR = 28, 2
VIDEO_MIN_PIXELS = 128 * 28 * 28  # qwen_vl_utils
FPS_MIN_FRAMES, FPS_MAX_FRAMES = 4, 768


# ----------------------------------------------------------------------------- pure helpers


def smart_resize(height: int, width: int, *, factor: int = IMAGE_FACTOR, min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = 230400) -> tuple[int, int]:
    """Qwen2-VL ``smart_resize``: both sides multiples of ``factor``, area in
    ``[min_pixels, max_pixels]``, aspect ratio kept as closely as possible.

    ``h̄ = max(f, round(h/f)·f)``; if ``h̄·w̄ > max``: ``β = √(h·w/max)``, ``h̄ = floor(h/β/f)·f``;
    if ``< min``: ``β = √(min/(h·w))``, ``h̄ = ceil(h·β/f)·f`` (same for w).
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {height}x{width} exceeds 200, which Qwen2-VL rejects.")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def frame_indices(total: int, *, num_frames: int | None = None, fps: float | None = None, video_fps: float | None = None) -> Tensor:
    """Which of ``total`` frames to keep (qwen_vl_utils ``smart_nframes``): ``num_frames`` rounded
    to a multiple of 2, or ``total / video_fps · fps`` clamped to ``[4, min(768, total)]`` and
    rounded down to a multiple of 2; without either, all frames (rounded down to a multiple of 2,
    at least 2). Evenly spaced: ``round(linspace(0, total − 1, n))``."""
    if num_frames is not None:
        n = max(FRAME_FACTOR, round(num_frames / FRAME_FACTOR) * FRAME_FACTOR)
    elif fps is not None and video_fps is not None:
        n = total / video_fps * fps
        n = min(max(n, FPS_MIN_FRAMES), min(FPS_MAX_FRAMES, total))
        n = max(FRAME_FACTOR, math.floor(n / FRAME_FACTOR) * FRAME_FACTOR)
    else:
        n = max(FRAME_FACTOR, total // FRAME_FACTOR * FRAME_FACTOR)
    return torch.linspace(0, total - 1, n).round().long()


def resize_frames(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """``[F, C, H, W]`` float → ``size`` with antialiased bicubic (torchvision tensor resize, as in
    VideoAlign's ``vision_process.fetch_video``); values are not clamped there, nor here."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return F.interpolate(frames, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)


def chat_text(prompt_text: str) -> str:
    """Qwen2-VL chat template output for one user turn (video, then text) plus the generation prompt."""
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>{prompt_text}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def pool_reward_logits(logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None, *, reward_token: str, special_token_ids: Sequence[int] | None) -> Tensor:
    """VideoAlign pooling of per-token head logits ``[B, L, N]``.

    ``special``: logits at the special tokens → ``[B, 3, N]``; diagonal if ``N == 3``, else
    ``[B, 3·N]``. ``last``: the last attended token → ``[B, N]``.
    """
    b = logits.shape[0]
    if reward_token == "special":
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for tid in special_token_ids or ():
            mask |= input_ids == tid
        counts = mask.sum(dim=1)
        if not torch.all(counts == len(special_token_ids)):
            raise ValueError(f"each prompt must contain the {len(special_token_ids)} reward tokens once; found {counts.tolist()} — check the prompt template.")
        pooled = logits[mask].view(b, len(special_token_ids), -1)
        if pooled.shape[-1] == len(special_token_ids):
            return pooled.diagonal(dim1=1, dim2=2)
        return pooled.reshape(b, -1)
    if reward_token == "last":
        last = (attention_mask.long().cumsum(1).argmax(1)) if attention_mask is not None else torch.full((b,), logits.shape[1] - 1)
        return logits[torch.arange(b), last.to(logits.device)]
    raise ValueError(f"unknown reward_token '{reward_token}'; known: special, last.")


# ----------------------------------------------------------------------------- the model class

_MODEL_CLS = None


def reward_model_class():
    """``Qwen2VLForConditionalGeneration`` + ``rm_head`` (built lazily: transformers imports on use).

    Extra config fields (saved with ``save_pretrained``): ``reward_output_dim``,
    ``reward_token``, ``reward_special_token_ids``.
    """
    global _MODEL_CLS
    if _MODEL_CLS is not None:
        return _MODEL_CLS
    from transformers import Qwen2VLForConditionalGeneration

    class VideoRewardModel(Qwen2VLForConditionalGeneration):
        def __init__(self, config):
            super().__init__(config)
            hidden = config.text_config.hidden_size  # config.hidden_size is None on the composite config (transformers 5)
            self.rm_head = torch.nn.Linear(hidden, int(getattr(config, "reward_output_dim", 1)), bias=False)
            self.post_init()

        def reward_logits(self, input_ids, attention_mask=None, pixel_values_videos=None, video_grid_thw=None, pixel_values=None, image_grid_thw=None, **kwargs) -> Tensor:
            # kwargs: whatever else the processor returns (transformers 5: mm_token_type_ids for M-RoPE)
            out = self.model(
                **kwargs,
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values_videos=pixel_values_videos,
                video_grid_thw=video_grid_thw,
                pixel_values=pixel_values,
                image_grid_thw=image_grid_thw,
                use_cache=False,
            )
            logits = self.rm_head(out.last_hidden_state.to(self.rm_head.weight.dtype))
            return pool_reward_logits(
                logits, input_ids, attention_mask,
                reward_token=getattr(self.config, "reward_token", "special"),
                special_token_ids=getattr(self.config, "reward_special_token_ids", None),
            )

    _MODEL_CLS = VideoRewardModel
    return _MODEL_CLS


# ----------------------------------------------------------------------------- the reward


@register("videoalign")
class VideoAlign(Reward):
    """VideoReward scores ``{"VQ", "MQ", "TA"}`` of videos ``[B, F, C, H, W]`` in [0, 1] (an image
    ``[B, C, H, W]`` is scored as a 2-frame still video).

    ``path``: a directory from :meth:`save`. Overrides: ``num_frames`` / ``fps`` (with
    ``meta["fps"]`` = the video's frame rate), ``max_pixels``, ``min_pixels``, ``use_norm``.
    """

    name = "videoalign"
    modalities = ("video",)
    differentiable = False
    scale = "VQ/MQ/TA logits (use_norm: z-scores, Overall ~ -3..3)"

    def __init__(self, path: str | None = None, *, num_frames: int | None = None, fps: float | None = None, max_pixels: int | None = None, min_pixels: int | None = None, use_norm: bool = True, device="cpu", dtype="float32", batch_size: int | None = None):
        if path is None:
            raise ValueError("videoalign needs `path`: a directory saved by VideoAlign.save (model, processor, videoalign.json).")
        from transformers import AutoProcessor

        with open(os.path.join(path, "videoalign.json")) as f:
            self.settings = json.load(f)
        self.device, self.dtype, self.batch_size = torch.device(device), as_dtype(dtype), batch_size
        self.model = reward_model_class().from_pretrained(path, local_files_only=True, dtype=self.dtype)
        self.model.rm_head.float()  # VideoAlign keeps the head in fp32
        self.model.to(self.device).eval().requires_grad_(False)
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        s = self.settings
        self.template = s.get("template", DEFAULT_TEMPLATE)
        self.num_frames = num_frames if num_frames is not None else s.get("num_frames")
        self.fps = fps if fps is not None else s.get("fps", 2.0)
        self.max_pixels = int(max_pixels or s.get("max_frame_pixels", 230400))
        self.min_pixels = int(min_pixels or s.get("min_pixels", VIDEO_MIN_PIXELS))
        self.use_norm = use_norm and "norm" in s

    # 1. preprocessing -------------------------------------------------------------------------
    def prepare(self, outputs: Tensor, prompts: Sequence[str], meta: dict | None = None) -> dict[str, Tensor]:
        """Model inputs for a batch (the reference path: frame sampling, smart_resize, processor)."""
        if outputs.dim() == 4:
            outputs = outputs[:, None].expand(-1, FRAME_FACTOR, -1, -1, -1)
        if outputs.dim() != 5:
            raise ValueError(f"videoalign expects video [B, F, C, H, W] (or images [B, C, H, W]); got {tuple(outputs.shape)}.")
        video_fps = (meta or {}).get("fps")
        video_fps = float(video_fps[0] if isinstance(video_fps, (list, tuple, Tensor)) else video_fps) if video_fps is not None else None
        idx = frame_indices(outputs.shape[1], num_frames=self.num_frames, fps=self.fps if video_fps else None, video_fps=video_fps)
        size = smart_resize(*outputs.shape[-2:], min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        videos = [resize_frames(v[idx].float() * 255.0, size) for v in outputs.detach().cpu()]
        texts = [chat_text(self.template.format(text_prompt=p)) for p in prompts]
        batch = self.processor(text=texts, videos=videos, padding=True, return_tensors="pt", do_resize=False, do_rescale=True, return_mm_token_type_ids=True)
        return {k: v.to(self.device) for k, v in batch.items() if isinstance(v, Tensor)}

    # 2. scoring -------------------------------------------------------------------------------
    def __call__(self, outputs, prompts, meta=None):
        batch = self.prepare(outputs, prompts, meta)
        batch["pixel_values_videos"] = batch["pixel_values_videos"].to(self.dtype)
        logits = self.model.reward_logits(**batch).float().cpu()
        if logits.shape[1] != len(DIMENSIONS):
            raise ValueError(f"videoalign head gives {logits.shape[1]} values per sample; expected 3 (VQ, MQ, TA).")
        out = {d: logits[:, i] for i, d in enumerate(DIMENSIONS)}
        if self.use_norm:
            norm = self.settings["norm"]
            out = {d: (v - norm[f"{d}_mean"]) / norm[f"{d}_std"] for d, v in out.items()}
        return out

    # 3. saving --------------------------------------------------------------------------------
    @staticmethod
    def save(path: str, model: Any, processor: Any, *, template: str = DEFAULT_TEMPLATE, fps: float = 2.0, num_frames: int | None = None, max_frame_pixels: int = 230400, min_pixels: int = VIDEO_MIN_PIXELS, norm: dict | None = None) -> str:
        """Write the directory :class:`VideoAlign` loads: model (with ``rm_head``), processor and
        ``videoalign.json``. ``norm``: ``{"VQ_mean", "VQ_std", "MQ_mean", ...}`` (VideoAlign
        ``inference_config``)."""
        if "{text_prompt}" not in template or any(t not in template for t in SPECIAL_TOKENS):
            raise ValueError(f"template must contain '{{text_prompt}}' and the tokens {SPECIAL_TOKENS}.")
        os.makedirs(path, exist_ok=True)
        model.save_pretrained(path)
        processor.save_pretrained(path)
        settings = {"template": template, "fps": fps, "num_frames": num_frames, "max_frame_pixels": max_frame_pixels, "min_pixels": min_pixels}
        if norm is not None:
            settings["norm"] = {k: float(v) for k, v in norm.items()}
        with open(os.path.join(path, "videoalign.json"), "w") as f:
            json.dump(settings, f, indent=2)
        return path
