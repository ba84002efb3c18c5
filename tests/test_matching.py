"""Likelihood-free objectives on the model's own ODE samples (flowrl.matching): AWM, online
Flow-DPO, DGPO — formulas on hand-computed numbers and short runs on a tiny SD3."""

import math

import pytest
import torch

from flowrl.matching import awm_loss, awm_weighted_error, flow_matching_error


def test_flow_matching_error_and_awm_loss_by_hand():
    # u = ε − x0 = [1, 1]; v = [1, 2] → (v − u)² = [0, 1] → e = 0.5
    v, x0, eps = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.ones(1, 2)
    e = flow_matching_error(v, x0, eps)
    assert e.tolist() == [0.5]
    t = torch.tensor([0.5])
    assert awm_weighted_error(e, t, weighting="uniform").item() == 0.5
    assert awm_weighted_error(e, t, weighting="t").item() == 0.25
    # ghuber p = 1/4: t·((e + 1e-10)^p − (1e-10)^p)/p = 0.5·(0.5^0.25 − 10^-2.5)·4
    #   = 2·(0.8408964 − 0.0031623) = 1.6754683
    assert awm_weighted_error(e, t, weighting="ghuber", power=0.25).item() == pytest.approx(1.6754683, abs=1e-6)
    # AWM: Σ m·A·ℓ / Σ m, A = [2, −1], ℓ = [[0.5, 1.0], [3.0, 4.0]], m = [[1, 1], [1, 0]]
    #   = (2·0.5 + 2·1.0 − 1·3.0) / 3 = 0
    ell = torch.tensor([[0.5, 1.0], [3.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert awm_loss(ell, torch.tensor([[2.0], [-1.0]]), mask).item() == pytest.approx(0.0, abs=1e-7)
    # and with A = [1, 1]: (0.5 + 1 + 3)/3 = 1.5
    assert awm_loss(ell, torch.ones(2, 1), mask).item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="unknown AWM weighting 'huber'"):
        awm_weighted_error(e, t, weighting="huber")


def test_awm_gradient_pulls_positive_samples_and_pushes_negative_ones():
    # one velocity parameter per sample: d/dv of A·(v − u)² = 2A(v − u); A > 0 moves v towards u
    v = torch.tensor([[0.0], [0.0]], requires_grad=True)
    x0, eps = torch.zeros(2, 1), torch.ones(2, 1)  # u = 1
    e = flow_matching_error(v, x0, eps)
    awm_loss(e[:, None], torch.tensor([[1.0], [-1.0]]), torch.ones(2, 1)).backward()
    # mean over 2 entries: grad = 2A(v − u)/2 = [−1, +1]
    assert v.grad.flatten().tolist() == [-1.0, 1.0]


def _cfg(tmp_path, algorithm, *extra):
    from flowrl import TrainConfig

    return TrainConfig().override([
        f"algorithm={algorithm}", "model.pipeline=tiny-sd3", f"train.output_dir={tmp_path}", "train.iterations=2",
        "sampler.num_steps=4", "sampler.height=16", "sampler.width=16", "train.lora_rank=4", "train.lora_alpha=8",
        "train.num_generations=4", "train.prompts_per_iteration=2", "train.train_batch_size=8", "train.progress=false",
        "model.device=cpu", "train.learning_rate=1e-3", *extra,
    ])


def test_awm_preset_resolves_to_the_papers_defaults():
    from flowrl import TrainConfig

    r = TrainConfig().override(["algorithm=awm"]).resolved()
    p = r.preset
    assert (p.objective, p.rollout, p.kernel) == ("awm", "x0_only", "ode")
    assert p.advantage_params == {"std": "global", "clip": 1.0} and p.loss.beta == 0.003
    assert (r.learning_rate, r.timestep_fraction, r.timestep_selection) == (3e-4, 0.9, "random")
    assert p.skip_zero_advantage is False  # the reference trains every sample


def test_awm_trains_two_iterations_on_tiny_sd3(tmp_path):
    from flowrl.trainer import Trainer

    trainer = Trainer(_cfg(tmp_path, "awm"))
    before = [p.detach().clone() for p in trainer.params]
    result = trainer.train()
    h = result.history
    assert len(h) == 2 and all(math.isfinite(r["loss/policy"]) for r in h)
    assert all(r["awm/fm_error"] > 0 for r in h)
    assert h[0]["kl/ref"] == 0.0 and h[1]["kl/ref"] > 0  # LoRA starts at the reference, then moves
    assert max((p.detach() - q).abs().max().item() for p, q in zip(trainer.params, before)) > 0


def test_dpo_pairs_and_loss_by_hand():
    from flowrl.matching import dpo_pairs, flow_dpo_loss

    adv = torch.tensor([0.5, -1.0, 1.5, 0.0, 0.0, 2.0, -2.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    win, lose = dpo_pairs(adv, groups)  # group 1 is tied: no pair
    assert win.tolist() == [2, 5] and lose.tolist() == [1, 6]
    win, lose = dpo_pairs(adv[:3], groups[:3], pairing="all")  # 1.5 > 0.5 > −1
    assert sorted(zip(win.tolist(), lose.tolist())) == [(0, 1), (2, 0), (2, 1)]
    # −log σ(−β/2·[(e_w − r_w) − (e_l − r_l)]), β = 2: winner gained 0.1, loser lost 0.2:
    #   (0.9 − 1.0) − (1.2 − 1.0) = −0.3 → inside = 0.3 → −log σ(0.3) = log(1 + e^−0.3) = 0.5543552
    out = flow_dpo_loss(torch.tensor([0.9]), torch.tensor([1.0]), torch.tensor([1.2]), torch.tensor([1.0]), beta=2.0)
    assert out.item() == pytest.approx(0.5543552, abs=1e-6)
    # at θ = ref the loss is log 2
    z = torch.tensor([0.7])
    assert flow_dpo_loss(z, z, z, z, beta=5000.0).item() == pytest.approx(math.log(2))


def test_dgpo_loss_by_hand():
    from flowrl.matching import dgpo_loss

    # one group, A = [2, 1, −3]; β = 1; e_θ − e_ref = [−0.3, 0.0, 0.6] → r = [0.3, 0.0, −0.6]
    #   positive set: w = [2/3, 1/3] → 0.2;  negative set: w = [1] → −0.6
    #   −log σ(0.2 + 0.6) = log(1 + e^−0.8) = 0.3711007
    err, ref = torch.tensor([0.7, 1.0, 1.6]), torch.ones(3)
    out = dgpo_loss(err, ref, torch.tensor([2.0, 1.0, -3.0]), torch.zeros(3, dtype=torch.long), beta=1.0)
    assert out.tolist() == pytest.approx([0.3711007], abs=1e-6)
    # a group with no negative member contributes nothing
    assert len(dgpo_loss(err, ref, torch.tensor([1.0, 1.0, 0.0]), torch.zeros(3, dtype=torch.long), beta=1.0)) == 0


@pytest.mark.parametrize("algorithm", ["flow_dpo", "dgpo"])
def test_preference_presets_train_two_iterations_on_tiny_sd3(tmp_path, algorithm):
    from flowrl.trainer import Trainer

    trainer = Trainer(_cfg(tmp_path, algorithm, "train.learning_rate=1e-2"))
    assert trainer.resolved.preset.skip_zero_advantage is False
    before = [p.detach().clone() for p in trainer.params]
    h = trainer.train().history
    key = "dpo/pairs" if algorithm == "flow_dpo" else "dgpo/groups"
    assert [r[key] for r in h] == [2.0, 2.0]  # one pair (group) per prompt at every slot
    # LoRA starts at the reference: the first update's loss is exactly log 2
    assert h[0]["loss/policy"] == pytest.approx(math.log(2), abs=1e-6)
    assert math.isfinite(h[1]["loss/policy"]) and h[1]["loss/policy"] != pytest.approx(math.log(2), abs=1e-9)
    assert max((p.detach() - q).abs().max().item() for p, q in zip(trainer.params, before)) > 0


def test_preference_objectives_need_whole_groups_per_minibatch(tmp_path):
    from flowrl.config import ConfigError
    from flowrl.trainer import Trainer

    with pytest.raises(ConfigError, match="train.train_batch_size=6 must be a multiple of train.num_generations=4"):
        Trainer(_cfg(tmp_path, "flow_dpo", "train.train_batch_size=6")).train()
