"""HunyuanVideo 1.5 image-to-video adapter (``HunyuanVideo15ImageToVideoPipeline``): the prompt
row's ``image`` is the first frame.

Conditioning as the stock call builds it: the frame is resized (centre crop) to the generation
size; its VAE latents (mode, times the scaling factor) fill the first latent frame of the condition
(later frames zero) and the mask marks that frame (``in_channels = 2C + 1``: latents, condition,
mask); the SigLIP vision features of the frame (last hidden states) replace the zero image
embeddings of text-to-video. Text, σ grid, guider-driven CFG (the negative branch shares the image
conditioning) and decoding are :class:`~flowrl.pipelines.hunyuan_video.HunyuanVideo15Adapter`'s.

Difference from the stock call: the generation size is ``sampler.height``/``width`` (default: the
16:9 bucket of the transformer's ``target_size``, as for text-to-video); the stock call uses the
bucket nearest each frame's aspect ratio. MeanFlow-distilled transformers
(``use_meanflow``) are refused: their second timestep depends on the step index.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from flowrl.pipelines.base import register_adapter
from flowrl.pipelines.hunyuan_video import HunyuanVideo15Adapter
from flowrl.pipelines.image_cond import ImageConditionMixin
from flowrl.prompts import load_source_images

try:
    from diffusers import HunyuanVideo15ImageToVideoPipeline
except ImportError:  # pragma: no cover
    HunyuanVideo15ImageToVideoPipeline = None


@register_adapter(HunyuanVideo15ImageToVideoPipeline)
class HunyuanVideo15I2VAdapter(ImageConditionMixin, HunyuanVideo15Adapter):
    max_images = 1

    def __init__(self, pipe: Any):
        if pipe.transformer.config.get("use_meanflow", False):
            raise ValueError("MeanFlow-distilled HunyuanVideo 1.5 transformers (use_meanflow) are not supported: their extra timestep depends on the step index.")
        super().__init__(pipe)

    def encode_images(self, paths: Sequence[str], *, height: int, width: int) -> dict[str, Tensor]:
        """``{"image_embeds": [S, D], "cond_latents": [C, F', h, w], "cond_mask": [1, F', h, w]}`` of one first frame."""
        p = self.pipe
        frame = p.video_processor.resize(load_source_images(paths[0]), height=height, width=width, resize_mode="crop")
        embeds = p.encode_image(image=frame, batch_size=1, device=self.device, dtype=self.dtype)[0]
        lat = p._get_image_latents(vae=p.vae, image_processor=p.video_processor, image=frame, height=height, width=width, device=self.device)
        c, f, h, w = self.latent_shape(height, width)
        cond = lat[0].repeat(1, f, 1, 1)
        cond[:, 1:] = 0
        mask = torch.zeros(1, f, h, w, device=self.device)
        mask[:, 0] = 1.0
        return {"image_embeds": embeds, "cond_latents": cond.to(self.dtype), "cond_mask": mask.to(self.dtype)}

    def _image_inputs(self, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"cond_latents": cond["cond_latents"], "cond_mask": cond["cond_mask"], "image_embeds": cond["image_embeds"]}
