"""The loop's collectives over processes (``torchrun`` / ``accelerate launch``), each a no-op
in a single process: gathers of uneven row counts, sums, "any process" flags, the manual gradient
all-reduce for policies DDP cannot wrap, and where this process's rows sit in the global batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class GlobalRows:
    """This process's rows ``[lo, hi)`` of the gathered batch (``total`` rows); ``canonical[i]`` is
    gathered row ``i``'s index in a one-process run's batch."""

    lo: int
    hi: int
    total: int
    canonical: Tensor


class Collectives:
    """Collectives over the processes of an ``accelerate.Accelerator``."""

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def gather_uneven(self, x: Tensor) -> Tensor:
        """Concatenate every process's ``x`` (any number of rows each) in process order."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return x
        is_bool = x.dtype == torch.bool
        x = x.detach().cpu().to(torch.uint8 if is_bool else x.dtype).contiguous()
        sizes = [int(v) for v in acc.gather(torch.tensor([x.shape[0]], device=acc.device)).cpu().tolist()]
        m = max(sizes)
        padded = torch.cat([x, x.new_zeros((m - x.shape[0],) + tuple(x.shape[1:]))])
        out = acc.gather(padded.to(acc.device)).cpu()
        out = torch.cat([out[i * m : i * m + n] for i, n in enumerate(sizes)])
        return out.bool() if is_bool else out

    def gather_list(self, items: list[Any]) -> list[Any]:
        """Every process's list items, concatenated in process order."""
        if self.accelerator.num_processes == 1:
            return list(items)
        from accelerate.utils import gather_object

        return list(gather_object(list(items)))

    def gather_rows(self, value: Any) -> Any:
        """Every process's rows of a per-sample value in process order: tensors (``[B, T, ...]``
        padded with zeros along dim 1 to the widest process, e.g. token completions), lists."""
        if value is None:
            return None
        if not isinstance(value, Tensor):
            return self.gather_list(list(value))
        value = value.detach().cpu()
        if value.dim() >= 2:
            width = int(self.gather_uneven(torch.tensor([value.shape[1]])).max())
            if width > value.shape[1]:
                pad = value.new_zeros((value.shape[0], width - value.shape[1]) + tuple(value.shape[2:]))
                value = torch.cat([value, pad], dim=1)
        return self.gather_uneven(value)

    def sum(self, x: Tensor) -> Tensor:
        """Σ over processes (float64 on the CPU)."""
        if self.accelerator.num_processes == 1:
            return x.double()
        return self.accelerator.reduce(x.double().to(self.accelerator.device), "sum").cpu()

    def sum_dicts(self, d: dict[str, float]) -> dict[str, float]:
        """Key-wise Σ over processes (keys may differ between processes)."""
        if self.accelerator.num_processes == 1:
            return dict(d)
        out: dict[str, float] = {}
        for part in self.gather_list([d]):
            for k, v in part.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def any_process(self, flag: bool) -> bool:
        """``flag`` on any process (so every process skips the same optimizer steps)."""
        if self.accelerator.num_processes == 1:
            return flag
        total = self.accelerator.reduce(torch.tensor([float(flag)], device=self.accelerator.device), reduction="sum")
        return bool(total.item() > 0)

    def all_reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` over processes in one flat buffer (what DDP does for
        policies it can wrap)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.detach().reshape(-1).float() for g in grads])
        flat = self.accelerator.reduce(flat.to(self.accelerator.device), "mean").to(params[0].device)
        i = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[i : i + n].view_as(p).to(p.dtype)
            i += n

    def group_offset(self, groups: Tensor) -> int:
        """Offset that makes this process's group numbers (0…) global: Σ of earlier processes' counts."""
        n = int(groups.max()) + 1 if len(groups) else 0
        counts = self.gather_uneven(torch.tensor([n])).tolist()
        return int(sum(counts[: self.accelerator.process_index]))

    def global_rows(self, group_ids: Tensor, *, one_round: bool = True) -> GlobalRows:
        """Where this process's rows sit in the global batch: ``[lo, hi)`` in gathered (process)
        order, and each gathered row's number in a one-process run's order. One rollout round:
        the gathered order is that order (each process holds a contiguous share of the prompts).
        Several refill rounds (DAPO): a one-process run holds rows by kept group, so rows are
        sorted by their global group id (a group never spans processes)."""
        gids = self.gather_uneven(group_ids.cpu().long())
        sizes = self.gather_uneven(torch.tensor([len(group_ids)])).tolist()
        lo = int(sum(sizes[: self.accelerator.process_index]))
        canonical = torch.arange(len(gids))
        if not one_round:
            canonical[torch.argsort(gids, stable=True)] = torch.arange(len(gids))
        return GlobalRows(lo=lo, hi=lo + len(group_ids), total=len(gids), canonical=canonical)
