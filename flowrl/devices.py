"""Where a model runs and how it saves memory: the device choice of ``model.device`` and
activation (gradient) checkpointing. Helpers that adapters and the loop both use."""

from __future__ import annotations

from typing import Any

import torch

from flowrl.errors import ConfigError


def choose_device(cfg: Any) -> torch.device:
    """``model.device``; ``auto``: CUDA when available, else the CPU."""
    if cfg.model.device != "auto":
        return torch.device(cfg.model.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing of a diffusers (``enable_gradient_checkpointing``) or transformers
    (``activation_checkpointing_enable`` / ``gradient_checkpointing_enable``) model, always the
    non-reentrant form (``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``): the
    reentrant one runs a block's backward outside the outer autograd pass, which breaks DDP with
    ``find_unused_parameters=True`` (a parameter is marked ready twice) and drops gradients of LoRA
    weights whose block inputs do not require grad."""
    from torch.utils.checkpoint import checkpoint

    if getattr(model, "_supports_gradient_checkpointing", None) is not None and hasattr(model, "enable_gradient_checkpointing"):  # diffusers
        if not model._supports_gradient_checkpointing:
            raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing; set it to false.")
        model.enable_gradient_checkpointing(lambda module, *args: checkpoint(module.__call__, *args, use_reentrant=False))
        return
    kwargs = {"use_reentrant": False}
    for name, key in (("activation_checkpointing_enable", "activation_checkpointing_kwargs"), ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs")):
        fn = getattr(model, name, None)
        if fn is not None:
            try:
                fn(**{key: kwargs})
            except ValueError as exc:  # transformers: "... does not support activation checkpointing"
                raise ConfigError(f"train.gradient_checkpointing: {exc} Set it to false.") from None
            return
    raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing; set it to false.")
