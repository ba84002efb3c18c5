"""Pref-GRPO win rates: turn scores or a pairwise judge into per-sample win rates in a group.

``win_rate_i = (#{j ≠ i : s_j < s_i} + 0.5 · #{j ≠ i : s_j = s_i}) / (N − 1)`` (Pref-GRPO, Wang et
al. 2025: the reward of an image is its win rate against the other members of its group).

A pairwise judge is ``judge(image_a, image_b, prompt) -> float in [0, 1]`` = P(first is better);
VLM judges answer 1 ("Image 1 is better"), 0, or 0.5 (tie / unparseable).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

ORDERS = ("random", "both", "fixed")


def win_rates(scores: Tensor) -> Tensor:
    """Win rate of each of the N scores against the other N−1 (ties count ½). ``[N] -> [N]``.

    A group of one has no opponents: its win rate is defined as 0.5.
    """
    s = torch.as_tensor(scores, dtype=torch.float32).flatten()
    n = s.numel()
    if n == 1:
        return torch.full((1,), 0.5)
    lower = (s[None, :] < s[:, None]).sum(dim=1).float()  # row i: #j with s_j < s_i
    ties = (s[None, :] == s[:, None]).sum(dim=1).float() - 1  # minus self
    return (lower + 0.5 * ties) / (n - 1)


def _judge(judge: Callable[..., Any], a: Any, b: Any, prompt: str) -> float:
    p = float(judge(a, b, prompt))
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"pairwise judge returned {p}; it must return P(first is better) in [0, 1] (tie = 0.5).")
    return p


def pairwise_win_rates(
    judge: Callable[[Any, Any, str], float],
    images: Tensor | Sequence[Any],
    prompt: str,
    *,
    order: str = "random",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Win rates of N images of one prompt from a pairwise judge over all N(N−1)/2 pairs.

    ``order``: ``"random"`` shows each pair in a random order (coin from ``generator``) to average
    out position bias; ``"both"`` asks both orders and averages ``p(a,b)`` with ``1 − p(b,a)``
    (twice the calls); ``"fixed"`` always shows the lower index first. ``[N]`` float32.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown order '{order}'. Known: {', '.join(ORDERS)}.")
    n = len(images)
    if n == 1:
        return torch.full((1,), 0.5)
    wins = torch.zeros(n)
    for i in range(n):
        for j in range(i + 1, n):
            if order == "both":
                p_i = 0.5 * (_judge(judge, images[i], images[j], prompt) + 1.0 - _judge(judge, images[j], images[i], prompt))
            elif order == "random" and bool(torch.randint(0, 2, (1,), generator=generator)):
                p_i = 1.0 - _judge(judge, images[j], images[i], prompt)
            else:
                p_i = _judge(judge, images[i], images[j], prompt)
            wins[i] += p_i
            wins[j] += 1.0 - p_i
    return wins / (n - 1)
