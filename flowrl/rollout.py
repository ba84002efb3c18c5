"""Rollout schedules: which denoising steps are stochastic, and how samples share prefixes.

A schedule is a registered function ``fn(policy, prompts, *, group_size, generator, **params) ->
Trajectories`` over a :class:`~flowrl.pipelines.flow_policy.FlowPolicy`; the policy's
``rollout_name`` / ``rollout_params`` pick it (config: ``sampler.rollout`` / ``sampler.rollout_params``).

- ``full``      SDE at every step (Flow-GRPO, DanceGRPO).
- ``window``    SDE on ``window_size`` consecutive steps, ODE elsewhere; only window steps are
                stored and trained. ``mode="random"`` draws the window inside ``window_range`` each
                iteration (Flow-GRPO-Fast), ``mode="sliding"`` moves it forward every ``slide_every``
                iterations (MixGRPO).
- ``singular``  G²RPO: shared noise and ODE prefix to step k, one SDE step per member at k, ODE
                suffixes at granularities g; all suffixes batched into few transformer calls.
- ``tree``      BranchGRPO: one root per prompt, ``branch`` children at each split step, shared
                prefixes evaluated once (``flowrl.tree``); optional sliding SDE window (BranchGRPO-Mix).

Step indices in params: an ``int`` is a step index, a ``float`` is a fraction of ``num_steps``
(``0.5`` → ⌊T/2⌋), so a preset's defaults scale with ``sampler.num_steps``.

Cost accounting (every schedule): ``meta["model_evals"]`` = transformer evaluations per output
row (one image), CFG counted twice; ``meta["model_evals_total"]`` and ``meta["transformer_calls"]``
the totals of the rollout. The trainer logs ``cost/model_evals_per_sample``.

Structured rollouts (``singular``, ``tree``) keep ``traj.outputs`` one image per row, so the loop's
rewards line up with rows; rows that repeat a shared step carry ``meta["state_key"]`` (rows with the
same key at a stored step share its state, so ``FlowPolicy.evaluate`` computes one velocity for
them) and only one row owns each trainable step in ``traj.mask``; ``meta["minibatch_groups"]``
keeps rows that share states in the same minibatch.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from flowrl.registry import Registry
from flowrl.tree import tree_cost  # noqa: F401  (public: flowrl.rollout.tree_cost)

SCHEDULES: Registry[Callable[..., Any]] = Registry("rollout schedule")
register_schedule = SCHEDULES.register


def resolve_step(value: int | float, num_steps: int, *, field: str, allow_end: bool = False) -> int:
    """A step index from an ``int`` (index) or a ``float`` (fraction of ``num_steps``, floored)."""
    if isinstance(value, bool):
        raise ValueError(f"{field}: expected a step index or a fraction, got {value!r}")
    idx = int(math.floor(value * num_steps + 1e-9)) if isinstance(value, float) else int(value)
    hi = num_steps if allow_end else num_steps - 1
    if not 0 <= idx <= hi:
        raise ValueError(
            f"{field}={value!r} is step {idx}, outside 0…{hi} for sampler.num_steps={num_steps}. "
            "Give a step index inside that range or a fraction of num_steps (e.g. 0.5)."
        )
    return idx


def cfg_factor(policy: Any) -> int:
    """Transformer evaluations per latent: 2 with classifier-free guidance (cond + uncond)."""
    return 2 if getattr(policy, "guidance_scale", 1.0) > 1.0 else 1


class CountingVelocity:
    """``fn(x [N, *L], sigma [N], rows [N]) -> v``: the policy's velocity with conditioning row
    ``rows`` of ``cond``, in chunks of ``batch_size`` rows; counts evaluations (CFG doubled) and calls."""

    def __init__(self, policy: Any, cond: dict[str, Tensor], batch_size: int | None = None):
        self.policy, self.cond, self.batch_size = policy, cond, batch_size
        self.evals = 0
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor, rows: Tensor) -> Tensor:
        n = x.shape[0]
        step = self.batch_size or n
        out = []
        for s in range(0, n, step):
            r = rows[s : s + step].to(next(iter(self.cond.values())).device)
            cond = {k: v[r] for k, v in self.cond.items()}
            out.append(self.policy.velocity(x[s : s + step], sigma[s : s + step].to(x.device), cond))
            self.calls += 1
            self.evals += min(step, n - s) * cfg_factor(self.policy)
        return torch.cat(out)


@register_schedule("full")
def full_schedule(policy, prompts, *, group_size, generator=None):
    """SDE at every step; all steps stored (training may still drop some: ``timestep_fraction``)."""
    return chain_rollout(policy, prompts, group_size=group_size, generator=generator)


# ------------------------------------------------------------------------------------- window
def window_position(num_steps: int, *, window_size: int, window_range: Sequence[int | float], mode: str, iteration: int = 0, slide_every: int = 1, slide_stride: int = 1, generator: torch.Generator | None = None) -> int:
    """First step of the SDE window.

    The window ``[start, start + window_size)`` lies inside ``window_range = [lo, hi)``.
    ``random``: start uniform in ``lo … hi − window_size`` (Flow-GRPO-Fast draws it per batch);
    ``sliding``: start = lo + ⌊(iteration − 1)/slide_every⌋·slide_stride, wrapping back to lo past
    the end (MixGRPO: the window moves toward the data end every τ iterations).
    """
    if len(window_range) != 2:
        raise ValueError(f"window_range must be [lo, hi), got {list(window_range)}")
    lo = resolve_step(window_range[0], num_steps, field="window_range[0]")
    hi = resolve_step(window_range[1], num_steps, field="window_range[1]", allow_end=True)
    if window_size < 1 or hi - lo < window_size:
        raise ValueError(
            f"window_size={window_size} does not fit window_range steps [{lo}, {hi}) of {num_steps}; "
            "lower sampler.rollout_params.window_size or widen window_range."
        )
    positions = hi - lo - window_size + 1
    if mode == "random":
        from flowrl.seeding import batch_generator

        return lo + int(torch.randint(positions, (1,), generator=batch_generator(generator)))
    if mode == "sliding":
        if slide_every < 1 or slide_stride < 1:
            raise ValueError("slide_every and slide_stride must be ≥ 1")
        moves = max(int(iteration) - 1, 0) // slide_every
        return lo + (moves * slide_stride) % positions
    raise ValueError(f"unknown window mode '{mode}'. Known: random, sliding.")


def compress_after(grid: Tensor, last: int, ratio: float) -> Tensor:
    """MixGRPO-Flash's shorter ODE after the SDE window: keep ``grid[:last + 2]`` (up to the σ the
    last window step lands on) and replace the rest with n = max(⌊(T − last)·ratio⌋, 2) points from
    σ_{last+1} to 0, placed as the reference places them: evenly in unshifted time,
    shift(linspace(t_{last+1}, 0, n)) with t_i = 1 − i/T.

    The shift is read off the grid itself: the time shifts of SD3 and Flux (static or Flux's
    resolution-dependent μ) are σ = k·t/(1 + (k − 1)·t), i.e. logit σ = logit t + log k, so
    log k_i = logit σ_i − logit t_i is interpolated (linearly in t, held at the ends) between the
    grid's interior points and σ' = sigmoid(logit t' + log k(t')). For such a grid this is the
    reference's point set exactly; for a grid of another form (inferred) it follows the grid's own
    local shift. ``ratio`` 1 keeps the grid."""
    import numpy as np

    T = len(grid) - 1
    if not 0 < ratio <= 1:
        raise ValueError(f"sampler.rollout_params.post_compress_ratio must be in (0, 1], got {ratio}.")
    if ratio >= 1 or last + 1 >= T:
        return grid
    n = max(int((T - last) * ratio), 2)
    sigma = grid.detach().double().cpu().numpy()
    t = 1.0 - np.arange(T + 1) / T
    inner = (sigma > 0) & (sigma < 1) & (t > 0) & (t < 1)
    logit = lambda x: np.log(x) - np.log1p(-x)  # noqa: E731
    log_k = logit(sigma[inner]) - logit(t[inner]) if inner.any() else np.zeros(1)
    t_inner = t[inner] if inner.any() else np.full(1, 0.5)
    tt = np.linspace(t[last + 1], 0.0, n)[1:-1]
    k_tt = np.interp(tt, t_inner[::-1], log_k[::-1])  # np.interp needs increasing x
    post = 1.0 / (1.0 + np.exp(-(logit(tt) + k_tt)))
    post = torch.as_tensor(post, dtype=grid.dtype, device=grid.device)
    return torch.cat([grid[: last + 2], post, grid.new_zeros(1)])


@register_schedule("window")
def window_schedule(policy, prompts, *, group_size, generator=None, window_size: int = 2, window_range: Sequence[int | float] = (0, 0.5), mode: str = "random", slide_every: int = 25, slide_stride: int = 1, ode_solver: str = "euler", post_compress_ratio: float = 1.0):
    """SDE on ``window_size`` consecutive steps, ODE elsewhere; only window steps are stored.

    Flow-GRPO-Fast: ``mode=random``, window 2 inside the first half. MixGRPO: ``mode=sliding``
    (window 4, moved one step every 25 iterations). The model still runs at every step:
    ``model_evals`` = num_steps (×2 with CFG) per sample; trained steps = window_size.
    MixGRPO-Flash: ``ode_solver=dpm2`` integrates the steps after the window with DPM-Solver++(2M)
    and ``post_compress_ratio`` < 1 takes fewer of them (:func:`compress_after`; reference 0.4), so
    ``model_evals`` drops; the window's steps, and so the trained log-probs, are unchanged.
    """
    T = policy.num_steps
    start = window_position(T, window_size=window_size, window_range=window_range, mode=mode, iteration=getattr(policy, "iteration", 0), slide_every=slide_every, slide_stride=slide_stride, generator=generator)
    grid = compress_after(policy.sigma_grid(), start + window_size - 1, float(post_compress_ratio))
    stochastic = [start <= i < start + window_size for i in range(len(grid) - 1)]
    traj = chain_rollout(policy, prompts, group_size=group_size, generator=generator, stochastic=stochastic, grid=grid, ode_solver=ode_solver)
    traj.meta["window_start"] = start
    traj.meta["window_size"] = int(window_size)
    traj.meta["ode_solver"] = ode_solver
    return traj


# ----------------------------------------------------------------------------------- singular
def suffix_indices(num_steps: int, k: int, g: int) -> list[int]:
    """Grid indices of G²RPO's ODE suffix after the SDE step at ``k`` (σ_k → σ_{k+1}), as the
    reference builds its coarse grid: σ[:k+2] followed by every ``g``-th σ after it, i.e. the points
    k+1, k+2, k+2+g, … ≤ T. The model is evaluated at every point but the last and the image is x̂0
    from the last evaluated σ, which is exactly one Euler step to σ = 0: so the returned path ends
    at T (replacing the last point when it is not T). e.g. T=16, k=3, g=2: reference points
    [4, 5, 7, 9, 11, 13, 15] → [4, 5, 7, 9, 11, 13, 16]; g = 1 is the full grid from k + 1."""
    if g < 1:
        raise ValueError(f"granularity must be ≥ 1, got {g}")
    idx = [k + 1] + list(range(k + 2, num_steps + 1, g))
    idx = [i for i in idx if i <= num_steps]
    if len(idx) > 1:
        idx[-1] = num_steps
    return idx


def singular_cost(num_steps: int, k_steps: Sequence[int], granularities: Sequence[int], group_size: int) -> int:
    """Model evaluations of one G²RPO group (no CFG): the shared ODE prefix up to max(k) plus, for
    every member, k and g, the suffix's steps. 16 steps, k = 0…7, g ∈ {1, 2}, G = 12 → 8 + 12·140 = 1688
    (DanceGRPO: 12·16 = 192, i.e. 8.8×)."""
    prefix = max(k_steps) + 1
    return prefix + group_size * sum(len(suffix_indices(num_steps, k, g)) - 1 for k in k_steps for g in granularities)


def sample_singular(velocity_fn: Callable[[Tensor, Tensor, Tensor], Tensor], x0: Tensor, grid: Tensor, *, k_steps: Sequence[int], granularities: Sequence[int], group_size: int, kind: str, noise_level: float, noise_fn: Callable[[torch.Size], Tensor], reduce: str = "mean"):
    """G²RPO singular stochastic sampling for ``P`` prompts from ``x0 [P, *L]``.

    Returns a dict with ``prefix`` (x_k for each k, ``[P, K, *L]``), ``v`` (velocity there),
    ``action``/``log_prob``/``mean`` of each member's SDE step ``[P, K, G, …]``, and ``final``
    ``[P, K, Gr, G, *L]`` clean latents of every suffix. The model runs once per prefix step
    and then on all suffixes of all prompts in lockstep (one call per suffix position).
    """
    from flowrl.sde import sde_step

    T = len(grid) - 1
    P = x0.shape[0]
    k_steps = list(k_steps)
    K, Gr, G = len(k_steps), len(granularities), group_size
    rows = torch.arange(P, device=x0.device)
    # 1. shared ODE prefix up to the last k (x_k and v_k of every k come from this one chain)
    x, xs, vs = x0, {}, {}
    for i in range(max(k_steps) + 1):
        v = velocity_fn(x, grid[i].to(x.device).expand(P), rows)
        xs[i], vs[i] = x, v
        x = sde_step(x.float(), v.float(), grid[i].expand(P), grid[i + 1].expand(P), kind="ode").prev_sample.to(x.dtype)
    prefix = torch.stack([xs[k] for k in k_steps], 1)  # [P, K, *L]
    vel = torch.stack([vs[k] for k in k_steps], 1)
    # 2. one SDE step per member at each k (own noise), no new model evaluation
    lat = tuple(x0.shape[1:])
    xk = prefix.unsqueeze(2).expand(P, K, G, *lat).reshape(-1, *lat)
    vk = vel.unsqueeze(2).expand(P, K, G, *lat).reshape(-1, *lat)
    kk = torch.tensor(k_steps).view(1, K, 1).expand(P, K, G).reshape(-1)
    sig, sig_next = grid[kk].to(x0.device), grid[kk + 1].to(x0.device)
    noise = noise_fn(torch.Size((P, K, G) + lat)).reshape(-1, *lat).to(x0.device)
    out = sde_step(xk.float(), vk.float(), sig, sig_next, kind=kind, noise_level=noise_level, noise=noise, reduce=reduce)
    action = out.prev_sample.to(x0.dtype)
    log_prob = sde_step(xk.float(), vk.float(), sig, sig_next, kind=kind, noise_level=noise_level, prev_sample=action.float(), reduce=reduce).log_prob
    # 3. ODE suffixes: every (prompt, k, g, member) chain, advanced together one position at a time
    paths = [suffix_indices(T, k, g) for k in k_steps for g in granularities]  # [K·Gr]
    chain_path = [paths[ki * Gr + gi] for _p in range(P) for ki in range(K) for gi in range(Gr) for _m in range(G)]
    start = action.view(P, K, 1, G, *lat).expand(P, K, Gr, G, *lat).reshape(-1, *lat)
    chain_rows = torch.arange(P, device=x0.device).repeat_interleave(K * Gr * G)
    cur = start.clone()
    longest = max(len(p) for p in paths) - 1
    for t in range(longest):
        active = torch.tensor([len(p) - 1 > t for p in chain_path], device=x0.device)
        idx = torch.nonzero(active).flatten()
        if len(idx) == 0:
            break
        s = torch.tensor([chain_path[i][t] for i in idx.tolist()])
        s_next = torch.tensor([chain_path[i][t + 1] for i in idx.tolist()])
        sg, sgn = grid[s].to(x0.device), grid[s_next].to(x0.device)
        v = velocity_fn(cur[idx], sg, chain_rows[idx])
        cur[idx] = sde_step(cur[idx].float(), v.float(), sg, sgn, kind="ode").prev_sample.to(cur.dtype)
    return {
        "prefix": prefix, "v": vel,
        "action": action.view(P, K, G, *lat), "log_prob": log_prob.view(P, K, G), "mean": out.mean.view(P, K, G, *lat),
        "final": cur.view(P, K, Gr, G, *lat),
    }


@register_schedule("singular")
def singular_schedule(policy, prompts, *, group_size, generator=None, k_steps: Sequence[int | float] | None = None, granularities: Sequence[int] = (1, 2), eval_batch_size: int | None = None):
    """G²RPO singular stochastic sampling (Zhou et al. 2025, "Singular Stochastic Sampling").

    Every member of a group starts from the prompt's noise and shares the ODE prefix to step k;
    at k each member takes one SDE step (the policy's kernel) with its own noise, then ODE at each
    granularity g on the reference's coarse grid (:func:`suffix_indices`: one step to σ_{k+2}, then
    every g-th σ, the image x̂0 from the last evaluated σ). Defaults: k ∈ first half of the steps
    (0…7 of 16), g ∈ {1, 2}.

    Rows (one image each) are ordered (prompt, k, g, member); the stored step of a row is its SDE
    step at k (state x_k shared by the group: ``state_key`` → one velocity per (prompt, k) in
    training). Only g = first granularity rows own the step in ``mask``; the estimator
    ``multi_granularity`` sums the z-scores over g onto them. ``eval_batch_size`` caps rows per
    transformer call (None: all suffixes of the batch at once).
    """
    from flowrl.policy import Trajectories

    T = policy.num_steps
    ks = list(range(max(T // 2, 1))) if k_steps is None else [resolve_step(k, T, field="k_steps") for k in k_steps]
    if len(set(ks)) != len(ks):
        raise ValueError(f"k_steps resolve to repeated steps {ks} at num_steps={T}; give distinct steps.")
    grans = [int(g) for g in granularities]
    if not grans or min(grans) < 1:
        raise ValueError(f"granularities must be ≥ 1, got {list(granularities)}")
    grid = policy.sigma_grid()
    P, K, Gr, G = len(prompts), len(ks), len(grans), group_size
    cond = policy.encode(prompts)
    counter = CountingVelocity(policy, cond, eval_batch_size)
    x0 = policy.adapter.initial_noise(P, height=policy.height, width=policy.width, generator=generator)
    res = sample_singular(counter, x0, grid, k_steps=ks, granularities=grans, group_size=G, kind=policy.sampler, noise_level=policy.noise_level, noise_fn=lambda shape: policy.draw_noise(shape, generator), reduce=policy.log_prob_reduce)
    lat = tuple(x0.shape[1:])
    B = P * K * Gr * G

    def rows(t: Tensor) -> Tensor:  # [P, K, G, ...] → rows ordered (p, k, g, m)
        return t.unsqueeze(2).expand(P, K, Gr, G, *t.shape[3:]).reshape(B, *t.shape[3:])

    p_idx = torch.arange(P).view(P, 1, 1, 1).expand(P, K, Gr, G).reshape(B)
    k_idx = torch.arange(K).view(1, K, 1, 1).expand(P, K, Gr, G).reshape(B)
    g_idx = torch.arange(Gr).view(1, 1, Gr, 1).expand(P, K, Gr, G).reshape(B)
    m_idx = torch.arange(G).view(1, 1, 1, G).expand(P, K, Gr, G).reshape(B)
    k_of = torch.tensor(ks)[k_idx]
    states = res["prefix"].unsqueeze(2).unsqueeze(3).expand(P, K, Gr, G, *lat).reshape(B, 1, *lat)
    images = policy.decode(res["final"].reshape(B, *lat).to(x0.dtype))
    total = counter.evals
    return Trajectories(
        prompts=[prompts[i] for i in p_idx.tolist()],
        group_ids=p_idx.clone(),
        log_probs=rows(res["log_prob"]).float().cpu().view(B, 1),
        mask=(g_idx == 0).view(B, 1),
        states=states.float().cpu(),
        actions=rows(res["action"]).float().cpu().view(B, 1, *lat),
        sigmas=grid[k_of].view(B, 1).float(),
        sigmas_next=grid[k_of + 1].view(B, 1).float(),
        means=rows(res["mean"]).float().cpu().view(B, 1, *lat) if policy.store_means else None,
        outputs=images.float().cpu(),
        cond={k: v[p_idx.to(v.device)].detach() for k, v in cond.items()},
        meta={
            "kernel": policy.sampler,
            "noise_level": policy.noise_level,
            "rollout_structure": "singular",
            "step_index": k_of.view(B, 1),
            "final_latents": res["final"].reshape(B, *lat).float().cpu(),
            "g2rpo_k": k_idx, "g2rpo_g": g_idx, "g2rpo_member": m_idx,
            "state_key": (p_idx * K + k_idx).view(B, 1),
            "minibatch_groups": p_idx * K + k_idx,
            "evaluate_masked_only": True,
            "model_evals": float(total) / B,
            "model_evals_total": float(total),
            "transformer_calls": float(counter.calls),
            "g2rpo_steps": list(ks), "g2rpo_granularities": list(grans),
        },
    )


# --------------------------------------------------------------------------------------- tree
@register_schedule("tree")
def tree_schedule(policy, prompts, *, group_size, generator=None, split_steps: Sequence[int | float] = (0, 3, 6, 9), branch: int = 2, split_noise_scale: float = 1.0, window_size: int | None = None, window_range: Sequence[int | float] = (0, 1.0), slide_every: int = 25, slide_stride: int = 1, depth_prune: Sequence[int | float] = (), depth_prune_window: int | None = None, depth_prune_every: int = 1, eval_batch_size: int | None = None):
    """BranchGRPO tree rollout (BranchGRPO, 2025), one tree per prompt; rows are its leaves.

    ``split_steps``/``branch``: every node gets ``branch`` children at those steps, so a tree has
    ``branch^len(split_steps)`` leaves, which must equal ``group_size`` (train.num_generations).
    ``split_noise_scale``: multiplies split noise (reference 4); edge log-probs use that std.
    ``window_size`` (BranchGRPO-Mix): SDE only on a window sliding over ``window_range`` every
    ``slide_every`` iterations, ODE elsewhere, split steps always SDE; only SDE steps are stored.
    ``depth_prune``: steps whose edges are not trained (fixed depth pruning);
    ``depth_prune_window``: prune a window of that many stored steps sliding one position every
    ``depth_prune_every`` iterations (sliding depth pruning). Width pruning needs rewards: it is
    an option of the ``tree_depth`` advantage estimator.

    Row ``l`` (a leaf) stores the path root → leaf; an edge is owned by (masked in for) the first
    leaf below it, so every edge is trained once; rows sharing a parent share ``state_key``.
    """
    from flowrl.policy import Trajectories
    from flowrl.tree import TreeLayout, sample_tree

    T = policy.num_steps
    splits = sorted({resolve_step(s, T, field="split_steps") for s in split_steps})
    if len(splits) != len(split_steps):
        raise ValueError(f"split_steps {list(split_steps)} resolve to repeated steps {splits} at num_steps={T}; give distinct steps.")
    layout = TreeLayout(T, tuple(splits), int(branch))
    L = layout.num_leaves
    if group_size != L:
        raise ValueError(
            f"the tree has branch^len(split_steps) = {branch}^{len(splits)} = {L} leaves per prompt but "
            f"train.num_generations is {group_size}; set train.num_generations={L} (or change split_steps/branch)."
        )
    if window_size is not None:
        start = window_position(T, window_size=int(window_size), window_range=window_range, mode="sliding", iteration=getattr(policy, "iteration", 0), slide_every=slide_every, slide_stride=slide_stride)
        stochastic = [(start <= i < start + int(window_size)) or i in splits for i in range(T)]
    else:
        start, stochastic = None, [True] * T
    cols = [i for i in range(T) if stochastic[i]]
    pruned = {resolve_step(d, T, field="depth_prune") for d in depth_prune}
    if depth_prune_window:
        pos = (max(getattr(policy, "iteration", 0) - 1, 0) // max(depth_prune_every, 1)) % len(cols)
        pruned |= {cols[(pos + j) % len(cols)] for j in range(int(depth_prune_window))}
    grid = policy.sigma_grid()
    P = len(prompts)
    cond = policy.encode(prompts)
    counter = CountingVelocity(policy, cond, eval_batch_size)
    roots = policy.adapter.initial_noise(P, height=policy.height, width=policy.width, generator=generator)
    res = sample_tree(counter, roots, grid, layout, kind=policy.sampler, noise_level=policy.noise_level, stochastic=stochastic,
                      split_noise_scale=split_noise_scale, noise_fn=lambda shape: policy.draw_noise(shape, generator),
                      reduce=policy.log_prob_reduce, store_means=policy.store_means)
    sizes = layout.level_sizes
    B, C = P * L, len(cols)
    leaf = torch.arange(L).repeat(P)
    tree = torch.arange(P).repeat_interleave(L)
    lat = tuple(roots.shape[1:])
    states = torch.empty(B, C, *lat)
    actions = torch.empty(B, C, *lat)
    log_probs = torch.empty(B, C)
    means = torch.empty(B, C, *lat) if policy.store_means else None
    mask = torch.zeros(B, C, dtype=torch.bool)
    key = torch.empty(B, C, dtype=torch.long)
    std_scale = torch.ones(B, C)
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + P * n)
    for j, i in enumerate(cols):
        parent = tree * sizes[i] + layout.ancestor(i, leaf)
        child = tree * sizes[i + 1] + layout.ancestor(i + 1, leaf)
        states[:, j] = res.levels[i][parent]
        actions[:, j] = res.levels[i + 1][child]
        log_probs[:, j] = res.log_probs[i][child]
        if means is not None:
            means[:, j] = res.means[i][child]
        owner = leaf % layout.subtree_leaves(i + 1) == 0
        mask[:, j] = owner & (i not in pruned)
        key[:, j] = offsets[i] + parent
        std_scale[:, j] = res.std_scale[i]
    images = policy.decode(res.levels[-1].to(policy.device, roots.dtype))
    total = counter.evals
    return Trajectories(
        prompts=[prompts[p] for p in tree.tolist()],
        group_ids=tree.clone(),
        log_probs=log_probs,
        mask=mask,
        states=states,
        actions=actions,
        sigmas=grid[torch.tensor(cols)].float().expand(B, C).clone(),
        sigmas_next=grid[torch.tensor(cols) + 1].float().expand(B, C).clone(),
        means=means,
        outputs=images.float().cpu(),
        cond={k: v[tree.to(v.device)].detach() for k, v in cond.items()},
        meta={
            "kernel": policy.sampler,
            "noise_level": policy.noise_level,
            "rollout_structure": "tree",
            "tree": TreeInfo(layout=layout, num_trees=P, columns=tuple(cols), edge_log_probs=res.log_probs, depth_pruned=tuple(sorted(pruned))),
            "step_index": torch.tensor(cols).expand(B, C).clone(),
            "final_latents": res.levels[-1].float(),
            "state_key": key,
            "std_scale": std_scale,
            "minibatch_groups": tree.clone(),
            "evaluate_masked_only": True,
            "window_start": start,
            "model_evals": float(total) / B,
            "model_evals_total": float(total),
            "transformer_calls": float(counter.calls),
            "edges_per_sample": float(mask.sum()) / B,
        },
    )


class TreeInfo:
    """Tree structure of a batch (kept out of row slicing: not a tensor, list or dict).

    layout: the :class:`~flowrl.tree.TreeLayout`; num_trees: P (one per prompt, trees contiguous,
    ``L`` rows each); columns: the step index of each stored column; edge_log_probs: per step the
    ``[P·n_{i+1}]`` edge log-probs (None for ODE steps), for log-prob-weighted reward fusion."""

    def __init__(self, *, layout: Any, num_trees: int, columns: tuple[int, ...], edge_log_probs: list[Tensor | None], depth_pruned: tuple[int, ...] = ()):
        self.layout, self.num_trees, self.columns, self.edge_log_probs = layout, num_trees, columns, edge_log_probs
        self.depth_pruned = depth_pruned

    def __repr__(self) -> str:
        return f"TreeInfo(trees={self.num_trees}, splits={list(self.layout.split_steps)}, branch={self.layout.branch}, columns={list(self.columns)})"


def chain_rollout(policy: Any, prompts: list[str], *, group_size: int, generator: torch.Generator | None, stochastic: Sequence[bool] | None = None, grid: Tensor | None = None, ode_solver: str = "euler") -> "Trajectories":
    """Sample one chain per sample; steps with ``stochastic[i]`` use the policy's kernel and are
    stored, the others are deterministic ODE steps (window schedules). ``stochastic=None``: all steps.

    ``grid``: the σ grid (default: the policy's). ``ode_solver``: ``euler`` for every ODE step, or
    ``dpm2`` (MixGRPO-Flash): DPM-Solver++(2M) for the ODE steps *after* the last stochastic step
    (:func:`flowrl.sde.dpm2_step`, multistep on the x̂0 predictions of the previous steps, the
    window's included, as the MixGRPO reference); ODE steps before the window stay Euler.

    Cost: one text-encoder call for the batch's distinct prompts and the negative (cached across
    calls), one transformer call (CFG rows batched) and one kernel evaluation per step. The SDE
    noise is drawn before the loop and every state stays on the model's device until the loop
    ends, so nothing reads back to the host while denoising (Euler/SDE steps); the trajectory
    moves to the CPU once."""
    from flowrl.policy import Trajectories
    from flowrl.sde import check_steps, dpm2_step, gaussian_log_prob

    if ode_solver not in ("euler", "dpm2"):
        raise ValueError(f"unknown ode_solver '{ode_solver}'. Known: euler, dpm2.")
    grid = policy.sigma_grid() if grid is None else grid.float().cpu()
    num_steps = len(grid) - 1
    stochastic = list(stochastic) if stochastic is not None else [True] * num_steps
    if len(stochastic) != num_steps:
        raise ValueError(f"stochastic mask has {len(stochastic)} entries for {num_steps} steps")
    stored = [i for i, s in enumerate(stochastic) if s]
    if not stored:
        raise ValueError("the rollout schedule made no step stochastic, so nothing can be trained.")
    check_steps(policy.sampler, grid[:-1], grid[1:], policy.noise_level, stochastic=False)
    check_steps(policy.sampler, grid[stored], grid[[i + 1 for i in stored]], policy.noise_level)
    prompts_rep = [p for p in prompts for _ in range(group_size)]
    batch = len(prompts_rep)
    cond_unique = policy.encode(prompts)
    cond = {k: v.repeat_interleave(group_size, dim=0) for k, v in cond_unique.items()}
    x = policy.initial_noise(len(prompts), group_size, generator)
    noises = [policy.draw_noise(x.shape, generator) for _ in stored]  # the draws the loop used to make, in order
    grid_dev = grid.to(policy.device)
    states, actions, log_probs, means = [], [], [], []
    last_sde = stored[-1]
    prev_x0 = prev_sigma = None
    shape = (-1,) + (1,) * (x.dim() - 1)
    for i in range(num_steps):
        sigma, sigma_next = grid_dev[i].expand(batch), grid_dev[i + 1].expand(batch)
        v = policy.velocity(x, sigma, cond)
        x0_pred = x.float() - sigma.view(shape) * v.float() if ode_solver == "dpm2" else None
        if stochastic[i]:
            out = policy.transition(x.float(), v.float(), sigma, sigma_next, noise=noises[len(states)], validate=False)
            x_next = out.prev_sample.to(x.dtype)
            # log-prob of the stored (possibly down-cast) sample, exactly what recomputation sees
            lp = out.log_prob if x_next.dtype == torch.float32 else gaussian_log_prob(x_next.float(), out.mean, out.std, reduce=policy.log_prob_reduce)
            states.append(x.float())
            actions.append(x_next.float())
            log_probs.append(lp)
            if policy.store_means:
                means.append(out.mean.float())
        elif x0_pred is not None and i > last_sde:  # MixGRPO-Flash: 2nd-order multistep after the window
            x_next = dpm2_step(x.float(), x0_pred, sigma.view(shape), sigma_next.view(shape), prev_x0,
                               None if prev_sigma is None else prev_sigma.view(shape)).to(x.dtype)
        else:
            x_next = policy.transition(x.float(), v.float(), sigma, sigma_next, kind="ode", validate=False).prev_sample.to(x.dtype)
        if x0_pred is not None:
            prev_x0, prev_sigma = x0_pred, sigma
        x = x_next
    images = policy.decode(x)
    num_prompts = len(prompts)
    group_ids = torch.arange(num_prompts).repeat_interleave(group_size)
    cols = torch.tensor(stored)
    return Trajectories(
        prompts=prompts_rep,
        group_ids=group_ids,
        log_probs=torch.stack(log_probs, 1).cpu(),
        mask=torch.ones(batch, len(states), dtype=torch.bool),
        states=torch.stack(states, 1).cpu(),
        actions=torch.stack(actions, 1).cpu(),
        sigmas=grid[cols].expand(batch, -1).clone(),
        sigmas_next=grid[cols + 1].expand(batch, -1).clone(),
        means=torch.stack(means, 1).cpu() if means else None,
        outputs=images.float().cpu(),
        cond={k: v.detach() for k, v in cond.items()},
        meta={
            "kernel": policy.sampler,
            "noise_level": policy.noise_level,
            "log_prob_reduce": policy.log_prob_reduce,  # GRPO-Guard's b must use the same reduction
            "step_index": cols.repeat(batch, 1),
            "final_latents": x.float().cpu(),
            "model_evals": float(num_steps * (2 if policy.guidance_scale > 1 else 1)),
            "model_evals_total": float(num_steps * (2 if policy.guidance_scale > 1 else 1) * batch),
            "transformer_calls": float(num_steps),  # one batched call per step (CFG rows included)
        },
    )
