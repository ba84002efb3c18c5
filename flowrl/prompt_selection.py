"""Prompt selection: which prompts each iteration rolls out, and which groups it keeps.

The sixth plug point (docs/algorithms.md), separate from the loss. A selector is a registered class
built over the prompt set (``len(dataset)`` prompts, addressed by index so per-prompt metadata such
as ground-truth answers follows):

- ``sample(n, generator) -> list[int]``: the next ``n`` prompt indices;
- ``keep(rewards [B], group_ids [B]) -> [B] bool``: which samples survive filtering (whole groups);
- ``update(indices, rewards, group_ids)``: learn from scored rollouts (``indices`` per sample);
- ``state_dict()`` / ``load_state_dict()``: exact resume.

Built in: ``uniform`` (shuffled epochs), ``dapo`` (uniform + dynamic sampling: drop groups whose
rewards are all equal, i.e. not 0 < #correct < G, and refill), ``spo`` (prioritised sampling
∝ √(p̂(1 − p̂)) + 0.05 from a per-prompt Beta tracker). :func:`fill_batch` is the DAPO refill loop
the trainer runs in its rollout phase.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from flowrl.registry import Registry

PROMPT_SELECTORS: Registry[Any] = Registry("prompt selection")
register_selector = PROMPT_SELECTORS.register


@register_selector("uniform")
class UniformSelector:
    """Every prompt once per epoch, in an order shuffled by the generator (DAPO, GRPO).

    ``num_prompts``: size of the prompt set.
    """

    def __init__(self, num_prompts: int):
        if num_prompts < 1:
            raise ValueError("the prompt set is empty; give at least one prompt.")
        self.num_prompts = int(num_prompts)
        self.order: list[int] = []
        self.pos = 0
        self.epoch = 0

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self.pos >= len(self.order):
                self.order = torch.randperm(self.num_prompts, generator=generator).tolist()
                self.pos = 0
                self.epoch += 1
            take = min(n - len(out), len(self.order) - self.pos)
            out += self.order[self.pos : self.pos + take]
            self.pos += take
        return out

    def keep(self, rewards: Tensor, group_ids: Tensor) -> Tensor:
        return torch.ones(len(rewards), dtype=torch.bool)

    def update(self, indices: Sequence[int], rewards: Tensor, group_ids: Tensor) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"order": list(self.order), "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order, self.pos, self.epoch = list(state["order"]), int(state["pos"]), int(state["epoch"])


def informative_groups(rewards: Tensor, group_ids: Tensor, *, tol: float = 1e-6) -> Tensor:
    """``[B]`` bool: the sample's group has reward spread > ``tol`` (for 0/1 rewards: 0 < #correct < G).
    DAPO's dynamic-sampling filter (Yu et al. 2025, eq. 11 constraint)."""
    keep = torch.zeros(len(rewards), dtype=torch.bool)
    for g in torch.unique(group_ids):
        idx = (group_ids == g).nonzero(as_tuple=True)[0]
        r = rewards[idx].float()
        keep[idx] = bool((r.max() - r.min()) > tol)
    return keep


@register_selector("dapo")
class DynamicSamplingSelector(UniformSelector):
    """DAPO dynamic sampling: uniform prompts; groups whose rewards are all equal (all right or all
    wrong: zero advantage, no gradient) are dropped and :func:`fill_batch` refills the batch."""

    def __init__(self, num_prompts: int, *, tol: float = 1e-6):
        super().__init__(num_prompts)
        self.tol = tol

    def keep(self, rewards: Tensor, group_ids: Tensor) -> Tensor:
        return informative_groups(rewards.cpu(), group_ids.cpu(), tol=self.tol)


