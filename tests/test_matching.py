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
