"""Pref-GRPO win rates: turn scores or a pairwise judge into per-sample win rates in a group.

``win_rate_i = (#{j ≠ i : s_j < s_i} + 0.5 · #{j ≠ i : s_j = s_i}) / (N − 1)`` (Pref-GRPO, Wang et
al. 2025: the reward of an image is its win rate against the other members of its group).

A pairwise judge is ``judge(image_a, image_b, prompt) -> float in [0, 1]`` = P(first is better);
VLM judges answer 1 ("Image 1 is better"), 0, or 0.5 (tie / unparseable).
"""

from __future__ import annotations

import math

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


def _checked(p: Any) -> float:
    p = float(p)
    if math.isnan(p):  # a failed comparison: the win rates of both members become NaN (counted as failed)
        return p
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"pairwise judge returned {p}; it must return P(first is better) in [0, 1] (tie = 0.5).")
    return p


def _judge(judge: Callable[..., Any], a: Any, b: Any, prompt: str) -> float:
    return _checked(judge(a, b, prompt))


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
    # one implementation: the batched one calls a judge without ``judge_batch`` pair by pair
    return pairwise_win_rates_batched(judge, images, prompt, order=order, generator=generator)


# ====================================================================================== Pref-GRPO
# A judge protocol with two implementations (a local model, a VLM behind an OpenAI-compatible API),
# a reward that turns any judge into in-group win rates, and the `win_rate` reward transform that
# turns any pointwise column into win rates (so Pref-GRPO composes with any GRPO-type preset).

import hashlib  # noqa: E402
from typing import Protocol, runtime_checkable  # noqa: E402

from .base import Reward, group_zscore, register  # noqa: E402


@runtime_checkable
class PairwiseJudge(Protocol):
    """``judge(a, b, prompt) -> P(a is better) in [0, 1]`` (1 = first wins, 0 = second, 0.5 = tie or
    an unparseable answer). Optionally ``judge_batch(firsts, seconds, prompts) -> list[float]`` to
    answer many pairs at once (concurrent requests, one model forward)."""

    def __call__(self, a: Any, b: Any, prompt: str) -> float: ...


def _judge_many(judge: Callable[..., Any], firsts: list[Any], seconds: list[Any], prompts: list[str]) -> list[float]:
    batch = getattr(judge, "judge_batch", None)
    if batch is not None:
        return [_checked(p) for p in batch(firsts, seconds, prompts)]
    return [_judge(judge, a, b, p) for a, b, p in zip(firsts, seconds, prompts)]


def pairwise_win_rates_batched(
    judge: Callable[[Any, Any, str], float],
    images: Tensor | Sequence[Any],
    prompt: str,
    *,
    order: str = "random",
    generator: torch.Generator | None = None,
) -> Tensor:
    """:func:`pairwise_win_rates` with every comparison of the group sent in one ``judge_batch`` call
    (when the judge has one). Same coin sequence, so the same result as the one-by-one version."""
    if order not in ORDERS:
        raise ValueError(f"unknown order '{order}'. Known: {', '.join(ORDERS)}.")
    n = len(images)
    if n == 1:
        return torch.full((1,), 0.5)
    pairs, firsts, seconds = [], [], []
    for i in range(n):
        for j in range(i + 1, n):
            if order == "both":
                pairs.append((i, j, "both"))
                firsts += [images[i], images[j]]
                seconds += [images[j], images[i]]
            elif order == "random" and bool(torch.randint(0, 2, (1,), generator=generator)):
                pairs.append((i, j, "swapped"))
                firsts.append(images[j])
                seconds.append(images[i])
            else:
                pairs.append((i, j, "fixed"))
                firsts.append(images[i])
                seconds.append(images[j])
    answers = iter(_judge_many(judge, firsts, seconds, [prompt] * len(firsts)))
    wins = torch.zeros(n)
    for i, j, how in pairs:
        if how == "both":
            p_i = 0.5 * (next(answers) + 1.0 - next(answers))
        elif how == "swapped":
            p_i = 1.0 - next(answers)
        else:
            p_i = next(answers)
        wins[i] += p_i
        wins[j] += 1.0 - p_i
    return wins / (n - 1)


