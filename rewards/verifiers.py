"""Verifiable rewards for language-model RL: exact answers, output format, completion length.

Each reward is called as ``reward(outputs: list[str], prompts: list[str], meta) -> Tensor[B]``;
``meta["answer"]`` carries the ground truth, one entry per sample (the trainer repeats each
prompt's answer for its group). Registered as ``exact_match``, ``format`` and ``length_penalty``.

Answer extraction (:func:`extract_answer`), in order: the last ``\\boxed{...}``, the last
``<answer>...</answer>``, text after a final "answer is"/"Answer:", else the last number in the
text. Normalisation (:func:`normalize_answer`): strips ``$``, spaces, thousands separators and a
trailing period; numbers compare by value, so ``"1,000" == "1000"``, ``"0.50" == "0.5" == "1/2"``,
``"3/4" == "0.75"``.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any, Sequence

import torch
from torch import Tensor

from flowrl.answers import _NUMBER, _last_boxed, answers_match, extract_answer, normalize_answer, parse_number  # noqa: F401  (re-exported)
from flowrl.rewards.base import Reward, register

def _load_answers(path: str) -> dict[str, Any]:
    """prompt → answer from a JSON object, a JSON list of rows or JSONL rows ``{"prompt", "answer"}``."""
    import json
    from pathlib import Path

    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        return {str(k): v for k, v in data.items()}
    return {str(row["prompt"]): row["answer"] for row in data}


def _answers(meta: dict | None, n: int, key: str) -> Sequence[Any]:
    if not meta or key not in meta:
        raise ValueError(f"this reward compares with ground truth: pass meta['{key}'] with one answer per sample ({n}).")
    answers = meta[key]
    if isinstance(answers, (str, int, float)):
        answers = [answers] * n
    if len(answers) != n:
        raise ValueError(f"meta['{key}'] has {len(answers)} entries for {n} completions; give one per sample.")
    return answers


_ARITH = re.compile(r"(-?\d+)\s*([-+*/x×])\s*(-?\d+)")


def solve_arithmetic(prompt: str) -> str | None:
    """The answer of the first ``a op b`` in ``prompt`` (``+ - * / x ×``), as a normalised string."""
    m = _ARITH.search(prompt)
    if m is None:
        return None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    if op == "+":
        return str(a + b)
    if op == "-":
        return str(a - b)
    if op in "*x×":
        return str(a * b)
    return str(Fraction(a, b)) if b != 0 else None


def arithmetic_prompts(split: str | None = "train", *, seed: int = 0, ops: str = "+-*", test_fraction: float = 0.2) -> list[str]:
    """Single-digit arithmetic prompts ``"What is a op b ?"`` (a, b ∈ 0…9), a fixed shuffled split
    (``train`` / ``test`` / None for all); answers via :func:`solve_arithmetic`."""
    import random

    prompts = [f"What is {a} {op} {b} ?" for op in ops for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(prompts)
    n_test = int(len(prompts) * test_fraction)
    if split in (None, "all"):
        return prompts
    if split == "test":
        return prompts[:n_test]
    if split == "train":
        return prompts[n_test:]
    raise ValueError(f"unknown arithmetic split '{split}'. Known: train, test, all.")


try:  # the set is selectable as ``train.prompts: arith:train`` where prompt sets exist
    from flowrl.prompts import register_prompt_set

    # rows carry their answer: exact_match finds it in meta["answer"] with no solver configured
    register_prompt_set("arith", lambda split: [{"prompt": p, "answer": solve_arithmetic(p)} for p in arithmetic_prompts(split)])
except (ImportError, ValueError):  # pragma: no cover - older checkout / already registered
    pass


@register("exact_match")
class ExactMatch(Reward):
    """1 if the extracted final answer equals the ground truth after normalisation, else 0.

    The ground truth of a sample comes from, in order: ``meta[answer_key]`` (one per sample),
    ``answers`` (a dict prompt → answer, or a JSON/JSONL file of ``{"prompt", "answer"}`` rows), or
    ``solver`` (``"arithmetic"``: compute it from the prompt, :func:`solve_arithmetic`).

    Args:
        answer_key: the meta key holding ground truths.
        answers: prompt → answer mapping or a path to one.
        solver: derive the answer from the prompt (``"arithmetic"``), or None.
        require_format: only accept answers inside ``\\boxed{}`` or ``<answer>`` tags (else the last
            number anywhere counts).
    """

    name = "exact_match"
    modalities = ("text",)
    scale = "0/1 correctness"

    def __init__(self, *, answer_key: str = "answer", answers: dict[str, Any] | str | None = None, solver: str | None = None, require_format: bool = False):
        if solver not in (None, "arithmetic"):
            raise ValueError(f"unknown exact_match solver '{solver}'. Known: arithmetic (or None).")
        self.answer_key = answer_key
        self.answers = _load_answers(answers) if isinstance(answers, str) else dict(answers or {})
        self.solver = solver
        self.require_format = require_format

    def truths(self, prompts: list[str], meta: dict | None) -> list[Any]:
        if meta and meta.get(self.answer_key) is not None:
            return list(_answers(meta, len(prompts), self.answer_key))
        out = []
        for p in prompts:
            if p in self.answers:
                out.append(self.answers[p])
            elif self.solver == "arithmetic":
                out.append(solve_arithmetic(p))
            else:
                raise ValueError(
                    f"exact_match has no ground truth for prompt {p!r}: pass meta['{self.answer_key}'], "
                    "answers={prompt: answer} (or a JSON/JSONL file), or solver='arithmetic'."
                )
        return out

    def __call__(self, outputs: list[str], prompts: list[str], meta: dict | None = None) -> Tensor:
        truths = self.truths(list(prompts), meta)
        scores = []
        for text, truth in zip(outputs, truths):
            if self.require_format and _last_boxed(text) is None and "<answer>" not in text:
                scores.append(0.0)
                continue
            scores.append(1.0 if answers_match(extract_answer(text), truth) else 0.0)
        return torch.tensor(scores, dtype=torch.float32)


@register("format")
class FormatReward(Reward):
    """1 if the completion matches ``pattern`` (a regex, full match after stripping), else 0.

    The default asks for ``<think>…</think>`` (optional) followed by ``<answer>…</answer>``, the
    DeepSeek-R1 format; ``pattern="boxed"`` asks for a ``\\boxed{}`` anywhere.
    """

    name = "format"
    modalities = ("text",)
    scale = "0/1 format"
    DEFAULT = r"(?:<think>.*?</think>\s*)?<answer>.*?</answer>"

    def __init__(self, *, pattern: str | None = None):
        self.pattern = pattern or self.DEFAULT

    def __call__(self, outputs: list[str], prompts: list[str], meta: dict | None = None) -> Tensor:
        if self.pattern == "boxed":
            return torch.tensor([1.0 if _last_boxed(o) is not None else 0.0 for o in outputs])
        rx = re.compile(self.pattern, flags=re.S)
        return torch.tensor([1.0 if rx.fullmatch(o.strip()) else 0.0 for o in outputs])


def overlong_penalty(length: Tensor, *, max_length: int, cache_length: int) -> Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025, eq. 13): 0 for ℓ ≤ L_max − L_cache;
    ((L_max − L_cache) − ℓ)/L_cache inside the cache window; −1 beyond L_max."""
    length = length.float()
    start = max_length - cache_length
    out = torch.zeros_like(length)
    inside = (length > start) & (length <= max_length)
    out[inside] = (start - length[inside]) / cache_length
    out[length > max_length] = -1.0
    return out


