"""Every random draw of a run derives from ``(seed, labels...)``: the same config gives the same
numbers, and a resumed run continues exactly."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def derive_seed(seed: int, *parts: Any) -> int:
    """A stable 63-bit seed from the run seed and labels (e.g. ``(seed, iteration, "rollout")``)."""
    h = hashlib.sha256(repr((seed,) + parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def generator_for(seed: int, *parts: Any, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *parts))

