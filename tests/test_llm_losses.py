"""LLM loss pieces against hand-worked values: GSPO sequence ratio (value and gradient of the
token form), aggregation modes (DAPO token-mean vs GRPO seq-mean, Dr.GRPO's constant normaliser),
clip-higher, DISPO's four bounds, ETR, SSPO segments, Reg-GRPO, REAL, DHPO."""

import math

import pytest
import torch

torch.set_num_threads(1)

from flowrl.losses import (  # noqa: E402
    CLIP_RULES,
    RATIOS,
    LossInputs,
    LossSpec,
    aggregate,
    etr_clip_range,
    policy_loss,
    ppo_clip_loss,
    segment_mean,
    sequence_log_ratio,
)
from flowrl.policy import PolicyEval, Trajectories  # noqa: E402


def test_sequence_log_ratio_hand_values():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    old = torch.tensor([[-1.5, -2.0, -2.0], [-1.3, -0.7, -1.6]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # row 0: diffs (0.5, 0, ·) → 0.25; row 1: (0.3 − 0.3 + 0.6)/3 = 0.2
    torch.testing.assert_close(sequence_log_ratio(lp, old, mask), torch.tensor([0.25, 0.2]))
    inputs = LossInputs(log_prob=lp, old_log_prob=old, advantages=torch.zeros(2, 3), mask=mask.float())
    torch.testing.assert_close(RATIOS.get("sequence")(inputs), torch.tensor([[0.25] * 3, [0.2] * 3]))


def test_gspo_token_value_and_gradient():
    old = torch.tensor([[-1.5, -2.0]])
    mask = torch.ones(1, 2)
    c = torch.tensor([[1.0, 2.0]])
    grads = {}
    for level in ("gspo_token", "sequence"):
        lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
        log_ratio = RATIOS.get(level)(LossInputs(log_prob=lp, old_log_prob=old, advantages=torch.zeros(1, 2), mask=mask))
        # value: log s = mean(0.5, 0) = 0.25 at every token for both forms
        torch.testing.assert_close(log_ratio.detach(), torch.tensor([[0.25, 0.25]]))
        (torch.exp(log_ratio) * c).sum().backward()
        grads[level] = lp.grad.clone()
    s = math.exp(0.25)
    # GSPO-token: ∂/∂log π_t = s·c_t (the token's own weight); GSPO: s·Σc·(1/|o|) for every token
    torch.testing.assert_close(grads["gspo_token"], torch.tensor([[s * 1.0, s * 2.0]]))
    torch.testing.assert_close(grads["sequence"], torch.tensor([[s * 1.5, s * 1.5]]))


def test_aggregation_dapo_vs_grpo_vs_dr_grpo():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert float(aggregate(loss, mask, "token-mean")) == pytest.approx(10 / 4)  # DAPO: (1+2+3+4)/4
    assert float(aggregate(loss, mask, "seq-mean-token-mean")) == pytest.approx((2 + 4) / 2)  # GRPO
    assert float(aggregate(loss, mask, "seq-mean-token-sum")) == pytest.approx((6 + 4) / 2)
    assert float(aggregate(loss, mask, "seq-mean-token-sum-norm", max_len=8)) == pytest.approx(5 / 8)  # Dr.GRPO
    # Dr.GRPO's normaliser is a constant: padding the batch to another T does not change the loss
    padded_loss, padded_mask = torch.nn.functional.pad(loss, (0, 5)), torch.nn.functional.pad(mask, (0, 5))
    assert float(aggregate(padded_loss, padded_mask, "seq-mean-token-sum-norm", max_len=8)) == pytest.approx(5 / 8)
    assert float(aggregate(padded_loss, padded_mask, "seq-mean-token-sum-norm")) == pytest.approx(5 / 8)  # T = 8 now
    assert float(aggregate(loss, mask, "seq-mean-token-sum-norm")) == pytest.approx(5 / 3)  # default T = 3
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(loss, mask, "bogus")


def test_clip_higher_asymmetric():
    # A = +1, ρ = 1.5 → max(−1.5, −clip(1.5, 0.8, 1.28)) = −1.28; A = −1, ρ = 0.5 → max(0.5, 0.8) = 0.8
    log_ratio = torch.log(torch.tensor([[1.5], [0.5]]))
    loss, info = ppo_clip_loss(log_ratio, torch.tensor([[1.0], [-1.0]]), clip_range=0.2, clip_range_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([[-1.28], [0.8]]))
    assert info["clipped"].all()


def test_dispo_four_bounds_by_correctness():
    # four distinct bounds: correct up 0.1 / down 0.2, incorrect up 0.3 / down 0.4
    params = dict(eps_up_correct=0.1, eps_down_correct=0.2, eps_up_incorrect=0.3, eps_down_incorrect=0.4)
    ratio = torch.tensor([[1.5], [0.5], [1.5], [0.5], [1.05]])
    adv = torch.tensor([[1.0], [1.0], [-1.0], [-1.0], [1.0]])
    lp = torch.tensor([[-1.0], [-2.0], [-1.0], [-2.0], [-1.0]], requires_grad=True)
    inputs = LossInputs(log_prob=lp, old_log_prob=lp.detach() - torch.log(ratio), advantages=adv, mask=torch.ones(5, 1))
    loss, info = CLIP_RULES.get("dispo")(RATIOS.get("token")(inputs), inputs, **params)
    # weight w = clip(ρ): correct 1.5→1.1, 0.5→0.8; incorrect 1.5→1.3, 0.5→0.6; inside the bounds 1.05→1.05
    w = torch.tensor([[1.1], [0.8], [1.3], [0.6], [1.05]])
    torch.testing.assert_close(loss.detach(), -w * adv * lp.detach())  # −sg[w]·A·log π
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, -w * adv)  # REINFORCE gradient, w carries no gradient
    assert info["clipped"][:, 0].tolist() == [True, True, True, True, False]
    # with rewards given, correctness comes from them (threshold 0.5), not from the advantage sign
    inputs.rewards = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0])
    loss2, _ = CLIP_RULES.get("dispo")(RATIOS.get("token")(inputs), inputs, **params)
    w2 = torch.tensor([[1.3], [0.6], [1.1], [0.8], [1.05]])
    torch.testing.assert_close(loss2.detach(), -w2 * adv * lp.detach())


