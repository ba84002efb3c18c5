"""Precision and run-directory rules of the training loop: gradient clipping acts on unscaled
gradients under fp16 loss scaling; a new run never starts in a used output_dir."""

import copy
import json

import pytest
import torch

from flowrl import FlowPolicy, TrainConfig
from flowrl.config import ConfigError
from flowrl.trainer import Trainer


def _config(tmp_path, *extra):
    return TrainConfig().override([
        f"train.output_dir={tmp_path / 'run'}", "train.iterations=1", "sampler.num_steps=3",
        "sampler.height=16", "sampler.width=16", "train.lora_rank=4", "train.lora_alpha=8",
        "train.num_generations=4", "train.prompts_per_iteration=2", "train.train_batch_size=8",
        "train.progress=false", "sampler.eval_num_steps=3", "loss.beta=0", "train.max_grad_norm=1e-3", *extra,
    ])


def _policy(pipe, cfg):
    r = cfg.resolved()
    return FlowPolicy.from_pipeline(copy.deepcopy(pipe), sampler=r.preset.kernel, noise_level=r.preset.noise_level,
                                    num_steps=cfg.sampler.num_steps, height=cfg.sampler.height, width=cfg.sampler.width)


def _fp16_scaling_accelerator():
    """An Accelerator that scales losses by 2^16 as fp16 training on a GPU does (accelerate gives
    the CPU no GradScaler; the scaling and unscaling logic is the same)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True, mixed_precision="fp16")
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    acc.native_amp = True
    return acc


def test_fp16_loss_scaling_clips_and_logs_unscaled_gradients(tmp_path, tiny_sd3, monkeypatch):
    cfg32 = _config(tmp_path / "fp32")
    ref = Trainer(cfg32, policy=_policy(tiny_sd3, cfg32)).train().history[0]
    cfg16 = _config(tmp_path / "fp16")
    acc = _fp16_scaling_accelerator()
    try:
        trainer = Trainer(cfg16, policy=_policy(tiny_sd3, cfg16), accelerator=acc)
        # compute in float32 (CPU fp16 autocast is not the point): only the 2^16 loss scale differs
        monkeypatch.setattr(trainer, "autocast", lambda: torch.autocast("cpu", enabled=False))
        got = trainer.train().history[0]
        assert trainer.optimizer.scaler is not None and trainer.optimizer.scaler.get_scale() >= 2.0**15  # scaling was on
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    # the gradient norm before clipping, unscaled: the fp32 run's (a scaled one would be ×65,536)
    assert ref["grad_norm"] > 1e-3  # so the clip at 1e-3 acts in both runs
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert got["loss/policy"] == pytest.approx(ref["loss/policy"], rel=1e-4, abs=1e-9)


def test_new_run_refuses_a_used_output_dir_and_resume_continues_it(tmp_path, tiny_sd3):
    cfg = _config(tmp_path, "train.iterations=2", "train.save_every=1", "train.save_total_limit=1")
    Trainer(cfg, policy=_policy(tiny_sd3, cfg)).train()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["iter_000002"]  # save_total_limit=1 deleted iter_000001
    with pytest.raises(ConfigError, match=r"train.output_dir=.*already holds checkpoints.*iter_000002.*resume_from=latest"):
        Trainer(cfg, policy=_policy(tiny_sd3, cfg)).train()
    # the refused run touched nothing: metrics of the first run are intact
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["iteration"] for l in lines if "reward/mean" in l] == [1, 2]
    more = _config(tmp_path, "train.iterations=3", "train.resume_from=latest")
    result = Trainer(more, policy=_policy(tiny_sd3, more)).train()
    assert [h["iteration"] for h in result.history] == [1, 2, 3]
