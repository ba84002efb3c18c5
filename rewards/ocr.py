"""OCR reward (Flow-GRPO's text-rendering reward) over a transformers image-to-text OCR model.

Definition (:func:`ocr_score`), as Flow-GRPO's ``OcrScorer``: the target is the text between the
first pair of double quotes of the prompt (``'a sign that says "Open 24h"'`` → ``Open 24h``); the
recognised text and the target are lower-cased with spaces removed; the distance d is 0 when the
target occurs inside the recognised text, else the Levenshtein distance between them, capped at the
target's length; the reward is ``1 − d / len(target)`` in [0, 1].

Recognition: any local transformers checkpoint that turns an image into text with ``generate``
(a TrOCR ``VisionEncoderDecoderModel`` with its processor, or another image-to-text model whose
processor takes ``images=``), greedy decoding. Flow-GRPO runs PaddleOCR (text detection, then
recognition of each line, joined); a line-level recogniser such as TrOCR reads the whole image
as one line, so its numbers differ from Flow-GRPO's on multi-line images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Reward, register


def quoted_target(prompt: str) -> str:
    """The text between the first pair of double quotes (Flow-GRPO: ``prompt.split('"')[1]``)."""
    parts = prompt.split('"')
    if len(parts) < 3:
        raise ValueError(f"ocr: the prompt {prompt!r} has no text in double quotes; the OCR reward reads the text to render from \"...\".")
    return parts[1]


def normalize_text(text: str) -> str:
    """Lower-case, spaces removed (Flow-GRPO's normalisation; other whitespace is kept)."""
    return text.replace(" ", "").lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_score(recognized: str, target: str) -> float:
    """``1 − min(d, |t|)/|t|`` with t, r normalised (:func:`normalize_text`) and d = 0 when t occurs
    in r, else ``levenshtein(r, t)``. An empty target (after normalisation) raises."""
    r, t = normalize_text(recognized), normalize_text(target)
    if not t:
        raise ValueError(f"ocr: the quoted target {target!r} is empty once spaces are removed.")
    d = 0 if t in r else min(levenshtein(r, t), len(t))
    return 1.0 - d / len(t)


@register("ocr")
class OCRReward(Reward):
    """Flow-GRPO's OCR reward (module doc) with a local transformers OCR model at ``path``.
    Output in [0, 1]; 1 = the quoted text is read exactly. Video: mean over frames."""

    name = "ocr"
    scale = "[0,1], 1 = quoted text read exactly"

    def __init__(self, path: str, processor_path: str | None = None, *, device="cpu", max_new_tokens: int = 64, batch_size: int | None = None):
        from transformers import AutoConfig, AutoProcessor

        self.device = torch.device(device)
        self.processor = AutoProcessor.from_pretrained(processor_path or path, local_files_only=True)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type == "vision-encoder-decoder":
            from transformers import VisionEncoderDecoderModel as cls
        else:
            from transformers import AutoModelForImageTextToText as cls
        self.model = cls.from_pretrained(path, local_files_only=True).to(self.device).eval().requires_grad_(False)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.last_text: list[str] = []

    @torch.no_grad()
    def read(self, images: Tensor) -> list[str]:
        """Recognised text of each image ``[B, C, H, W]`` in [0, 1] (uint8 via round(x·255))."""
        from PIL import Image

        from .geneval import to_uint8_hwc

        pils = [Image.fromarray(to_uint8_hwc(x)) for x in images]
        inputs = self.processor(images=pils, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device)
        ids = self.model.generate(pixel_values=pixel_values, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        decode = getattr(self.processor, "batch_decode", None) or self.processor.tokenizer.batch_decode
        return [str(t) for t in decode(ids, skip_special_tokens=True)]

    def __call__(self, outputs: Any, prompts, meta=None):
        targets = [quoted_target(p) for p in prompts]
        if outputs.dim() == 5:  # video: every frame, mean per sample
            b, f = outputs.shape[:2]
            texts = self.read(outputs.flatten(0, 1))
            scores = torch.tensor([ocr_score(t, targets[i // f]) for i, t in enumerate(texts)]).view(b, f).mean(1)
        else:
            texts = self.read(outputs)
            scores = torch.tensor([ocr_score(t, g) for t, g in zip(texts, targets)])
        self.last_text = texts
        return scores.float()


__all__ = ["OCRReward", "ocr_score", "levenshtein", "quoted_target", "normalize_text"]
