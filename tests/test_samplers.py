"""Every sampler preset trains the tiny SD3 and Flux pipelines end to end for two iterations, with
its cost metrics, on-policy ratio 1 and finite losses; config errors name the field to change."""

import copy
import math

import pytest
import torch

from flowrl import FlowPolicy, TrainConfig
from flowrl.algorithms import PRESETS
from flowrl.trainer import Trainer
from tests._tolerance import assert_recomputed_log_probs

SAMPLER_PRESETS = ("flow_grpo_fast", "mix_grpo", "mix_grpo_flash", "sage_grpo", "g2rpo", "branch_grpo", "branch_grpo_mix", "tempflow_grpo")

#: overrides that fit each preset on 4 steps with 4 samples per prompt, and the costs they imply
CASES = {
    # window of 2 inside the first half (steps 0, 1): model at every step, 2 trained
    "flow_grpo_fast": ([], 4.0, 2.0),
    # window of 4 over 4 steps
    "mix_grpo": ([], 4.0, 4.0),
    # window of 2 at steps 0, 1; after it DPM-Solver++(2M) on max(⌊3·0.4⌋, 2) = 2 points (σ_2, 0): 3 steps
    "mix_grpo_flash": (["sampler.rollout_params={window_size: 2}"], 3.0, 2.0),
    # full SDE, timestep_fraction 0.99 drops the last step
    "sage_grpo": ([], 4.0, 3.0),
    # k ∈ {0, 1}: per prompt 2 prefix + 4·(k0: 3 + 2, k1: 2 + 1) = 34 evals over 16 images; one step per image trained
    "g2rpo": (["train.train_batch_size=4"], 34 / 16, 1.0),
    # branches at k ∈ {0, 1}, one ODE suffix each: per prompt 2 prefix + 4·(k0: 3 + k1: 2) = 22 evals over 8 images
    "tempflow_grpo": ([], 22 / 8, 1.0),
    # splits 0, 2, branch 2: 1 + 2 + 2 + 4 = 9 evals / 4 leaves; 12 edges, width pruning drops 2 → 10 / 4
    # (every leaf kept: a reward tie would give a leaf zero advantage and drop it from the count)
    "branch_grpo": (["sampler.rollout_params={split_steps: [0, 2]}", "loss.options={width_prune: top}", "loss.skip_zero_advantage=false"], 9 / 4, 10 / 4),
    # window of 1 at step 0 (iteration ≤ 25) ∪ splits {0, 2}: edges 2 + 4 = 6 / 4 leaves (every row
    # kept: the JPEG reward is quantised, so a leaf can tie with its group mean and get advantage 0)
    "branch_grpo_mix": (["sampler.rollout_params={split_steps: [0, 2], window_size: 1}", "loss.skip_zero_advantage=false"], 9 / 4, 6 / 4),
}


