"""G²RPO: singular stochastic sampling (shared prefix, one SDE step, ODE suffixes), suffix index
sets, evaluation counts, multi-granularity advantages and the estimator's row mapping."""

import pytest
import torch

from flowrl import FlowPolicy
from flowrl.advantages import AdvantageInputs, make_estimator, multi_granularity_advantages
from flowrl.rollout import CountingVelocity, sample_singular, singular_cost, suffix_indices
from tests._tolerance import float32_sum_tol


def _policy(pipe, cfg=1.0, **params):
    return FlowPolicy.from_pipeline(pipe, num_steps=4, height=16, width=16, sampler="flow", noise_level=0.7,
                                    rollout="singular", rollout_params=params, guidance_scale=cfg)


def test_suffix_index_sets():
    assert suffix_indices(16, 3, 1) == list(range(4, 17))
    # the reference's coarse grid σ[:k+2] + σ[k+2::g]: one fine step to k+2, then every g-th σ; its
    # last point (15) is not evaluated and x̂0 there is an Euler step to σ = 0, hence 16
    assert suffix_indices(16, 3, 2) == [4, 5, 7, 9, 11, 13, 16]
    assert suffix_indices(16, 4, 2) == [5, 6, 8, 10, 12, 14, 16]
    assert suffix_indices(16, 15, 2) == [16]  # SDE at the last step: no ODE suffix
    assert suffix_indices(4, 0, 2) == [1, 2, 4]
    with pytest.raises(ValueError, match="granularity"):
        suffix_indices(4, 0, 0)


def _reference_suffix(velocity, x, grid, k, g):
    """The reference's ODE after the SDE step at k: grid σ[:k+2] ++ σ[k+2::g], Euler from index
    k+1, and the image is x̂0 = x − σ·v at the last evaluated σ."""
    sig = torch.cat([grid[: k + 2], grid[k + 2 :: g]])
    x0 = x
    for i in range(k + 1, len(sig) - 1):
        v = velocity(x, sig[i].expand(x.shape[0]))
        x0 = x - sig[i] * v
        x = x + (sig[i + 1] - sig[i]) * v
    return x0


def test_suffixes_reproduce_the_reference_coarse_grid():
    T = 16
    t = torch.linspace(1, 0, T + 1)
    grid = 3 * t / (1 + 2 * t)  # shift 3

    def velocity(x, sigma, rows=None):
        return torch.tanh(x) * (1 + sigma.view(-1, 1)) - 0.5 * x  # nonlinear: the grid matters

    x0 = torch.randn(1, 6, generator=torch.Generator().manual_seed(0))
    ks, grans = [0, 3, 4, 7], [1, 2, 3]
    noise = torch.randn(1, len(ks), 2, 6, generator=torch.Generator().manual_seed(1))
    res = sample_singular(velocity, x0, grid, k_steps=ks, granularities=grans, group_size=2, kind="flow",
                          noise_level=0.7, noise_fn=lambda shape: noise.reshape(shape))
    for ki, k in enumerate(ks):
        for gi, g in enumerate(grans):
            want = _reference_suffix(velocity, res["action"][0, ki], grid, k, g)
            torch.testing.assert_close(res["final"][0, ki, gi], want, atol=1e-5, rtol=0, msg=f"k={k} g={g}")


def test_cost_of_the_reference_setting_vs_dancegrpo():
    # prefix 8 + 12 members × Σ_k (15−k … 8 for g=1: 92; ⌈(15−k)/2⌉ for g=2: 48) = 8 + 12·140 = 1688
    assert singular_cost(16, range(8), (1, 2), 12) == 1688
    assert round(1688 / (12 * 16), 2) == 8.79  # DanceGRPO: G·T = 192 evaluations per group


def test_members_share_the_prefix_and_differ_only_from_step_k(tiny_sd3):
    policy = _policy(tiny_sd3, k_steps=[0, 1, 2])
    traj = policy.rollout(["a cat", "a dog"], group_size=3, generator=torch.Generator().manual_seed(0))
    P, K, Gr, G = 2, 3, 2, 3
    assert len(traj) == traj.outputs.shape[0] == P * K * Gr * G
    states = traj.states.view(P, K, Gr, G, *traj.states.shape[2:])
    actions = traj.actions.view(P, K, Gr, G, *traj.actions.shape[2:])
    for p in range(P):
        for k in range(K):
            block = states[p, k].reshape(Gr * G, -1)
            assert torch.equal(block, block[:1].expand_as(block))  # identical up to step k
            assert torch.equal(actions[p, k, 0], actions[p, k, 1])  # one SDE step per member, shared by its suffixes
            assert not torch.equal(actions[p, k, 0, 0], actions[p, k, 0, 1])  # members differ from step k on
        assert not torch.equal(states[p, 0, 0, 0], states[p, 1, 0, 0])
    # the prefix is one ODE chain: x_1 = x_0 + (σ_1 − σ_0)·v(x_0)
    grid = policy.sigma_grid()
    with torch.no_grad():
        v0 = policy.velocity(states[0, 0, 0, :1], grid[:1], {k: v[:1] for k, v in traj.cond.items()})
    torch.testing.assert_close(states[0, 1, 0, :1], states[0, 0, 0, :1] + (grid[1] - grid[0]) * v0.float(), atol=1e-5, rtol=0)
    # only the first granularity owns the SDE step; each row's σ is that of its k
    assert traj.mask.view(P, K, Gr, G)[:, :, 0].all() and not traj.mask.view(P, K, Gr, G)[:, :, 1].any()
    assert traj.meta["step_index"].view(P, K, Gr, G)[0, :, 0, 0].tolist() == [0, 1, 2]