@register("length_penalty")
class LengthPenalty(Reward):
    """A penalty (≤ 0) for long completions.

    Lengths come from ``meta["completion_length"]`` (tokens, as :class:`~flowrl.TokenPolicy`
    reports them) when present, else whitespace-separated words.

    - ``mode="overlong"`` (DAPO): :func:`overlong_penalty` with ``max_length`` / ``cache_length``;
    - ``mode="linear"``: −ℓ/max_length.
    """

    name = "length_penalty"
    modalities = ("text",)
    scale = "[-1, 0]"

    def __init__(self, *, max_length: int = 64, cache_length: int = 16, mode: str = "overlong"):
        if mode not in ("overlong", "linear"):
            raise ValueError(f"unknown length_penalty mode '{mode}'. Known: overlong, linear.")
        if mode == "overlong" and not 0 < cache_length <= max_length:
            raise ValueError(f"cache_length must be in (0, max_length]; got {cache_length} with max_length {max_length}.")
        self.max_length, self.cache_length, self.mode = max_length, cache_length, mode

    def __call__(self, outputs: list[str], prompts: list[str], meta: dict | None = None) -> Tensor:
        if meta and meta.get("completion_length") is not None:
            length = torch.as_tensor(meta["completion_length"], dtype=torch.float32).reshape(-1)
        else:
            length = torch.tensor([len(o.split()) for o in outputs], dtype=torch.float32)
        if self.mode == "linear":
            return -length / self.max_length
        return overlong_penalty(length, max_length=self.max_length, cache_length=self.cache_length)


__all__ = [
    "ExactMatch",
    "FormatReward",
    "LengthPenalty",
    "extract_answer",
    "normalize_answer",
    "parse_number",
    "answers_match",
    "overlong_penalty",
    "solve_arithmetic",
    "arithmetic_prompts",
]
