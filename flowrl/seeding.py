"""Every random draw of a run derives from ``(seed, labels...)``: the same config gives the same
numbers, and a resumed run continues exactly."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor


def derive_seed(seed: int, *parts: Any) -> int:
    """A stable 63-bit seed from the run seed and labels (e.g. ``(seed, iteration, "rollout")``)."""
    h = hashlib.sha256(repr((seed,) + parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def generator_for(seed: int, *parts: Any, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *parts))



class PromptGenerators(torch.Generator):
    """One random stream per prompt, so a sample's noise depends on ``(seed, labels, key)`` only —
    not on which other prompts share its batch, nor on which process rolls it out.

    ``keys`` name the prompts of a batch in order (ints or tuples of ints; the trainer uses each
    prompt's refill round and position in the iteration's *global* batch). A draw through
    :func:`randn` / :func:`rand` / :func:`multinomial` whose first dimension has ``n`` rows (``n`` a
    multiple of the number of prompts; groups contiguous, prompt-major, as every rollout lays them
    out) takes rows ``[i·n/P, (i+1)·n/P)`` from prompt ``i``'s stream. So process ``r`` of ``N``
    draws exactly the numbers a one-process run draws for the same prompts.

    It is itself a ``torch.Generator`` seeded from the labels alone: draws that concern the whole
    batch (a window position; :func:`batch_generator`) use it, and so does code that hands it to
    ``torch.randn`` directly — deterministic, but then the samples depend on the batch split.
    """

    def __new__(cls, seed: int = 0, *parts: Any, keys: Any = (), device: str | torch.device = "cpu"):
        return super().__new__(cls, device)

    def __init__(self, seed: int, *parts: Any, keys: Any, device: str | torch.device = "cpu"):
        self.manual_seed(derive_seed(seed, *parts, "shared"))
        self.seed, self.parts, self.keys = seed, parts, list(keys)
        self.generators = [generator_for(seed, *parts, "prompt", k, device=device) for k in self.keys]

    @property
    def shared(self) -> torch.Generator:
        return self

    def __len__(self) -> int:
        return len(self.generators)

    def narrow(self, start: int, stop: int) -> "PromptGenerators":
        """The streams of prompts ``start … stop − 1`` (the same generator objects, not copies)."""
        out = PromptGenerators(self.seed, *self.parts, keys=[], device=self.device)
        out.keys, out.generators = self.keys[start:stop], self.generators[start:stop]
        return out

    def _rows_per_prompt(self, rows: int) -> int:
        if not self.generators or rows % len(self.generators):
            raise ValueError(f"a draw of {rows} rows cannot be split over {len(self.generators)} per-prompt random streams; "
                             "a rollout must lay samples out prompt-major (groups contiguous).")
        return rows // len(self.generators)

    def randn(self, shape: Any, *, dtype: torch.dtype = torch.float32) -> Tensor:
        shape = tuple(shape)
        k = self._rows_per_prompt(shape[0])
        return torch.cat([torch.randn((k,) + shape[1:], generator=g, device=self.device, dtype=dtype) for g in self.generators])

    def rand(self, shape: Any, *, dtype: torch.dtype = torch.float32) -> Tensor:
        shape = tuple(shape)
        k = self._rows_per_prompt(shape[0])
        return torch.cat([torch.rand((k,) + shape[1:], generator=g, device=self.device, dtype=dtype) for g in self.generators])

    def multinomial(self, probs: Tensor, num_samples: int) -> Tensor:
        k = self._rows_per_prompt(probs.shape[0])
        probs = probs.to(self.device)
        return torch.cat([torch.multinomial(probs[i * k : (i + 1) * k], num_samples, generator=g) for i, g in enumerate(self.generators)])


def _draw_device(generator: Any, fallback: torch.device | str | None) -> torch.device:
    if generator is not None:
        return generator.device
    return torch.device(fallback) if fallback is not None else torch.device("cpu")


def randn(shape: Any, generator: Any = None, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal ``shape`` from a ``torch.Generator`` or :class:`PromptGenerators` (drawn on
    the generator's device, returned on ``device``)."""
    if isinstance(generator, PromptGenerators):
        out = generator.randn(shape, dtype=dtype)
    else:
        out = torch.randn(tuple(shape), generator=generator, device=_draw_device(generator, device), dtype=dtype)
    return out.to(device) if device is not None else out


def rand(shape: Any, generator: Any = None, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform [0, 1) ``shape``; see :func:`randn`."""
    if isinstance(generator, PromptGenerators):
        out = generator.rand(shape, dtype=dtype)
    else:
        out = torch.rand(tuple(shape), generator=generator, device=_draw_device(generator, device), dtype=dtype)
    return out.to(device) if device is not None else out


def multinomial(probs: Tensor, num_samples: int, generator: Any = None) -> Tensor:
    """``torch.multinomial`` row by row from a ``torch.Generator`` or per-prompt streams; the result
    is on ``probs``' device."""
    if isinstance(generator, PromptGenerators):
        return generator.multinomial(probs, num_samples).to(probs.device)
    draw_on = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(draw_on), num_samples, generator=generator).to(probs.device)


def batch_generator(generator: Any) -> torch.Generator | None:
    """The generator for a draw that concerns the whole batch (not one prompt's samples)."""
    return generator.shared if isinstance(generator, PromptGenerators) else generator
