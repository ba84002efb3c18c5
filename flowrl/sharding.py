"""Sharded (FSDP2) parameters: full copies for what must see whole tensors (checkpoints, EMA and
LoRA export, rollouts), and the way back.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, what accelerate's FSDP plugin with
``fsdp_version: 2`` applies) every parameter is a ``DTensor`` holding one process's shard; the
module all-gathers a layer's parameters before using it and frees them after. These helpers are
no-ops on ordinary tensors, so the single-process and DDP paths are unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor


def is_sharded(x: Any) -> bool:
    """Whether ``x`` is a ``DTensor`` (a sharded parameter or a tensor made from one)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(x, DTensor)


def full_tensor(x: Tensor) -> Tensor:
    """The whole tensor (all-gathered from every process: a collective, call it on all of them)."""
    return x.full_tensor() if is_sharded(x) else x


def full_state(obj: Any) -> Any:
    """``obj`` (nested dicts/lists/tuples of tensors) with every sharded tensor replaced by its
    whole value on the CPU; a collective when anything is sharded (every process calls it, in the
    same order)."""
    if isinstance(obj, dict):
        return {k: full_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_state(v) for v in obj)
    if is_sharded(obj):
        return obj.full_tensor().detach().cpu()
    return obj


def like(template: Tensor, value: Tensor) -> Tensor:
    """``value`` (a whole tensor) in ``template``'s layout: this process's shard when ``template``
    is sharded, else ``value`` itself — for ``template.copy_(like(template, value))``."""
    if not is_sharded(template) or is_sharded(value):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(device=template.device, dtype=template.dtype), template.device_mesh, template.placements, src_data_rank=None)


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules ``fully_shard`` was applied to (empty for an unsharded model)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered_parameters(model: torch.nn.Module):
    """Inside: every FSDP2 module of ``model`` holds its whole (unsharded) parameters and keeps
    them across forward calls, so calling the model runs no collective at all — processes may then
    make different numbers of calls (rollouts, evaluation). On exit the parameters are resharded and
    the modules' ``reshard_after_forward`` restored. Entering is one all-gather per module: every
    process must enter, the same number of times. A no-op for an unsharded model.

    Memory: the trained module's whole weights (as under DDP) while inside; outside only the
    update's current layer is gathered."""
    modules = fsdp_modules(model)
    if not modules:
        yield
        return
    saved = []
    for m in modules:
        state = m._get_fsdp_state()  # noqa: SLF001 (torch has no public getter for these settings)
        saved.append((state._auto_reshard_after_forward, [g.post_forward_mesh_info for g in state._fsdp_param_groups]))  # noqa: SLF001
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m, (auto, infos) in zip(modules, saved):
            m.reshard()
            state = m._get_fsdp_state()  # noqa: SLF001
            state._auto_reshard_after_forward = auto  # noqa: SLF001
            for g, info in zip(state._fsdp_param_groups, infos):  # noqa: SLF001
                g.post_forward_mesh_info = info


def shard_like_params(state: Any, params: list[Tensor]) -> Any:
    """A loaded state (EMA shadow, DiffusionNFT's old policy: lists of whole tensors, one per
    trainable parameter) in the parameters' layout: every list that matches ``params`` in length
    and shapes becomes this process's shards (:func:`like`). Unchanged when nothing is sharded."""
    if not any(is_sharded(p) for p in params):
        return state
    if isinstance(state, dict):
        return {k: shard_like_params(v, params) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        if len(state) == len(params) and all(isinstance(v, Tensor) and tuple(v.shape) == tuple(p.shape) for v, p in zip(state, params)):
            return type(state)(like(p, v) for p, v in zip(params, state))
        return type(state)(shard_like_params(v, params) for v in state)
    return state
