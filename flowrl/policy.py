"""The one interface every trainable generator implements: a :class:`Policy` produces
:class:`Trajectories` and re-evaluates them.

A diffusion policy's trajectory is T denoising steps with Gaussian per-step log-probs; a language
model's is T tokens with categorical log-probs. Both hand the trainer the same things: ``[B, T]``
log-probs, a ``[B, T]`` mask of trainable steps, group ids, and a way to recompute the log-probs
(and, for KL, the reference's) with the current weights. Advantage estimators, losses and
aggregation are therefore written once (``flowrl.advantages``, ``flowrl.losses``).

Shapes: ``B`` samples (prompts × group size), ``T`` stored steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ContextManager, Iterable, NamedTuple, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor


class PolicyEval(NamedTuple):
    """What one re-evaluation of stored steps returns. ``[B, T']`` for the evaluated steps.

    - ``log_prob``: per-step log-prob of the stored action (float32, Flow-GRPO mean reduction for
      diffusion steps, one token for LMs).
    - ``mean``: Gaussian mean μ_θ of each diffusion step, ``[B, T', *latent]`` (None for tokens).
    - ``std``: Gaussian std ``[B, T']`` per step (None for tokens).
    - ``entropy``: per-token entropy ``[B, T']`` (None for diffusion).
    """

    log_prob: Tensor
    mean: Tensor | None = None
    std: Tensor | None = None
    entropy: Tensor | None = None


def _index(value: Any, idx: Tensor, batch: int) -> Any:
    """Select rows ``idx`` of anything batch-first: tensors, lists, dicts, tuples."""
    if isinstance(value, Tensor):
        if value.dim() > 0 and value.shape[0] == batch:
            return value[idx.to(value.device)]
        return value
    if isinstance(value, (list, tuple)) and len(value) == batch:
        picked = [value[i] for i in idx.tolist()]
        return type(value)(picked) if isinstance(value, tuple) else picked
    if isinstance(value, dict):
        return {k: _index(v, idx, batch) for k, v in value.items()}
    return value


def _concat(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, Tensor):
        return torch.cat(values, dim=0) if first.dim() > 0 else first
    if isinstance(first, list):
        return [x for v in values for x in v]
    if isinstance(first, tuple):
        return tuple(x for v in values for x in v)
    if isinstance(first, dict):
        return {k: _concat([v[k] for v in values]) for k in first}
    return first


@dataclass
class Trajectories:
    """A batch of rollouts, everything batch-first.

    Fields (``B`` samples, ``T`` stored steps):
        prompts: ``B`` prompt strings (each repeated ``group_size`` times, groups contiguous).
        group_ids: ``[B]`` long, equal for samples of the same prompt.
        log_probs: ``[B, T]`` float32 log-probs at rollout time (the "old" policy).
        mask: ``[B, T]`` bool, which steps are trainable (tokens past EOS, ODE steps → False).
        states: policy-specific inputs to re-evaluate each step: diffusion ``[B, T, *latent]`` x_t;
            LMs the full token ids ``[B, P + T]``.
        actions: what was sampled at each step: diffusion ``[B, T, *latent]`` x_{t+1}; LMs ``[B, T]``.
        sigmas, sigmas_next: ``[B, T]`` σ and σ' of each stored diffusion step (None for tokens).
        means: ``[B, T, *latent]`` μ_old of each step (GRPO-Guard), or None.
        outputs: final outputs for rewards: images ``[B, C, H, W]`` in [0, 1], video
            ``[B, F, C, H, W]``, or a list of completion strings.
        rewards: ``[B, K]`` float table, columns named by ``reward_names``; None before scoring.
        advantages: ``[B]`` or ``[B, T]``; None before estimation.
        cond: batch-first conditioning needed to re-evaluate (prompt embeddings, attention masks).
        meta: free dict (per-sample lists of length B are sliced with the batch).
    """

    prompts: list[str]
    group_ids: Tensor
    log_probs: Tensor
    mask: Tensor
    states: Any = None
    actions: Any = None
    sigmas: Tensor | None = None
    sigmas_next: Tensor | None = None
    means: Tensor | None = None
    outputs: Any = None
    rewards: Tensor | None = None
    reward_names: list[str] = field(default_factory=list)
    advantages: Tensor | None = None
    cond: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return int(self.log_probs.shape[1])

    def select(self, idx: Tensor | Sequence[int]) -> "Trajectories":
        """Rows ``idx`` of every batch-first field (a new object; tensors are views/copies)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        batch = len(self)
        kwargs = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "reward_names":
                kwargs[f.name] = list(value)
            else:
                kwargs[f.name] = _index(value, idx, batch)
        return Trajectories(**kwargs)

    @staticmethod
    def concat(parts: Sequence["Trajectories"]) -> "Trajectories":
        """Stack trajectories along the batch (same T and fields)."""
        if not parts:
            raise ValueError("Trajectories.concat needs at least one part.")
        kwargs = {}
        for f in dataclasses.fields(parts[0]):
            values = [getattr(p, f.name) for p in parts]
            if f.name == "reward_names":
                kwargs[f.name] = list(values[0])
            elif values[0] is None:
                kwargs[f.name] = None
            else:
                kwargs[f.name] = _concat(values)
        return Trajectories(**kwargs)

    def to(self, device: torch.device | str) -> "Trajectories":
        def move(v: Any) -> Any:
            if isinstance(v, Tensor):
                return v.to(device)
            if isinstance(v, dict):
                return {k: move(x) for k, x in v.items()}
            return v

        return dataclasses.replace(self, **{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def reward_table(self) -> dict[str, Tensor]:
        """Rewards as ``{name: [B]}``."""
        if self.rewards is None:
            return {}
        return {n: self.rewards[:, i] for i, n in enumerate(self.reward_names)}


@runtime_checkable
class Policy(Protocol):
    """What the trainer needs from any generator (diffusion or language model).

    - ``rollout(prompts, group_size=G, generator=...)``: sample ``G`` continuations of each prompt;
      returns :class:`Trajectories` with old log-probs, masks and everything needed to re-evaluate.
    - ``evaluate(traj, steps=None)``: re-run the current weights on the stored steps
      (all stored steps by default, else the ``[T']`` step indices) → :class:`PolicyEval`.
      With unchanged weights and the same batch this reproduces ``traj.log_probs`` (ratio 1).
    - ``log_prob(traj, steps=None)``: ``evaluate(...).log_prob``, ``[B, T']``.
    - ``reference()``: a context manager inside which ``evaluate`` computes the frozen reference
      policy (LoRA adapters disabled, or a frozen copy) — used for KL terms.
    - ``trainable_parameters()``: what the optimizer updates.
    - ``step_chunks(traj)``: how the trainer should split the stored steps into backward passes
      (diffusion: a few steps at a time to bound memory; tokens: all at once).
    """

    def rollout(self, prompts: Sequence[str], *, group_size: int, generator: torch.Generator | None = None) -> Trajectories: ...

    def evaluate(self, traj: Trajectories, steps: Tensor | None = None) -> PolicyEval: ...

    def log_prob(self, traj: Trajectories, steps: Tensor | None = None) -> Tensor: ...

    def reference(self) -> ContextManager[None]: ...

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]: ...

    def step_chunks(self, traj: Trajectories) -> list[Tensor]: ...


class PolicyBase:
    """Shared conveniences for :class:`Policy` implementations."""

    #: module whose parameters train; its peft adapters are disabled in :meth:`reference`.
    model: torch.nn.Module
    #: how many stored steps one backward pass covers (None: all at once).
    steps_per_backward: int | None = None

    def log_prob(self, traj: Trajectories, steps: Tensor | None = None) -> Tensor:
        return self.evaluate(traj, steps).log_prob  # type: ignore[attr-defined]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def reference(self) -> ContextManager[None]:
        """Disable LoRA adapters if the model has them; with a full fine-tune the caller must keep
        a frozen copy (``flowrl.trainer`` does)."""
        ref = getattr(self, "_reference_model", None)
        if ref is not None:
            return _swap_model(self, ref)
        if hasattr(self.model, "disable_adapters") and getattr(self.model, "peft_config", None):
            return _adapters_disabled(self.model)
        raise RuntimeError(
            "this policy has no reference: it has no LoRA adapters and no frozen copy. "
            "Use LoRA (train.lora_rank > 0) or set a reference with policy.set_reference_model(...)."
        )

    def set_reference_model(self, module: torch.nn.Module | None) -> None:
        """Use ``module`` (a frozen copy of the trained model) as the reference policy."""
        if module is not None:
            module.requires_grad_(False).eval()
        self._reference_model = module

    def step_chunks(self, traj: Trajectories) -> list[Tensor]:
        steps = torch.arange(traj.num_steps)
        if self.steps_per_backward is None:
            return [steps]
        return list(torch.split(steps, self.steps_per_backward))


def group_step_chunks(chunks: Sequence[Tensor], rows_per_step: int, max_rows: int | None) -> list[list[Tensor]]:
    """Consecutive loss chunks (``step_chunks``) grouped so that each group's rows — stored steps ×
    ``rows_per_step`` — fit in ``max_rows`` (None: one group). A group is recomputed in one
    transformer call and one backward pass; each chunk keeps its own loss, so the groups change
    the cost, never the loss. A chunk larger than ``max_rows`` forms a group alone."""
    groups: list[list[Tensor]] = []
    rows = 0
    for chunk in chunks:
        need = len(chunk) * rows_per_step
        if groups and (max_rows is None or rows + need <= max_rows):
            groups[-1].append(chunk)
            rows += need
        else:
            groups.append([chunk])
            rows = need
    return groups


def slice_eval(ev: PolicyEval | None, cols: slice) -> PolicyEval | None:
    """The columns ``cols`` (stored steps) of every ``[B, T', ...]`` field of a :class:`PolicyEval`."""
    if ev is None:
        return None
    return PolicyEval(*[None if f is None else f[:, cols] for f in ev])


@contextlib.contextmanager
def _adapters_disabled(model: torch.nn.Module):
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


@contextlib.contextmanager
def _swap_model(policy: PolicyBase, ref: torch.nn.Module):
    live = policy.model
    policy.model = ref
    try:
        yield
    finally:
        policy.model = live


@contextlib.contextmanager
def weights_swapped(params: Sequence[torch.nn.Parameter], values: Sequence[Tensor]):
    """Inside: ``params`` hold ``values`` (copied in, no autograd history); their own values are
    restored on exit. Used for EMA evaluation, DiffusionNFT's old policy and SAGE's moving anchor —
    copies, never aliases, so an update inside cannot leak into the stored values."""
    if len(params) != len(values):
        raise RuntimeError(f"{len(values)} stored tensors for {len(params)} parameters: was it taken from another model or LoRA setup?")
    with torch.no_grad():
        live = [p.detach().clone() for p in params]
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, live):
                p.copy_(v)