def test_the_same_noise_at_k_reproduces_the_same_reward(tiny_sd3):
    """Permuting the members' noises permutes their images: each image depends on exactly its own noise."""
    policy = _policy(tiny_sd3)
    cond = policy.encode(["a cat"])
    x0 = policy.adapter.initial_noise(1, height=16, width=16, generator=torch.Generator().manual_seed(0))
    grid = policy.sigma_grid()
    noise = torch.randn(1, 2, 3, *x0.shape[1:], generator=torch.Generator().manual_seed(1))
    perm = torch.tensor([2, 0, 1])

    def run(z):
        res = sample_singular(CountingVelocity(policy, cond), x0, grid, k_steps=[0, 1], granularities=[1, 2], group_size=3,
                              kind="flow", noise_level=0.7, noise_fn=lambda shape: z.reshape(shape))
        img = policy.decode(res["final"].reshape(-1, *x0.shape[1:])).view(1, 2, 2, 3, 3, 16, 16)
        return img.mean(dim=(-3, -2, -1))  # a reward: mean brightness, [1, K, Gr, G]

    with torch.no_grad():
        r, r_perm = run(noise), run(noise[:, :, perm])
    # the members' rows in another order (other batch positions, same arithmetic per row in
    # principle): the reward is a mean over 3·16·16 pixels in [0, 1]
    torch.testing.assert_close(r_perm, r[..., perm], atol=float32_sum_tol(1.0, 3 * 16 * 16), rtol=0)
    assert (r[..., 0] - r[..., 1]).abs().max() > 1e-4  # and different noises give different rewards


@pytest.mark.parametrize("cfg", [1.0, 4.5])
def test_evaluations_are_counted_and_training_runs_one_evaluation_per_k(tiny_sd3, cfg):
    policy = _policy(tiny_sd3, cfg=cfg, k_steps=[0, 1, 2])
    rows = {"n": 0}
    handle = policy.model.register_forward_pre_hook(lambda m, a, kw: rows.__setitem__("n", rows["n"] + kw["hidden_states"].shape[0]), with_kwargs=True)
    try:
        traj = policy.rollout(["a", "b"], group_size=4, generator=torch.Generator().manual_seed(0))
        factor = 2 if cfg > 1 else 1
        # per prompt: prefix 3 + 4 members × (k0: 3 + 2, k1: 2 + 1, k2: 1 + 1) = 43
        assert rows["n"] == traj.meta["model_evals_total"] == 2 * 43 * factor
        assert traj.meta["model_evals"] == pytest.approx(2 * 43 * factor / 48)
        assert traj.meta["transformer_calls"] == 3 + 3  # prefix steps + the longest suffix, all suffixes batched
        rows["n"] = 0
        lp = policy.log_prob(traj)
        assert rows["n"] == 2 * 3 * factor  # one evaluation per (prompt, k), shared by the group's members
    finally:
        handle.remove()
    torch.testing.assert_close(lp[traj.mask], traj.log_probs[traj.mask], atol=1e-5, rtol=0)  # ratio 1


def test_multi_granularity_advantages_hand_values():
    r = torch.tensor([0.0, 1.0, 2.0])
    z = (r - 1.0) / (torch.tensor(2 / 3).sqrt() + 1e-4)  # population std √(2/3)
    rewards = torch.stack([torch.stack([r, r], -1), torch.stack([r, 2 * r], -1)], 1)  # [G=3, K=2, Gr=2]
    adv = multi_granularity_advantages(rewards)
    assert adv.shape == (3, 2)
    torch.testing.assert_close(adv[:, 0], 2 * z, atol=1e-5, rtol=0)  # granularities agree → 2·z
    torch.testing.assert_close(adv[:, 1], 2 * z, atol=1e-4, rtol=0)  # z-scores are scale-free
    flat = torch.stack([torch.stack([r, torch.full((3,), 7.0)], -1)], 1)
    torch.testing.assert_close(multi_granularity_advantages(flat)[:, 0], z, atol=1e-5, rtol=0)  # zero column adds 0
    zero = torch.full((3, 1, 2), 0.5)
    assert multi_granularity_advantages(zero).abs().max() == 0  # all-equal rewards → zero advantage
    with pytest.raises(ValueError, match=r"\[G, K, Gr\]"):
        multi_granularity_advantages(r)


