"""Trackers through accelerate (train.report_to): TensorBoard by default with every metric and a few
evaluation images at every evaluation; unknown or missing trackers fail with the fix."""

import copy

import pytest
import torch

from flowrl import FlowPolicy, TrainConfig
from flowrl.config import ConfigError
from flowrl.tracking import preview_images, tracker_names


def test_report_to_names_are_checked():
    assert tracker_names("tensorboard") == ["tensorboard"] and tracker_names("none") == [] and tracker_names([]) == []
    assert tracker_names(["tensorboard", "TensorBoard"]) == ["tensorboard"]
    with pytest.raises(ConfigError, match=r"train.report_to: unknown tracker 'tensorbored'. Known: .*wandb"):
        tracker_names("tensorbored")
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"tracker 'wandb' is not installed. Install it \(pip install wandb\)"):
            tracker_names(["tensorboard", "wandb"])


def test_preview_images_upscale_small_images_and_skip_text():
    imgs = torch.rand(5, 1, 16, 16)
    out = preview_images(imgs, count=3)
    assert out.shape == (3, 1, 64, 64)
    torch.testing.assert_close(out[:, :, ::4, ::4], imgs[:3])  # nearest-neighbour: pixels repeated, not blurred
    assert preview_images(torch.rand(2, 3, 1, 8, 8), count=4).shape == (2, 1, 64, 64)  # video: first frame
    assert preview_images(["a completion"], count=4) is None and preview_images(imgs, count=0) is None


def test_tensorboard_gets_metrics_and_eval_images_at_every_evaluation(tmp_path, tiny_sd3):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flowrl.trainer import Trainer

    cfg = TrainConfig().override([
        f"train.output_dir={tmp_path / 'run'}", "train.iterations=2", "train.eval_every=1", "sampler.num_steps=2",
        "sampler.eval_num_steps=2", "sampler.height=16", "sampler.width=16", "train.lora_rank=2", "train.lora_alpha=2",
        "train.num_generations=2", "train.prompts_per_iteration=1", "train.train_batch_size=2", "train.progress=false",
        "train.eval_prompts=[a cat, a dog, a red apple]", "train.eval_samples_per_prompt=2", "train.eval_images=2",
    ])
    r = cfg.resolved()
    policy = FlowPolicy.from_pipeline(copy.deepcopy(tiny_sd3), sampler=r.preset.kernel, noise_level=r.preset.noise_level, num_steps=2, height=16, width=16)
    trainer = Trainer(cfg, policy=policy)
    trainer.train()
    assert [t.name for t in trainer.accelerator.trackers] == ["tensorboard"]  # reachable as accelerate trackers
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalars = acc.Tags()["scalars"]
    assert {"reward/mean", "loss/policy", "eval/jpeg_compressibility"} <= set(scalars)
    assert [e.step for e in acc.Scalars("reward/mean")] == [1, 2]
    # base (0), iteration 1 (eval_every) and tuned (2): the first sample of the first 2 prompts each time
    images = acc.Images("eval/images")
    assert sorted({e.step for e in images}) == [0, 1, 2]
    assert all(e.height >= 64 and e.width >= 2 * 64 for e in images)  # one 2-image grid of upscaled 16-px images
    text = acc.Tags()["tensors"]
    assert any("eval/prompts" in t for t in text)


def test_report_to_none_logs_metrics_jsonl_only(tmp_path, tiny_sd3):
    from flowrl.trainer import Trainer

    cfg = TrainConfig().override([
        f"train.output_dir={tmp_path / 'run'}", "train.iterations=1", "sampler.num_steps=2", "sampler.height=16",
        "sampler.width=16", "train.lora_rank=2", "train.num_generations=2", "train.prompts_per_iteration=1",
        "train.train_batch_size=2", "train.progress=false", "train.report_to=none",
    ])
    r = cfg.resolved()
    policy = FlowPolicy.from_pipeline(copy.deepcopy(tiny_sd3), sampler=r.preset.kernel, noise_level=r.preset.noise_level, num_steps=2, height=16, width=16)
    Trainer(cfg, policy=policy).train()
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and not (tmp_path / "run" / "tensorboard").exists()
    with pytest.raises(ConfigError, match="train.report_to: unknown tracker 'nope'"):
        Trainer(cfg.override(["train.report_to=nope"]), policy=policy)
