"""The moving KL reference (loss.reference: ema | periodic) for any preset (flowrl.reference)."""

import math

import pytest
import torch

from flowrl.reference import moving_reference_update


def test_moving_reference_update_by_hand():
    shadow, live = [torch.tensor([0.0, 2.0])], [torch.tensor([1.0, 0.0])]
    # ema, d = 0.75: shadow ← 0.75·[0, 2] + 0.25·[1, 0] = [0.25, 1.5]
    assert moving_reference_update(shadow, live, 1, mode="ema", decay=0.75, every=1)
    assert shadow[0].tolist() == [0.25, 1.5]
    # every 2 steps: step 3 does nothing, step 4 moves again: 0.75·[0.25, 1.5] + 0.25·[1, 0] = [0.4375, 1.125]
    assert not moving_reference_update(shadow, live, 3, mode="ema", decay=0.75, every=2)
    assert moving_reference_update(shadow, live, 4, mode="ema", decay=0.75, every=2)
    assert shadow[0].tolist() == [0.4375, 1.125]
    # periodic: a copy
    assert moving_reference_update(shadow, live, 4, mode="periodic", decay=0.0, every=2)
    assert shadow[0].tolist() == [1.0, 0.0]


def _cfg(tmp_path, *extra):
    from flowrl import TrainConfig

    return TrainConfig().override([
        "algorithm=flow_grpo", "model.pipeline=tiny-sd3", f"train.output_dir={tmp_path}", "train.iterations=2",
        "sampler.num_steps=3", "sampler.height=16", "sampler.width=16", "train.lora_rank=4", "train.lora_alpha=8",
        "train.num_generations=4", "train.prompts_per_iteration=2", "train.train_batch_size=8", "train.progress=false",
        "model.device=cpu", "train.learning_rate=5e-2", "loss.timestep_fraction=1.0", *extra,
    ])


def test_resolve_wraps_the_presets_objective():
    from flowrl import TrainConfig
    from flowrl.config import ConfigError

    r = TrainConfig().override(["algorithm=flow_grpo", "loss.reference=ema", "loss.reference_options={decay: 0.9}"]).resolved()
    assert r.preset.objective == "moving_reference"
    assert r.preset.objective_params == {"inner": "policy_gradient", "inner_params": {}, "mode": "ema", "decay": 0.9}
    with pytest.raises(ConfigError, match="algorithm 'dance_grpo' has no KL term"):
        TrainConfig().override(["algorithm=dance_grpo", "loss.reference=ema"]).resolved()
    with pytest.raises(ConfigError, match="loss.reference must be base, ema or periodic"):
        TrainConfig().override(["algorithm=flow_grpo", "loss.reference=old"]).resolved()


def test_periodic_reference_refreshed_every_step_makes_the_next_kl_zero_at_the_start(tmp_path):
    """periodic with every=1: after each optimizer step the reference equals the weights, so the KL
    of the next update (one optimizer step per iteration here, on-policy) is 0 — while the base
    reference gives a positive KL once the weights moved (the control)."""
    from flowrl.trainer import Trainer

    moving = Trainer(_cfg(tmp_path / "m", "loss.reference=periodic", "train.save_every=1")).train().history
    base = Trainer(_cfg(tmp_path / "b")).train().history
    assert base[1]["kl/ref"] > 1e-8
    assert moving[1]["kl/ref"] == pytest.approx(0.0, abs=1e-10)
    assert [h["ref/refreshes"] for h in moving] == [1.0, 2.0]
    # an EMA reference sits between them
    ema = Trainer(_cfg(tmp_path / "e", "loss.reference=ema", "loss.reference_options={decay: 0.5}")).train().history
    assert 0 < ema[1]["kl/ref"] < base[1]["kl/ref"]
    # exact resume (the shadow is checkpointed)
    resumed = Trainer(_cfg(tmp_path / "m", "loss.reference=periodic", f"train.resume_from={tmp_path / 'm' / 'checkpoints' / 'iter_000001'}")).train().history
    assert [resumed[1][k] for k in ("reward/mean", "loss/policy", "kl/ref")] == [moving[1][k] for k in ("reward/mean", "loss/policy", "kl/ref")]
    assert math.isfinite(moving[1]["loss/policy"])
