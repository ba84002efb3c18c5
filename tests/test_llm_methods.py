"""F-GRPO, MDPO and the Lagrangian safety combination: formulas by hand, two iterations on a tiny Llama."""

import copy
import math

import pytest
import torch

torch.set_num_threads(1)

from flowrl.advantages import AdvantageInputs, LagrangianAdvantage, fgrpo_estimator, focal_weights, lagrange_update, lagrangian_reward  # noqa: E402
from flowrl.losses import mdpo_token_loss  # noqa: E402


def test_focal_weights_and_fgrpo_by_hand():
    # group 0: rewards [1, 1, 1, 0] → μ̂_pos = 0.75 → g = (0.25)^γ; group 1: [1, 0, 0, 0] → 0.25 → (0.75)^γ
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert focal_weights(r, g, gamma=1.0).tolist() == pytest.approx([0.25] * 4 + [0.75] * 4)
    assert focal_weights(r, g, gamma=2.0).tolist() == pytest.approx([0.0625] * 4 + [0.5625] * 4)
    # group 0: mean 0.75, unbiased var = (3·0.0625 + 0.5625)/3 = 0.25 → std 0.5:
    #   correct (1 − 0.75)/0.5 = 0.5, wrong −1.5; × 0.25 → 0.125, −0.375
    a = fgrpo_estimator(AdvantageInputs(rewards=r, group_ids=g), gamma=1.0, eps=0.0)
    assert a[:4].tolist() == pytest.approx([0.125, 0.125, 0.125, -0.375])
    # group 1 mirrored: correct 1.5·0.75 = 1.125, wrong −0.5·0.75 = −0.375
    assert a[4:].tolist() == pytest.approx([1.125, -0.375, -0.375, -0.375])


def test_mdpo_token_loss_by_hand():
    # ρ = e^0.1: −ρ·A + c·ρ·log ρ = e^0.1·(−2 + 0.5·0.1) = −1.95·1.1051709 = −2.1550833
    out = mdpo_token_loss(torch.tensor([[0.1]]), torch.tensor([[2.0]]), kl_coef=0.5)
    assert out.item() == pytest.approx(-2.1550833, abs=1e-6)
    # at ρ = 1 the gradient wrt log ρ is −A + c·(log ρ + 1)·ρ... = −A + c: the KL term's slope c is a constant
    lr = torch.zeros(1, 1, requires_grad=True)
    mdpo_token_loss(lr, torch.tensor([[2.0]]), kl_coef=0.5).sum().backward()
    assert lr.grad.item() == pytest.approx(-2.0 + 0.5)


def test_lagrangian_by_hand():
    # (R − λC)/(1 + λ): R = 1, C = 0.5, λ = 1 → 0.25
    assert lagrangian_reward(torch.tensor([1.0]), torch.tensor([0.5]), 1.0).item() == pytest.approx(0.25)
    # λ ← max(0, λ + η(E[C] − d)): 1 + 0.1·(0.5 − 0) = 1.05; 0.02 + 0.1·(0 − 0.5) < 0 → 0
    assert lagrange_update(1.0, 0.5, limit=0.0, lr=0.1) == pytest.approx(1.05)
    assert lagrange_update(0.02, 0.0, limit=0.5, lr=0.1) == 0.0
    est = LagrangianAdvantage(lambda_init=1.0, lambda_lr=0.1, cost_sign=-1.0)
    table = torch.tensor([[1.0, -1.0], [0.0, 0.0]])  # safety score −1 → cost 1 for sample 0
    adv = est(AdvantageInputs(rewards=table[:, 0], group_ids=torch.zeros(2, dtype=torch.long), reward_table=table, reward_names=["help", "safe"]))
    # combined = [(1 − 1)/2, 0] = [0, 0] → advantages 0; λ ← 1 + 0.1·(0.5 − 0) = 1.05
    assert adv.abs().max().item() < 1e-6 and est.lam == pytest.approx(1.05)
    assert est.state_dict() == {"lambda": pytest.approx(1.05)}
    with pytest.raises(ValueError, match="loss.options.safety 'harm' is not a reward column"):
        LagrangianAdvantage(safety="harm")(AdvantageInputs(rewards=table[:, 0], group_ids=torch.zeros(2, dtype=torch.long), reward_table=table, reward_names=["help", "safe"]))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from flowrl.pipelines.causal_lm import TokenPolicy, build_tiny_causal_lm

    path = build_tiny_causal_lm(str(tmp_path_factory.mktemp("tiny_llama_methods")), seed=1)
    torch.manual_seed(0)
    return TokenPolicy.from_pretrained(path, lora={"r": 4}, max_new_tokens=4)


@pytest.mark.parametrize("algorithm", ["fgrpo", "mdpo", "safe_lagrangian"])
def test_llm_methods_train_two_iterations(tmp_path, tiny_llama, algorithm):
    import tests.test_llm_trainer as lt
    from flowrl.trainer import Trainer

    initial = copy.deepcopy(tiny_llama.model.state_dict())
    try:
        trainer = Trainer(lt._config(tmp_path, algorithm, iterations=2), policy=tiny_llama)
        before = {n: p.detach().clone() for n, p in tiny_llama.model.named_parameters() if p.requires_grad}
        h = trainer.train().history
        assert len(h) == 2 and all(math.isfinite(r["loss/policy"]) for r in h)
        assert h[0]["ratio/mean"] == pytest.approx(1.0, abs=1e-5)  # one optimizer step per iteration: on-policy
        moved = sum(float((p.detach() - before[n]).abs().sum()) for n, p in tiny_llama.model.named_parameters() if p.requires_grad)
        assert moved > 0
        if algorithm == "safe_lagrangian":  # brevity ∈ (0, 1] read as a safety score: cost < 0 → λ shrinks from 1
            assert trainer.estimator.lam < 1.0
    finally:
        tiny_llama.model.load_state_dict(initial)
