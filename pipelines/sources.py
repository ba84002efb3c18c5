"""Where a pipeline comes from: ``model.pipeline`` as a built-in source (``PIPELINE_SOURCES``:
``digits``, the tiny test models), a local folder written by ``save_pretrained``, or a Hugging Face
id already in the local cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flowrl.errors import ConfigError
from flowrl.plugins import PIPELINE_SOURCES
from flowrl.registry import import_if_present


def load_pipeline(spec: str, run_dir: Path, dtype: torch.dtype = torch.float32):
    """A diffusers pipeline from a built-in name (``PIPELINE_SOURCES``) or a local folder."""
    _import_pipeline_sources()
    if spec in PIPELINE_SOURCES:
        pipe = PIPELINE_SOURCES.get(spec)(run_dir)
    else:
        path = local_model_folder(spec, builtins=PIPELINE_SOURCES.names())
        pipe = _pipeline_class(path).from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
    if dtype != torch.float32 and hasattr(pipe, "to"):
        pipe = pipe.to(dtype=dtype)
    return pipe


#: single-file checkpoint suffixes (one file holding a whole model, as UIs share them)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def local_model_folder(spec: str, *, field: str = "model.pipeline", builtins: Any = ()) -> Path:
    """The folder ``model.pipeline`` names: a local folder, or a Hugging Face id already in the
    local cache (``org/name``, resolved with ``local_files_only``: nothing is downloaded). A
    single-file checkpoint is refused with the conversion that makes it a folder."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        raise ConfigError(
            f"{field} '{spec}' is a single-file checkpoint; flowrl loads folders written by save_pretrained. Convert it once "
            "with diffusers (e.g. StableDiffusion3Pipeline.from_single_file(path, config=<a local pipeline folder of the same "
            "model>).save_pretrained(folder)) and point the config at that folder."
        )
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(spec, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the cache (or not an id): the error below says what to do
            pass
    known = f" nor a built-in ({', '.join(builtins)})" if builtins else ""
    raise ConfigError(
        f"{field} '{spec}' is neither a local folder{known} nor a Hugging Face id in the local cache. "
        "flowrl never downloads: point it at a local checkpoint folder (or fetch it once with `huggingface-cli download`)."
    )


def _pipeline_class(path: Path):
    """The class named in ``model_index.json``: a flowrl pipeline with a registered adapter (e.g.
    ``DigitsPipeline``, which ``DiffusionPipeline`` cannot resolve by name), else ``DiffusionPipeline``."""
    import json

    from diffusers import DiffusionPipeline

    from flowrl.pipelines.base import _ADAPTERS, _import_builtin_adapters

    index = path / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"model.pipeline: {path} has no model_index.json; point it at a folder written by save_pretrained.")
    name = json.loads(index.read_text()).get("_class_name")
    _import_builtin_adapters()
    for cls in _ADAPTERS:
        if cls is not None and cls.__name__ == name and not cls.__module__.startswith("diffusers"):
            return cls
    return DiffusionPipeline


def _import_pipeline_sources() -> None:
    import_if_present(("flowrl.pipelines.digits",))


def _tiny_source(builder_name: str):
    def build(run_dir: Path):
        from flowrl.pipelines import tiny

        pipe = getattr(tiny, builder_name)()
        return tiny.save_and_reload(pipe, Path(run_dir) / "base_model")

    return build


def _digits_source(run_dir: Path):
    from flowrl.pipelines.digits import load_default_digits_pipeline

    return load_default_digits_pipeline()


def _tiny_video_source(builder_name: str):
    def build(run_dir: Path):
        from flowrl.pipelines import tiny, tiny_video

        pipe = tiny.save_and_reload(getattr(tiny_video, builder_name)(), Path(run_dir) / "base_model")
        return tiny_video.with_test_defaults(pipe)

    return build


PIPELINE_SOURCES.register("digits", _digits_source)
PIPELINE_SOURCES.register("tiny-sd3", _tiny_source("tiny_sd3_pipeline"))
PIPELINE_SOURCES.register("tiny-flux", _tiny_source("tiny_flux_pipeline"))
PIPELINE_SOURCES.register("tiny-wan", _tiny_video_source("tiny_wan_pipeline"))
PIPELINE_SOURCES.register("tiny-hunyuan-video", _tiny_video_source("tiny_hunyuan_video15_pipeline"))
PIPELINE_SOURCES.register("tiny-qwen-image", _tiny_video_source("tiny_qwen_image_pipeline"))
PIPELINE_SOURCES.register("tiny-flux-kontext", _tiny_source("tiny_flux_kontext_pipeline"))
PIPELINE_SOURCES.register("tiny-wan-i2v", _tiny_video_source("tiny_wan_i2v_pipeline"))
PIPELINE_SOURCES.register("tiny-hunyuan-video-i2v", _tiny_video_source("tiny_hunyuan_video15_i2v_pipeline"))
