"""Every sampler preset trains the tiny SD3 and Flux pipelines end to end for two iterations, with
its cost metrics, on-policy ratio 1 and finite losses; config errors name the field to change."""

import copy

import pytest
import torch

from flowrl import FlowPolicy, TrainConfig
from flowrl.algorithms import PRESETS
from flowrl.trainer import Trainer

SAMPLER_PRESETS = ("flow_grpo_fast", "mix_grpo", "sage_grpo", "g2rpo", "branch_grpo", "branch_grpo_mix")

#: overrides that fit each preset on 4 steps with 4 samples per prompt, and the costs they imply
CASES = {
    # window of 2 inside the first half (steps 0, 1): model at every step, 2 trained
    "flow_grpo_fast": ([], 4.0, 2.0),
    # window of 4 over 4 steps
    "mix_grpo": ([], 4.0, 4.0),
    # full SDE, timestep_fraction 0.99 drops the last step
    "sage_grpo": ([], 4.0, 3.0),
    # k ∈ {0, 1}: per prompt 2 prefix + 4·(k0: 3 + 2, k1: 2 + 1) = 34 evals over 16 images; one step per image trained
    "g2rpo": (["train.train_batch_size=4"], 34 / 16, 1.0),
    # splits 0, 2, branch 2: 1 + 2 + 2 + 4 = 9 evals / 4 leaves; 12 edges, width pruning drops 2 → 10 / 4
    "branch_grpo": (["sampler.rollout_params={split_steps: [0, 2]}", "loss.options={width_prune: top}"], 9 / 4, 10 / 4),
    # window of 1 at step 0 (iteration ≤ 25) ∪ splits {0, 2}: edges 2 + 4 = 6 / 4 leaves (every row
    # kept: the JPEG reward is quantised, so a leaf can tie with its group mean and get advantage 0)
    "branch_grpo_mix": (["sampler.rollout_params={split_steps: [0, 2], window_size: 1}", "loss.skip_zero_advantage=false"], 9 / 4, 6 / 4),
}


def _config(tmp_path, name, *extra):
    return TrainConfig().override([
        f"algorithm={name}", f"train.output_dir={tmp_path / name}", "train.num_iterations=2", "sampler.num_steps=4",
        "sampler.height=16", "sampler.width=16", "train.lora_rank=4", "train.lora_alpha=8", "train.num_generations=4",
        "train.prompts_per_iteration=2", "train.train_batch_size=8", "train.progress=false", "train.learning_rate=1e-3",
        *extra,
    ])


def _policy(pipe, cfg):
    """What flowrl.trainer.build_flow_policy builds, over an in-memory pipeline."""
    r = cfg.resolved()
    p, s = r.preset, cfg.sampler
    return FlowPolicy.from_pipeline(copy.deepcopy(pipe), sampler=p.kernel, noise_level=p.noise_level, num_steps=s.num_steps,
                                    height=s.height, width=s.width, rollout=p.rollout, rollout_params=p.rollout_params,
                                    share_initial_noise=p.share_initial_noise)


def test_all_sampler_presets_are_registered_and_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "algorithms.md").read_text()
    section = doc[doc.index("## Samplers"):]
    for name in SAMPLER_PRESETS:
        assert name in PRESETS and PRESETS.get(name).doc
        assert f"`{name}`" in section, name


@pytest.mark.parametrize("family", ["tiny_sd3", "tiny_flux"])
@pytest.mark.parametrize("name", SAMPLER_PRESETS)
def test_preset_trains_two_iterations(tmp_path, request, family, name):
    extra, evals, trained = CASES[name]
    cfg = _config(tmp_path, name, *extra)
    trainer = Trainer(cfg, policy=_policy(request.getfixturevalue(family), cfg))
    before = {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if p.requires_grad}
    result = trainer.train()
    assert len(result.history) == 2
    for h in result.history:
        assert h["cost/model_evals_per_sample"] == pytest.approx(evals)
        assert h["cost/trained_steps_per_sample"] == pytest.approx(trained)
        assert h["update/steps"] >= 1 and torch.isfinite(torch.tensor(h["loss/policy"]))
    assert result.history[0]["ratio/mean"] == pytest.approx(1.0, abs=1e-4)
    after = dict(trainer.policy.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_structured_presets_explain_their_group_size(tmp_path, tiny_sd3):
    cfg = _config(tmp_path, "branch_grpo", "train.num_generations=6", "sampler.rollout_params={split_steps: [0, 2]}")
    with pytest.raises(ValueError, match="set train.num_generations=4"):
        Trainer(cfg, policy=_policy(tiny_sd3, cfg)).train()
    cfg = _config(tmp_path, "branch_grpo")  # the paper's splits 0, 3, 6, 9 need 10+ steps
    with pytest.raises(ValueError, match="split_steps=6 is step 6, outside 0…3"):
        Trainer(cfg, policy=_policy(tiny_sd3, cfg)).train()
