"""FlowPolicy on real (tiny) SD3 and Flux pipelines loaded through from_pretrained."""

import copy

import pytest
import torch

from flowrl import FlowPolicy, Trajectories
from flowrl.policy import Policy


def _policy(pipe, **kw):
    kw.setdefault("num_steps", 4)
    return FlowPolicy.from_pipeline(pipe, height=16, width=16, **kw)


@pytest.mark.parametrize("family", ["tiny_sd3", "tiny_flux"])
@pytest.mark.parametrize("cfg", [1.0, 4.5])
def test_recomputed_log_probs_equal_rollout(family, cfg, request):
    pipe = request.getfixturevalue(family)
    policy = _policy(pipe, guidance_scale=cfg)
    assert isinstance(policy, Policy)
    traj = policy.rollout(["a cat", "a dog"], group_size=3, generator=torch.Generator().manual_seed(0))
    assert traj.log_probs.shape == (6, 4) and traj.outputs.shape == (6, 3, 16, 16)
    assert traj.outputs.min() >= 0 and traj.outputs.max() <= 1
    recomputed = policy.log_prob(traj)
    ratio = torch.exp(recomputed - traj.log_probs)
    # measured: exactly 1.0 on CPU float32 (tolerance kept at 1e-6 for other BLAS backends)
    assert (ratio - 1).abs().max() < 1e-6
    # a subset of steps, on a re-ordered sub-batch
    sub = traj.select([4, 1])
    part = policy.log_prob(sub, steps=torch.tensor([1, 3]))
    torch.testing.assert_close(part, traj.log_probs[[4, 1]][:, [1, 3]], atol=1e-5, rtol=0)


def test_rollout_is_deterministic_and_groups_are_contiguous(tiny_sd3):
    policy = _policy(tiny_sd3)
    a = policy.rollout(["x", "y"], group_size=2, generator=torch.Generator().manual_seed(5))
    b = policy.rollout(["x", "y"], group_size=2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.log_probs, b.log_probs) and torch.equal(a.outputs, b.outputs)
    assert a.group_ids.tolist() == [0, 0, 1, 1] and a.prompts == ["x", "x", "y", "y"]
    c = policy.rollout(["x", "y"], group_size=2, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(a.outputs, c.outputs)


def test_stored_sigmas_follow_the_scheduler_grid(tiny_sd3, tiny_flux):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sd3 = _policy(tiny_sd3)
    sched = FlowMatchEulerDiscreteScheduler.from_config(tiny_sd3.scheduler.config)
    sched.set_timesteps(4)
    torch.testing.assert_close(sd3.sigma_grid(), sched.sigmas.float())
    flux = _policy(tiny_flux)
    grid = flux.sigma_grid()
    assert grid[0] == 1.0 and grid[-1] == 0.0 and torch.all(grid[1:] < grid[:-1])
    assert tiny_flux.scheduler.config.use_dynamic_shifting  # the grid came through mu


def test_shared_initial_noise_makes_group_members_start_equal(tiny_sd3):
    policy = _policy(tiny_sd3, share_initial_noise=True)
    traj = policy.rollout(["x"], group_size=3, generator=torch.Generator().manual_seed(0))
    x0 = traj.states[:, 0]
    assert torch.equal(x0[0], x0[1]) and torch.equal(x0[1], x0[2])
    assert not torch.equal(traj.actions[0, 0], traj.actions[1, 0])  # SDE noise still differs


def test_non_flow_scheduler_is_refused_with_the_fix(tiny_sd3):
    from diffusers import EulerDiscreteScheduler

    pipe = copy.copy(tiny_sd3)
    pipe.scheduler = EulerDiscreteScheduler()
    with pytest.raises(TypeError, match="FlowMatchEulerDiscreteScheduler"):
        FlowPolicy.from_pipeline(pipe)


def test_unknown_pipeline_is_refused():
    class NotAPipeline:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="no adapter"):
        FlowPolicy.from_pipeline(NotAPipeline())


def test_trajectories_select_and_concat_roundtrip(tiny_sd3):
    policy = _policy(tiny_sd3)
    traj = policy.rollout(["x", "y"], group_size=2, generator=torch.Generator().manual_seed(0))
    a, b = traj.select([0, 1]), traj.select([2, 3])
    back = Trajectories.concat([a, b])
    assert torch.equal(back.log_probs, traj.log_probs) and back.prompts == traj.prompts
    assert torch.equal(back.cond["prompt_embeds"], traj.cond["prompt_embeds"])