def group_win_rates(scores: Tensor, group_ids: Tensor) -> Tensor:
    """:func:`win_rates` inside each group: ``[B] -> [B]`` (rank-based, group mean 0.5).
    NaN scores stay NaN and are not opponents."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    out = torch.full_like(scores, float("nan"))
    for g in torch.unique(group_ids):
        idx = (group_ids == g).nonzero(as_tuple=True)[0]
        ok = idx[torch.isfinite(scores[idx])]
        if len(ok):
            out[ok] = win_rates(scores[ok])
    return out


def is_win_rate_column(name: str) -> bool:
    """Columns already holding in-group win rates (a pairwise judge's output): ``<reward>/win_rate``."""
    return name == "win_rate" or name.endswith("/win_rate")


def win_rate_transform(table: Tensor, names: Sequence[str], group_ids: Tensor, traj: Any = None, *, zscore: bool = True, eps: float = 1e-4) -> tuple[Tensor, list[str]]:
    """Pref-GRPO reward transform: every column becomes in-group win rates (columns named
    ``*/win_rate`` already are), then — ``zscore=True`` — each column is z-scored inside its group, so
    the weighted sum that follows (``reward.combine``; ``gdpo`` re-normalises it over the batch) is a
    sum of per-reward z-scores. Advantages are then invariant to any monotone transform of a
    scalar judge. ``[B, K] -> [B, K]``; names unchanged."""
    group_ids = torch.as_tensor(group_ids)
    cols = []
    for k, name in enumerate(names):
        col = table[:, k].float()
        col = col if is_win_rate_column(name) else group_win_rates(col, group_ids)
        cols.append(group_zscore(col, group_ids, eps=eps) if zscore else col)
    return (torch.stack(cols, dim=1) if cols else table), list(names)


def _register_transform() -> None:
    from flowrl.plugins import REWARD_TRANSFORMS

    if "win_rate" not in REWARD_TRANSFORMS:
        REWARD_TRANSFORMS.register("win_rate", win_rate_transform)


class PointwiseJudge:
    """A local pairwise judge from any pointwise reward: P(a better) = 1 if r(a) > r(b) + margin,
    0 if r(b) > r(a) + margin, else 0.5. ``judge_batch`` scores each distinct image once."""

    def __init__(self, reward: Callable[..., Any], *, margin: float = 0.0):
        self.reward, self.margin = reward, float(margin)
        self.last_by_id: dict[int, float] = {}

    def _compare(self, ra: Tensor, rb: Tensor) -> list[float]:
        d = ra.float() - rb.float()
        return torch.where(d > self.margin, 1.0, torch.where(d < -self.margin, 0.0, 0.5)).tolist()

    def __call__(self, a: Tensor, b: Tensor, prompt: str) -> float:
        s = torch.as_tensor(self.reward(torch.stack([a, b]), [prompt, prompt])).flatten()
        return self._compare(s[:1], s[1:])[0]

    def judge_batch(self, firsts: list[Tensor], seconds: list[Tensor], prompts: list[str]) -> list[float]:
        uniq: dict[int, int] = {}
        imgs, ps = [], []
        for x, p in zip(list(firsts) + list(seconds), list(prompts) * 2):
            if id(x) not in uniq:
                uniq[id(x)] = len(imgs)
                imgs.append(x)
                ps.append(p)
        s = torch.as_tensor(self.reward(torch.stack(imgs), ps)).flatten()
        self.last_by_id = {key: float(s[pos]) for key, pos in uniq.items()}
        ia = torch.tensor([uniq[id(x)] for x in firsts])
        ib = torch.tensor([uniq[id(x)] for x in seconds])
        return self._compare(s[ia], s[ib])


class ModelPairwiseJudge:
    """A local pairwise model: ``model(a [P, ...], b [P, ...]) -> logits [P]`` of P(a better);
    answers sigmoid(logit) (``hard=True``: 1/0/0.5 by sign)."""

    def __init__(self, model: Callable[[Tensor, Tensor], Tensor], *, hard: bool = False):
        self.model, self.hard = model, hard

    @torch.no_grad()
    def judge_batch(self, firsts: list[Tensor], seconds: list[Tensor], prompts: list[str]) -> list[float]:
        z = torch.as_tensor(self.model(torch.stack(list(firsts)), torch.stack(list(seconds)))).float().flatten()
        p = torch.where(z > 0, 1.0, torch.where(z < 0, 0.0, 0.5)) if self.hard else torch.sigmoid(z)
        return p.tolist()

    def __call__(self, a: Tensor, b: Tensor, prompt: str) -> float:
        return self.judge_batch([a], [b], [prompt])[0]


def _groups_of(prompts: Sequence[str], meta: dict | None, n: int) -> Tensor:
    gids = (meta or {}).get("group_ids")
    if gids is not None and len(gids) == n:
        return torch.as_tensor(gids)
    out, g = [], -1
    for i, p in enumerate(prompts):  # contiguous runs of one prompt (the rollout layout)
        g += 1 if i == 0 or p != prompts[i - 1] else 0
        out.append(g)
    return torch.tensor(out)


@register("pairwise_judge")
class PairwiseJudgeReward(Reward):
    """Pref-GRPO reward: in-group win rates from a pairwise judge over all N(N−1)/2 pairs.

    ``judge``: ``"vlm"`` (:class:`~flowrl.rewards.vlm_judge.VLMPairwiseJudge` behind an
    OpenAI-compatible API; ``judge_options`` are its arguments: ``base_url``, ``model``,
    ``timeout``, ``max_retries``, ``max_concurrency``...), the name of any pointwise reward (compared
    pairwise: :class:`PointwiseJudge`; its score is also returned as the component ``score`` with
    weight 0, logged but unused, since win rates always average 0.5), or a dotted path to a judge
    class. ``order``: random (default; a coin per pair, seeded by ``seed`` and the group's content,
    so reruns and resumes agree), both (ask both orders and average), or fixed.
    Groups come from ``meta["group_ids"]`` (the trainer passes them), else runs of equal prompts.
    Returns ``{"win_rate": [B]}`` (column ``pairwise_judge/win_rate``, which the ``win_rate``
    transform keeps as is).
    """

    name = "pairwise_judge"
    scale = "win rate in [0, 1], group mean 0.5"
    isolate_failures = False  # a win rate needs the whole group; one sample alone has no opponent

    def __init__(self, judge: str = "vlm", *, order: str = "random", seed: int = 0, margin: float = 0.0, judge_options: dict | None = None, **options: Any):
        if order not in ORDERS:
            raise ValueError(f"unknown order '{order}'. Known: {', '.join(ORDERS)}.")
        opts = {**(judge_options or {}), **options}
        self.order, self.seed, self.pointwise = order, int(seed), False
        if judge == "vlm":
            from .vlm_judge import VLMPairwiseJudge

            self.judge = VLMPairwiseJudge(**opts)
        elif ":" in judge and not _is_reward_name(judge):
            from flowrl.registry import load_dotted

            self.judge = load_dotted(judge)(**opts)
        else:
            from .base import get

            self.judge = PointwiseJudge(get(judge, **opts), margin=margin)
            self.pointwise = True
            self.component_weights = {"win_rate": 1.0, "score": 0.0}

    def _generator(self, prompt: str, images: Tensor) -> torch.Generator:
        h = hashlib.sha256(f"{self.seed}|{prompt}|".encode() + images.detach().float().cpu().contiguous().numpy().tobytes()).digest()
        return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))

    def __call__(self, outputs: Tensor, prompts: list[str], meta: dict | None = None) -> dict[str, Tensor]:
        n = len(prompts)
        gids = _groups_of(prompts, meta, n)
        rates = torch.full((n,), 0.5)
        scores = torch.full((n,), float("nan"))
        for g in torch.unique(gids):
            idx = (gids == g).nonzero(as_tuple=True)[0]
            images = [outputs[i] for i in idx.tolist()]
            prompt = prompts[int(idx[0])]
            rates[idx] = pairwise_win_rates_batched(self.judge, images, prompt, order=self.order, generator=self._generator(prompt, outputs[idx]))
            if self.pointwise and len(idx) > 1:
                scores[idx] = torch.tensor([self.judge.last_by_id.get(id(x), float("nan")) for x in images])
        if self.pointwise:
            return {"win_rate": rates, "score": scores}
        return {"win_rate": rates}

    def metrics(self) -> dict[str, float]:
        fn = getattr(self.judge, "metrics", None)
        return dict(fn()) if callable(fn) else {}

    # a remote judge's failure semantics (flowrl.rewards.remote): health check, URL, limits, last error
    @property
    def endpoint(self) -> str | None:
        return getattr(self.judge, "endpoint", None)

    def health_check(self) -> None:
        fn = getattr(self.judge, "health_check", None)
        if callable(fn):
            fn()

    def describe_limits(self) -> str | None:
        fn = getattr(self.judge, "describe_limits", None)
        return fn() if callable(fn) else None

    def last_error(self) -> str | None:
        fn = getattr(self.judge, "last_error", None)
        return fn() if callable(fn) else None


def _is_reward_name(name: str) -> bool:
    from .base import REWARDS

    return name in REWARDS


_register_transform()
