"""``flowrl export`` (issue 24, item 8): a run's evaluated LoRA as diffusers files, or fused into
the transformer, with a model card; loaded back through the stock loaders they give flowrl's images."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from flowrl import TrainConfig, runs
from flowrl.cli import main
from flowrl.export import read_card_numbers

DIGITS = Path(__file__).resolve().parents[1] / "assets" / "configs" / "digits.yaml"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    cfg = TrainConfig.from_yaml(DIGITS).override([
        f"train.output_dir={out}", "train.iterations=2", "train.prompts_per_iteration=2", "train.num_generations=2",
        "train.train_batch_size=4", "train.eval_prompts=['a 3', 'two 5s']", "train.lora_rank=4", "train.lora_alpha=8",
        "train.learning_rate=0.01", "sampler.num_steps=2", "sampler.eval_num_steps=4", "train.report_to=none", "train.progress=false",
    ])
    from flowrl.trainer import Trainer

    Trainer(cfg).train()
    return out


def _images(run, weights, config=None):
    images, _ = runs.generate(run, weights, config=config)
    return images


def test_lora_export_loads_with_stock_load_lora_weights(digits_run, tmp_path, capsys):
    run = runs.load_run(digits_run)
    assert main(["export", str(digits_run), "--out", str(tmp_path / "lora")]) == 0
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    ours = _images(run, run.evaluated_weights())
    # a fresh config naming only the base model: the exported folder through diffusers' load_lora_weights
    fresh = runs.Run.from_config(run.config)
    theirs = _images(fresh, runs.Weights("lora", tmp_path / "lora"))
    assert torch.equal(ours, theirs)
    base = _images(fresh, fresh.base_weights())
    assert not torch.equal(ours, base)  # the LoRA changes the images: the comparison above means something
    # the model card holds the run's own final numbers and its config
    card = (tmp_path / "lora" / "README.md").read_text()
    finals = [json.loads(x) for x in (digits_run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    table = read_card_numbers(tmp_path / "lora")
    assert table["digits/correct"][1] == pytest.approx(finals[-1]["eval/digits/correct"], abs=5e-5)
    assert table["digits/correct"][0] == pytest.approx(finals[0]["eval/digits/correct"], abs=5e-5)
    assert "algorithm: flow_grpo" in card and "load_lora_weights" in card


def test_merged_export_gives_the_same_images(digits_run, tmp_path):
    run = runs.load_run(digits_run)
    assert main(["export", str(digits_run), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert (tmp_path / "merged" / "model_index.json").is_file() and (tmp_path / "merged" / "README.md").is_file()
    ours = _images(run, run.evaluated_weights())
    merged_cfg = dataclasses.replace(run.config, model=dataclasses.replace(run.config.model, pipeline=str(tmp_path / "merged")))
    merged = _images(runs.Run.from_config(merged_cfg), runs.Weights("base"), config=merged_cfg)
    # W + s·BA fused vs applied separately: float32 rounding only, far below one 8-bit pixel level (1/255)
    assert (ours - merged).abs().max() < 1e-4
    # merged into the transformer only: the text encoder is the base model's
    from flowrl.builders import load_pipeline

    base = load_pipeline("digits", tmp_path / "b")
    again = load_pipeline(str(tmp_path / "merged"), tmp_path / "m")
    for (n, a), (_, b) in zip(base.text_encoder.state_dict().items(), again.text_encoder.state_dict().items()):
        assert torch.equal(a, b), n


def test_export_from_a_checkpoint_and_refusals(digits_run, tmp_path, capsys):
    from safetensors.torch import load_file

    ckpt = sorted((digits_run / "checkpoints").glob("iter_*"))[-1]
    assert main(["export", str(digits_run), "--out", str(tmp_path / "ck"), "--checkpoint", str(ckpt)]) == 0
    a = load_file(str(tmp_path / "ck" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(digits_run / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)  # both the EMA at the last iteration
    assert main(["export", str(digits_run), "--out", str(tmp_path / "ck")]) == 2  # never overwrites
    assert "already holds files" in capsys.readouterr().err


def test_model_names_cache_ids_and_single_files(tmp_path, monkeypatch):
    """A Hugging Face id in the local cache is a valid model.pipeline (as the docs say; nothing is
    downloaded); a single-file checkpoint is refused with the conversion to a folder."""
    import shutil

    import huggingface_hub.constants as C

    from flowrl.builders import load_pipeline
    from flowrl.config import ConfigError

    cache = tmp_path / "hub"
    snap = cache / "models--someone--digits" / "snapshots" / ("0" * 40)
    shutil.copytree(Path(__file__).resolve().parents[1] / "assets" / "digits" / "pipeline", snap)
    (cache / "models--someone--digits" / "refs").mkdir()
    (cache / "models--someone--digits" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    pipe = load_pipeline("someone/digits", tmp_path / "run")
    assert type(pipe).__name__ == "DigitsPipeline"
    with pytest.raises(ConfigError, match="nor a Hugging Face id in the local cache"):
        load_pipeline("someone/absent", tmp_path / "run")
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"\0")
    with pytest.raises(ConfigError, match="single-file checkpoint.*from_single_file"):
        load_pipeline(str(single), tmp_path / "run")