def test_etr_clip_range_hand_value():
    # ε = 0.2·(1 + 0.1·2)·(1 + 0.5·4·0.5·0.5) = 0.2·1.2·1.5 = 0.36; p = 0 or 1 → no widening
    got = etr_clip_range(torch.tensor([2.0, 2.0]), torch.tensor([0.5, 1.0]), clip_range=0.2, adv_scale=0.1, var_scale=0.5)
    torch.testing.assert_close(got, torch.tensor([0.36, 0.24]))


def test_etr_rule_uses_group_success():
    traj = Trajectories(prompts=["a"] * 2, group_ids=torch.tensor([0, 0]), log_probs=torch.zeros(2, 1), mask=torch.ones(2, 1, dtype=torch.bool))
    lp = torch.log(torch.tensor([[1.5], [1.5]]))
    inputs = LossInputs(log_prob=lp, old_log_prob=torch.zeros(2, 1), advantages=torch.tensor([[1.0], [-1.0]]), mask=torch.ones(2, 1), traj=traj, rewards=torch.tensor([1.0, 0.0]))
    loss, _ = CLIP_RULES.get("etr")(lp, inputs, clip_range=0.2, adv_scale=0.0, var_scale=0.5)
    # p = 0.5 → ε = 0.2·1.5 = 0.3: A=+1 → −min(1.5, 1.3) = −1.3; A=−1 → max(1.5, 1.3) = 1.5
    torch.testing.assert_close(loss, torch.tensor([[-1.3], [1.5]]))