@register_selector("spo")
class PrioritizedSelector:
    """SPO prioritised sampling: P(prompt) ∝ √(p̂(1 − p̂)) + ε_floor with p̂ the prompt's tracked
    success rate (:class:`~flowrl.advantages.BetaValueTracker`), drawn without replacement.
    Xu et al., Single-stream Policy Optimization (2025), §3.3 (ε_floor = 0.05).

    ``tracker``: share the SPO estimator's tracker (then :meth:`update` does nothing, the estimator
    updates it); otherwise the selector keeps its own, updated from rewards in :meth:`update`.
    """

    def __init__(self, num_prompts: int, *, floor: float = 0.05, tracker: Any = None, prompts: Sequence[str] | None = None):
        from flowrl.advantages import BetaValueTracker

        if num_prompts < 1:
            raise ValueError("the prompt set is empty; give at least one prompt.")
        self.num_prompts = int(num_prompts)
        self.floor = float(floor)
        self.shared = tracker is not None
        self.tracker = tracker if tracker is not None else BetaValueTracker()
        # the tracker is keyed by prompt text when texts are known, else by index
        self.keys = list(prompts) if prompts is not None else [str(i) for i in range(num_prompts)]

    def weights(self) -> Tensor:
        p = torch.tensor([self.tracker.value(k) for k in self.keys], dtype=torch.float64)
        return torch.sqrt(p * (1 - p)) + self.floor

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[int]:
        w = self.weights()
        if n <= self.num_prompts:
            return torch.multinomial(w, n, replacement=False, generator=generator).tolist()
        return torch.multinomial(w, n, replacement=True, generator=generator).tolist()

    def keep(self, rewards: Tensor, group_ids: Tensor) -> Tensor:
        return torch.ones(len(rewards), dtype=torch.bool)

    def update(self, indices: Sequence[int], rewards: Tensor, group_ids: Tensor) -> None:
        if not self.shared:
            self.tracker.update([self.keys[i] for i in indices], rewards.float().cpu())

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": None if self.shared else self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("tracker") is not None and not self.shared:
            self.tracker.load_state_dict(state["tracker"])


class _SuccessTracker:
    """Per-prompt Beta(α, β) posterior of the success rate, discounted each update:
    α ← ρ·α + Σ r, β ← ρ·β + Σ (1 − r) (rewards clipped to [0, 1]); prior Beta(1, 1)."""

    def __init__(self, num_prompts: int, *, decay: float):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"prompt selection decay must be in (0, 1], got {decay}.")
        self.alpha = torch.ones(num_prompts, dtype=torch.float64)
        self.beta = torch.ones(num_prompts, dtype=torch.float64)
        self.decay = float(decay)

    def update(self, indices: Sequence[int], rewards: Tensor) -> None:
        r = rewards.double().clamp(0, 1)
        touched = sorted(set(int(i) for i in indices))
        idx = torch.tensor(touched, dtype=torch.long)
        self.alpha[idx] *= self.decay
        self.beta[idx] *= self.decay
        for i, x in zip(indices, r.tolist()):
            self.alpha[int(i)] += x
            self.beta[int(i)] += 1.0 - x

    def mean(self) -> Tensor:
        return self.alpha / (self.alpha + self.beta)

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha.clone(), "beta": self.beta.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha, self.beta = state["alpha"].clone().double(), state["beta"].clone().double()


class _TrackedSelector(UniformSelector):
    """A shuffled-epoch selector that keeps a :class:`_SuccessTracker` of every prompt (updated
    with each iteration's rewards, saved with the selector's state)."""

    def __init__(self, num_prompts: int, *, decay: float):
        super().__init__(num_prompts)
        self.tracker = _SuccessTracker(num_prompts, decay=decay)

    def update(self, indices: Sequence[int], rewards: Tensor, group_ids: Tensor) -> None:
        self.tracker.update(indices, rewards)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.tracker.load_state_dict(state["tracker"])


@register_selector("vade")
class VADESelector(_TrackedSelector):
    """VADE-style selection (variance-aware dynamic sampling): each prompt's success rate has a
    Beta posterior (:class:`_SuccessTracker`, discount ``decay`` so it follows the changing policy);
    each iteration draws θ_i ~ Beta(α_i, β_i) for a candidate pool of ``pool_factor``·n prompts
    (the next ones of a shuffled epoch) and keeps the n with the largest θ(1 − θ) — the Bernoulli
    variance, i.e. the expected magnitude of a GRPO gradient — Thompson sampling that explores
    prompts it knows little about. Unpicked candidates are passed over until the next epoch.
    The mechanism is the paper's; ``decay`` 0.9 and ``pool_factor`` 2 are *inferred*."""

    def __init__(self, num_prompts: int, *, decay: float = 0.9, pool_factor: float = 2.0):
        if pool_factor < 1:
            raise ValueError(f"vade pool_factor must be ≥ 1, got {pool_factor}.")
        super().__init__(num_prompts, decay=decay)
        self.pool_factor = float(pool_factor)

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[int]:
        pool = super().sample(min(self.num_prompts, max(n, int(round(n * self.pool_factor)))), generator)
        if len(pool) <= n:
            return pool + super().sample(n - len(pool), generator) if len(pool) < n else pool
        idx = torch.tensor(pool, dtype=torch.long)
        theta = thompson_beta(self.tracker.alpha[idx], self.tracker.beta[idx], generator)
        chosen = torch.argsort(-(theta * (1 - theta)), stable=True)[:n].sort().values
        return [pool[i] for i in chosen.tolist()]