def _config(tmp_path, name, *extra):
    return TrainConfig().override([
        f"algorithm={name}", f"train.output_dir={tmp_path / name}", "train.iterations=2", "sampler.num_steps=4",
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


class _LinearFieldPolicy(FlowPolicy):
    """A FlowPolicy over a closed-form flow: data x0 ~ N(μ, s²) per dim, x_σ = (1−σ)·x0 + σ·ε. Its
    exact velocity is affine in x, v = −μ + (sd'(σ)/sd(σ))·(x − (1−σ)μ), sd² = (1−σ)²s² + σ², and
    the exact ODE maps x_σ to x0 = μ + s·(x_σ − (1−σ)μ)/sd(σ)."""

    mu, s = 1.5, 0.4

    def __init__(self, num_steps=10, **rollout_params):
        self.sampler, self.noise_level, self.num_steps, self.guidance_scale = "flow", 0.7, num_steps, 1.0
        self.rollout_name, self.rollout_params, self.iteration = "window", rollout_params, 1
        self.store_means, self.log_prob_reduce, self.share_initial_noise = False, "mean", False
        self.adapter = type("Adapter", (), {"dtype": torch.float32})()

    @property
    def device(self):
        return torch.device("cpu")

    def sigma_grid(self, num_steps=None):
        return torch.linspace(1, 0, (num_steps or self.num_steps) + 1)

    def encode(self, prompts):
        return {"dummy": torch.zeros(len(prompts), 1)}

    def _sd(self, sigma):
        return torch.sqrt((1 - sigma) ** 2 * self.s**2 + sigma**2)

    def velocity(self, latents, sigma, cond):
        sg = sigma.view(-1, 1).float()
        sd = self._sd(sg)
        dsd = (-(1 - sg) * self.s**2 + sg) / sd
        return -self.mu + dsd / sd * (latents.float() - (1 - sg) * self.mu)

    def exact_x0(self, x, sigma):
        sg = sigma.view(-1, 1)
        return self.mu + self.s * (x - (1 - sg) * self.mu) / self._sd(sg)

    def initial_noise(self, num_prompts, group_size, generator):
        return torch.randn(num_prompts * group_size, 8, generator=generator)

    def decode(self, latents):
        return latents


@pytest.mark.parametrize("window_start", [0, 2])
def test_flash_solver_beats_euler_after_the_window_and_keeps_ratio_one(window_start):
    """MixGRPO-Flash's DPM-Solver++(2M) after the SDE window, at the same number of steps as Euler,
    lands closer to the exact ODE solution from the state the window left; the window's stored steps
    and their recomputed log-probs are unchanged (ratio 1)."""
    params = dict(window_size=2, window_range=[window_start, window_start + 2], mode="sliding")
    errors, trajs = {}, {}
    for solver in ("euler", "dpm2"):
        policy = _LinearFieldPolicy(**params, ode_solver=solver)
        traj = policy.rollout(["p"], group_size=16, generator=torch.Generator().manual_seed(0))
        exact = policy.exact_x0(traj.actions[:, -1], traj.sigmas_next[:, -1])  # from where the window ended
        errors[solver] = float((traj.meta["final_latents"] - exact).abs().max())
        assert traj.meta["model_evals"] == 10.0  # equal steps
        ev = policy.evaluate(traj)  # ratio 1, within the float32 bound of a recomputed step mean
        assert_recomputed_log_probs(ev.log_prob, traj.log_probs, traj.actions, ev.mean, ev.std)
        trajs[solver] = traj
    assert errors["dpm2"] < errors["euler"] / 4, errors  # measured: euler 0.17–0.22, dpm2 0.02–0.03
    # the window is the same under both solvers: exact, the steps up to and through it run the same
    # arithmetic on the same inputs (the solvers differ only after it)
    for field in ("states", "actions", "log_probs", "sigmas"):
        torch.testing.assert_close(getattr(trajs["dpm2"], field), getattr(trajs["euler"], field), atol=0, rtol=0)
    # compressed as the preset (ratio 0.4) at the reference's 25 steps: fewer evaluations, and at
    # equal (compressed) steps still more accurate than Euler
    compressed = {}
    for solver in ("euler", "dpm2"):
        policy = _LinearFieldPolicy(25, **params, ode_solver=solver, post_compress_ratio=0.4)
        traj = policy.rollout(["p"], group_size=16, generator=torch.Generator().manual_seed(0))
        exact = policy.exact_x0(traj.actions[:, -1], traj.sigmas_next[:, -1])
        assert traj.meta["model_evals"] < 25
        compressed[solver] = float((traj.meta["final_latents"] - exact).abs().max())
    assert compressed["dpm2"] < compressed["euler"] / 2, compressed  # measured: euler 0.21–0.24, dpm2 0.06


def test_compressed_post_window_grid_matches_the_reference_points():
    from flowrl.rollout import compress_after

    t = torch.linspace(1, 0, 26)
    grid = 3 * t / (1 + 2 * t)
    out = compress_after(grid, 3, 0.4)  # T = 25, window 0…3: ⌊22·0.4⌋ = 8 points from σ_4 to 0
    torch.testing.assert_close(out, torch.cat([grid[:4], grid[torch.arange(4, 26, 3)]]))
    assert out[-1] == 0 and len(out) - 1 == 3 + 8 - 1 + 1  # 4 window/prefix steps + 7 after
    assert torch.equal(compress_after(grid, 3, 1.0), grid) and torch.equal(compress_after(grid, 24, 0.4), grid)
    with pytest.raises(ValueError, match="post_compress_ratio"):
        compress_after(grid, 3, 0.0)


@pytest.mark.parametrize("shift", ["static", "flux"])
def test_compressed_post_window_grid_is_the_shifted_linspace_at_every_window_position(shift):
    """The reference's post-window points are shift(linspace(t_{last+1}, 0, n)) in unshifted time,
    also where (T − last − 1) does not divide by n − 1 (snapping to the model's grid put σ up to
    0.038 off at 9 of 17 window positions of a 25-step shift-3 grid). Flux's μ-shift
    e^μ/(e^μ + 1/t − 1) has the same form with k = e^μ."""
    from flowrl.rollout import compress_after

    T, k = 25, (3.0 if shift == "static" else math.exp(0.8))
    t = torch.linspace(1, 0, T + 1, dtype=torch.float64)
    shifted = lambda x: k * x / (1 + (k - 1) * x)  # noqa: E731
    grid = shifted(t).float()
    for last in range(3, T - 1):
        n = max(int((T - last) * 0.4), 2)
        ref = shifted(torch.linspace(float(t[last + 1]), 0, n, dtype=torch.float64)).float()
        out = compress_after(grid, last, 0.4)
        torch.testing.assert_close(out[: last + 1], grid[: last + 1], rtol=0, atol=0)
        # float64 arithmetic rounded to float32: a few ulps of σ ≤ 1 (measured ≤ 6e-8)
        torch.testing.assert_close(out[last + 1 :], ref, rtol=0, atol=3e-7)


def test_mix_grpo_presets_follow_the_reference_scripts():
    """Shared initial noise in every MixGRPO preset (--init_same_noise), the Flash window sliding
    every 20 iterations, and one group z-score per reward model, summed with the weights."""
    from flowrl.advantages import AdvantageInputs, make_estimator

    for name, every in (("mix_grpo", 25), ("mix_grpo_flash", 20)):
        p = TrainConfig().override([f"algorithm={name}"]).resolved().preset
        assert p.share_initial_noise and p.rollout_params["slide_every"] == every, name
        assert p.advantage_params["per_reward"] is True, name
    # two reward models of very different spreads, two groups of 3
    table = torch.tensor([[0.0, 10.0], [1.0, 0.0], [2.0, 20.0], [5.0, 0.0], [5.5, 30.0], [6.0, 0.0]])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    w = torch.tensor([1.0, 0.5])
    inputs = AdvantageInputs(rewards=table @ w, group_ids=groups, reward_table=table, reward_names=["a", "b"], reward_weights=w)
    z = lambda x: torch.cat([(g - g.mean()) / (g.std(unbiased=False) + 1e-4) for g in x.view(2, 3)])  # noqa: E731
    adv = make_estimator("group", std="group", clip=5.0, per_reward=True)(inputs)
    torch.testing.assert_close(adv, (z(table[:, 0]) + 0.5 * z(table[:, 1])).clamp(-5, 5))
    combined = make_estimator("group", std="group", clip=5.0)(inputs)
    torch.testing.assert_close(combined, z(table @ w))
    assert (adv - combined).abs().max() > 0.3  # the forms really differ here
    one = AdvantageInputs(rewards=table[:, 0], group_ids=groups, reward_table=table[:, :1], reward_names=["a"])
    torch.testing.assert_close(make_estimator("group", per_reward=True)(one), make_estimator("group")(one))
