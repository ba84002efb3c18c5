"""BranchGRPO (flowrl.tree, the ``tree`` schedule, ``tree_depth`` estimator): cost counts, depth
advantages on hand values, edge ownership and credit, pruning, honest split-noise density, and the
leaf distribution on the Gaussian analytic flow."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from scipy import stats

from flowrl import FlowPolicy
from flowrl.advantages import AdvantageInputs, depth_advantages, make_estimator
from flowrl.rollout import tree_cost
from flowrl.sde import KERNELS, sde_step
from flowrl.tree import TreeLayout, fuse_rewards, sample_tree, width_prune_leaves
from tests._tolerance import EPS32

PAPER = dict(split_steps=[0, 3, 6, 9], branch=2)


def _tree_policy(pipe, num_steps, cfg=1.0, **params):
    return FlowPolicy.from_pipeline(pipe, num_steps=num_steps, height=16, width=16, sampler="dance", noise_level=0.3,
                                    rollout="tree", rollout_params=params, guidance_scale=cfg)


class RowCounter:
    """Counts rows the transformer actually runs (CFG batches cond + uncond rows)."""

    def __init__(self, module):
        self.rows = 0
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.rows += int(kwargs["hidden_states"].shape[0])

    def close(self):
        self.handle.remove()


def test_tree_cost_matches_the_paper():
    # levels 1, 2×3, 4×3, 8×3, 16×10 → 1 + 6 + 12 + 24 + 160 = 203 evaluations; edges 2·3 + 4·3 + 8·3 + 16·11 = 218
    assert tree_cost(20, PAPER["split_steps"], 2) == (203, 218)
    assert round(203 / 16, 2) == 12.69
    assert tree_cost(20, [], 2) == (20, 20)  # a single chain
    with pytest.raises(ValueError, match="outside the 4 denoising steps"):
        tree_cost(4, [0, 3, 6], 2)


@pytest.mark.parametrize("cfg", [1.0, 4.5])
def test_rollout_counts_evaluations_edges_and_pruned_edges(tiny_sd3, cfg):
    policy = _tree_policy(tiny_sd3, 20, cfg=cfg, **PAPER)
    counter = RowCounter(policy.model)
    try:
        traj = policy.rollout(["a cat"], group_size=16, generator=torch.Generator().manual_seed(0))
    finally:
        counter.close()
    factor = 2 if cfg > 1 else 1
    assert counter.rows == 203 * factor == traj.meta["model_evals_total"]  # CFG doubles the rows
    assert traj.meta["model_evals"] == pytest.approx(203 * factor / 16)
    assert traj.outputs.shape[0] == 16 and int(traj.mask.sum()) == 218
    # every edge once: at step i, as many owned entries as children at level i+1
    sizes = TreeLayout(20, (0, 3, 6, 9), 2).level_sizes
    assert traj.mask.sum(0).tolist() == sizes[1:]
    for mode in ("top", "extremes"):
        est = make_estimator("tree_depth", width_prune=mode)
        rewards = torch.randn(16, generator=torch.Generator().manual_seed(1))
        meta = dict(traj.meta)
        est(AdvantageInputs(rewards=rewards, group_ids=traj.group_ids, meta=meta, traj=traj))
        trained = traj.mask & meta["train_mask"]
        assert int(trained.sum()) == 138, mode  # 218 − 8 pruned leaves × 10 post-split steps
        assert float(trained.sum()) / 16 == 8.625


def test_depth_advantages_on_hand_made_leaf_rewards():
    layout = TreeLayout(20, (0, 3, 6, 9), 2)
    levels = fuse_rewards(layout, torch.arange(16.0).view(1, 16))
    assert levels[1].tolist() == [[3.5, 11.5]] and levels[4].tolist() == [[1.5, 5.5, 9.5, 13.5]]
    flat = torch.cat([lv.reshape(-1) for lv in levels])
    depth = torch.cat([torch.full((n,), d) for d, n in enumerate(layout.level_sizes)])
    adv = torch.split(depth_advantages(flat, depth, torch.zeros_like(depth)), layout.level_sizes)
    assert adv[0].tolist() == [0.0]  # one node: 0
    # after the first split: (3.5 − 7.5)/(4·√2) = ∓0.7071 (sample std of two nodes)
    torch.testing.assert_close(adv[1], torch.tensor([-1, 1]) / math.sqrt(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(adv[3], adv[1])  # non-split steps keep the level's values
    # after the second: deviations ∓6, ∓2 over std √(80/3) = 5.164 → ∓1.162, ∓0.387
    torch.testing.assert_close(adv[4], torch.tensor([-1.162, -0.387, 0.387, 1.162]), atol=1e-3, rtol=0)
    leaves = torch.arange(16.0)
    torch.testing.assert_close(adv[20], (leaves - leaves.mean()) / leaves.std(), atol=1e-5, rtol=0)  # plain z-scores
    for a in adv:
        assert abs(float(a.sum())) < 1e-5  # each depth sums to zero
    # a flat depth (std < 1e-6) and a second tree are handled per (tree, depth)
    out = depth_advantages(torch.tensor([1.0, 1.0, 0.0, 2.0]), torch.tensor([1, 1, 1, 1]), torch.tensor([0, 0, 1, 1]))
    # a mean, a std and a division of two values ≤ 2: a few float32 roundings (8 ulps)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -1 / math.sqrt(2), 1 / math.sqrt(2)]), atol=8 * EPS32, rtol=0)


def test_estimator_gives_each_edge_its_childs_advantage(tiny_sd3):
    policy = _tree_policy(tiny_sd3, 4, split_steps=[0, 2], branch=2)
    traj = policy.rollout(["a", "b"], group_size=4, generator=torch.Generator().manual_seed(0))
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0])  # second tree flat
    adv = make_estimator("tree_depth")(AdvantageInputs(rewards=rewards, group_ids=traj.group_ids, meta=dict(traj.meta)))
    assert adv.shape == traj.mask.shape == (8, 4)
    # tree 0, step 0 (split): children means 0.5 and 2.5 → ∓0.7071, on the rows owning them (leaves 0 and 2)
    torch.testing.assert_close(adv[[0, 2], 0], torch.tensor([-1, 1]) / math.sqrt(2), atol=1e-4, rtol=0)
    assert adv[[1, 3], 0].tolist() == [0.0, 0.0]  # not owned by leaves 1, 3: trained once
    # step 2 splits again: four leaves, plain z-scores of 0, 1, 2, 3
    r = torch.arange(4.0)
    torch.testing.assert_close(adv[:4, 2], (r - 1.5) / r.std(), atol=1e-5, rtol=0)
    assert adv[4:].abs().max() == 0  # equal rewards: no signal


def test_log_prob_fusion_weights_children_by_edge_probability():
    layout = TreeLayout(2, (0,), 2)
    lp = [torch.tensor([0.0, math.log(3.0)]), None]
    levels = fuse_rewards(layout, torch.tensor([[1.0, 5.0]]), fusion="log_prob", edge_log_probs=lp)
    # softmax(0, log 3) = (1/4, 3/4) → 1/4·1 + 3/4·5 = 4
    assert levels[0].tolist() == [[4.0]]
    assert fuse_rewards(layout, torch.tensor([[1.0, 5.0]]))[0].tolist() == [[3.0]]


def test_width_pruning_modes():
    layout = TreeLayout(6, (0, 2), 2)
    r = torch.tensor([[0.0, 1.0, 5.0, 4.0]])
    assert width_prune_leaves(layout, r, mode="top").tolist() == [[False, True, True, False]]  # best of each pair
    assert width_prune_leaves(layout, r, mode="extremes").tolist() == [[True, False, True, False]]  # best + worst 25%
    with pytest.raises(ValueError, match="Known: top, extremes"):
        width_prune_leaves(layout, r, mode="nope")


def test_depth_pruning_fixed_and_sliding(tiny_sd3):
    policy = _tree_policy(tiny_sd3, 4, split_steps=[0, 2], branch=2, depth_prune=[3])
    traj = policy.rollout(["a"], group_size=4, generator=torch.Generator().manual_seed(0))
    assert traj.mask[:, 3].sum() == 0 and traj.mask[:, :3].sum() == 2 + 2 + 4
    policy = _tree_policy(tiny_sd3, 4, split_steps=[0, 2], branch=2, depth_prune_window=1, depth_prune_every=1)
    pruned = []
    for it in (1, 2, 3):
        policy.iteration = it
        traj = policy.rollout(["a"], group_size=4, generator=torch.Generator().manual_seed(0))
        pruned.append([j for j in range(4) if traj.mask[:, j].sum() == 0])
    assert pruned == [[0], [1], [2]]  # the pruned depth slides one step per iteration


def test_mix_variant_stores_only_sde_steps_and_splits_are_always_sde(tiny_sd3):
    policy = _tree_policy(tiny_sd3, 6, split_steps=[0, 4], branch=2, window_size=1, window_range=[0, 6], slide_every=1)
    policy.iteration = 3  # window at step 2
    traj = policy.rollout(["a"], group_size=4, generator=torch.Generator().manual_seed(0))
    assert traj.meta["step_index"][0].tolist() == [0, 2, 4]
    assert traj.meta["model_evals_total"] == tree_cost(6, [0, 4], 2)[0]  # ODE steps still run the model
    lp = policy.log_prob(traj)
    torch.testing.assert_close(lp[traj.mask], traj.log_probs[traj.mask], atol=1e-5, rtol=0)


def test_scaled_split_noise_keeps_the_density_honest(tiny_sd3):
    policy = _tree_policy(tiny_sd3, 4, split_steps=[0, 2], branch=2, split_noise_scale=4.0)
    traj = policy.rollout(["a cat"], group_size=4, generator=torch.Generator().manual_seed(0))
    assert traj.meta["std_scale"][0].tolist() == [4.0, 1.0, 4.0, 1.0]
    # recomputation reproduces the stored log-probs (ratio 1) on every trained edge
    with torch.no_grad():
        ev = policy.evaluate(traj)
    torch.testing.assert_close(ev.log_prob[traj.mask], traj.log_probs[traj.mask], atol=1e-5, rtol=0)
    # whitened by the std actually used, split residuals are N(0, 1); by the kernel's own std (the
    # reference's density) they would have variance 16
    z = (traj.actions[:, 2] - ev.mean[:, 2]) / ev.std[:, 2].view(-1, 1, 1, 1)
    assert abs(float(z[traj.mask[:, 2]].std()) - 1.0) < 0.1
    assert ev.std[0, 2] / ev.std[0, 3] > 3  # 4·s at the split vs s after it


def _affine_velocity(sigma, m, s):
    q = (1 - sigma) ** 2 * s**2 + sigma**2
    a = sigma / q - (1 - sigma) * s**2 / q
    return a, -a * (1 - sigma) * m - m


def test_tree_leaves_have_the_sde_marginal_on_the_gaussian_flow():
    """With split noise scale 1 each leaf is distributed like an independent SDE rollout: on the
    Gaussian analytic flow the kernels are affine, so the exact marginal is N(mean_T, var_T)."""
    m, s, eta = 1.5, 0.4, 0.3
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    grid = sched.sigmas.double()
    layout = TreeLayout(10, (0, 2, 4), 2)

    def velocity(x, sigma, tree):
        a, b = _affine_velocity(sigma.view(-1, 1), m, s)
        return a * x + b

    # exact moments of the chain x_{i+1} = c0 + c1·x_i + std·ε
    mean, var = 0.0, 1.0
    for i in range(10):
        x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
        a, b = _affine_velocity(float(grid[i]), m, s)
        mu, std = KERNELS.get("dance")(x, a * x + b, torch.full((2, 1), float(grid[i]), dtype=torch.float64), torch.full((2, 1), float(grid[i + 1]), dtype=torch.float64), eta)
        c0, c1 = float(mu[0]), float(mu[1] - mu[0])
        mean, var = c0 + c1 * mean, c1**2 * var + float(torch.as_tensor(std).flatten()[0]) ** 2

    def leaves(scale, seed):
        g = torch.Generator().manual_seed(seed)
        P = 4000
        roots = torch.randn(P, 1, generator=g, dtype=torch.float64)
        res = sample_tree(velocity, roots, grid, layout, kind="dance", noise_level=eta, split_noise_scale=scale,
                          noise_fn=lambda shape: torch.randn(shape, generator=g, dtype=torch.float64))
        out = res.levels[-1].double().view(P, 8)
        return out[torch.arange(P), torch.arange(P) % 8]  # one leaf per tree: independent samples

    x = leaves(1.0, 0)
    se_mean, se_var = math.sqrt(var / len(x)), var * math.sqrt(2 / len(x))
    assert abs(float(x.mean()) - mean) < 4 * se_mean
    assert abs(float(x.var()) - var) < 4 * se_var
    assert stats.kstest(((x - mean) / math.sqrt(var)).numpy(), "norm").pvalue > 1e-3
    # the test can fail: split noise ×4 (the reference's) widens the leaves far beyond sampling error
    x4 = leaves(4.0, 1)
    assert float(x4.var()) > var + 6 * se_var  # measured: 0.103 vs 0.086 (9 standard errors)
