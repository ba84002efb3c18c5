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
    # a shaping bonus does not make a wrong answer correct: [1.1, 0.05, 0.05, 0.05] → μ̂_pos 0.25 → 0.75
    shaped = torch.tensor([1.1, 0.05, 0.05, 0.05])
    assert focal_weights(shaped, torch.zeros(4, dtype=torch.long)).tolist() == pytest.approx([0.75] * 4)
    # group 0: mean 0.75, unbiased var = (3·0.0625 + 0.5625)/3 = 0.25 → std 0.5:
    #   correct (1 − 0.75)/0.5 = 0.5, wrong −1.5; × 0.25 → 0.125, −0.375
    a = fgrpo_estimator(AdvantageInputs(rewards=r, group_ids=g), gamma=1.0, eps=0.0)
    assert a[:4].tolist() == pytest.approx([0.125, 0.125, 0.125, -0.375])
    # group 1 mirrored: correct 1.5·0.75 = 1.125, wrong −0.5·0.75 = −0.375
    assert a[4:].tolist() == pytest.approx([1.125, -0.375, -0.375, -0.375])


def test_mdpo_token_loss_by_hand():
    # ρ = e^0.1 = 1.1051709: −ρ·A + c·(ρ·log ρ − ρ + 1) = −2.2103418 + 0.5·(0.1105171 − 0.1051709)
    #   = −2.2103418 + 0.0026731 = −2.2076687
    out = mdpo_token_loss(torch.tensor([[0.1]]), torch.tensor([[2.0]]), kl_coef=0.5)
    assert out.item() == pytest.approx(-2.2076687, abs=1e-6)
    # d/d log ρ = −ρ·A + c·ρ·log ρ: at ρ = 1 it is −A (the policy gradient), and 0 when A = 0 —
    # an on-policy update with flat rewards moves nothing (ρ·log ρ alone gives slope c there)
    for adv, grad in ((2.0, -2.0), (0.0, 0.0)):
        lr = torch.zeros(1, 1, requires_grad=True)
        mdpo_token_loss(lr, torch.tensor([[adv]]), kl_coef=0.5).sum().backward()
        assert lr.grad.item() == pytest.approx(grad, abs=1e-7)
    # away from ρ = 1 the KL term pulls back: log ρ = 0.1, A = 0 → slope c·ρ·log ρ = 0.5·0.1105171 > 0
    lr = torch.full((1, 1), 0.1, requires_grad=True)
    mdpo_token_loss(lr, torch.tensor([[0.0]]), kl_coef=0.5).sum().backward()
    assert lr.grad.item() == pytest.approx(0.0552585, abs=1e-6)


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
        # the advantages were not all 0 (F-GRPO: 1 + a brevity bonus is "correct" at threshold 0.5;
        # with threshold 0 every sample counted as correct and every weight was 0)
        assert max(r["adv/abs_mean"] for r in h) > 0
        if algorithm == "safe_lagrangian":  # brevity ∈ (0, 1] read as a safety score: cost < 0 → λ shrinks from 1
            assert trainer.estimator.lam < 1.0
    finally:
        tiny_llama.model.load_state_dict(initial)


def test_knapsack_value_and_allocation_by_hand():
    from flowrl.prompt_selection import knapsack_allocate, knapsack_value

    # p = 0.5, G = 4: one group: (1 − 2·0.5⁴)·0.25 = 0.21875; two: (1 − 2·0.5⁸)·0.25 = 0.248046875
    v = knapsack_value(torch.tensor([0.5, 0.5, 1.0]), torch.tensor([1, 2, 3]), 4)
    assert v.tolist() == pytest.approx([0.21875, 0.248046875, 0.0])
    # p = [0.5, 1, 0.1, 0.9], 4 groups: 0.5 first (0.219); then 0.1 and 0.9 (0.0309 each, 1 − 0.9⁴ − 10⁻⁴ = 0.3438 × 0.09)
    # beat 0.5's second group (0.0293); the 4th goes to 0.5 (0.0293 > 0.1's second group 0.0203); p = 1 gets none
    assert knapsack_allocate(torch.tensor([0.5, 1.0, 0.1, 0.9]), 4, 4).tolist() == [2, 0, 1, 1]


def test_knapsack_refuses_a_cap_that_cannot_hold_the_budget():
    from flowrl.prompt_selection import KnapsackSelector, knapsack_allocate

    # the cap used to be ignored once every prompt reached it: all the rest went to the first prompt
    with pytest.raises(ValueError, match="max_units"):
        knapsack_allocate(torch.full((4,), 0.5), 4, 8, max_units=0)
    with pytest.raises(ValueError, match="max_units"):
        knapsack_allocate(torch.full((2,), 0.5), 5, 8, max_units=2)
    assert knapsack_allocate(torch.full((2,), 0.5), 4, 8, max_units=2).tolist() == [2, 2]
    with pytest.raises(ValueError, match="knapsack max_units must be ≥ 1"):
        KnapsackSelector(10, group_size=4, max_units=0)


