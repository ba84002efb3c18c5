"""BranchGRPO tree rollouts: layout, cost model, sampler and reward fusion (BranchGRPO, 2025;
docs/algorithms.md "BranchGRPO").

One root per prompt starts from one noise; at every step each node advances one transition; at a
*split* step every node gets ``branch`` children (independent noises from the same mean), elsewhere
one. Nodes are numbered per level (level ``i`` = after ``i`` steps, ``n_i`` nodes per tree) and
children are contiguous: node ``c`` at level ``i+1`` has parent ``c // b_i`` (``b_i`` = branch at
a split step, else 1). Hence leaf ``l``'s ancestor at level ``i`` is ``l // (L / n_i)`` and every
level is "tree-major" when several trees are sampled together (tree ``p``'s nodes are rows
``p·n_i … (p+1)·n_i − 1``).

Cost: the model is evaluated once per node and level (shared prefixes are computed once):
``Σ_{i<T} n_i`` evaluations and ``Σ_{i<T} n_{i+1}`` edges per tree — 203 and 218 for splits at
0, 3, 6, 9 of 20 steps with branch 2 (16 leaves: 12.69 evaluations per leaf instead of 20).

Split noise may be scaled (the reference multiplies it by 4); the log-prob of such an edge is the
density of the noise actually injected, N(μ, (c·s)²) — the reference logs N(μ, s²) instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from flowrl.sde import gaussian_log_prob, sde_step

#: velocity_fn(x [N, *L], sigma [N], tree [N] long) -> v [N, *L]; ``tree`` indexes the roots (prompts).
VelocityFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class TreeLayout:
    """Shape of one tree: ``num_steps`` transitions, children ``branch`` at each of ``split_steps``."""

    num_steps: int
    split_steps: tuple[int, ...]
    branch: int

    def __post_init__(self) -> None:
        if self.branch < 1:
            raise ValueError(f"branch must be ≥ 1, got {self.branch}")
        bad = [s for s in self.split_steps if not 0 <= s < self.num_steps]
        if bad:
            raise ValueError(
                f"split steps {bad} are outside the {self.num_steps} denoising steps (0…{self.num_steps - 1}). "
                "Give sampler.rollout_params.split_steps inside that range (the paper's 0, 3, 6, 9 assume 20 steps)."
            )
        if list(self.split_steps) != sorted(set(self.split_steps)):
            raise ValueError(f"split steps must be strictly increasing, got {list(self.split_steps)}")

    def branching(self, step: int) -> int:
        return self.branch if step in self.split_steps else 1

    @property
    def level_sizes(self) -> list[int]:
        """``[n_0, …, n_T]`` nodes per level of one tree (n_0 = 1 root)."""
        sizes = [1]
        for i in range(self.num_steps):
            sizes.append(sizes[-1] * self.branching(i))
        return sizes

    @property
    def num_leaves(self) -> int:
        return self.level_sizes[-1]

    def ancestor(self, level: int, leaf: Tensor | int) -> Tensor | int:
        """Index (within its level) of leaf ``leaf``'s ancestor at ``level``."""
        return leaf // (self.num_leaves // self.level_sizes[level])

    def subtree_leaves(self, level: int) -> int:
        """Leaves below one node of ``level``."""
        return self.num_leaves // self.level_sizes[level]

    @property
    def last_split(self) -> int:
        return max(self.split_steps) if self.split_steps else -1


def tree_cost(num_steps: int, split_steps: Sequence[int], branch: int) -> tuple[int, int]:
    """BranchGRPO cost model of one tree → ``(model_evals, edges)``.

    model_evals = Σ_{i<T} n_i (one velocity per node and step), edges = Σ_{i<T} n_{i+1} (trainable
    transitions). CFG doubles the evaluations (not counted here). 20 steps, splits 0, 3, 6, 9,
    branch 2 → (203, 218): 1 + 3·2 + 3·4 + 3·8 + 10·16 = 203; 2·3 + 4·3 + 8·3 + 16·11 = 218.
    """
    sizes = TreeLayout(int(num_steps), tuple(int(s) for s in split_steps), int(branch)).level_sizes
    return sum(sizes[:-1]), sum(sizes[1:])


