"""HPSv2 / HPSv2.1 (Wu et al. 2023, ``tgxs002/HPSv2``): open_clip ViT-H-14 fine-tuned on human
preference data, shipped as a state-dict checkpoint (``HPS_v2.1_compressed.pt``).

Reference (``hpsv2/img_score.py``): ``create_model_and_transforms('ViT-H-14', ...)``, then
``model.load_state_dict(torch.load(cp)['state_dict'])``; images go through ``ResizeMaxSize(224)``
(longest side 224, bicubic, zero-pad to a square), ToTensor, OpenAI mean/std; prompts through the
open_clip tokenizer (77 tokens). ``score = <E_img/‖E_img‖, E_txt/‖E_txt‖>`` (no logit scale).
Output: ~0.25–0.35.
"""

from __future__ import annotations

from torch import Tensor

from .base import Reward, register
from .clip import OpenCLIP, video_mean


@register("hpsv2")
class HPSv2(Reward):
    """HPSv2.1 score: cosine of the HPS-tuned open_clip embeddings, HPS preprocessing."""

    name = "hpsv2"
    modalities = ("image", "video")
    differentiable = True
    scale = "cosine, ~0.25-0.35"

    def __init__(self, checkpoint: str | None = None, *, model_name: str = "ViT-H-14", device="cpu", dtype="float32", batch_size: int | None = None):
        if checkpoint is None:
            raise ValueError("hpsv2 needs `checkpoint`: the path of HPS_v2.1_compressed.pt (a {'state_dict': ...} file).")
        self.clip = OpenCLIP(model_name, None, checkpoint=checkpoint, device=device, dtype=dtype, resize_mode="longest")
        self.device, self.dtype, self.batch_size = self.clip.device, self.clip.dtype, batch_size

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return (self.clip.image_features(images) * self.clip.text_features(prompts)).sum(-1)

    def __call__(self, outputs, prompts, meta=None):
        return video_mean(self._score, outputs, prompts)
