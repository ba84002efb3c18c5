"""Answer extraction and comparison for verifiable rewards and answer-aware estimators.

Extraction (:func:`extract_answer`), in order: the last ``\\boxed{...}``, the last
``<answer>...</answer>``, text after a final "answer is"/"Answer:", else the last number in the
text. Normalisation (:func:`normalize_answer`): strips ``$``, spaces, thousands separators and a
trailing period; numbers compare by value, so ``"1,000" == "1000"``, ``"0.50" == "0.5" == "1/2"``,
``"3/4" == "0.75"``.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any


_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|[-+]?\.\d+")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth, j = 0, i
    while j < len(text):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


def extract_answer(text: str) -> str | None:
    """The final answer in a completion, or None (rules in the module docstring, first that applies)."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    tags = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S)
    if tags:
        return tags[-1].strip()
    m = re.search(r"(?:answer is|answer:)\s*(.+)$", text, flags=re.I | re.S)
    if m:
        tail = m.group(1).strip()
        nums = _NUMBER.findall(tail)
        if nums:
            return nums[0].strip()
        return tail.splitlines()[0].strip() if tail else None  # "The answer is" with nothing after it
    nums = _NUMBER.findall(text)
    return nums[-1].strip() if nums else None


def parse_number(text: str) -> Fraction | None:
    """``"1,000"`` → 1000, ``"0.50"`` → 1/2, ``"3/4"`` → 3/4, ``"\\frac{3}{4}"`` → 3/4; None if not a number."""
    s = text.strip().strip("$").replace(" ", "").rstrip(".")
    s = s.replace("\\!", "").replace("{,}", "")
    m = re.fullmatch(r"\\[dt]?frac\{([-+]?\d+)\}\{(\d+)\}", s)
    if m:
        s = f"{m.group(1)}/{m.group(2)}"
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if s.endswith("%"):
        return None
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return Fraction(int(num), int(den)) if int(den) != 0 else None
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def normalize_answer(text: str | None) -> str | None:
    """A canonical string: numbers as reduced fractions (``"3/4"``, ``"1000"``), other text
    lower-cased without spaces, ``$`` or a trailing period."""
    if text is None:
        return None
    num = parse_number(text)
    if num is not None:
        return str(num)
    return re.sub(r"\s+", "", text.strip().strip("$").rstrip(".")).lower()


def answers_match(prediction: str | None, truth: Any) -> bool:
    """True if the normalised prediction equals the normalised ground truth."""
    if prediction is None or truth is None:
        return False
    return normalize_answer(prediction) == normalize_answer(str(truth))
