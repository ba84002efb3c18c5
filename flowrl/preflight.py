"""Environment checks that run before any model loads, so a run that cannot finish says why in one
line within seconds instead of a traceback after minutes of loading: the output folder can be
written, the device exists, the resolution fits the model. (The trackers, the rewards' weights and
remote rewards' servers are checked by their own modules, also before the model loads.)"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from flowrl.errors import ConfigError


def check_output_dir(path: str | Path, field: str = "train.output_dir") -> None:
    """``path`` is a folder (or can become one) that this process can write: the nearest existing
    ancestor is probed with a temporary file, removed at once."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field}={path} is a file, not a folder; choose another {field}.")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{field}={path}: {probe} is a file, so the folder cannot be created; choose another {field}.")
    try:
        fd, name = tempfile.mkstemp(prefix=".flowrl-write-check-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(f"{field}={path}: cannot write in {probe} ({os.strerror(exc.errno) if exc.errno else exc}); choose a folder you can write.") from None


def check_device(device: str) -> None:
    """``model.device`` names a device this machine has."""
    import torch

    if device in ("auto", "cpu") or not isinstance(device, str):
        return
    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device={device} but this machine has no CUDA device (torch.cuda.is_available() is False); use model.device=cpu or auto.")
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(f"model.device={device} but this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1}).")
    elif kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"model.device={device} but MPS is not available here; use model.device=cpu or auto.")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def resolution_multiple(folder: Path) -> tuple[int, str] | None:
    """The number the image height and width must divide by for the pipeline saved in ``folder``
    (VAE downsampling × transformer patch size, × 2 for models that pack 2×2 latent patches: Flux,
    Qwen-Image), and how it was derived; None when the folder does not say."""
    t = _read(folder / "transformer" / "config.json")
    if not t:
        return None
    patch = t.get("patch_size", 1) or 1
    patch = int(patch[-1] if isinstance(patch, (list, tuple)) else patch)
    vae = _read(folder / "vae" / "config.json")
    scale = 2 ** (len(vae["block_out_channels"]) - 1) if "block_out_channels" in vae else 1
    cls = str(t.get("_class_name", ""))
    packed = 2 if ("Flux" in cls or "QwenImage" in cls) else 1
    if "Wan" in cls or "Hunyuan" in cls:  # video VAEs: their own temporal/spatial factors; not checked here
        return None
    return scale * patch * packed, f"VAE ×{scale} · patch {patch}" + (" · 2×2 packing" if packed > 1 else "")


def pipeline_folder(spec: str) -> Path | None:
    if spec == "digits":
        from flowrl.paths import assets_dir

        return assets_dir() / "digits" / "pipeline"
    path = Path(spec)
    return path if path.is_dir() else None


def check_resolution(config: Any) -> None:
    """``sampler.height`` / ``sampler.width`` divide by what the model needs (read from the saved
    model's configs, before it loads)."""
    s = config.sampler
    if config.model.kind != "flow" or (s.height is None and s.width is None):
        return
    folder = pipeline_folder(config.model.pipeline)
    need = resolution_multiple(folder) if folder is not None else None
    if need is None:
        return
    m, why = need
    for field, value in (("sampler.height", s.height), ("sampler.width", s.width)):
        if value is not None and value % m:
            lower, upper = max(m, value // m * m), (value // m + 1) * m
            raise ConfigError(f"{field}={value} is not a multiple of {m} ({why} of {config.model.pipeline}); use {lower} or {upper}.")


def check_environment(config: Any) -> None:
    """Every check of this module (see the module doc)."""
    check_output_dir(config.train.output_dir)
    check_device(config.model.device)
    check_resolution(config)