def test_selectors_learn_and_resume():
    from flowrl.prompt_selection import KnapsackSelector, VADESelector

    for cls in (KnapsackSelector, VADESelector):
        sel = cls(6, group_size=2) if cls is KnapsackSelector else cls(6)
        # prompts 0 and 1 always solved, prompt 2 half the time
        sel.update([0, 0, 1, 1, 2, 2], torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1, 2, 2]))
        # α, β of prompt 0: decay 0.9 then + 2 successes → α = 2.9, β = 0.9
        assert float(sel.tracker.alpha[0]) == pytest.approx(2.9) and float(sel.tracker.beta[0]) == pytest.approx(0.9)
        state = copy.deepcopy(sel.state_dict())
        a = sel.sample(3, torch.Generator().manual_seed(1))
        assert len(a) == 3 and all(0 <= i < 6 for i in a)
        other = cls(6, group_size=2) if cls is KnapsackSelector else cls(6)
        other.load_state_dict(state)
        assert other.sample(3, torch.Generator().manual_seed(1)) == a  # exact resume


@pytest.mark.parametrize("algorithm", ["vade", "knapsack_rl"])
def test_selection_presets_train_two_iterations(tmp_path, tiny_llama, algorithm):
    import tests.test_llm_trainer as lt
    from flowrl.trainer import Trainer

    initial = copy.deepcopy(tiny_llama.model.state_dict())
    try:
        trainer = Trainer(lt._config(tmp_path, algorithm, iterations=2), policy=tiny_llama)
        if algorithm == "knapsack_rl":
            assert trainer.selector.group_size == 4  # train.num_generations
        h = trainer.train().history
        assert len(h) == 2 and all(math.isfinite(r["loss/policy"]) for r in h)
        tr = trainer.selector.tracker  # it learnt from the scored groups: some posteriors left the Beta(1, 1) prior
        assert bool(((tr.alpha != 1) | (tr.beta != 1)).any())
    finally:
        tiny_llama.model.load_state_dict(initial)


def test_trpa_pairs_and_loss_by_hand():
    from flowrl.trpa import trpa_loss, trpa_pairs

    # one group, rewards [1, 0.5, 0]: pairs (0>1, top), (0>2, top), (1>2, not top)
    w, l_, top = trpa_pairs(torch.tensor([1.0, 0.5, 0.0]), torch.zeros(3, dtype=torch.long))
    assert list(zip(w.tolist(), l_.tolist(), top.tolist())) == [(0, 1, True), (0, 2, True), (1, 2, False)]
    # log r = [0.2, 0, −0.2], β 1, anisotropy 2: h = [2·0.2, 2·0.4, 1·0.2] → −log σ(h) = log(1 + e^−h)
    out = trpa_loss(torch.tensor([0.2, 0.0, -0.2]), w, l_, top, beta=1.0, anisotropy=2.0)
    assert out.tolist() == pytest.approx([math.log1p(math.exp(-0.4)), math.log1p(math.exp(-0.8)), math.log1p(math.exp(-0.2))])


def test_trpa_pair_mean_scale_by_hand():
    from flowrl.trpa import pair_mean_scale

    # 2 processes, 4 rows each (N = 8); process A holds 6 pairs with Σ loss S_A, B none.
    # The loop weighs A's loss by 4/8: (4/8)·S_A·scale must be S_A/6 → scale = (8/4)/6 = 1/3
    assert pair_mean_scale(4, 8, 6) == pytest.approx(1 / 3)
    # one process: Σ/P, the plain mean; no pairs anywhere or no rows here: 0
    assert pair_mean_scale(8, 8, 12) == pytest.approx(1 / 12)
    assert pair_mean_scale(4, 8, 0) == 0.0 and pair_mean_scale(0, 8, 6) == 0.0


def test_trpa_trains_two_iterations(tmp_path, tiny_llama):
    import tests.test_llm_trainer as lt
    from flowrl.trainer import Trainer

    initial = copy.deepcopy(tiny_llama.model.state_dict())
    try:
        trainer = Trainer(lt._config(tmp_path, "trpa", iterations=2), policy=tiny_llama)
        h = trainer.train().history
        assert len(h) == 2 and all(math.isfinite(r["loss/policy"]) for r in h)
        pairs = [r.get("trpa/pairs", 0.0) for r in h]
        # on-policy (one optimizer step per iteration): log r = 0 for every response → loss log 2 when pairs exist
        for r in h:
            if r.get("trpa/pairs", 0.0) > 0:
                assert r["loss/policy"] == pytest.approx(math.log(2), abs=1e-5)
        assert max(pairs) > 0
    finally:
        tiny_llama.model.load_state_dict(initial)
