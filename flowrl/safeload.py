"""Loading saved state safely: tensors from safetensors, everything else through
``torch.load(..., weights_only=True)`` (tensors, numbers, strings, lists, dicts: no pickled code
runs). A missing, truncated or corrupted file, or a file of the wrong format (a pickle renamed to
``.safetensors``), raises :class:`CheckpointError` naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A saved file could not be read; the message names the file and what to do."""


class WriteError(CheckpointError):
    """A run's file could not be written (full disk, no permission); the message names the path,
    the cause and the space needed. The previous version of the file is intact."""


def _fail(path: Path, what: str, exc: BaseException) -> CheckpointError:
    detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return CheckpointError(
        f"{path}: cannot read {what} ({type(exc).__name__}: {detail}). The file is truncated, corrupted or not "
        "what its name says; resume from another checkpoint or delete this one."
    )


def load_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file (a clear error for anything else)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; the checkpoint is incomplete.")
    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...: re-raised naming the file
        raise _fail(path, "safetensors weights", exc) from exc


def load_state(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu")`` with a clear error naming the file:
    optimizer state dicts, EMA shadows, estimator/selector state (plain data and tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; the checkpoint is incomplete.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError (zip), EOFError: named
        raise _fail(path, "saved state", exc) from exc
