"""What a checkpoint restores besides the weights: the fp16 loss scaler's scale (a resumed fp16 run
would otherwise restart at 2^16 and skip steps a second time while it backs off)."""

import copy

import torch

from flowrl import FlowPolicy, TrainConfig
from flowrl.trainer import Trainer


def _config(tmp_path, *extra):
    return TrainConfig().override([
        f"train.output_dir={tmp_path / 'run'}", "sampler.num_steps=3", "sampler.height=16", "sampler.width=16",
        "train.lora_rank=4", "train.lora_alpha=8", "train.num_generations=2", "train.prompts_per_iteration=2",
        "train.train_batch_size=4", "train.progress=false", "loss.beta=0", *extra,
    ])


def _policy(pipe, cfg):
    r = cfg.resolved()
    return FlowPolicy.from_pipeline(copy.deepcopy(pipe), sampler=r.preset.kernel, noise_level=r.preset.noise_level,
                                    num_steps=cfg.sampler.num_steps, height=cfg.sampler.height, width=cfg.sampler.width)


def _scaling_accelerator(scale: float):
    """fp16-style loss scaling on the CPU (accelerate gives the CPU no GradScaler; the logic is the same)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True, mixed_precision="fp16")
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1)  # grows ×2 after every finite step
    acc.native_amp = True
    return acc


def test_checkpoint_restores_the_loss_scale(tmp_path, tiny_sd3, monkeypatch):
    from accelerate.state import AcceleratorState

    try:
        cfg = _config(tmp_path, "train.iterations=1")
        trainer = Trainer(cfg, policy=_policy(tiny_sd3, cfg), accelerator=_scaling_accelerator(2.0**4))
        monkeypatch.setattr(trainer, "autocast", lambda: torch.autocast("cpu", enabled=False))
        trainer.train()
        saved = trainer.optimizer.scaler.get_scale()
        assert saved > 2.0**4  # the scale moved during the run (so restoring it is not vacuous)
        assert (tmp_path / "run" / "checkpoints" / "iter_000001" / "scaler.pt").is_file()
        more = _config(tmp_path, "train.iterations=1", "train.resume_from=latest")
        resumed = Trainer(more, policy=_policy(tiny_sd3, more), accelerator=_scaling_accelerator(2.0**16))
        resumed.load_checkpoint(resumed._resolve_checkpoint("latest"))
        assert resumed.optimizer.scaler.get_scale() == saved
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
