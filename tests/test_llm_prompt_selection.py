"""Prompt selection: uniform epochs, DAPO dynamic filtering with refill, SPO prioritised sampling."""

import math

import pytest
import torch

torch.set_num_threads(1)

from flowrl.advantages import BetaValueTracker  # noqa: E402
from flowrl.policy import Trajectories  # noqa: E402
from flowrl.prompt_selection import PROMPT_SELECTORS, fill_batch, informative_groups, make_selector  # noqa: E402


def test_uniform_covers_every_prompt_each_epoch_and_resumes():
    sel = make_selector("uniform", 5)
    g = torch.Generator().manual_seed(0)
    first = sel.sample(5, g)
    assert sorted(first) == [0, 1, 2, 3, 4]
    state = sel.state_dict()
    g_state = g.get_state()
    a = sel.sample(7, g)
    sel2 = make_selector("uniform", 5)
    sel2.load_state_dict(state)
    g2 = torch.Generator()
    g2.set_state(g_state)
    assert sel2.sample(7, g2) == a


def test_informative_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    g = torch.tensor([0, 0, 1, 1, 2, 2])
    assert informative_groups(r, g).tolist() == [False, False, False, False, True, True]


def _fake_generate(correct_by_prompt, group_size=2):
    """generate(indices) → (traj, rewards): prompt i's group gets rewards correct_by_prompt[i]."""

    def generate(indices):
        rows = len(indices) * group_size
        traj = Trajectories(
            prompts=[f"p{i}" for i in indices for _ in range(group_size)],
            group_ids=torch.arange(len(indices)).repeat_interleave(group_size),
            log_probs=torch.zeros(rows, 1),
            mask=torch.ones(rows, 1, dtype=torch.bool),
            outputs=[f"o{i}" for i in indices for _ in range(group_size)],
        )
        rewards = torch.tensor([r for i in indices for r in correct_by_prompt[i]], dtype=torch.float32)
        return traj, rewards

    return generate


def test_dapo_dynamic_sampling_refills():
    # prompts 0,1 are always solved, 2,3 never, 4,5,6,7 mixed: only mixed groups may be kept
    pattern = {0: [1, 1], 1: [1, 1], 2: [0, 0], 3: [0, 0], 4: [1, 0], 5: [0, 1], 6: [1, 0], 7: [0, 1]}
    sel = make_selector("dapo", 8)
    traj, rewards, idx, metrics = fill_batch(sel, _fake_generate(pattern), 3, generator=torch.Generator().manual_seed(0))
    assert len(traj) == 6 and set(idx) <= {4, 5, 6, 7} and len(set(idx)) == 3
    assert traj.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert [p for p in traj.prompts] == [f"p{i}" for i in idx]
    assert metrics["select/kept"] == 3 and metrics["select/rounds"] >= 2  # the first 3 prompts cannot all be mixed
    assert informative_groups(rewards, traj.group_ids).all()
    # uniform keeps the first draw whatever the rewards
    traj_u, _, _, m_u = fill_batch(make_selector("uniform", 8), _fake_generate(pattern), 3, generator=torch.Generator().manual_seed(0))
    assert len(traj_u) == 6 and m_u["select/rounds"] == 1


def test_dapo_gives_up_with_a_clear_error():
    sel = make_selector("dapo", 2)
    with pytest.raises(RuntimeError, match="kept no group"):
        fill_batch(sel, _fake_generate({0: [1, 1], 1: [0, 0]}), 1, max_rounds=3)


def test_spo_priorities_follow_sqrt_p_one_minus_p():
    sel = make_selector("spo", 3, prompts=["a", "b", "c"])
    sel.tracker.alpha.update({"a": 1.0, "b": 9.0})
    sel.tracker.beta.update({"a": 1.0, "b": 1.0})
    w = sel.weights()
    # a: p = ½ → ½ + 0.05; b: p = 0.9 → √0.09 + 0.05 = 0.35; c: unseen (prior ½) → 0.55
    torch.testing.assert_close(w, torch.tensor([0.55, 0.35, 0.55], dtype=torch.float64))
    counts = torch.zeros(3)
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        counts[sel.sample(1, g)[0]] += 1
    assert counts[1] / 2000 == pytest.approx(0.35 / 1.45, abs=0.03)
    assert sorted(sel.sample(3, g)) == [0, 1, 2]  # without replacement


def test_spo_selector_updates_own_or_shared_tracker():
    own = make_selector("spo", 2)
    own.update([0, 0, 1], torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0, 0, 1]))
    assert own.tracker.value("0") > 0.5 > own.tracker.value("1")
    shared = BetaValueTracker()
    sel = make_selector("spo", 2, tracker=shared, prompts=["x", "y"])
    sel.update([0], torch.tensor([1.0]), torch.tensor([0]))
    assert shared.alpha == {}  # the SPO estimator updates a shared tracker, not the selector
    shared.update(["x"], torch.tensor([1.0]))
    assert sel.weights()[0] != sel.weights()[1]
    assert set(PROMPT_SELECTORS.names()) >= {"uniform", "dapo", "spo"}
    assert math.isclose(float(sel.weights()[1]), 0.55)
