"""DiffusionNFT (Zheng et al. 2025): online RL on the forward process — no likelihoods, any sampler.

Pieces (Zheng et al. 2025; docs/algorithms.md "DiffusionNFT"):

- ``x0_only`` rollout schedule: sample with any black-box ODE solver (``euler`` or ``dpm2``, a
  deterministic 2nd-order DPM-Solver++(2M) in data-prediction form on the flow path) and keep only
  the clean latents x0, plus the forward-process noise ε of each training slot.
- :func:`nft_optimality`: r = clip(A, −c, c)/(2c) + ½ ∈ [0, 1] (c = 5: r = clip(A)/10 + ½), with
  A = (R − mean_prompt)/(std_batch + 1e-4) (the ``group`` estimator with ``std="global"``).
- :class:`NFTObjective` (``OBJECTIVES["nft"]``): x_t = (1−t)·x0 + t·ε at t from the sampler's grid,
  :func:`flowrl.losses.nft_loss` between the current velocity and the old policy's, optional
  velocity-space KL to the reference weighted by the preset's ``loss.beta``.
- The old policy θ_old: a shadow copy of the trainable (LoRA) weights — a second adapter. Each
  iteration's rollouts are sampled **with θ_old** (the trainer runs the rollout inside
  :meth:`NFTObjective.sampling_weights`; DiffusionNFT Algorithm 1, and the reference switches to
  its "old" adapter before sampling), which is why the loss's implicit positive/negative policies
  are centred on v_old. After every iteration θ_old ← d·θ_old + (1−d)·θ, with d from
  :func:`soft_update_decay` at the number of optimizer steps taken so far (the reference's
  ``global_step``), not the iteration count; they differ when an iteration takes several steps.
- Trained timesteps: the preset trains a random ⌊0.99·T⌋ of the T slots per sample (9 of 10), as
  the reference's ``timestep_fraction`` 0.99 over a per-sample permutation of the timesteps.

DiffusionNFT's β is ``nft_beta`` everywhere (config ``loss.nft_beta``); ``beta`` stays the KL weight.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from flowrl.losses import masked_mean, nft_loss_per_sample
from flowrl.sde import dpm2_step  # noqa: F401  (public here too: the solver of x0_only rollouts)
from flowrl.policy import Trajectories
from flowrl.rollout import SCHEDULES
from flowrl.plugins import OBJECTIVES

#: soft-update schedules: (flat steps, rate, cap) → d(step) = 0 if step < flat else min(rate·(step − flat), cap)
DECAY_SCHEDULES: dict[str, tuple[float, float, float]] = {
    "on_policy": (0.0, 0.0, 0.0),  # d = 0: the old policy is the current one after every iteration
    "linear": (0.0, 0.001, 0.5),  # d = min(0.001·step, 0.5) (the reference default)
    "delayed": (75.0, 0.0075, 0.999),  # OCR: 0 until step 75, then min(0.0075·(step − 75), 0.999)
}
SOLVERS = ("euler", "dpm2")


def soft_update_decay(step: int, schedule: str | Sequence[float] = "linear") -> float:
    """Decay d of θ_old ← d·θ_old + (1−d)·θ when ``step`` optimizer steps have been taken in
    total (the reference's ``global_step``). ``schedule`` is a name in :data:`DECAY_SCHEDULES` or a
    ``(flat, rate, cap)`` triple."""
    if isinstance(schedule, str):
        if schedule not in DECAY_SCHEDULES:
            raise ValueError(f"unknown soft-update schedule '{schedule}'. Known: {', '.join(DECAY_SCHEDULES)}, or (flat, rate, cap).")
        schedule = DECAY_SCHEDULES[schedule]
    flat, rate, cap = (float(v) for v in schedule)
    return 0.0 if step < flat else min(rate * (step - flat), cap)


def nft_optimality(advantages: Tensor, *, clip: float = 5.0) -> Tensor:
    """r = clip(A, −c, c)/(2c) + ½ ∈ [0, 1] (DiffusionNFT; c = 5 gives clip(A)/10 + ½)."""
    return advantages.float().clamp(-clip, clip) / (2 * clip) + 0.5


# ------------------------------------------------------------------------------------- solvers
def euler_step(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """x + (σ' − σ)·v (σ, σ' broadcastable to x)."""
    return x + (sigma_next - sigma) * v


def solve(velocity: Callable[[Tensor, Tensor], Tensor], x: Tensor, grid: Tensor, *, solver: str = "dpm2") -> Tensor:
    """Integrate the flow ODE from σ = grid[0] to grid[-1] (= 0) with ``euler`` or ``dpm2``.
    ``velocity(x, sigma[B]) -> v``; one velocity evaluation per step for both solvers."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver '{solver}'. Known: {', '.join(SOLVERS)}.")
    b = x.shape[0]
    shape = (-1,) + (1,) * (x.dim() - 1)
    prev_x0 = prev_sigma = None
    for i in range(len(grid) - 1):
        s = grid[i].expand(b).to(x.device)
        s_next = grid[i + 1].expand(b).to(x.device)
        v = velocity(x, s).float()
        xf = x.float()
        if solver == "euler":
            x_new = euler_step(xf, v, s.view(shape), s_next.view(shape))
        else:
            x0 = xf - s.view(shape) * v
            x_new = dpm2_step(xf, x0, s.view(shape), s_next.view(shape), prev_x0, None if prev_sigma is None else prev_sigma.view(shape))
            prev_x0, prev_sigma = x0, s
        x = x_new.to(x.dtype)
    return x


