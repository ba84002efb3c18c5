"""PickScore (Kirstain et al. 2023, ``yuvalkirstain/PickScore_v1``): a CLIP-H fine-tuned on
Pick-a-Pic human preferences.

Reference (PickScore README / flow_grpo ``pickscore_scorer.py``): the CLIP-H processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (shortest edge 224, centre crop 224, OpenAI mean/std;
text padded, truncated to 77), then ``score = logit_scale.exp() · cos(E_img, E_txt)``.
Output: ~18–24 for typical images (logit_scale.exp() = 100); flow_grpo divides by 26
(``normalize=True``) to get ~0.7–0.9.
"""

from __future__ import annotations

from torch import Tensor

from .base import Reward, register
from .clip import HFCLIP, video_mean

PICKSCORE_NORM = 26.0


@register("pickscore")
class PickScore(Reward):
    """``logit_scale.exp() · cos(img, txt)`` with a transformers ``CLIPModel`` (÷26 if ``normalize``)."""

    name = "pickscore"
    modalities = ("image", "video")
    differentiable = True
    scale = "logit_scale.exp()*cos, ~18-24 (normalize=True: /26, ~0.7-0.9)"

    def __init__(
        self,
        path: str = "yuvalkirstain/PickScore_v1",
        processor_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        *,
        normalize: bool = False,
        device="cpu",
        dtype="float32",
        batch_size: int | None = None,
    ):
        self.clip = HFCLIP(path, processor_path, device=device, dtype=dtype)
        self.normalize = normalize
        self.device, self.dtype, self.batch_size = self.clip.device, self.clip.dtype, batch_size
        if normalize:
            self.scale = "PickScore/26, ~0.7-0.9"

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        cos = (self.clip.image_features(images) * self.clip.text_features(prompts)).sum(-1)
        score = self.clip.model.logit_scale.exp().float() * cos
        return score / PICKSCORE_NORM if self.normalize else score

    def __call__(self, outputs, prompts, meta=None):
        return video_mean(self._score, outputs, prompts)