def thompson_beta(alpha: Tensor, beta: Tensor, generator: torch.Generator | None) -> Tensor:
    """θ ~ Beta(α, β) per entry, as X/(X + Y) with X ~ Γ(α), Y ~ Γ(β) drawn from a stream seeded by
    ``generator`` (so the draw follows the run's seed and iteration)."""
    u = torch.rand(2, len(alpha), generator=generator, dtype=torch.float64)
    seed = int((u[0, 0] * 2**31).item()) if len(alpha) else 0
    g = torch.Generator().manual_seed(seed)
    x = torch._standard_gamma(alpha.double().clamp(min=1e-6), generator=g)
    y = torch._standard_gamma(beta.double().clamp(min=1e-6), generator=g)
    return x / (x + y).clamp(min=1e-300)


def knapsack_value(p: Tensor, units: Tensor, group_size: int) -> Tensor:
    """Value of ``units``·G rollouts for prompts of success rate p: P(the group has both outcomes)
    × p(1 − p), with P = 1 − p^N − (1 − p)^N, N = units·G (0 units: 0). Knapsack RL's value is a
    non-zero-gradient probability times an information gain; this gain form is *inferred*."""
    n = units.double() * group_size
    p = p.double()
    mixed = 1 - p**n - (1 - p) ** n
    return torch.where(units > 0, mixed * p * (1 - p), torch.zeros_like(p))


def knapsack_allocate(p: Tensor, budget: int, group_size: int, *, max_units: int | None = None) -> Tensor:
    """Units (groups of G rollouts) per prompt, Σ = ``budget``, maximising Σ value by greedy marginal
    gains (optimal for values concave in the units, as these are); ties go to the earlier prompt.
    Prompts whose value is 0 whatever the units (p = 0 or 1) get units only after every other
    prompt is saturated at ``max_units``."""
    k = len(p)
    units = torch.zeros(k, dtype=torch.long)
    cap = max_units if max_units is not None else budget
    if budget > 0 and k * cap < budget:  # else the capped gains all tie at −1 and one prompt takes the rest
        raise ValueError(f"knapsack: {k} prompts × max_units {cap} cannot hold {budget} groups; raise max_units (≥ 1).")
    for _ in range(budget):
        gain = knapsack_value(p, units + 1, group_size) - knapsack_value(p, units, group_size)
        gain = torch.where(units < cap, gain, torch.full_like(gain, -1.0))
        units[int(torch.argmax(gain))] += 1
    return units


@register_selector("knapsack")
class KnapsackSelector(_TrackedSelector):
    """Knapsack RL's budget allocation over the iteration's prompts: the n prompts of the batch (the
    next ones of a shuffled epoch) share n·G rollouts; each prompt gets a number of G-rollout
    groups (possibly 0 or several) that maximises Σ value (:func:`knapsack_allocate`) with its
    success rate estimated by a discounted Beta posterior. A prompt given k groups appears k
    times (k groups, each with its own baseline: the allocation is in units of G, the paper's is per
    rollout). ``group_size`` is set by the trainer from ``train.num_generations``. ``decay`` 0.9
    and ``max_units`` 4 are *inferred*."""

    def __init__(self, num_prompts: int, *, group_size: int = 8, decay: float = 0.9, max_units: int = 4):
        if int(max_units) < 1:
            raise ValueError(f"knapsack max_units must be ≥ 1 (groups per prompt), got {max_units}.")
        super().__init__(num_prompts, decay=decay)
        self.group_size, self.max_units = int(group_size), int(max_units)

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[int]:
        pool = super().sample(n, generator)
        units = knapsack_allocate(self.tracker.mean()[torch.tensor(pool, dtype=torch.long)], n, self.group_size, max_units=self.max_units)
        return [i for i, u in zip(pool, units.tolist()) for _ in range(u)]