# ------------------------------------------------------------------------------------- rollout
def x0_rollout(policy: Any, prompts: list[str], *, group_size: int, generator: torch.Generator | None = None, solver: str = "dpm2") -> Trajectories:
    """Black-box sampling for DiffusionNFT: ODE-solve each sample to x0 (``solver``), decode, and
    keep only x0 plus the forward-process noise ε ``[B, T, *L]`` of the T training slots (slot j
    trains at t = grid[j], every σ > 0 of the sampler's grid). Layout: ``actions`` = ε,
    ``sigmas`` = t, ``meta["final_latents"]`` = x0; ``log_probs`` are zeros (no likelihood)."""
    grid = policy.sigma_grid()
    prompts_rep = [p for p in prompts for _ in range(group_size)]
    batch = len(prompts_rep)
    cond_unique = policy.encode(prompts)
    cond = {k: v.repeat_interleave(group_size, dim=0) for k, v in cond_unique.items()}
    x = policy.initial_noise(len(prompts), group_size, generator)
    x0 = solve(lambda z, s: policy.velocity(z, s, cond), x, grid, solver=solver)
    images = policy.decode(x0)
    t = grid[:-1][grid[:-1] > 0]
    num = len(t)
    eps = policy.draw_noise(torch.Size((batch, num) + tuple(x0.shape[1:])), generator).float().cpu()
    return Trajectories(
        prompts=prompts_rep,
        group_ids=torch.arange(len(prompts)).repeat_interleave(group_size),
        log_probs=torch.zeros(batch, num),
        mask=torch.ones(batch, num, dtype=torch.bool),
        actions=eps,
        sigmas=t.float().expand(batch, num).clone(),
        sigmas_next=torch.zeros(batch, num),
        outputs=images.float().cpu(),
        cond={k: v.detach() for k, v in cond.items()},
        meta={
            "kernel": "ode", "solver": solver, "final_latents": x0.float().cpu(),
            "model_evals": float((len(grid) - 1) * (2 if getattr(policy, "guidance_scale", 1.0) > 1 else 1)),
        },
    )


if "x0_only" not in SCHEDULES:
    SCHEDULES.register("x0_only", x0_rollout)


