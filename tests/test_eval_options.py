"""Options every preset can use: training CFG-free or at a lower resolution than evaluation
(``sampler.eval_height`` / ``eval_width`` / ``eval_guidance_scale``)."""

import pytest
import torch


def _cfg(tmp_path, *extra):
    from flowrl import TrainConfig

    return TrainConfig().override([
        "algorithm=awm", "model.pipeline=tiny-sd3", f"train.output_dir={tmp_path}", "train.iterations=0",
        "sampler.num_steps=2", "sampler.eval_num_steps=2", "sampler.height=16", "sampler.width=16", "train.lora_rank=4",
        "train.num_generations=2", "train.prompts_per_iteration=1", "train.train_batch_size=2", "train.progress=false",
        "model.device=cpu", "train.eval_prompts=['a cat']", *extra,
    ])


def test_evaluation_at_a_higher_resolution_and_with_cfg_than_training(tmp_path):
    from flowrl.evaluation import eval_samples
    from flowrl.seeding import PromptGenerators
    from flowrl.trainer import Trainer

    trainer = Trainer(_cfg(tmp_path, "sampler.eval_height=32", "sampler.eval_width=24", "sampler.eval_guidance_scale=3.0"))
    policy = trainer.policy
    assert (policy.height, policy.width, policy.guidance_scale) == (16, 16, 1.0)  # training: 16×16, CFG-free
    out, _ = eval_samples(policy, ["a cat"], trainer.config)
    assert tuple(out.shape[-2:]) == (32, 24)
    assert (policy.height, policy.width, policy.guidance_scale) == (16, 16, 1.0)  # restored after evaluation
    # the same samples as a policy that was set to 32×24 with CFG 3 all along
    policy.height, policy.width, policy.guidance_scale = 32, 24, 3.0
    ref = policy.generate(["a cat"], generator=PromptGenerators(trainer.config.train.seed, "eval", keys=range(1)), num_steps=2)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    no_cfg = policy.generate(["a cat"], generator=PromptGenerators(trainer.config.train.seed, "eval", keys=range(1)), num_steps=2, guidance_scale=1.0)
    assert (no_cfg - ref).abs().max() > 1e-4  # CFG changes the samples


def test_unset_evaluation_options_keep_the_training_values(tmp_path):
    from flowrl.evaluation import eval_sampling_options

    cfg = _cfg(tmp_path)
    assert eval_sampling_options(cfg) == {"num_steps": 2}


@pytest.mark.parametrize("field, value", [("eval_height", 0), ("eval_guidance_scale", 0.5)])
def test_bad_evaluation_options_name_the_field(tmp_path, field, value):
    from flowrl.config import ConfigError

    with pytest.raises(ConfigError, match=f"sampler.{field}"):
        _cfg(tmp_path, f"sampler.{field}={value}").validate()
