"""Rollout schedules: window placement (random / sliding), ODE outside the window, stored steps,
step options as indices or fractions, and honest evaluation counts (CFG doubled)."""

import pytest
import torch

from flowrl import FlowPolicy
from flowrl.rollout import SCHEDULES, resolve_step, window_position


def _policy(pipe, rollout="full", cfg=1.0, share=False, steps=4, **params):
    return FlowPolicy.from_pipeline(pipe, num_steps=steps, height=16, width=16, rollout=rollout, rollout_params=params,
                                    guidance_scale=cfg, share_initial_noise=share)


def test_schedules_are_registered():
    assert {"full", "window", "singular", "tree"} <= set(SCHEDULES.names())


def test_step_options_are_indices_or_fractions():
    assert resolve_step(3, 10, field="x") == 3
    assert resolve_step(0.5, 10, field="x") == 5 and resolve_step(0.5, 25, field="x") == 12  # ⌊f·T⌋
    assert resolve_step(1.0, 10, field="x", allow_end=True) == 10
    with pytest.raises(ValueError, match="x=12 is step 12, outside 0…9 for sampler.num_steps=10"):
        resolve_step(12, 10, field="x")


def test_random_window_stays_in_range_and_covers_it():
    g = torch.Generator().manual_seed(0)
    starts = {window_position(10, window_size=2, window_range=(0, 0.5), mode="random", generator=g) for _ in range(200)}
    assert starts == {0, 1, 2, 3}  # [start, start+2) ⊂ [0, 5)
    a = window_position(10, window_size=2, window_range=(0, 0.5), mode="random", generator=torch.Generator().manual_seed(3))
    b = window_position(10, window_size=2, window_range=(0, 0.5), mode="random", generator=torch.Generator().manual_seed(3))
    assert a == b


def test_sliding_window_moves_every_k_iterations_and_wraps():
    pos = [window_position(6, window_size=4, window_range=(0, 1.0), mode="sliding", iteration=it, slide_every=2) for it in range(1, 9)]
    assert pos == [0, 0, 1, 1, 2, 2, 0, 0]  # three positions (0, 1, 2) for a 4-step window in 6 steps
    with pytest.raises(ValueError, match="window_size=5 does not fit window_range steps"):
        window_position(4, window_size=5, window_range=(0, 1.0), mode="sliding")
    with pytest.raises(ValueError, match="Known: random, sliding"):
        window_position(4, window_size=1, window_range=(0, 1.0), mode="nope")


def test_window_schedule_stores_only_window_steps_ode_elsewhere(tiny_sd3):
    policy = _policy(tiny_sd3, "window", share=True, window_size=2, window_range=[1, 3], mode="random")
    traj = policy.rollout(["a cat"], group_size=3, generator=torch.Generator().manual_seed(0))
    assert traj.log_probs.shape == (3, 2) and traj.meta["step_index"][0].tolist() == [1, 2]
    assert traj.meta["window_start"] == 1
    # shared initial noise + an ODE step 0 → every member reaches the window from the same state
    assert torch.equal(traj.states[0, 0], traj.states[1, 0]) and torch.equal(traj.states[0, 0], traj.states[2, 0])
    assert not torch.equal(traj.actions[0, 0], traj.actions[1, 0])  # the window step is stochastic
    # and after the window the chain is deterministic: the clean latent is the ODE image of the last action
    lp = policy.log_prob(traj)
    assert (torch.exp(lp - traj.log_probs) - 1).abs().max() < 1e-6  # ratio 1
    assert traj.meta["model_evals"] == 4.0  # the model still runs every step; 2 steps trained


@pytest.mark.parametrize("rollout,params", [("full", {}), ("window", {"window_size": 1, "window_range": [0, 1.0]})])
def test_evaluations_per_sample_count_cfg(tiny_sd3, rollout, params):
    for cfg, factor in ((1.0, 1), (4.5, 2)):
        policy = _policy(tiny_sd3, rollout, cfg=cfg, **params)
        rows = {"n": 0}
        h = policy.model.register_forward_pre_hook(lambda m, a, kw: rows.__setitem__("n", rows["n"] + kw["hidden_states"].shape[0]), with_kwargs=True)
        try:
            traj = policy.rollout(["a", "b"], group_size=2, generator=torch.Generator().manual_seed(0))
        finally:
            h.remove()
        assert traj.meta["model_evals"] == 4 * factor == rows["n"] / len(traj)