def test_estimator_maps_rows_and_trains_each_step_once():
    P, K, Gr, G = 2, 2, 2, 3
    B = P * K * Gr * G
    idx = torch.arange(B)
    meta = {"g2rpo_k": (idx // (Gr * G)) % K, "g2rpo_g": (idx // G) % Gr, "g2rpo_member": idx % G}
    rewards = torch.randn(B, generator=torch.Generator().manual_seed(0))
    adv = make_estimator("multi_granularity")(AdvantageInputs(rewards=rewards, group_ids=idx // (K * Gr * G), meta=meta))
    table = rewards.view(P, K, Gr, G).permute(0, 3, 1, 2)  # [P, G, K, Gr]
    expected = torch.stack([multi_granularity_advantages(table[p]) for p in range(P)])  # [P, G, K]
    got = adv.view(P, K, Gr, G)
    torch.testing.assert_close(got[:, :, 0].permute(0, 2, 1), expected)
    assert got[:, :, 1].abs().max() == 0  # the second granularity's rows carry no (duplicate) gradient
    with pytest.raises(ValueError, match="sampler.rollout=singular"):
        make_estimator("multi_granularity")(AdvantageInputs(rewards=rewards, group_ids=idx, meta={}))


def test_estimator_z_scores_each_reward_model_before_summing():
    """As the reference (HPS + CLIP): A = Σ_models Σ_g z, not Σ_g z of the summed reward, which a
    large-scale model would dominate; the reward set's weights scale each model's part."""
    P, K, Gr, G = 1, 2, 2, 4
    B = P * K * Gr * G
    idx = torch.arange(B)
    meta = {"g2rpo_k": (idx // (Gr * G)) % K, "g2rpo_g": (idx // G) % Gr, "g2rpo_member": idx % G}
    gen = torch.Generator().manual_seed(3)
    table = torch.stack([10 * torch.randn(B, generator=gen), 0.01 * torch.randn(B, generator=gen)], 1)  # scales 10 and 0.01
    est = make_estimator("multi_granularity", eps=1e-8, std="unbiased", clip=None)

    def part(col):
        t = col.view(P, K, Gr, G).permute(0, 3, 1, 2)[0]  # [G, K, Gr]
        return multi_granularity_advantages(t, eps=1e-8, std="unbiased")  # [G, K]

    got = est(AdvantageInputs(rewards=table.sum(1), group_ids=idx // (K * Gr * G), meta=meta, reward_table=table, reward_names=["hps", "clip"]))
    want = part(table[:, 0]) + part(table[:, 1])
    torch.testing.assert_close(got.view(K, Gr, G)[:, 0].T, want, atol=1e-5, rtol=0)
    combined = part(table.sum(1))
    assert (combined - want).abs().max() > 0.5  # z-scoring the sum differs: the small-scale model is drowned
    weighted = est(AdvantageInputs(rewards=table.sum(1), group_ids=idx // (K * Gr * G), meta=meta, reward_table=table,
                                   reward_names=["hps", "clip"], reward_weights=torch.tensor([1.0, 0.5])))
    torch.testing.assert_close(weighted.view(K, Gr, G)[:, 0].T, part(table[:, 0]) + 0.5 * part(table[:, 1]), atol=1e-5, rtol=0)
    # the unbiased std is the reference's torch.std: z = (r − mean)/std_unbiased
    r = torch.tensor([0.0, 1.0, 2.0]).view(3, 1, 1)
    assert multi_granularity_advantages(r, eps=0.0, std="unbiased")[:, 0].tolist() == pytest.approx([-1.0, 0.0, 1.0])


def test_step_options_are_validated_with_clear_errors(tiny_sd3):
    policy = _policy(tiny_sd3, k_steps=[0, 7])
    with pytest.raises(ValueError, match="k_steps=7 is step 7, outside 0…3 for sampler.num_steps=4"):
        policy.rollout(["a"], group_size=2)
    policy = _policy(tiny_sd3, k_steps=[0.0, 0.5])  # fractions scale with num_steps: steps 0 and 2
    traj = policy.rollout(["a"], group_size=2, generator=torch.Generator().manual_seed(0))
    assert sorted(set(traj.meta["step_index"].flatten().tolist())) == [0, 2]
