"""DiffusionNFT: the NFT loss (zero gradient at r ≡ ½, per-sample minimiser), solvers, the
soft-update schedules, a 1-D two-mode toy flow trained through the trainer, the preset on tiny
SD3 / Flux with exact resume of the old policy."""

from __future__ import annotations

import math

import pytest
import torch

from flowrl.losses import nft_loss
from flowrl.nft import NFTObjective, dpm2_step, nft_optimality, soft_update_decay, solve
from flowrl.policy import PolicyBase


def _vs(seed=0, B=5, D=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(3)] + [torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.05]


@pytest.mark.parametrize("x0_adaptive", [False, True])
def test_half_optimality_leaves_the_model_unchanged(x0_adaptive):
    v_old, v, _, t = _vs()
    v_theta = v_old.clone().requires_grad_(True)
    nft_loss(v_theta, v_old, v, torch.full((5,), 0.5), beta=0.7, x0_adaptive=x0_adaptive, t=t).backward()
    assert v_theta.grad.abs().max() < 1e-12
    v_theta.grad = None
    nft_loss(v_theta, v_old, v, torch.full((5,), 0.9), beta=0.7, x0_adaptive=x0_adaptive, t=t).backward()
    assert v_theta.grad.abs().max() > 1e-3  # r ≠ ½ moves it


@pytest.mark.parametrize("beta", [1.0, 0.1, 2.5])
def test_per_sample_minimiser(beta):
    v_old, v, _, _ = _vs(1)
    r = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0], dtype=torch.float64)
    star = v_old + (2 * r[:, None] - 1) * (v - v_old) / beta  # v_old + (2r−1)(v − v_old)/β
    x = star.clone().requires_grad_(True)
    loss = nft_loss(x, v_old, v, r, beta=beta)
    loss.backward()
    assert x.grad.abs().max() < 1e-12  # stationary, and the loss is a convex quadratic in v_θ:
    for _ in range(3):
        assert nft_loss(star + 0.01 * torch.randn_like(star), v_old, v, r, beta=beta) > loss
    # hand value, one dim: v_old 0, v 1, v_θ 0, r 0.75, β 1 → (0.75·1 + 0.25·1)/1 = 1
    assert nft_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.tensor([0.75]), beta=1.0).item() == pytest.approx(1.0)


def test_optimality_mapping():
    a = torch.tensor([-9.0, -5.0, -1.0, 0.0, 2.5, 5.0, 7.0])
    torch.testing.assert_close(nft_optimality(a), torch.tensor([0.0, 0.0, 0.4, 0.5, 0.75, 1.0, 1.0]))


def test_soft_update_follows_schedule():
    assert [soft_update_decay(s, "on_policy") for s in (1, 100, 10_000)] == [0.0, 0.0, 0.0]
    assert [soft_update_decay(s, "linear") for s in (1, 100, 499, 500, 10_000)] == pytest.approx([0.001, 0.1, 0.499, 0.5, 0.5])
    assert [soft_update_decay(s, "delayed") for s in (1, 74, 75, 76, 100, 300)] == pytest.approx([0, 0, 0, 0.0075, 0.1875, 0.999])

    class P(PolicyBase):
        def __init__(self):
            self.model = torch.nn.Linear(1, 1, bias=False)

    pol = P()
    obj = NFTObjective(decay="linear")
    obj.snapshot(pol)
    old = pol.model.weight.detach().clone()
    for step in range(1, 6):
        with torch.no_grad():
            pol.model.weight.add_(1.0)
        obj.on_update(None)  # one optimizer step per iteration here
        d = obj.on_iteration_end(type("T", (), {"policy": pol})(), step)["nft/decay"]
        assert d == pytest.approx(soft_update_decay(step, "linear"))
        old = d * old + (1 - d) * pol.model.weight.detach()
        torch.testing.assert_close(obj.old[0], old)
    with obj.old_weights(pol):  # swapped in, then restored
        torch.testing.assert_close(pol.model.weight.detach(), old)
    assert pol.model.weight.item() != pytest.approx(old.item())


