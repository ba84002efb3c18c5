"""JPEG (in)compressibility (DDPO, Black et al. 2023, ``ddpo_pytorch/rewards.py``): no weights.

Each image is quantised to uint8 (``round(x·255)``), encoded as JPEG at quality 95 with PIL, and
scored by its size in kB (bytes / 1000). ``jpeg_compressibility`` returns ``−size`` (smaller files
score higher), ``jpeg_incompressibility`` returns ``+size``. Video ``[B, F, C, H, W]``: the mean
size over frames. Output scale: a few to a few hundred kB depending on resolution and detail.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import Tensor

from .base import Reward, register


def to_uint8_hwc(images: Tensor) -> np.ndarray:
    """``[B, C, H, W]`` float in [0, 1] -> ``[B, H, W, C]`` uint8 (DDPO: ``(x·255).round().clamp``)."""
    if images.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W]; got shape {tuple(images.shape)}.")
    x = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    return x.transpose(0, 2, 3, 1)


def jpeg_sizes_kb(images: Tensor, *, quality: int = 95) -> Tensor:
    """JPEG size in kB (bytes/1000) of each image ``[B, C, H, W]`` (or frames of ``[B, F, C, H, W]``,
    averaged over F) at the given quality."""
    from PIL import Image

    if images.dim() == 5:
        b, f = images.shape[:2]
        return jpeg_sizes_kb(images.flatten(0, 1), quality=quality).view(b, f).mean(dim=1)
    sizes = []
    for arr in to_uint8_hwc(images):
        img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


@register("jpeg_compressibility")
class JpegCompressibility(Reward):
    """−(JPEG size in kB) at quality 95 (DDPO's compressibility reward). Higher = more compressible."""

    name = "jpeg_compressibility"
    modalities = ("image", "video")
    scale = "-kB of JPEG at q95 (512px: roughly -10 to -200)"
    sign = -1.0

    def __init__(self, quality: int = 95, batch_size: int | None = None):
        self.quality = int(quality)
        self.batch_size = batch_size

    def __call__(self, outputs, prompts=None, meta=None):
        return self.sign * jpeg_sizes_kb(outputs, quality=self.quality)


@register("jpeg_incompressibility")
class JpegIncompressibility(JpegCompressibility):
    """+(JPEG size in kB) at quality 95 (DDPO's incompressibility reward)."""

    name = "jpeg_incompressibility"
    scale = "+kB of JPEG at q95 (512px: roughly 10 to 200)"
    sign = 1.0
