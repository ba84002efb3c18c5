"""Image-conditioned families (editing, image-to-video): the source images of a prompt become part
of its conditioning.

A prompt row's ``image`` column rides on the prompt (:class:`flowrl.prompts.ImagePrompt`, resolved
paths). An adapter mixing in :class:`ImageConditionMixin` encodes, for every prompt of a batch, its
text as the base family does and its images with :meth:`ImageConditionMixin.encode_images` (VAE
latents, image-encoder features: whatever the pipeline's transformer takes), and returns both in
the prompt's ``cond`` rows — so group expansion, recomputation, tree and window rollouts, and
evaluation carry them like text embeddings, and every process loads the images it needs from the
paths. The source is resized to the generation size (``sampler.height``/``width``): one size per
batch, where the stock editing pipelines default to the source's own size.

Caching: the text part is cached by its text (these families' text encoders do not see the image);
the image part by ``(paths, height, width)``, each entry encoded alone (so its numbers do not depend
on which batch first met it), while the image encoders' weights do not change.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import Tensor

from flowrl.prompts import prompt_images


class ImageConditionMixin:
    """Source images in the conditioning (mixed in before the family's adapter; see the module doc).

    Subclasses implement :meth:`encode_images` and read its keys from ``cond`` in ``velocity``."""

    #: FlowPolicy passes the generation size to ``encode_prompts`` of adapters that set this.
    image_conditioned = True
    #: most images one prompt may carry (None: any number).
    max_images: int | None = 1

    def encode_images(self, paths: Sequence[str], *, height: int, width: int) -> dict[str, Tensor]:
        """Conditioning of one prompt's images, ``{key: tensor}`` without a batch dim."""
        raise NotImplementedError

    def encode_prompts(self, prompts: list[str], *, guidance_scale: float, height: int | None = None, width: int | None = None) -> dict[str, Tensor]:
        images = [prompt_images(p) for p in prompts]
        family = type(self.pipe).__name__
        for p, im in zip(prompts, images):
            if not im:
                raise ValueError(
                    f"{family} is conditioned on a source image, but the prompt {str(p)!r} has none: give its prompt row "
                    "an 'image' column (a path relative to the prompt file), e.g. {\"prompt\": \"...\", \"image\": \"src/1.png\"}."
                )
            if self.max_images is not None and len(im) > self.max_images:
                raise ValueError(f"{family} takes at most {self.max_images} image(s) per prompt; the prompt {str(p)!r} has {len(im)}.")
        cond = super().encode_prompts([str(p) for p in prompts], guidance_scale=guidance_scale)  # type: ignore[misc]
        h, w = (height, width) if height and width else self.default_size  # type: ignore[attr-defined]
        rows = [self._image_rows(im, int(h), int(w)) for im in images]
        for k in rows[0]:
            cond[k] = torch.stack([r[k] for r in rows])
        return cond

    def _image_encoder_fingerprint(self) -> tuple:
        """Identity of the weights that encode images (VAE, image encoder): it changes when a
        parameter is replaced, moved, cast or modified in place, which empties the image cache."""
        fp = []
        for name in ("vae", "image_encoder"):
            module = getattr(self.pipe, name, None)
            if isinstance(module, torch.nn.Module):
                fp.extend((id(p), p._version, p.dtype, p.device) for p in module.parameters())
        return tuple(fp)

    def _image_rows(self, paths: tuple[str, ...], height: int, width: int) -> dict[str, Tensor]:
        cache: OrderedDict = self.__dict__.setdefault("_image_cache", OrderedDict())
        fingerprint = self._image_encoder_fingerprint()
        if self.__dict__.get("_image_cache_key") != fingerprint:
            cache.clear()
            self._image_cache_key = fingerprint
        key = (paths, height, width)
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit
        with torch.no_grad():
            row = {k: v.detach() for k, v in self.encode_images(list(paths), height=height, width=width).items()}
        budget = int(getattr(self, "prompt_cache_bytes", 0))
        if budget > 0:
            cache[key] = row
            used = sum(v.numel() * v.element_size() for r in cache.values() for v in r.values())
            while used > budget and len(cache) > 1:
                _, old = cache.popitem(last=False)
                used -= sum(v.numel() * v.element_size() for v in old.values())
        return row


def image_conditioned(adapter: Any) -> bool:
    """Whether ``adapter`` takes source images (and the generation size when encoding)."""
    return bool(getattr(adapter, "image_conditioned", False))
