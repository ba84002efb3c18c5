"""GRPO-Guard: the guarded log-ratio (RatioNorm), its zero mean under π_old, the 1/|dt| gradient
reweighting, per-step ratio statistics, and the preset on tiny SD3 / Flux through the trainer."""

import math

import pytest
import torch

from flowrl.losses import LossInputs, guard_log_ratio, inv_dt_weight
from flowrl.policy import PolicyEval, Trajectories
from flowrl.sde import flow_sigma_t, gaussian_log_prob, mean_velocity_gain, sde_step
from tests._tolerance import float32_sum_tol


def _sd3_grid(steps=10, shift=3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(shift=shift)
    s.set_timesteps(steps)
    return s.sigmas.double()


def test_guarded_log_ratio_equals_whitened_inner_product():
    g = torch.Generator().manual_seed(0)
    B, D = 6, 32
    mu_old = torch.randn(B, D, generator=g, dtype=torch.float64)
    mu = mu_old + 0.05 * torch.randn(B, D, generator=g, dtype=torch.float64)
    s = torch.rand(B, generator=g, dtype=torch.float64) * 0.2 + 0.05
    x = mu_old + s[:, None] * torch.randn(B, D, generator=g, dtype=torch.float64)
    lp = lambda m: (-((x - m) ** 2) / (2 * s[:, None] ** 2) - torch.log(s[:, None]) - 0.5 * math.log(2 * math.pi)).mean(1)
    got = guard_log_ratio(lp(mu).double(), lp(mu_old).double(), mu, mu_old, s.double())
    want = ((x - mu_old) * (mu - mu_old)).mean(1) / s
    # float32 inside: a mean over D terms of size ≤ |x − μ_old|·|μ − μ_old|/s (measured 8e-9 apart)
    size = float(((x - mu_old) * (mu - mu_old)).abs().mean(1).max() / s.min())
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=float32_sum_tol(size, D))
    # through the real kernel (float32 log-probs, [B, C, H, W] latents, std [B, 1, 1, 1]) and "sum"
    x0, v_old = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    v = v_old + 0.01 * torch.randn(2, 4, 8, 8, generator=g)
    for reduce in ("mean", "sum"):
        old = sde_step(x0, v_old, 0.7, 0.6, kind="flow", noise_level=0.7, generator=g, reduce=reduce)
        new = sde_step(x0, v, 0.7, 0.6, kind="flow", noise_level=0.7, prev_sample=old.prev_sample, reduce=reduce)
        got = guard_log_ratio(new.log_prob, old.log_prob, new.mean, old.mean, old.std, reduce=reduce)
        inner = ((old.prev_sample - old.mean) * (new.mean - old.mean)).double()
        want = (inner.flatten(1).mean(1) if reduce == "mean" else inner.flatten(1).sum(1)) / old.std.flatten()[0].double()
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-6)


def test_guarded_ratio_is_zero_mean_under_old_policy_raw_is_left_shifted():
    # x' ~ N(μ_old, s²): E[raw log-ratio] = −b, E[guarded] = 0 (b = mean(δ²)/(2s²))
    g = torch.Generator().manual_seed(1)
    N, D, s = 20000, 16, 0.1
    mu_old = torch.zeros(1, D, dtype=torch.float64)
    delta = torch.full((1, D), 0.05, dtype=torch.float64)  # b = 0.0025/0.02 = 0.125
    x = mu_old + s * torch.randn(N, D, generator=g, dtype=torch.float64)
    std = torch.full((N,), s, dtype=torch.float64)
    lp_new = gaussian_log_prob(x, (mu_old + delta).expand(N, D), std[:, None]).double()
    lp_old = gaussian_log_prob(x, mu_old.expand(N, D), std[:, None]).double()
    raw = lp_new - lp_old
    guarded = guard_log_ratio(lp_new, lp_old, (mu_old + delta).expand(N, D), mu_old.expand(N, D), std).double()
    b = 0.125
    se_raw = raw.std() / math.sqrt(N)
    assert abs(raw.mean() + b) < 4 * se_raw, (raw.mean(), -b)
    assert abs(guarded.mean()) < 4 * guarded.std() / math.sqrt(N)
    assert raw.mean() < -b / 2  # the left shift is far outside the noise