def test_segment_ratio_hand_values():
    diffs = torch.tensor([[0.2, 0.4, -0.2, 0.0, 9.0]])
    seg = torch.tensor([[0, 0, 1, 1, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    torch.testing.assert_close(segment_mean(diffs, mask, seg), torch.tensor([[0.3, 0.3, -0.1, -0.1, 0.0]]))
    traj = Trajectories(prompts=["a"], group_ids=torch.tensor([0]), log_probs=torch.zeros(1, 5), mask=mask.bool(), meta={"segment_ids": seg})
    inputs = LossInputs(log_prob=diffs, old_log_prob=torch.zeros(1, 5), advantages=torch.zeros(1, 5), mask=mask.float(), traj=traj)
    torch.testing.assert_close(RATIOS.get("segment")(inputs)[:, :4], torch.tensor([[0.3, 0.3, -0.1, -0.1]]))


def test_reg_grpo_and_real_hand_values():
    inputs = LossInputs(log_prob=torch.zeros(2, 1), old_log_prob=torch.zeros(2, 1), advantages=torch.tensor([[1.0], [-1.0]]), mask=torch.ones(2, 1))
    loss, _ = CLIP_RULES.get("reg_grpo")(torch.tensor([[0.05], [0.0]]), inputs, tau=0.1)
    torch.testing.assert_close(loss, torch.tensor([[0.25], [1.0]]))  # (1 − 0.5)², (−1 − 0)²
    loss, _ = CLIP_RULES.get("real")(torch.zeros(2, 1), inputs, tau=0.1)
    torch.testing.assert_close(loss, torch.full((2, 1), math.log(2.0)))  # anchored: p = ½ for both labels
    # gradient direction: correct samples are pushed up, incorrect down
    lr = torch.zeros(2, 1, requires_grad=True)
    CLIP_RULES.get("real")(lr, inputs, tau=0.1)[0].sum().backward()
    assert lr.grad[0, 0] < 0 < lr.grad[1, 0]


def test_dhpo_average_is_mean_of_clipped_branches():
    lp = torch.log(torch.tensor([[1.5, 0.9]]))
    inputs = LossInputs(log_prob=lp, old_log_prob=torch.zeros(1, 2), advantages=torch.ones(1, 2), mask=torch.ones(1, 2))
    loss, _ = CLIP_RULES.get("dhpo")(lp, inputs, clip_range=0.2, seq_clip_range=0.01, seq_clip_range_high=0.01)
    tok = torch.tensor([[-1.2, -0.9]])  # token branch: clip(1.5) = 1.2, 0.9 inside
    seq = -torch.full((1, 2), 1.01)  # s = sqrt(1.5·0.9) = 1.162 → clipped to 1.01
    torch.testing.assert_close(loss, 0.5 * tok + 0.5 * seq)


def _common_inputs():
    torch.manual_seed(0)
    B, T = 4, 5
    lp = (torch.randn(B, T) * 0.1 - 1).requires_grad_(True)
    old = lp.detach() + torch.randn(B, T) * 0.05
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    traj = Trajectories(prompts=["a", "a", "b", "b"], group_ids=torch.tensor([0, 0, 1, 1]), log_probs=old, mask=mask.bool(), meta={"segment_ids": torch.tensor([[0, 0, 1, 1, 1]] * B)})
    cur = PolicyEval(log_prob=lp, entropy=torch.rand(B, T) + 0.1)
    ref = PolicyEval(log_prob=old + 0.01)
    return LossInputs(log_prob=lp, old_log_prob=old, advantages=torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None].expand(B, T), mask=mask, current=cur, reference=ref, traj=traj, rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]))


# the token-policy entries (diffusion-only rules such as GRPO-Guard's need Gaussian means)
LLM_RULES = ["ppo_clip", "dispo", "etr", "dhpo", "sspo", "reg_grpo", "real"]
LLM_RATIOS = ["token", "sequence", "gspo_token", "segment"]


@pytest.mark.parametrize("clip", LLM_RULES)
@pytest.mark.parametrize("ratio", LLM_RATIOS)
def test_every_ratio_and_rule_runs_on_the_same_inputs(ratio, clip):
    if clip == "dhpo" and ratio != "token":
        pytest.skip("dhpo mixes its own sequence branch from the token log-ratio")
    inputs = _common_inputs()
    spec = LossSpec(ratio=ratio, clip=clip, clip_params={}, aggregation="seq-mean-token-mean", kl="k3", beta=0.04)
    loss, metrics = policy_loss(inputs, spec)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(inputs.log_prob.grad).all() and inputs.log_prob.grad.abs().sum() > 0
    assert "loss/policy" in metrics and metrics["kl/ref"] >= 0


def test_entropy_is_computed_only_for_losses_that_read_it():
    # a token policy computes entropies (a softmax over the vocabulary per token) only when the loss reads them
    from flowrl.losses import loss_reads_entropy

    assert loss_reads_entropy(LossSpec(ratio="segment", clip="sspo", clip_params={})) is True
    assert loss_reads_entropy(LossSpec(clip="dhpo", clip_params={"mix": "entropy"})) is True
    assert loss_reads_entropy(LossSpec(clip="dhpo", clip_params={"mix": "average"})) is False
    assert loss_reads_entropy(LossSpec(clip="ppo_clip", clip_params={"clip_range": 0.2})) is False
    assert loss_reads_entropy(LossSpec(clip="ppo_clip", kl="k3", beta=0.04)) is False
