"""LAION aesthetic predictor v2 (``christophschuhmann/improved-aesthetic-predictor``), as used by
DDPO and Flow-GRPO: CLIP ViT-L/14 image embedding, L2-normalised, into an MLP
768 → 1024 → 128 → 64 → 16 → 1 (dropouts between the first four layers; inactive at eval), whose
weights are the state-dict file ``sac+logos+ava1-l14-linearMSE.pth``.
Output: ~1–10 (LAION aesthetic rating), typical generations 5–7. Prompts are ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Reward, register
from .clip import HFCLIP, flatten_video


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head; state-dict keys ``layers.{0,2,4,6,7}.{weight,bias}``."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embed: Tensor) -> Tensor:
        return self.layers(embed)


@register("aesthetic")
class Aesthetic(Reward):
    """LAION aesthetic score of the images (mean over frames for video)."""

    name = "aesthetic"
    modalities = ("image", "video")
    differentiable = True
    scale = "LAION aesthetic rating, ~1-10 (typical 5-7)"

    def __init__(self, head_path: str | None = None, clip_path: str = "openai/clip-vit-large-patch14", *, device="cpu", dtype="float32", batch_size: int | None = None):
        if head_path is None:
            raise ValueError("aesthetic needs `head_path`: the MLP state dict sac+logos+ava1-l14-linearMSE.pth.")
        self.clip = HFCLIP(clip_path, device=device, dtype=dtype)
        dim = self.clip.model.config.projection_dim
        self.mlp = AestheticMLP(dim)
        state = torch.load(head_path, map_location="cpu", weights_only=True)
        try:
            self.mlp.load_state_dict(state)
        except RuntimeError as exc:
            raise RuntimeError(f"aesthetic head {head_path} does not fit CLIP projection_dim={dim}: {exc}") from exc
        self.mlp.to(self.clip.device).eval().requires_grad_(False)
        self.device, self.dtype, self.batch_size = self.clip.device, self.clip.dtype, batch_size

    def __call__(self, outputs, prompts=None, meta=None):
        images, frames = flatten_video(outputs)
        score = self.mlp(self.clip.image_features(images)).squeeze(-1)
        return score.view(-1, frames).mean(dim=1)
