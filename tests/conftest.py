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
