"""Verifiable rewards: answer extraction and normalisation, exact match, format, length penalties."""

import pytest
import torch

torch.set_num_threads(1)

import flowrl.rewards as rewards  # noqa: E402
from flowrl.rewards.verifiers import (  # noqa: E402
    ExactMatch,
    FormatReward,
    LengthPenalty,
    answers_match,
    arithmetic_prompts,
    extract_answer,
    normalize_answer,
    overlong_penalty,
    solve_arithmetic,
)


@pytest.mark.parametrize(
    "text, answer",
    [
        ("The answer is 1,000.", "1000"),
        ("so \\boxed{\\frac{3}{4}} and 9", "3/4"),
        ("<think>2+2</think><answer> 0.50 </answer>", "1/2"),
        ("x = 5 then 7", "7"),
        ("Answer: 3/4", "3/4"),
        ("\\boxed{x^{2}}", "x^{2}"),
    ],
)
def test_extract_and_normalise(text, answer):
    assert normalize_answer(extract_answer(text)) == answer


def test_number_equivalences():
    assert answers_match("1,000", 1000) and answers_match("0.50", "1/2") and answers_match("3/4", "0.75")
    assert answers_match("$12$", "12.0") and not answers_match("12", "13") and not answers_match(None, "1")
    assert extract_answer("no digits here") is None


def test_exact_match_reward_with_meta_and_solver():
    r = ExactMatch()
    got = r(["The answer is 7", "\\boxed{8}", "nothing"], ["p"] * 3, {"answer": ["7", "7", "7"]})
    assert got.tolist() == [1.0, 0.0, 0.0] and got.dtype == torch.float32
    with pytest.raises(ValueError, match="ground truth"):
        r(["7"], ["p"], None)
    solved = ExactMatch(solver="arithmetic")(["7", "12", "-3"], ["What is 3 + 4 ?", "What is 3 * 4 ?", "What is 1 - 4 ?"])
    assert solved.tolist() == [1.0, 1.0, 1.0]
    mapped = ExactMatch(answers={"q": "0.25"})(["1/4"], ["q"])
    assert mapped.tolist() == [1.0]
    strict = ExactMatch(require_format=True)(["7", "<answer>7</answer>"], ["p", "p"], {"answer": "7"})
    assert strict.tolist() == [0.0, 1.0]


def test_exact_match_answers_file(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"prompt": "a", "answer": "3/4"}\n{"prompt": "b", "answer": 2}\n')
    assert ExactMatch(answers=str(path))(["0.75", "2.0"], ["a", "b"]).tolist() == [1.0, 1.0]


def test_format_reward():
    r = FormatReward()
    assert r(["<think>hm</think> <answer>3</answer>", "<answer>3</answer>", "3", "<answer>3</answer> extra"], ["p"] * 4).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert FormatReward(pattern="boxed")(["\\boxed{3}", "3"], ["p"] * 2).tolist() == [1.0, 0.0]


def test_overlong_penalty_hand_values():
    # DAPO: L_max 20, L_cache 5 → 0 up to 15, (15 − ℓ)/5 inside, −1 beyond 20
    got = overlong_penalty(torch.tensor([10.0, 15, 16, 20, 21]), max_length=20, cache_length=5)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.2, -1.0, -1.0]))
    r = LengthPenalty(max_length=20, cache_length=5)
    assert r(["a"] * 2, ["p"] * 2, {"completion_length": torch.tensor([16, 3])}).tolist() == pytest.approx([-0.2, 0.0])
    assert LengthPenalty(max_length=4, mode="linear")(["a b", "a b c d"], ["p"] * 2).tolist() == [-0.5, -1.0]
    with pytest.raises(ValueError, match="mode"):
        LengthPenalty(mode="nope")


def test_registered_names_and_reward_set():
    names = {"exact_match": ExactMatch, "format": FormatReward, "length_penalty": LengthPenalty}
    for name, cls in names.items():
        assert isinstance(rewards.get(name), cls)
    rs = rewards.build_rewards({"exact_match": {"weight": 1.0, "solver": "arithmetic"}, "format": 0.5})
    table, cols = rs.score(["<answer>7</answer>", "6"], ["What is 3 + 4 ?", "What is 3 + 4 ?"], {})
    assert cols == ["exact_match", "format"] and table.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    torch.testing.assert_close(rs.combine(table, cols), torch.tensor([1.5, 0.0]))


def test_arithmetic_prompts_split():
    train, test = arithmetic_prompts("train"), arithmetic_prompts("test")
    assert len(train) == 240 and len(test) == 60 and not set(train) & set(test)
    assert solve_arithmetic("What is 9 * 9 ?") == "81" and solve_arithmetic("What is 3 / 4 ?") == "3/4"


def test_answer_cue_with_nothing_after_it_is_no_answer():
    from flowrl.rewards.verifiers import extract_answer

    assert extract_answer("The answer is   ") is None
    assert extract_answer("answer:\n") is None
