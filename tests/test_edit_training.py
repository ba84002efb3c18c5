"""Training image-conditioned models through the one loop, from the example configs with tiny
models: Flux Kontext editing (instruction-following CLIPScore + edit_consistency) and Wan 2.1
image-to-video (edit_consistency), two iterations each, pipelines loaded from saved folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flowrl import TrainConfig
from flowrl.prompts import ImagePrompt
from flowrl.rewards import Reward, register
from flowrl.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "assets" / "configs"


@register("test_record_sources")
class RecordSources(Reward):
    """Scores 0; records the ``meta["image"]`` and prompts it was handed (class-level log)."""

    seen: list = []

    def __call__(self, outputs, prompts, meta=None):
        RecordSources.seen.append((list(prompts), list((meta or {}).get("image") or [])))
        return torch.zeros(len(prompts))


def _sources(root: Path, size: int) -> Path:
    """Two source images and a prompt file whose rows name them relative to the file; the same
    instruction on both images (two groups)."""
    from PIL import Image

    (root / "imgs").mkdir(parents=True)
    for i, c in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (size, size), c).save(root / "imgs" / f"{i}.png")
    rows = [{"prompt": "make it green", "image": "imgs/0.png"}, {"prompt": "make it green", "image": "imgs/1.png"}]
    (root / "edits.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root / "edits.jsonl"


def _dinov2(root) -> str:
    from test_rewards_edit import tiny_dinov2_dir

    return tiny_dinov2_dir(root)


def _lora(trainer):
    return {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if "lora_B" in n}


def _run(tmp_path, config: str, pipe, rewards: str, *extra):
    from flowrl.pipelines.tiny import save_and_reload

    folder = tmp_path / "model"
    save_and_reload(pipe, folder)  # the user path: model.pipeline is a saved folder
    prompts = _sources(tmp_path / "data", 32)
    cfg = TrainConfig.from_yaml(CONFIGS / config).override([
        f"model.pipeline={folder}", "model.dtype=float32", "model.device=cpu", f"train.output_dir={tmp_path / 'run'}",
        "train.iterations=2", "sampler.num_steps=2", "sampler.eval_num_steps=2", "sampler.height=32", "sampler.width=32",
        "train.num_generations=2", "train.prompts_per_iteration=2", "train.train_batch_size=4", "train.lora_rank=4",
        "train.lora_alpha=8", "train.learning_rate=1e-3", "train.mixed_precision=no", "train.gradient_checkpointing=false",
        "train.progress=false", f"train.prompts={prompts}", f"train.eval_prompts={prompts}", "train.eval_samples_per_prompt=1",
        f"reward.rewards={rewards}", *extra,
    ])
    RecordSources.seen.clear()
    trainer = Trainer(cfg)
    before = _lora(trainer)
    result = trainer.train()
    return trainer, result, before, prompts


def _check(trainer, result, before, prompts, reward_cols):
    root = prompts.parent
    src = [str((root / "imgs" / f"{i}.png").resolve()) for i in range(2)]
    assert len(result.history) == 2
    for h in result.history:
        for col in reward_cols:
            assert -1.0 <= h[f"reward/{col}"] <= 1.0
        assert h["samples/generated"] == 4
    after = _lora(trainer)
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the LoRA trained
    traj = trainer._last_traj
    # same instruction, two source images: two groups, each sample scored against its own source
    assert traj.group_ids.tolist() == [0, 0, 1, 1]
    assert [p.images for p in traj.prompts] == [(src[0],)] * 2 + [(src[1],)] * 2 or [p.images for p in traj.prompts] == [(src[1],)] * 2 + [(src[0],)] * 2
    train_calls = [c for c in RecordSources.seen if len(c[0]) == 4]
    assert train_calls and all(imgs == [p.images[0] for p in prompts_] for prompts_, imgs in train_calls)
    assert set(result.eval_before) >= set(reward_cols)  # evaluation conditions on the sources too
    assert (trainer.run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_two_iterations_of_the_editing_config(tmp_path):
    from fixtures_rewards import tiny_hf_clip_dir

    from flowrl.pipelines.tiny import tiny_flux_kontext_pipeline

    clip, dino = tiny_hf_clip_dir(tmp_path / "clip"), _dinov2(tmp_path / "dino")
    rewards = f"{{clipscore: {{weight: 1.0, path: {clip}}}, edit_consistency: {{weight: 0.5, path: {dino}}}, test_record_sources: 0.0}}"
    trainer, result, before, prompts = _run(tmp_path, "flux_kontext_edit.yaml", tiny_flux_kontext_pipeline(), rewards)
    assert type(trainer.policy.adapter).__name__ == "FluxKontextAdapter"
    _check(trainer, result, before, prompts, ["clipscore", "edit_consistency"])
    assert trainer._last_traj.outputs.shape == (4, 3, 32, 32)


def test_two_iterations_of_the_image_to_video_config(tmp_path):
    from flowrl.pipelines.tiny_video import tiny_wan_i2v_pipeline

    dino = _dinov2(tmp_path / "dino")
    rewards = f"{{edit_consistency: {{weight: 1.0, path: {dino}}}, test_record_sources: 0.0}}"
    trainer, result, before, prompts = _run(tmp_path, "wan_i2v.yaml", tiny_wan_i2v_pipeline(), rewards, "sampler.num_frames=5", "sampler.guidance_scale=1.0")
    assert type(trainer.policy.adapter).__name__ == "WanI2VAdapter"
    _check(trainer, result, before, prompts, ["edit_consistency"])
    assert trainer._last_traj.outputs.shape == (4, 5, 3, 32, 32)
