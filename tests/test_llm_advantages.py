"""LLM advantage estimators against hand-worked values, stateful estimators' state_dict round trip,
and every LLM estimator on the same inputs."""

import math

import pytest
import torch

torch.set_num_threads(1)

from flowrl.advantages import (  # noqa: E402
    ADVANTAGES,
    AdvantageInputs,
    BetaValueTracker,
    grpo_lambda_rewards,
    make_estimator,
    ngrpo_advantages,
    noisy_verifier_correction,
    s_grpo_rewards,
    semantic_entropy,
    tempo_token_bonus,
    unlikeliness_rewards,
)
from flowrl.policy import Trajectories  # noqa: E402


def test_ngrpo_virtual_max_sample():
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    r = torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1, 1, 0])
    a = ngrpo_advantages(r, g, eps=0.0)
    # all wrong (n=4): μ' = 1/5, σ'² = (4·0.04 + 0.64)/5 = 0.16 → A = −0.2/0.4 = −0.5
    torch.testing.assert_close(a[:4], torch.full((4,), -0.5))
    # all right: μ' = 1, σ' = 0 → A = 0 (with eps > 0; eps = 0 gives 0/0 → use the registered default)
    torch.testing.assert_close(ngrpo_advantages(r, g)[4:8], torch.zeros(4))
    # mixed pair: μ' = 2/3, σ'² = (1/9 + 4/9 + 1/9)/3 = 2/9 → A = (1/3, −2/3)/√(2/9) = (0.7071, −1.4142)
    torch.testing.assert_close(a[8:], torch.tensor([1 / 3, -2 / 3]) / math.sqrt(2 / 9))
    est = make_estimator("ngrpo")
    torch.testing.assert_close(est(AdvantageInputs(rewards=r, group_ids=g)), ngrpo_advantages(r, g))


def test_dr_grpo_and_grpo_advantages():
    g = torch.tensor([0, 0, 0, 0])
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    dr = make_estimator("group", std="none", clip=None)(AdvantageInputs(rewards=r, group_ids=g))
    torch.testing.assert_close(dr, torch.tensor([0.75, -0.25, -0.25, -0.25]))  # r − μ, no σ
    grpo = make_estimator("group", std="group", clip=None, eps=0.0)(AdvantageInputs(rewards=r, group_ids=g))
    torch.testing.assert_close(grpo, torch.tensor([0.75, -0.25, -0.25, -0.25]) / math.sqrt(0.1875))


def test_gdpo_estimator_decouples_rewards():
    g = torch.tensor([0, 0])
    table = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    adv = make_estimator("gdpo")(AdvantageInputs(rewards=table.sum(1), group_ids=g, reward_table=table, reward_names=["a", "b"]))
    # column a: z = (±0.5)/(0.5 + eps) ≈ ±1; column b: 0; sum ±1; batch z-score ±1
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0]), atol=1e-3, rtol=0)


def test_spo_tracker_update_hand_values_and_state_dict():
    est = make_estimator("spo", eps=0.0)
    inputs = AdvantageInputs(rewards=torch.tensor([1.0, 0.0, 1.0]), group_ids=torch.tensor([0, 1, 2]), prompts=["a", "a", "b"])
    adv = est(inputs)
    # v̂ = ½ for unseen prompts: raw (½, −½, ½), mean 1/6, std √(2/9) → (0.7071, −1.4142, 0.7071)
    torch.testing.assert_close(adv, torch.tensor([1 / 3, -2 / 3, 1 / 3]) / math.sqrt(2 / 9))
    tr = est.tracker
    # D unobserved → ρ = ρ_max = 0.96: a: α = 0.96 + 1, β = 0.96 + 1; b: α = 0.96 + 1, β = 0.96
    assert tr.alpha == pytest.approx({"a": 1.96, "b": 1.96}) and tr.beta == pytest.approx({"a": 1.96, "b": 0.96})
    # D = 0.01 for b → ρ = 2^(−0.01/0.06) = 0.8909 (inside [0.875, 0.96]); D = 0.06 → 0.5 → clipped to 0.875
    est.observe_shift(["b"], torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.01, -1.99]]), torch.ones(1, 2))
    assert tr.discount("b") == pytest.approx(2 ** (-0.01 / 0.06), rel=1e-5)
    tr.shift["z"] = 0.06
    assert tr.discount("z") == pytest.approx(0.875)
    # round trip: a fresh estimator with the saved state continues identically
    state = est.state_dict()
    clone = make_estimator("spo", eps=0.0)
    clone.load_state_dict(state)
    nxt = AdvantageInputs(rewards=torch.tensor([0.0]), group_ids=torch.tensor([0]), prompts=["b"])
    a1, a2 = est(nxt), clone(nxt)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(a1, torch.tensor([-1.96 / 2.92]))  # one sample: A = r − v̂, no normalisation
    rho = 2 ** (-0.01 / 0.06)
    assert est.tracker.alpha["b"] == pytest.approx(rho * 1.96) and est.tracker.beta["b"] == pytest.approx(rho * 0.96 + 1)
    assert clone.state_dict() == est.state_dict()