def test_dpm2_is_second_order_on_gaussian_data():
    # x0 ~ N(m, s²): exact velocity is affine; the exact ODE maps x1 to m + s·x1
    m, s = 1.5, 0.4

    def vel(x, sigma):
        sig = sigma.view(-1, 1)
        q = (1 - sig) ** 2 * s**2 + sig**2
        d = x - (1 - sig) * m
        return (sig / q) * d - (m + (1 - sig) * s**2 / q * d)

    x1 = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    exact = m + s * x1
    err = {}
    for solver in ("euler", "dpm2"):
        for n in (10, 20):
            grid = torch.linspace(1, 0, n + 1, dtype=torch.float64)
            err[solver, n] = float((solve(vel, x1, grid, solver=solver) - exact).abs().max())
    # measured: euler 10 → 20 steps halves its error; dpm2 (first-order at both ends, as diffusers'
    # lower_order_final) is several times more accurate at the same number of model evaluations
    assert err["euler", 10] / err["euler", 20] == pytest.approx(2.0, rel=0.25)
    assert err["dpm2", 10] < err["euler", 10] / 3 and err["dpm2", 20] < err["euler", 20] / 3
    # the first step from σ = 1 is the Euler step, the last one returns x̂0
    x, x0 = torch.randn(3, 2), torch.randn(3, 2)
    torch.testing.assert_close(dpm2_step(x, x0, torch.tensor(1.0), torch.tensor(0.8)), 0.8 * x + 0.2 * x0)
    torch.testing.assert_close(dpm2_step(x, x0, torch.tensor(0.3), torch.tensor(0.0), x0 * 2, torch.tensor(0.5)), x0)


# ------------------------------------------------------------------------- 1-D two-mode toy flow
class GMMFlow(torch.nn.Module):
    """Exact velocity of a two-component 1-D Gaussian mixture with learnable weights, means, stds."""

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(2))
        self.means = torch.nn.Parameter(torch.tensor([-2.0, 2.0]))
        self.log_s = torch.nn.Parameter(torch.log(torch.tensor([0.3, 0.3])))

    def forward(self, x, t):  # x [B, 1], t [B]
        t = t.clamp(1e-4, 1.0)[:, None]
        s2 = torch.exp(2 * self.log_s)
        q = (1 - t) ** 2 * s2 + t**2
        d = x - (1 - t) * self.means
        w = torch.softmax(torch.log_softmax(self.logits, 0) - 0.5 * torch.log(q) - d**2 / (2 * q), 1)
        return (w * (t / q * d - (self.means + (1 - t) * s2 / q * d))).sum(1, keepdim=True)


class ToyFlowPolicy(PolicyBase):
    """The policy interface x0_rollout and NFTObjective need, over the toy flow (outputs = x0)."""

    steps_per_backward = None

    def __init__(self):
        self.model, self.device, self.guidance_scale, self.iteration = GMMFlow(), torch.device("cpu"), 1.0, 0

    def sigma_grid(self):
        return torch.linspace(1, 0, 11)

    def encode(self, prompts):
        return {}

    def initial_noise(self, n, g, generator):
        return torch.randn(n * g, 1, generator=generator)

    def draw_noise(self, shape, generator):
        return torch.randn(shape, generator=generator)

    def velocity(self, x, sigma, cond):
        return self.model(x.float(), sigma.float())

    def decode(self, x):
        return x

    def rollout(self, prompts, *, group_size, generator=None):
        from flowrl.nft import x0_rollout

        with torch.no_grad():
            return x0_rollout(self, list(prompts), group_size=group_size, generator=generator, solver="dpm2")


class PositiveMass:
    name = "positive"

    def __call__(self, outputs, prompts, meta=None):
        return (outputs[:, 0] > 0).float()