def test_per_step_gradient_weight_is_one_plus_half_a_squared():
    # ∂/∂v of guarded_ratio/Δ equals −(1 + a²/2)·ε/D at every step with σ < 1 (1 at σ = 1, where
    # x̂1 drops out of μ); vanilla Flow-GRPO's |∂μ/∂v|/s spreads 0.057 → 1.49 (26×) over the steps.
    a, grid = 0.7, _sd3_grid().float()
    D = 64
    g = torch.Generator().manual_seed(2)
    weights, vanilla = [], []
    for k in range(len(grid) - 2):  # the last step (σ' ≈ 0.009 → 0) is dropped by timestep_fraction 0.99
        sig, nxt = grid[k].view(1), grid[k + 1].view(1)
        x = torch.randn(1, D, generator=g, dtype=torch.float64)
        v_old = torch.randn(1, D, generator=g, dtype=torch.float64)
        old = sde_step(x, v_old, sig.double(), nxt.double(), kind="flow", noise_level=a, generator=g)
        eps = (old.prev_sample - old.mean) / old.std
        v = v_old.clone().requires_grad_(True)
        new = sde_step(x, v, sig.double(), nxt.double(), kind="flow", noise_level=a, prev_sample=old.prev_sample)
        traj = Trajectories(prompts=["p"], group_ids=torch.zeros(1), log_probs=old.log_prob[:, None], mask=torch.ones(1, 1, dtype=torch.bool),
                            sigmas=sig.view(1, 1), sigmas_next=nxt.view(1, 1))
        inputs = LossInputs(log_prob=new.log_prob[:, None], old_log_prob=old.log_prob[:, None], advantages=torch.ones(1, 1), mask=torch.ones(1, 1),
                            current=PolicyEval(new.log_prob[:, None], new.mean[:, None], new.std.flatten(1)[:, :1]), traj=traj, steps=torch.tensor([0]))
        rho = guard_log_ratio(new.log_prob, old.log_prob.detach(), new.mean, old.mean.detach(), new.std.flatten(1)[:, 0])
        (rho * inv_dt_weight(inputs)[:, 0]).sum().backward()
        w = (-v.grad * D / eps.double()).mean().item()
        weights.append(w)
        vanilla.append(float(mean_velocity_gain("flow", sig, nxt, a).abs() / (flow_sigma_t(sig, nxt, a) * torch.sqrt(sig - nxt))))
    assert weights[0] == pytest.approx(1.0, rel=1e-5)
    for w in weights[1:]:
        assert w == pytest.approx(1 + a**2 / 2, rel=1e-5)
    assert vanilla[0] == pytest.approx(0.057, abs=5e-4) and vanilla[-1] == pytest.approx(1.49, abs=5e-3)
    assert max(vanilla) / min(vanilla) > 25


def _cfg(tmp_path, pipeline, algorithm, *extra):
    from flowrl import TrainConfig

    return TrainConfig().override([
        f"algorithm={algorithm}", f"model.pipeline={pipeline}", f"train.output_dir={tmp_path / pipeline}",
        "train.iterations=2", "sampler.num_steps=4", "sampler.height=16", "sampler.width=16", "train.lora_rank=4",
        "train.lora_alpha=8", "train.num_generations=4", "train.prompts_per_iteration=2", "train.train_batch_size=8",
        "train.progress=false", "model.device=cpu", *extra,
    ])


@pytest.mark.parametrize("pipeline", ["tiny-sd3", "tiny-flux"])
def test_grpo_guard_preset_trains_and_logs_per_step_ratios(tmp_path, pipeline):
    from flowrl.trainer import Trainer

    trainer = Trainer(_cfg(tmp_path, pipeline, "grpo_guard", "train.learning_rate=1e-3"))
    assert trainer.policy.store_means
    result = trainer.train()
    h = result.history
    assert len(h) == 2 and all(math.isfinite(r["loss/policy"]) for r in h)
    # one on-policy update per iteration: every guarded ratio is exactly 1 (its mean is 0 by construction)
    for r in h:
        steps = sorted({int(k.split("/")[1]) for k in r if k.startswith("ratio_step/")})
        assert steps == [0, 1, 2]  # 4 steps, timestep_fraction 0.99 drops the last
        for k in steps:
            assert r[f"ratio_step/{k}/mean"] == pytest.approx(1.0, abs=1e-6)
            assert r[f"ratio_step/{k}/clipfrac"] == 0.0
            assert r[f"ratio_step/{k}/raw_log_mean"] == pytest.approx(0.0, abs=1e-5)
    assert h[-1]["grad_norm"] > 0
