"""Edit consistency: how close an edited image (or a generated video) stays to its source image.

``edit_consistency`` scores ``cos(E(output), E(source))`` with a local image encoder from
transformers — a CLIP model (``CLIPModel``: projected image features) or a DINOv2 model
(``Dinov2Model``: the pooled class token) — loaded from a folder (``path``) holding the weights
and its ``preprocessor_config.json``. The source of each sample is its prompt row's ``image``
(``meta["image"]``, the resolved path, see :mod:`flowrl.prompts`); with several reference images
the score is the mean over them, and for video it is the mean over frames.

It is the "stay close to the source" half of an editing objective; pair it with an
instruction-following reward (a VLM judge, CLIPScore of the instruction) in ``reward.rewards``
with weights. Output: cosine in [−1, 1] (1 for an image identical to its source).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .base import Reward, register
from .clip import as_dtype, flatten_video, hf_image_preprocess, image_config_from_hf, l2n, pooled

#: model_type in the folder's config.json → backbone kind
BACKBONES = {"clip": "clip", "dinov2": "dinov2"}


def source_paths(meta: dict | None, n: int, who: str = "edit_consistency") -> list[list[str]]:
    """Per sample, its source image paths from ``meta["image"]`` (a path or a list of paths per
    sample); a clear error when a sample has none."""
    values = (meta or {}).get("image")
    if values is None or len(values) != n:
        raise ValueError(
            f"{who} needs each sample's source image: give the prompt rows an 'image' column "
            "(a path relative to the prompt file), e.g. {\"prompt\": \"make the sky red\", \"image\": \"photos/1.png\"}."
        )
    out = []
    for i, v in enumerate(values):
        paths = [v] if isinstance(v, (str, Path)) else list(v or [])
        if not paths:
            raise ValueError(f"{who}: sample {i} has no source image (its prompt row lacks the 'image' column).")
        out.append([str(p) for p in paths])
    return out


def load_image_tensor(path: str) -> Tensor:
    """An image file as float ``[1, 3, H, W]`` in [0, 1] (RGB)."""
    import numpy as np

    from flowrl.prompts import load_source_images

    arr = np.asarray(load_source_images(path), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


@register("edit_consistency")
class EditConsistency(Reward):
    """``cos(E(output), E(source))`` with a local CLIP or DINOv2 image encoder (see the module doc).

    Args:
        path: folder with the model (``config.json`` of model_type ``clip`` or ``dinov2``) and its
            image processor config (or give ``processor_path``).
        processor_path: folder of ``preprocessor_config.json`` (default: ``path``).
        device, dtype, batch_size: as every reward.
    """

    name = "edit_consistency"
    differentiable = True
    scale = "cosine to the source image, 1 = unchanged"

    def __init__(self, path: str, processor_path: str | None = None, *, device="cpu", dtype="float32", batch_size: int | None = None):
        cfg_file = Path(path) / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"edit_consistency: {path} holds no config.json; point `path` at a saved CLIP or DINOv2 model folder.")
        model_type = json.loads(cfg_file.read_text()).get("model_type")
        if model_type not in BACKBONES:
            raise ValueError(f"edit_consistency: {path} is a '{model_type}' model; supported: {', '.join(BACKBONES)} (CLIPModel, Dinov2Model).")
        from transformers import AutoImageProcessor

        self.kind = BACKBONES[model_type]
        self.device, self.dtype, self.batch_size = torch.device(device), as_dtype(dtype), batch_size
        if self.kind == "clip":
            from transformers import CLIPModel as cls
        else:
            from transformers import Dinov2Model as cls
        self.model = cls.from_pretrained(path, local_files_only=True, dtype=self.dtype).to(self.device).eval().requires_grad_(False)
        self.image_cfg = image_config_from_hf(AutoImageProcessor.from_pretrained(processor_path or path, local_files_only=True))
        self._source_cache: dict[str, Tensor] = {}

    def preprocess(self, images: Tensor) -> Tensor:
        """Tensor equivalent of the folder's image processor (shortest-edge resize, centre crop,
        normalise; or a squash to ``{height, width}``)."""
        return hf_image_preprocess(images, self.image_cfg)

    def features(self, images: Tensor) -> Tensor:
        """L2-normalised image features ``[B, D]`` of images ``[B, 3, H, W]`` in [0, 1]."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        if self.kind == "clip":
            return l2n(pooled(self.model.get_image_features(pixel_values=pixels)).float())
        return l2n(self.model(pixel_values=pixels).pooler_output.float())

    def source_features(self, paths: Sequence[str]) -> Tensor:
        """Mean of the normalised features of the images at ``paths`` ``[D]`` (cached per path)."""
        feats = []
        for p in paths:
            if p not in self._source_cache:
                with torch.no_grad():
                    self._source_cache[p] = self.features(load_image_tensor(p))[0]
            feats.append(self._source_cache[p])
        return torch.stack(feats).mean(0)

    def __call__(self, outputs: Tensor, prompts: list[str], meta: dict | None = None) -> Tensor:
        images, frames = flatten_video(outputs)
        sources = source_paths(meta, outputs.shape[0])
        ref = torch.stack([self.source_features(p) for p in sources])  # [B, D]
        out = self.features(images).view(outputs.shape[0], frames, -1)
        return (out * ref[:, None]).sum(-1).mean(1)