def test_toy_flow_moves_mass_to_rewarded_mode_without_drifting_it(tmp_path):
    from flowrl import TrainConfig
    from flowrl.rewards import build_rewards
    from flowrl.trainer import Trainer

    cfg = TrainConfig().override([
        "algorithm=diffusion_nft", f"train.output_dir={tmp_path}", "train.iterations=10", "train.num_generations=128",
        "train.prompts_per_iteration=1", "train.train_batch_size=128", "train.inner_epochs=20", "train.lora_rank=0",
        "train.learning_rate=0.05", "train.max_grad_norm=0", "train.weight_decay=0", "train.progress=false", "model.device=cpu",
        "loss.beta=0", "loss.objective_options={x0_adaptive: false}",
    ])
    policy = ToyFlowPolicy()
    trainer = Trainer(cfg, policy=policy, reward_set=build_rewards({"tests.test_nft:PositiveMass": 1.0}))
    result = trainer.train()
    mass = [h["reward/mean"] for h in result.history]
    assert 0.4 < mass[0] < 0.6 and min(mass[-3:]) > 0.95, mass  # measured: 0.52 → 0.99 by iteration 8
    w = torch.softmax(policy.model.logits.detach(), 0)
    assert w[1] > 0.95
    assert policy.model.means[1].item() == pytest.approx(2.0, abs=0.1)  # the kept mode stays where it was
    assert policy.model.log_s[1].exp().item() == pytest.approx(0.3, abs=0.05)
    # the decay is indexed by optimizer steps (20 per iteration here: inner_epochs=20), not iterations
    steps = [h["update/steps"] for h in result.history[:3]]
    assert steps == [20.0, 20.0, 20.0]
    assert [h["nft/decay"] for h in result.history[:3]] == pytest.approx([0.02, 0.04, 0.06])


def _cfg(tmp_path, pipeline, *extra):
    from flowrl import TrainConfig

    return TrainConfig().override([
        "algorithm=diffusion_nft", f"model.pipeline={pipeline}", f"train.output_dir={tmp_path}", "train.iterations=2",
        "sampler.num_steps=4", "sampler.height=16", "sampler.width=16", "train.lora_rank=4", "train.lora_alpha=8",
        "train.num_generations=4", "train.prompts_per_iteration=2", "train.progress=false", "model.device=cpu",
        "train.learning_rate=1e-3", *extra,
    ])


@pytest.mark.parametrize("pipeline", ["tiny-sd3", "tiny-flux"])
def test_diffusion_nft_preset_on_tiny_pipelines(tmp_path, pipeline):
    from flowrl.trainer import Trainer

    trainer = Trainer(_cfg(tmp_path / "a", pipeline, "train.save_every=1"))
    assert trainer.policy.rollout_name == "x0_only" and trainer.policy.guidance_scale == 1.0  # CFG-free
    assert trainer.objective.nft_beta == 1.0 and trainer.resolved.preset.loss.beta == 1e-4  # two different βs
    result = trainer.train()
    h = result.history
    assert all(math.isfinite(r["loss/policy"]) and r["kl/ref"] >= 0 for r in h)
    assert h[0]["nft/v_gap"] == 0.0 and h[1]["nft/v_gap"] > 0  # old = θ0 in the first update only
    if pipeline == "tiny-sd3":  # exact resume restores the old policy too
        resumed = Trainer(_cfg(tmp_path / "a", pipeline, f"train.resume_from={tmp_path / 'a' / 'checkpoints' / 'iter_000001'}")).train()
        keys = ["reward/mean", "loss/policy", "nft/v_gap", "kl/ref"]
        assert [resumed.history[1][k] for k in keys] == [h[1][k] for k in keys]
        # and nft_beta is a config field of its own
        t2 = Trainer(_cfg(tmp_path / "b", pipeline, "loss.nft_beta=0.1", "train.iterations=0"))
        assert t2.objective.nft_beta == 0.1 and t2.resolved.preset.loss.beta == 1e-4