def make_selector(name: str, num_prompts: int, **params: Any) -> Any:
    """Build the registered selector ``name`` over ``num_prompts`` prompts."""
    cls = PROMPT_SELECTORS.get(name)
    try:
        return cls(num_prompts, **params)
    except TypeError as exc:
        raise TypeError(f"prompt selection '{name}' could not be built with {sorted(params)}: {exc}") from exc


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` that process ``rank`` of ``world`` owns: contiguous, sizes differ by
    at most one (the first ``n mod world`` processes take one more)."""
    q, r = divmod(n, world)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


def fill_batch(
    selector: Any,
    generate: Callable[..., tuple[Any, Tensor]],
    num_prompts: int,
    *,
    max_rounds: int = 8,
    generator: torch.Generator | None = None,
    concat: Callable[[list[Any]], Any] | None = None,
    rank: int = 0,
    world: int = 1,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Any, Tensor, list[int], dict[str, float]]:
    """Collect ``num_prompts`` kept groups (DAPO's refill loop; one round for selectors that keep all).

    ``generate(indices) -> (traj, rewards [B])`` rolls out and scores the prompts ``indices`` (groups
    contiguous, ``traj.group_ids`` numbering them). Each round samples as many prompts as are still
    missing, lets the selector learn from all scored groups (:meth:`update`) and keeps the groups
    its :meth:`keep` accepts (``concat`` joins the rounds' trajectories; default
    ``Trajectories.concat``). After ``max_rounds`` the kept groups are returned even if fewer
    (metric ``select/short``). Returns ``(traj, rewards, prompt_index_per_sample, metrics)`` with
    group ids renumbered 0…n−1.

    Several processes (``world > 1``, ``gather`` concatenating a tensor of every process's rows in
    process order): ``num_prompts`` counts the whole batch; every process draws the same indices
    (same selector state and ``generator``), rolls out its contiguous share
    (:func:`shard_bounds`). A ``generate`` that accepts ``keys`` is called as
    ``generate(indices, keys=[(round, position), ...])`` (always; also in one process), so the noise
    can follow each prompt's refill round and global position; the selector learns from and filters the gathered
    rewards, so every process takes the same decisions and the same number of rounds. Group ids
    are then the global kept-group numbers (equal to a one-process run's), and a process may end
    with zero rows (it still returns a 0-row trajectory).
    """
    from flowrl.policy import Trajectories

    import inspect

    takes_keys = "keys" in inspect.signature(generate).parameters
    if world > 1 and not takes_keys:
        raise TypeError("fill_batch over several processes needs generate(indices, keys=...): keys name each prompt's global position.")
    parts, rewards_parts, idx_parts = [], [], []
    kept_groups, drawn, rounds = 0, 0, 0
    spare = None
    while kept_groups < num_prompts and rounds < max_rounds:
        rounds += 1
        missing = num_prompts - kept_groups
        indices = selector.sample(missing, generator)
        drawn += len(indices)
        lo, hi = shard_bounds(len(indices), rank, world)
        if hi == lo:
            traj, rewards = None, torch.zeros(0)
        elif takes_keys:
            traj, rewards = generate(indices[lo:hi], keys=[(rounds, p) for p in range(lo, hi)])
        else:
            traj, rewards = generate(indices[lo:hi])
        gids = traj.group_ids.cpu() + lo if traj is not None else torch.zeros(0, dtype=torch.long)
        rewards = rewards.cpu().float()
        if spare is None and traj is not None:
            spare = traj.select([])
        all_rewards, all_gids = (gather(rewards), gather(gids)) if world > 1 else (rewards, gids)
        per_sample = [indices[int(g)] for g in all_gids]
        selector.update(per_sample, all_rewards, all_gids)
        keep = selector.keep(all_rewards, all_gids)
        groups = sorted(torch.unique(all_gids[keep]).tolist())[:missing]
        new_id = {g: kept_groups + i for i, g in enumerate(groups)}
        rows = [i for i, g in enumerate(gids.tolist()) if g in new_id]
        if rows:
            part = traj.select(torch.tensor(rows, dtype=torch.long))
            part.group_ids = torch.tensor([new_id[int(g)] for g in gids[rows]], dtype=torch.long)
            parts.append(part)
            rewards_parts.append(rewards[rows])
            idx_parts += [indices[int(gids[i])] for i in rows]
        kept_groups += len(groups)
    metrics = {"select/rounds": float(rounds), "select/drawn": float(drawn), "select/kept": float(kept_groups), "select/short": float(num_prompts - kept_groups)}
    if kept_groups == 0:
        raise RuntimeError(
            f"prompt selection kept no group in {max_rounds} rounds ({drawn} prompts drawn): every group's "
            "rewards were identical. Use easier prompts, a larger num_generations, or prompt_selection='uniform'."
        )
    if not parts:  # another process holds every kept group
        return spare, torch.zeros(0), [], metrics
    # rounds may differ in shape (token policies: prompt width, completion length): the policy's own
    # concat pads them; Trajectories.concat needs equal shapes
    joined = (concat or Trajectories.concat)(parts) if len(parts) > 1 else parts[0]
    return joined, torch.cat(rewards_parts), idx_parts, metrics


__all__ = [
    "PROMPT_SELECTORS",
    "register_selector",
    "UniformSelector",
    "DynamicSamplingSelector",
    "PrioritizedSelector",
    "informative_groups",
    "make_selector",
    "fill_batch",
    "shard_bounds",
]
