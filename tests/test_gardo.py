"""GARDO: uncertainty gate, gated KL, adaptive reference (flowrl.gardo)."""

import math

import pytest
import torch

from flowrl.gardo import gated_gaussian_reference_kl, normalised_ranks, rank_uncertainty, uncertainty_gate


def test_ranks_uncertainty_and_gate_by_hand():
    # ranks of [3, 1, 2, 2]: less-than counts [3, 0, 1, 1], ties add ½ each for the two 2s → [3, 0, 1.5, 1.5] / 3
    assert normalised_ranks(torch.tensor([3.0, 1.0, 2.0, 2.0])).tolist() == pytest.approx([1.0, 0.0, 0.5, 0.5])
    main = torch.tensor([4.0, 3.0, 2.0, 1.0])  # ρ = [1, 2/3, 1/3, 0]
    aux = torch.tensor([[1.0, 1.0], [4.0, 4.0], [3.0, 2.0], [2.0, 3.0]])  # mean ρ = [0, 1, 0.5, 0.5]
    u = rank_uncertainty(main, aux)
    assert u.tolist() == pytest.approx([1.0, -1 / 3, -1 / 6, -0.5])  # sample 0: best by main, worst by aux
    # non-negative u = [1.0]; quantile(1 − 0.5) of one value = 1.0; u > 1.0 gates nothing...
    assert uncertainty_gate(u, 0.5).tolist() == [False, False, False, False]
    # ...with u = [1.0, 0.4, 0.2, −0.1]: u ≥ 0 → [1.0, 0.4, 0.2], 50% quantile 0.4 → gate u > 0.4
    assert uncertainty_gate(torch.tensor([1.0, 0.4, 0.2, -0.1]), 0.5).tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="gate fraction must be in"):
        uncertainty_gate(u, 0.0)


def test_gated_kl_is_the_mean_over_gated_samples():
    from flowrl.losses import LossInputs, aggregate
    from flowrl.policy import PolicyEval, Trajectories

    # Flow-GRPO's reference form: mean((μ_θ − μ_ref)²)/(2σ²)·... — build inputs where it is known:
    # per-sample KL k = [1, 2, 3] (μ gaps √2, 2, √6 with s² = 1, Δ = 1)
    b = 3
    mu = torch.zeros(b, 1, 1)
    ref = torch.tensor([[[2.0**0.5]], [[2.0]], [[6.0**0.5]]])
    std = torch.ones(b, 1)
    traj = Trajectories(prompts=["a"] * b, group_ids=torch.zeros(b, dtype=torch.long), log_probs=torch.zeros(b, 1),
                        mask=torch.ones(b, 1, dtype=torch.bool), actions=None, sigmas=torch.ones(b, 1),
                        sigmas_next=torch.zeros(b, 1), outputs=None, cond={}, meta={"kl_gate": torch.tensor([1.0, 0.0, 1.0])})
    inputs = LossInputs(log_prob=torch.zeros(b, 1), old_log_prob=torch.zeros(b, 1), advantages=torch.zeros(b, 1),
                        mask=torch.ones(b, 1), current=PolicyEval(log_prob=torch.zeros(b, 1), mean=mu, std=std),
                        reference=PolicyEval(log_prob=torch.zeros(b, 1), mean=ref, std=std), traj=traj, steps=torch.tensor([0]))
    from flowrl.losses import gaussian_kl_reference_form

    k = gaussian_kl_reference_form(inputs)
    # gated mean = (k0 + k2)/2
    gated = aggregate(gated_gaussian_reference_kl(inputs), inputs.mask, "token-mean")
    assert gated.item() == pytest.approx(float(k[0, 0] + k[2, 0]) / 2)
    traj.meta["kl_gate"] = torch.zeros(b)
    assert aggregate(gated_gaussian_reference_kl(inputs), inputs.mask, "token-mean").item() == 0.0


def _cfg(tmp_path, *extra):
    from flowrl import TrainConfig

    return TrainConfig().override([
        "algorithm=gardo", "model.pipeline=tiny-sd3", f"train.output_dir={tmp_path}", "train.iterations=2",
        "sampler.num_steps=3", "sampler.height=16", "sampler.width=16", "train.lora_rank=4", "train.lora_alpha=8",
        "train.num_generations=4", "train.prompts_per_iteration=2", "train.train_batch_size=8", "train.progress=false",
        "model.device=cpu", "train.learning_rate=5e-2", "loss.timestep_fraction=1.0",
        "reward.rewards={jpeg_compressibility: 1.0, jpeg_incompressibility: 0.0}", *extra,
    ])


def test_gardo_trains_two_iterations_and_refreshes_its_reference(tmp_path):
    from flowrl.trainer import Trainer

    # a threshold of 0: any KL refreshes the reference after the iteration
    h = Trainer(_cfg(tmp_path / "a", "loss.objective_options={gate_fraction: 1.0, kl_threshold: 0.0}")).train().history
    assert all(math.isfinite(r["loss/policy"]) for r in h)
    assert 0 < h[0]["gardo/gated"] <= 0.5  # jpeg vs its negation: u ≥ 0 on half the batch at most
    assert h[1]["ref/refreshes"] >= 1.0
    # a huge threshold and reset_every 15: never refreshed in 2 iterations
    h2 = Trainer(_cfg(tmp_path / "b", "loss.objective_options={kl_threshold: 1e9}")).train().history
    assert [r["ref/refreshes"] for r in h2] == [0.0, 0.0]


def test_gardo_needs_an_auxiliary_reward(tmp_path):
    from flowrl.config import ConfigError
    from flowrl.trainer import Trainer

    with pytest.raises(ConfigError, match="at least two rewards"):
        Trainer(_cfg(tmp_path, "reward.rewards={jpeg_compressibility: 1.0}")).train()
    from flowrl import TrainConfig

    with pytest.raises(ConfigError, match="refreshes its own KL reference"):
        TrainConfig().override(["algorithm=gardo", "loss.reference=ema"]).resolved()
