"""Qwen-Image (``QwenImagePipeline``): retired hand adapter. The registry name stays and points to
the modular path (``flowrl.pipelines.modular``): diffusers' ``QwenImageModularPipeline`` built from
the pipeline's components. On the same weights the two agreed bit for bit (ODE samples and
recomputed log-probs, with and without CFG; ``tests/test_modular_families.py``).

What the hand adapter defined and the modular path keeps: the σ grid (``linspace(1, 1/n, n)`` with
the dynamic shift, ``shift_terminal`` and exponential time shift of the released scheduler), the
Qwen2.5-VL text conditioning with its mask, and Qwen-Image's true CFG
(``v = v_u + w·(v_c − v_u)`` rescaled per token to ‖v_c‖, diffusers' guider) — all now diffusers'
own blocks. One default is flowrl's: with guidance on, the negative prompt is " " (the model card's
choice when there is nothing to avoid) where the modular call would use ""; ``sampler.negative_prompt``
overrides it.
"""

from __future__ import annotations

from typing import Any

from flowrl.pipelines.base import register_adapter
from flowrl.pipelines.modular import ModularAdapter, to_modular

try:
    from diffusers import QwenImagePipeline
except ImportError:  # pragma: no cover
    QwenImagePipeline = None


@register_adapter(QwenImagePipeline)
class QwenImageAdapter(ModularAdapter):
    """The modular path on ``QwenImageModularPipeline`` (see the module docstring)."""

    def __init__(self, pipe: Any):
        super().__init__(to_modular(pipe))

    def set_guidance(self, guidance_scale: float) -> float:
        if guidance_scale > 1.0:
            self.call_kwargs.setdefault("negative_prompt", " ")
        return super().set_guidance(guidance_scale)