def test_rollouts_are_sampled_with_the_old_policy(tmp_path):
    """A decay that keeps θ_old at the initial weights (d = min(steps, 1) = 1 after the first
    optimizer step): a later iteration's rollouts equal the initial model's for the same seed, while
    the trained weights sample something else (the control that catches sampling with θ)."""
    from flowrl.policy import weights_swapped
    from flowrl.seeding import PromptGenerators
    from flowrl.trainer import Trainer

    trainer = Trainer(_cfg(tmp_path, "tiny-sd3", "train.iterations=3", "train.learning_rate=5e-2", "loss.beta=0",
                           "loss.objective_options={decay: [0, 1.0, 1.0]}"))
    initial = [p.detach().clone() for p in trainer.params]
    result = trainer.train()
    assert [h["nft/decay"] for h in result.history] == [1.0, 1.0, 1.0]
    assert max((p.detach() - q).abs().max().item() for p, q in zip(trainer.params, initial)) > 1e-3  # θ moved
    traj = trainer._last_traj  # iteration 3's rollouts
    prompts = sorted(set(traj.prompts), key=traj.prompts.index)
    group = len(traj) // len(prompts)

    def rollout():
        with torch.no_grad():
            noise = PromptGenerators(trainer.config.train.seed, 3, "rollout", keys=[(1, p) for p in range(len(prompts))])
            return trainer.policy.rollout(prompts, group_size=group, generator=noise)

    with weights_swapped(trainer.params, initial):
        base = rollout()
    torch.testing.assert_close(traj.meta["final_latents"], base.meta["final_latents"], atol=1e-5, rtol=0)
    torch.testing.assert_close(traj.outputs, base.outputs, atol=1e-5, rtol=0)
    current = rollout()  # the trained weights, same seed: different samples
    assert (current.meta["final_latents"] - base.meta["final_latents"]).abs().max() > 1e-3


def test_preset_trains_a_random_nine_of_ten_timesteps():
    from flowrl import TrainConfig
    from flowrl.trainer import select_train_steps

    r = TrainConfig().override(["algorithm=diffusion_nft"]).resolved()
    assert (r.timestep_fraction, r.timestep_selection) == (0.99, "random")  # the reference's timestep_fraction 0.99
    mask = select_train_steps(torch.ones(16, 10, dtype=torch.bool), r.timestep_fraction, r.timestep_selection, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [9] * 16
    assert len({tuple(row.tolist()) for row in mask}) > 1  # a different slot is left out per sample


def test_zero_advantage_samples_train_as_the_reference(tmp_path):
    """The reference trains every row: an A = 0 row (r = ½) pulls v_θ toward v_old once they differ,
    so the preset keeps them (Flow-GRPO's ratio presets skip them)."""
    from flowrl.trainer import Trainer

    v_old, v, _, t = _vs(2)
    v_theta = (v_old + 0.1 * torch.randn_like(v_old)).requires_grad_(True)
    nft_loss(v_theta, v_old, v, torch.full((5,), 0.5), beta=1.0, x0_adaptive=True, t=t).backward()
    assert float((v_theta.grad * (v_theta - v_old)).sum()) > 0  # descent moves v_θ toward v_old
    # the prompt "two 4s" gets a flat reward: its group has A = 0 exactly, and still trains
    trainer = Trainer(_cfg(tmp_path, "tiny-sd3", "train.iterations=1", "train.prompts=[two 4s, a cat]", "sampler.num_steps=2",
                           "reward.rewards={tests._dist_worker:FlatForPairs: 1.0}", "train.eval_prompts=null"))
    assert trainer.resolved.preset.skip_zero_advantage is False
    (h,) = trainer.train().history
    assert h["samples/trained"] == h["samples/generated"] == 8