@dataclass
class TreeSamples:
    """What :func:`sample_tree` returns for ``P`` trees.

    levels: ``T + 1`` tensors, level ``i`` ``[P·n_i, *L]`` float32 (level 0 the roots, level T the leaves).
    log_probs: per step ``[P·n_{i+1}]`` float32 log-prob of each edge into level ``i+1`` (None for ODE steps).
    std_scale: per step, the factor applied to the kernel's std (split noise scale, else 1).
    model_evals / calls: velocity evaluations (rows) and batched calls made.
    """

    levels: list[Tensor]
    log_probs: list[Tensor | None]
    std_scale: list[float]
    means: list[Tensor | None] = field(default_factory=list)
    model_evals: int = 0
    calls: int = 0


def tree_transition(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, *, kind: str, noise_level: float, noise: Tensor | None, scale: float = 1.0, reduce: str = "mean", store_dtype: torch.dtype | None = None):
    """One edge batch: x' = μ + scale·s·ε and its honest log-prob under N(μ, (scale·s)²), evaluated at
    the stored (possibly down-cast) sample. ``noise=None`` → the ODE step (log-prob None)."""
    if noise is None:
        out = sde_step(x.float(), v.float(), sigma, sigma_next, kind="ode")
        nxt = out.prev_sample if store_dtype is None else out.prev_sample.to(store_dtype)
        return nxt, None, None
    out = sde_step(x.float(), v.float(), sigma, sigma_next, kind=kind, noise_level=noise_level, noise=noise * scale, reduce=reduce)
    nxt = out.prev_sample if store_dtype is None else out.prev_sample.to(store_dtype)
    lp = gaussian_log_prob(nxt.float(), out.mean, out.std * scale, reduce=reduce)
    return nxt, lp, out.mean


