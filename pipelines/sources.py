"""Where a pipeline comes from: ``model.pipeline`` as a built-in source (``PIPELINE_SOURCES``:
``digits``, the tiny test models) or a local folder written by ``save_pretrained``."""

from __future__ import annotations

from pathlib import Path

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
        path = Path(spec)
        if not path.is_dir():
            raise ConfigError(
                f"model.pipeline '{spec}' is neither a local folder nor a built-in "
                f"({', '.join(PIPELINE_SOURCES.names())}). flowrl never downloads: point it at a local checkpoint."
            )
        pipe = _pipeline_class(path).from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
    if dtype != torch.float32 and hasattr(pipe, "to"):
        pipe = pipe.to(dtype=dtype)
    return pipe


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
