"""GRPO-CARE's slowly moving reference and answer confidence, as a training objective.

Chen et al., "GRPO-CARE: Consistency-Aware Reinforcement Learning for Multimodal Reasoning" (2025):
GRPO without the KL term; instead a consistency bonus (``flowrl.advantages.care_bonus``) for accurate
answers whose likelihood under a slowly moving reference — an EMA of the trained weights, decay 0.995
applied every 10 optimizer steps, starting from the initial weights — is at least the mean of the
group's accurate answers (minus a margin). The likelihood is exp(mean log p) of the answer tokens
given the prompt and the member's own reasoning, capped at 0.95.

Answer tokens are those whose text lies after an answer-start tag (``<answer>``) and before the
closing tag, both found on the decoded completion (a tag may span several tokens); a completion
without the tag is scored on all its tokens but its end-of-sequence token (the released code scores
such a completion with an empty span, i.e. confidence 1 → the cap; they rarely carry accuracy).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flowrl.plugins import OBJECTIVES


def answer_span_mask(token_texts: list[list[str]], mask: Tensor, *, start: str = "<answer>", end: str = "</answer>") -> Tensor:
    """``[B, T]`` bool: the tokens that carry text between the first ``start`` tag and the next
    ``end`` tag (or the completion's end), found on the completion's text.

    ``token_texts[i]`` holds each token's decoded text; their concatenation is the completion, and
    token t covers the characters [o_t, o_{t+1}) of it (o: cumulative lengths). The tags are
    searched in the joined text, so a tag split over several tokens is found (a byte-level BPE
    such as Qwen2's splits ``<answer>`` into ``'><'``, ``'answer'``, ``'>'``; matching one token
    containing the tag misses it). A token is in the span when its characters overlap the text
    strictly after the start tag and before the end tag; a token holding only tag characters is
    not. Without ``start``, every masked token but the last (the end-of-sequence token) — or the
    single token of a one-token completion."""
    B, T = mask.shape
    out = torch.zeros(B, T, dtype=torch.bool)
    lengths = mask.bool().sum(-1).tolist()
    for i, texts in enumerate(token_texts):
        n = int(lengths[i])
        pieces = list(texts[:n])
        joined = "".join(pieces)
        offsets = [0]
        for piece in pieces:
            offsets.append(offsets[-1] + len(piece))
        at = joined.find(start)
        if at < 0:
            out[i, : max(n - 1, 1) if n else 0] = True
            continue
        lo = at + len(start)
        close = joined.find(end, lo)
        hi = close if close >= 0 else len(joined)
        for t in range(n):
            if offsets[t + 1] > lo and offsets[t] < hi:
                out[i, t] = True
    return out & mask.bool()


def answer_confidence(log_probs: Tensor, span: Tensor, *, upper_bound: float | None = 0.95) -> Tensor:
    """exp(mean log p over the answer span) per row, capped at ``upper_bound``; ``[B, T] → [B]``.
    An empty span gives exp(0) = 1 (then the cap), as the released code."""
    span = span.float()
    mean = (log_probs.float() * span).sum(-1) / (span.sum(-1) + 1e-6)
    conf = torch.exp(mean)
    return conf.clamp(max=upper_bound) if upper_bound is not None else conf


@OBJECTIVES.register("grpo_care")
class GRPOCareObjective:
    """The policy-gradient objective plus GRPO-CARE's EMA reference: ``before_advantages`` (called by
    the trainer after the rewards, before the advantages) scores each completion's answer with the EMA
    weights into ``traj.meta["care_confidence"]``; ``on_update`` moves the EMA every ``update_every``
    optimizer steps, θ_ref ← decay·θ_ref + (1 − decay)·θ. The EMA covers the trainable parameters (the
    LoRA weights, or all weights of a full fine-tune). Stateful: the EMA and the step count are
    checkpointed."""

    #: the update is :func:`~flowrl.objectives.policy_gradient_objective`'s (old log-probs from its evaluation when exact)
    old_log_probs_from_current = True

    def __init__(self, *, decay: float = 0.995, update_every: int = 10, confidence_upper_bound: float | None = 0.95, answer_start: str = "<answer>", answer_end: str = "</answer>"):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"grpo_care decay must be in [0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"grpo_care update_every must be ≥ 1, got {update_every}")
        self.decay, self.update_every = float(decay), int(update_every)
        self.upper_bound = confidence_upper_bound
        self.answer_start, self.answer_end = answer_start, answer_end
        self.shadow: list[Tensor] | None = None
        self.updates = 0

    def __call__(self, policy: Any, batch: Any, steps: Tensor, ctx: Any) -> tuple[Tensor, dict[str, float]]:
        from flowrl.objectives import policy_gradient_objective

        return policy_gradient_objective(policy, batch, steps, ctx)

    def _params(self, policy: Any) -> list[torch.nn.Parameter]:
        params = list(policy.trainable_parameters())
        if self.shadow is None:
            self.shadow = [p.detach().clone() for p in params]
        return params

    @torch.no_grad()
    def before_advantages(self, trainer: Any, traj: Any) -> None:
        from flowrl.policy import weights_swapped

        policy = trainer.policy
        tokenizer = getattr(policy, "tokenizer", None)
        if tokenizer is None or traj.actions is None:
            raise ValueError("the grpo_care objective scores answer tokens: it needs a token policy (model.kind causal_lm).")
        params = self._params(policy)
        with weights_swapped(params, self.shadow), trainer.autocast():
            log_probs = policy.evaluate(traj).log_prob.float().cpu()
        actions, mask = traj.actions.cpu(), traj.mask.cpu()
        texts = [[tokenizer.decode([t]) for t in row[: int(m.sum())].tolist()] for row, m in zip(actions, mask)]
        span = answer_span_mask(texts, mask, start=self.answer_start, end=self.answer_end)
        traj.meta["care_confidence"] = answer_confidence(log_probs, span, upper_bound=self.upper_bound)
        self._traj = traj  # for on_iteration_end's metrics (the estimator adds meta["care_bonus"])

    def on_update(self, trainer: Any) -> None:
        self.updates += 1
        if self.updates % self.update_every:
            return
        params = self._params(trainer.policy)
        with torch.no_grad():
            for s, p in zip(self.shadow, params):
                s.lerp_(p.detach().to(s.dtype), 1.0 - self.decay)

    def on_iteration_end(self, trainer: Any, it: int) -> dict[str, float]:
        traj = getattr(self, "_traj", None)
        meta = {} if traj is None else traj.meta
        out: dict[str, float] = {}
        if isinstance(meta.get("care_confidence"), Tensor):
            out["care/confidence"] = float(meta["care_confidence"].mean())
        if isinstance(meta.get("care_bonus"), Tensor):
            out["care/bonus"] = float(meta["care_bonus"].float().mean())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": None if self.shadow is None else [s.clone() for s in self.shadow], "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow = None if state["shadow"] is None else [s.clone() for s in state["shadow"]]
        self.updates = int(state["updates"])