def sample_tree(
    velocity_fn: VelocityFn,
    roots: Tensor,
    grid: Tensor,
    layout: TreeLayout,
    *,
    kind: str = "dance",
    noise_level: float = 0.3,
    stochastic: Sequence[bool] | None = None,
    split_noise_scale: float = 1.0,
    noise_fn: Callable[[torch.Size], Tensor],
    reduce: str = "mean",
    eval_batch_size: int | None = None,
    store_means: bool = False,
) -> TreeSamples:
    """Grow ``P`` trees from ``roots [P, *L]`` along the σ ``grid [T+1]``.

    At step ``i`` the velocity of every level-``i`` node is evaluated once (in chunks of
    ``eval_batch_size`` rows), then each node takes ``b_i`` transitions: kernel ``kind`` where
    ``stochastic[i]`` (split steps are always stochastic), the Euler ODE step elsewhere. Split-step
    noise is multiplied by ``split_noise_scale`` and its log-prob uses that std.
    """
    T = layout.num_steps
    if len(grid) != T + 1:
        raise ValueError(f"grid has {len(grid)} values for {T} steps")
    stochastic = [True] * T if stochastic is None else list(stochastic)
    if len(stochastic) != T:
        raise ValueError(f"stochastic mask has {len(stochastic)} entries for {T} steps")
    P = roots.shape[0]
    x = roots
    levels, lps, scales, means = [x.float().cpu()], [], [], []
    evals = calls = 0
    for i in range(T):
        n = x.shape[0]
        owner = torch.arange(P, device=x.device).repeat_interleave(n // P)
        sigma = grid[i].to(x.device).expand(n)
        sigma_next = grid[i + 1].to(x.device).expand(n)
        chunks = range(0, n, eval_batch_size or n)
        v = torch.cat([velocity_fn(x[s : s + (eval_batch_size or n)], sigma[s : s + (eval_batch_size or n)], owner[s : s + (eval_batch_size or n)]) for s in chunks])
        evals += n
        calls += len(chunks)
        b = layout.branching(i)
        split = b > 1 or i in layout.split_steps
        xs, vs = x.repeat_interleave(b, dim=0), v.repeat_interleave(b, dim=0)
        sg, sgn = sigma.repeat_interleave(b), sigma_next.repeat_interleave(b)
        if stochastic[i] or split:
            scale = float(split_noise_scale) if split else 1.0
            nxt, lp, mu = tree_transition(xs, vs, sg, sgn, kind=kind, noise_level=noise_level, noise=noise_fn(xs.shape).to(xs.device), scale=scale, reduce=reduce, store_dtype=x.dtype)
        else:
            scale = 1.0
            nxt, lp, mu = tree_transition(xs, vs, sg, sgn, kind=kind, noise_level=noise_level, noise=None, store_dtype=x.dtype)
        x = nxt
        levels.append(x.float().cpu())
        lps.append(None if lp is None else lp.float().cpu())
        means.append(mu.float().cpu() if (store_means and mu is not None) else None)
        scales.append(scale)
    return TreeSamples(levels=levels, log_probs=lps, std_scale=scales, means=means, model_evals=evals, calls=calls)


# ------------------------------------------------------------------------------ reward fusion
def fuse_rewards(layout: TreeLayout, leaf_rewards: Tensor, *, fusion: str = "mean", edge_log_probs: Sequence[Tensor | None] | None = None, temperature: float = 1.0) -> list[Tensor]:
    """Node rewards per level, ``[P, n_i]`` for i = 0…T, from leaf rewards ``[P, L]``.

    ``mean``: a node's reward is the mean of its children's (= the mean of its descendant leaves,
    subtrees being equal-sized). ``log_prob``: at a split, children are weighted by
    softmax(log-prob of their edge / temperature) — BranchGRPO's optional path-probability fusion;
    ``edge_log_probs[i]`` is ``[P·n_{i+1}]`` (tree-major).
    """
    if fusion not in ("mean", "log_prob"):
        raise ValueError(f"unknown reward fusion '{fusion}'. Known: mean, log_prob.")
    sizes = layout.level_sizes
    P = leaf_rewards.shape[0]
    out = [leaf_rewards.float()]
    for i in range(layout.num_steps - 1, -1, -1):
        b = layout.branching(i)
        child = out[0].view(P, sizes[i], b)
        if b == 1:
            node = child[..., 0]
        elif fusion == "mean":
            node = child.mean(-1)
        else:
            lp = edge_log_probs[i] if edge_log_probs is not None else None
            if lp is None:
                raise ValueError(f"log_prob fusion needs the edge log-probs of split step {i}")
            w = torch.softmax(lp.float().view(P, sizes[i], b) / temperature, dim=-1)
            node = (w * child).sum(-1)
        out.insert(0, node)
    return out


def node_index(layout: TreeLayout, num_trees: int) -> tuple[Tensor, Tensor, Tensor]:
    """Flattened ``(level, tree, index_in_level)`` of every node of ``num_trees`` trees, level-major."""
    levels, trees, idx = [], [], []
    for lvl, n in enumerate(layout.level_sizes):
        levels.append(torch.full((num_trees * n,), lvl, dtype=torch.long))
        trees.append(torch.arange(num_trees).repeat_interleave(n))
        idx.append(torch.arange(n).repeat(num_trees))
    return torch.cat(levels), torch.cat(trees), torch.cat(idx)


def width_prune_leaves(layout: TreeLayout, leaf_rewards: Tensor, *, mode: str, keep: float = 0.5) -> Tensor:
    """Leaves whose post-split chain is trained, ``[P, L]`` bool (BranchGRPO width pruning).

    ``top``: inside each sibling group of the last split keep the ⌈keep·branch⌉ best children
    ("top 50% per branch"; grouping by the last split's parent is our reading);
    ``extremes``: keep the best and the worst ⌊L·keep/2⌋ leaves of each tree (best 25% + worst 25%).
    """
    P, L = leaf_rewards.shape
    if mode == "top":
        b = layout.branching(layout.last_split) if layout.split_steps else 1
        k = max(1, int(round(keep * b)))
        groups = leaf_rewards.view(P, L // b, b)
        top = groups.topk(k, dim=-1).indices
        out = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
        return out.view(P, L)
    if mode == "extremes":
        k = max(1, int(L * keep / 2))
        order = leaf_rewards.argsort(dim=1)
        out = torch.zeros(P, L, dtype=torch.bool)
        out.scatter_(1, order[:, :k], True)
        out.scatter_(1, order[:, -k:], True)
        return out
    raise ValueError(f"unknown width pruning '{mode}'. Known: top, extremes (or null for none).")
