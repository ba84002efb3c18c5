"""TempFlow-GRPO's noise-aware weighting (flowrl.losses.noise_aware_weights) and preset."""

import pytest
import torch

from flowrl.losses import noise_aware_weights


def test_noise_aware_weights_by_hand():
    # stds s = [0.3, 0.1, 0.2] (one stored step per row: rows branched at different steps), all masked:
    # mean 0.2 → w = [1.5, 0.5, 1.0]
    w = noise_aware_weights(torch.tensor([[0.3], [0.1], [0.2]]), torch.ones(3, 1))
    assert w.flatten().tolist() == pytest.approx([1.5, 0.5, 1.0])
    # a masked-out entry does not count in the mean: mean(0.3, 0.1) = 0.2 → [1.5, 0.5, 1.0] again for the kept ones
    w = noise_aware_weights(torch.tensor([[0.3], [0.1], [0.6]]), torch.tensor([[1.0], [1.0], [0.0]]))
    assert w[:2].flatten().tolist() == pytest.approx([1.5, 0.5])
    assert noise_aware_weights(torch.ones(2, 1), torch.zeros(2, 1)).flatten().tolist() == [1.0, 1.0]


def test_tempflow_preset_branches_with_one_ode_suffix():
    from flowrl import TrainConfig

    p = TrainConfig().override(["algorithm=tempflow_grpo"]).resolved().preset
    assert p.rollout == "singular" and p.rollout_params["granularities"] == [1]
    assert p.loss.step_weight == "noise_aware" and p.kernel == "flow" and p.noise_level == 0.7
