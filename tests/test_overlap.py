"""Rewards of one rollout call are scored while the next call rolls out, with the same numbers
as scoring in line; calls join into one batch with renumbered groups."""

import copy
import threading

import pytest
import torch

from flowrl import FlowPolicy, TrainConfig
from flowrl.rewards import Reward, build_rewards, register
from flowrl.trainer import Trainer

PROBE: dict = {}


@register("test_overlap_probe")
class OverlapProbe(Reward):
    """Mean brightness; on its first call it waits (≤ 20 s) for the second rollout call to start
    and records whether it did, i.e. whether scoring overlapped the next rollout."""

    name = "probe"

    def __call__(self, images, prompts, meta=None):
        if "started" in PROBE and not PROBE.get("checked"):
            PROBE["checked"] = True
            PROBE["overlapped"] = PROBE["started"].wait(timeout=20.0)
        return images.float().mean(dim=(1, 2, 3))


def _trainer(pipe, tmp_path, *extra):
    cfg = TrainConfig().override([
        f"train.output_dir={tmp_path}", "train.iterations=1", "sampler.num_steps=3", "sampler.height=16", "sampler.width=16",
        "train.lora_rank=4", "train.lora_alpha=8", "train.num_generations=2", "train.prompts_per_iteration=2",
        "train.train_batch_size=4", "train.progress=false", "train.learning_rate=1e-3", "train.prompts=[a cat, a dog]",
        "reward.rewards={test_overlap_probe: 1.0}", *extra,
    ])
    r = cfg.resolved()
    policy = FlowPolicy.from_pipeline(copy.deepcopy(pipe), sampler=r.preset.kernel, noise_level=r.preset.noise_level, num_steps=3,
                                      height=16, width=16, rollout=r.preset.rollout, rollout_params=r.preset.rollout_params)
    trainer = Trainer(cfg, policy=policy, reward_set=build_rewards({"test_overlap_probe": 1.0}))
    trainer._prepare_run_dir()
    return trainer


def test_overlapped_rewards_give_the_in_line_numbers(tiny_sd3, tmp_path):
    runs = {}
    for overlap in (True, False):
        tr = _trainer(tiny_sd3, tmp_path / str(overlap), "train.rollout_batch_size=1", f"train.overlap_rewards={str(overlap).lower()}")
        rec = tr.iteration(1)
        params = [p.detach().clone() for p in tr.params]
        runs[overlap] = (rec, tr._last_traj, params)
    (a, ta, pa), (b, tb, pb) = runs[True], runs[False]
    assert ta.prompts[0] == ta.prompts[1] != ta.prompts[2] == ta.prompts[3]
    assert ta.group_ids.tolist() == [0, 0, 1, 1]  # two calls of one prompt, groups renumbered
    assert ta.prompts == tb.prompts
    assert torch.equal(ta.rewards, tb.rewards) and torch.equal(ta.log_probs, tb.log_probs)
    assert a["reward/mean"] == b["reward/mean"] and a["loss/policy"] == b["loss/policy"]
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert a["cost/transformer_calls"] == 2 * 3  # two calls of 3 steps


def test_scoring_runs_while_the_next_call_rolls_out(tiny_sd3, tmp_path):
    tr = _trainer(tiny_sd3, tmp_path, "train.rollout_batch_size=1")
    rollout = tr.policy.rollout
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            PROBE["started"].set()
        return rollout(*args, **kwargs)

    PROBE.clear()
    PROBE["started"] = threading.Event()
    tr.policy.rollout = counted
    try:
        tr.iteration(1)
    finally:
        tr.policy.rollout = rollout
    assert PROBE["checked"] and PROBE["overlapped"], "the first call's rewards were not scored during the second rollout"
    PROBE.clear()


def test_structured_rollouts_refuse_several_calls(tiny_sd3, tmp_path):
    tr = _trainer(tiny_sd3, tmp_path, "algorithm=branch_grpo", "sampler.rollout_params={split_steps: [0], branch: 2}",
                  "train.rollout_batch_size=1")
    with pytest.raises(ValueError, match="train.rollout_batch_size"):
        tr.iteration(1)
