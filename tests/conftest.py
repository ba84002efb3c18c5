"""Shared test setup: one thread per process (tests run in parallel under xdist), offline hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """A tiny random SD3 pipeline saved with save_pretrained and loaded back (offline)."""
    from flowrl.pipelines.tiny import save_and_reload, tiny_sd3_pipeline

    return save_and_reload(tiny_sd3_pipeline(), tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    from flowrl.pipelines.tiny import save_and_reload, tiny_flux_pipeline

    return save_and_reload(tiny_flux_pipeline(), tmp_path_factory.mktemp("flux"))


def _tiny_video(builder_name, tmp_path_factory):
    from flowrl.pipelines import tiny_video
    from flowrl.pipelines.tiny import save_and_reload

    pipe = save_and_reload(getattr(tiny_video, builder_name)(), tmp_path_factory.mktemp(builder_name))
    return tiny_video.with_test_defaults(pipe)


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory):
    """A tiny random WanPipeline (save_pretrained → from_pretrained), 32×32, 5 frames by default."""
    return _tiny_video("tiny_wan_pipeline", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_hunyuan_video(tmp_path_factory):
    """A tiny random HunyuanVideo15Pipeline (reloaded), 32×32, 5 frames, short text context."""
    return _tiny_video("tiny_hunyuan_video15_pipeline", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_qwen_image(tmp_path_factory):
    """A tiny random QwenImagePipeline (reloaded), 64×64 (8×8 latents)."""
    return _tiny_video("tiny_qwen_image_pipeline", tmp_path_factory)