# ----------------------------------------------------------------------------------- objective
class NFTObjective:
    """``OBJECTIVES["nft"]``: the DiffusionNFT update of one chunk of training slots.

    Args:
        nft_beta: DiffusionNFT's β (1.0; 0.1 for OCR / multi-reward). Not the KL weight.
        x0_adaptive: the reference's x̂0-space, adaptively weighted form of the loss (default) or
            the plain v-space form.
        decay: soft-update schedule of the old policy (``on_policy``, ``linear``, ``delayed``, or
            a ``(flat, rate, cap)`` triple), evaluated at the total number of optimizer steps.
        adv_clip_max: c in r = clip(A, −c, c)/(2c) + ½.
        loss_scale: constant factor on the NFT loss (the reference multiplies by adv_clip_max = 5;
            it sets the balance against the KL term).

    The KL weight is the preset's ``loss.beta`` (1e-4 in the reference): β_KL·mean((v_θ − v_ref)²)
    with the reference (LoRA disabled). The old policy is a shadow of the trainable weights
    (snapshotted before the first rollout), swapped in under ``no_grad`` for the rollouts
    (:meth:`sampling_weights`) and for v_old; ``state_dict`` holds it and the optimizer-step count
    so resume is exact. Metrics: ``loss/policy``, ``nft/r_mean``, ``nft/v_gap`` (mean (v_θ − v_old)²),
    ``kl/ref``, ``loss/kl``, and ``nft/decay`` per iteration.
    """

    #: the chunk loss is a masked mean over (sample, slot) entries (the trainer's loss normaliser)
    loss_aggregation = "token-mean"

    def __init__(self, *, nft_beta: float = 1.0, x0_adaptive: bool = True, decay: str | Sequence[float] = "linear", adv_clip_max: float = 5.0, loss_scale: float = 5.0):
        if nft_beta <= 0:
            raise ValueError(f"nft_beta must be > 0, got {nft_beta}.")
        soft_update_decay(1, decay)  # validates
        self.nft_beta, self.x0_adaptive, self.decay = float(nft_beta), bool(x0_adaptive), decay
        self.adv_clip_max, self.loss_scale = float(adv_clip_max), float(loss_scale)
        self.old: list[Tensor] | None = None
        #: optimizer steps taken so far (the reference's ``global_step``; indexes the decay)
        self.updates = 0

    # -- old policy -------------------------------------------------------------------------
    def _params(self, policy: Any) -> list[torch.nn.Parameter]:
        return [p for p in policy.trainable_parameters()]

    def snapshot(self, policy: Any) -> None:
        self.old = [p.detach().clone() for p in self._params(policy)]

    @contextlib.contextmanager
    def old_weights(self, policy: Any):
        """Inside: the trainable weights hold θ_old (no gradients); restored on exit."""
        from flowrl.policy import weights_swapped

        with weights_swapped(self._params(policy), self.old):
            yield

    def sampling_weights(self, policy: Any):
        """The trainer samples each iteration's rollouts inside this: the weights hold θ_old
        (snapshotted from the current weights before the first rollout)."""
        if self.old is None:
            self.snapshot(policy)
        return self.old_weights(policy)

    @torch.no_grad()
    def soft_update(self, policy: Any, step: int) -> float:
        d = soft_update_decay(step, self.decay)
        if self.old is None:
            self.snapshot(policy)
        for o, p in zip(self.old, self._params(policy)):
            o.mul_(d).add_(p.detach(), alpha=1.0 - d)
        return d

    def on_update(self, trainer: Any) -> None:
        """Called by the trainer after every optimizer step."""
        self.updates += 1

    def on_iteration_end(self, trainer: Any, it: int) -> dict[str, float]:
        return {"nft/decay": self.soft_update(trainer.policy, self.updates)}

    def state_dict(self) -> dict[str, Any]:
        return {"old": None if self.old is None else [o.clone() for o in self.old], "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.old = None if state.get("old") is None else [o.clone() for o in state["old"]]
        self.updates = int(state.get("updates", 0))

    # -- loss -------------------------------------------------------------------------------
    def __call__(self, policy: Any, batch: Trajectories, steps: Tensor, ctx: Any) -> tuple[Tensor, dict[str, float]]:
        if self.old is None:
            self.snapshot(policy)
        if "final_latents" not in batch.meta or batch.actions is None:
            raise ValueError("the 'nft' objective needs x0 (meta['final_latents']) and ε per slot (actions): use rollout 'x0_only'.")
        kl_beta = float(ctx.resolved.preset.loss.beta) if ctx is not None else 0.0
        autocast = ctx.autocast if ctx is not None else contextlib.nullcontext
        dev = policy.device
        dtype = getattr(getattr(policy, "adapter", None), "dtype", torch.float32)
        x0 = batch.meta["final_latents"].to(dev).float()
        r = nft_optimality(batch.advantages.to(dev), clip=self.adv_clip_max)
        if r.dim() > 1:
            r = r.mean(-1)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        per_step, gaps, kls = [], [], []
        for j in steps.tolist():
            t = batch.sigmas[:, j].to(dev).float()
            eps = batch.actions[:, j].to(dev).float()
            x_t = (1 - t.view(shape)) * x0 + t.view(shape) * eps
            v_target = eps - x0
            with torch.no_grad(), self.old_weights(policy), autocast():
                v_old = policy.velocity(x_t.to(dtype), t, batch.cond).float()
            with autocast():
                v_theta = policy.velocity(x_t.to(dtype), t, batch.cond).float()
            loss_j = self.loss_scale * nft_loss_per_sample(v_theta, v_old, v_target, r, beta=self.nft_beta, x0_adaptive=self.x0_adaptive, t=t)
            gaps.append(((v_theta.detach() - v_old) ** 2).flatten(1).mean(1))
            if kl_beta > 0:
                with torch.no_grad(), policy.reference(), autocast():
                    v_ref = policy.velocity(x_t.to(dtype), t, batch.cond).float()
                kl_j = ((v_theta - v_ref) ** 2).flatten(1).mean(1)
                kls.append(kl_j)
            per_step.append(loss_j)
        mask = batch.mask[:, steps].to(dev).float()
        policy_loss = masked_mean(torch.stack(per_step, 1), mask)
        loss = policy_loss
        metrics = {"loss/policy": float(policy_loss.detach()), "nft/r_mean": float(r.mean()), "nft/v_gap": float(masked_mean(torch.stack(gaps, 1), mask))}
        if kls:
            kl = masked_mean(torch.stack(kls, 1), mask)
            loss = loss + kl_beta * kl
            metrics["kl/ref"] = float(kl.detach())
            metrics["loss/kl"] = float(kl_beta * kl.detach())
        return loss, metrics


if "nft" not in OBJECTIVES:
    OBJECTIVES.register("nft", NFTObjective)
