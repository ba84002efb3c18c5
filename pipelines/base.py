"""Thin adapters from diffusers flow-matching pipelines to what :class:`flowrl.FlowPolicy` needs.

An adapter knows one model family's plumbing — prompt encoding, latent layout (Flux packs 2×2
patches), the σ grid its scheduler produces (static or dynamic shift), the transformer call with
CFG, and decoding — and nothing about RL. ``FlowPolicy`` does the sampling math with
``flowrl.sde`` and never calls the stateful ``scheduler.step()``.

Register a new family with ``@register_adapter(PipelineClass)``; ``adapter_for(pipe)`` finds the
adapter of a pipeline (or of its nearest registered base class).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

_ADAPTERS: dict[type, type["FlowAdapter"]] = {}


def register_adapter(pipeline_cls: type) -> Callable[[type["FlowAdapter"]], type["FlowAdapter"]]:
    def deco(adapter_cls: type["FlowAdapter"]) -> type["FlowAdapter"]:
        if pipeline_cls in _ADAPTERS and _ADAPTERS[pipeline_cls] is not adapter_cls:
            raise ValueError(f"an adapter for {pipeline_cls.__name__} is already registered")
        _ADAPTERS[pipeline_cls] = adapter_cls
        return adapter_cls

    return deco


def adapter_for(pipe: Any) -> "FlowAdapter":
    """The registered adapter for ``pipe`` (checked: a transformer and a flow-matching scheduler)."""
    _import_builtin_adapters()
    for cls in type(pipe).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls](pipe)
    known = ", ".join(sorted(c.__name__ for c in _ADAPTERS))
    raise TypeError(
        f"flowrl has no adapter for {type(pipe).__name__}. Supported pipelines: {known}. "
        "Write one with flowrl.pipelines.base.register_adapter (see pipelines/sd3.py)."
    )


def _import_builtin_adapters() -> None:
    import importlib

    for mod in ("sd3", "flux", "digits", "wan", "hunyuan_video", "qwen_image"):
        try:
            importlib.import_module(f"flowrl.pipelines.{mod}")
        except ModuleNotFoundError as exc:  # an adapter module not written yet, or an optional dep
            if exc.name and exc.name.startswith("flowrl.pipelines"):
                continue
            raise


def check_flow_scheduler(scheduler: Any) -> None:
    """Raise a clear error unless ``scheduler`` is a ``FlowMatchEulerDiscreteScheduler``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise TypeError(
            f"pipe.scheduler is a {type(scheduler).__name__}, not a flow-matching scheduler. flowrl's SDE "
            "samplers need σ from FlowMatchEulerDiscreteScheduler: set "
            "`pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)` "
            "if the model is a flow-matching (rectified-flow) model."
        )


class FlowAdapter:
    """Base class: one model family's plumbing. Subclasses implement the methods below.

    Shapes: ``B`` samples; latents are in the layout the transformer consumes (SD3 ``[B, C, h, w]``,
    Flux packed ``[B, N, C·4]``). ``cond`` is a dict of batch-first tensors (negatives for CFG under
    keys of their own), so slicing rows of it is always valid.
    """

    #: the default generation size (height, width) in pixels.
    default_size: tuple[int, int] = (64, 64)

    def __init__(self, pipe: Any):
        if not hasattr(pipe, "transformer") or pipe.transformer is None:
            raise TypeError(f"{type(pipe).__name__} has no `transformer`; FlowPolicy wraps transformer-based flow pipelines.")
        check_flow_scheduler(pipe.scheduler)
        self.pipe = pipe

    # -- the trainable denoiser --------------------------------------------------------------
    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    # -- to implement ------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], *, guidance_scale: float) -> dict[str, Tensor]:
        """Prompt conditioning, batch-first (include negative/unconditional embeddings when
        ``guidance_scale > 1``)."""
        raise NotImplementedError

    def initial_noise(self, batch: int, *, height: int, width: int, generator: torch.Generator | None) -> Tensor:
        """Standard normal latents ``[B, ...]`` in the transformer's layout."""
        raise NotImplementedError

    def sigmas(self, num_steps: int, *, height: int, width: int) -> Tensor:
        """The σ grid ``[T + 1]`` (float32, from 1 toward 0, last value 0) that the pipeline's own
        scheduler would use for this size (static shift for SD3, dynamic ``mu`` for Flux)."""
        raise NotImplementedError

    def velocity(self, latents: Tensor, sigma: Tensor, cond: dict[str, Tensor], *, guidance_scale: float, height: int, width: int) -> Tensor:
        """v(x, σ) with CFG applied if ``guidance_scale > 1``; ``sigma`` is ``[B]``."""
        raise NotImplementedError

    def decode(self, latents: Tensor, *, height: int, width: int) -> Tensor:
        """Images ``[B, C, H, W]`` float32 in [0, 1]."""
        raise NotImplementedError

    # -- shared helper -----------------------------------------------------------------------
    def scheduler_sigmas(self, num_steps: int, **set_timesteps_kwargs: Any) -> Tensor:
        """σ grid from a private copy of the pipeline's scheduler (never the live, stateful one)."""
        sched = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        sched.set_timesteps(num_steps, device="cpu", **set_timesteps_kwargs)
        return sched.sigmas.detach().float().cpu()