def test_trust_grpo_state_and_values():
    est = make_estimator("trust_grpo", anneal_steps=2, clip=None, std="none")
    table = torch.tensor([[1.0, 0.9], [1.0, 0.2], [0.0, 0.5]])
    inputs = AdvantageInputs(rewards=table[:, 0], group_ids=torch.tensor([0, 0, 0]), reward_table=table, reward_names=["ans", "think"])
    # γ: pairs (0.9 > 0.5) win, (0.2 < 0.5) lose → ½; λ_0 = 1 → r = (1.45, 1.1, 0.25), centred
    r = torch.tensor([1.45, 1.1, 0.25])
    torch.testing.assert_close(est(inputs), r - r.mean())
    assert est.last == {"trust/gamma": 0.5, "trust/lambda": 1.0}
    clone = make_estimator("trust_grpo", anneal_steps=2, clip=None, std="none")
    clone.load_state_dict(est.state_dict())
    torch.testing.assert_close(clone(inputs), est(inputs))  # both at λ = ½ now
    assert clone.last["trust/lambda"] == 0.5


def test_reward_transforms_hand_values():
    # unlikeliness: correct members ranked by likelihood; rank = # less likely correct ones
    r = unlikeliness_rewards(torch.tensor([1.0, 1, 0, 1]), torch.tensor([-1.0, -3.0, -0.5, -2.0]), torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(r, torch.tensor([1 - 0.25 * 2 / 4, 1.0, 0.0, 1 - 0.25 * 1 / 4]))
    # noisy verifier backward correction: (1 − 0.1)/0.7, (0 − 0.1)/0.7
    torch.testing.assert_close(noisy_verifier_correction(torch.tensor([1.0, 0.0]), false_positive=0.1, false_negative=0.2), torch.tensor([0.9 / 0.7, -0.1 / 0.7]))
    # S-GRPO exits
    torch.testing.assert_close(s_grpo_rewards(torch.tensor([0.0, 1, 1, 0, 1])), torch.tensor([0.0, 1.0, 0.5, 0.0, 0.25]))
    # semantic entropy: clusters (2, 1, 1) of 4 → (−½ln½ − 2·¼ln¼)/ln4 = 0.75
    torch.testing.assert_close(semantic_entropy(["1", "1", "2", "3"], torch.zeros(4, dtype=torch.long)), torch.full((4,), 0.75))
    # GRPO-λ: group 0 is 3/4 correct → length-penalised; group 1 is 1/4 correct → plain 0/1
    out = grpo_lambda_rewards(torch.tensor([1.0, 1, 1, 0, 1, 0, 0, 0]), torch.tensor([2.0, 4, 6, 3, 9, 1, 1, 1]), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    torch.testing.assert_close(out, torch.tensor([1.0, 0.75, 0.5, 0.0, 1.0, 0.0, 0.0, 0.0]))


def test_tempo_prefix_tree_bonus():
    actions = torch.tensor([[5, 6], [5, 7], [8, 9]])
    bonus = tempo_token_bonus(actions, torch.ones(3, 2), torch.tensor([1.0, 0.0, 1.0]), torch.zeros(3, dtype=torch.long))
    # root V = 2/3 branches into "5" (V ½) and "8" (V 1); "5" branches into "5 6" (V 1) and "5 7" (V 0)
    expected = torch.tensor([[0.5 - 2 / 3, 0.5], [0.5 - 2 / 3, -0.5], [1 - 2 / 3, 0.0]])
    torch.testing.assert_close(bonus, expected)


def test_posterior_grpo_gates_process_reward():
    table = torch.tensor([[1.0, 0.5], [0.0, 0.9], [1.0, 0.2]])
    adv = make_estimator("posterior_grpo", std="none", clip=None)(AdvantageInputs(rewards=table[:, 0], group_ids=torch.zeros(3, dtype=torch.long), reward_table=table, reward_names=["out", "proc"]))
    r = torch.tensor([1.5, 0.0, 1.2])  # the wrong answer's 0.9 process reward is ignored
    torch.testing.assert_close(adv, r - r.mean())


def _traj():
    return Trajectories(
        prompts=["p"] * 4 + ["q"] * 4,
        group_ids=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
        log_probs=-torch.rand(8, 3, generator=torch.Generator().manual_seed(0)),
        mask=torch.ones(8, 3, dtype=torch.bool),
        actions=torch.tensor([[1, 2, 3], [1, 2, 4], [5, 2, 3], [1, 6, 3]] * 2),
        outputs=["7", "7", "8", "x"] * 2,
    )


LLM_ESTIMATORS = ["group", "ngrpo", "gdpo", "spo", "noisy_verifier", "unlikeliness", "seed_grpo", "grpo_lambda", "posterior_grpo", "s_grpo", "tempo", "trust_grpo"]


@pytest.mark.parametrize("name", LLM_ESTIMATORS)
def test_every_llm_estimator_on_the_same_inputs(name):
    traj = _traj()
    table = torch.tensor([[1.0, 0.2], [0.0, 0.9], [1.0, 0.4], [0.0, 0.1], [1.0, 0.3], [1.0, 0.8], [1.0, 0.5], [0.0, 0.0]])
    inputs = AdvantageInputs(rewards=table[:, 0], group_ids=traj.group_ids, reward_table=table, reward_names=["exact_match", "format"], traj=traj, prompts=traj.prompts)
    adv = make_estimator(name)(inputs)
    assert name in ADVANTAGES
    assert adv.shape in ((8,), (8, 3)) and torch.isfinite(adv).all()
    # correct answers never get a lower advantage than wrong ones of the same group (first token)
    first = adv if adv.dim() == 1 else adv[:, 0]
    for g in (0, 1):
        idx = (traj.group_ids == g).nonzero().flatten()
        right, wrong = idx[table[idx, 0] == 1], idx[table[idx, 0] == 0]
        if name not in ("tempo", "gdpo"):  # tempo: per-token bonus; gdpo: the 2nd column counts equally
            assert first[right].min() >= first[wrong].max() - 1e-6


def test_beta_tracker_state_dict_round_trip():
    t = BetaValueTracker()
    t.update(["x", "y", "x"], torch.tensor([1.0, 0.0, 0.0]))
    u = BetaValueTracker()
    u.load_state_dict(t.state_dict())
    assert u.value("x") == t.value("x") and u.value("y") == t.value("y") and u.value("new") == 0.5


def test_estimators_declare_the_per_sample_data_they_read():
    """What the trainer gathers for an estimator on several processes (reads_rows)."""
    from flowrl.advantages import estimator_reads, make_estimator, reads_rows

    expected = {
        "group": ((), ()), "spo": ((), ()), "unlikeliness": (("log_probs", "mask"), ()),
        "seed_grpo": (("outputs",), ("answers",)), "grpo_lambda": (("mask",), ()),
        "tempo": (("actions", "mask"), ()), "grpo_care": ((), ("care_confidence",)),
    }
    for name, reads in expected.items():
        assert estimator_reads(make_estimator(name)) == reads, name
    with pytest.raises(ValueError, match="no field"):
        reads_rows(traj=("log_prob",))  # a typo: Trajectories.log_probs
