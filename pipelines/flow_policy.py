"""``FlowPolicy``: any diffusers flow-matching pipeline as an SDE sampler with per-step log-probs.

The model family's plumbing comes from an adapter (``pipelines/sd3.py``, ``flux.py``, ...); the
sampling math from ``flowrl.sde``; *which* steps are stochastic from a rollout schedule
(``flowrl.rollout``). σ for every step is read from the stored schedule — the stateful
``scheduler.step()`` is never called.

Trajectory layout (``T`` stored = stochastic steps; ``*L`` = latent shape):
``states [B, T, *L]`` x_σ before each stored step, ``actions [B, T, *L]`` the sampled x_σ',
``sigmas``/``sigmas_next`` ``[B, T]``, ``log_probs [B, T]``, optional ``means [B, T, *L]`` (μ_old),
``outputs [B, C, H, W]`` decoded images in [0, 1]; ``meta["final_latents"]`` the clean latents.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from flowrl.pipelines.base import FlowAdapter, adapter_for
from flowrl.policy import PolicyBase, PolicyEval, Trajectories
from flowrl.sde import KERNELS, gaussian_log_prob, sde_step

#: attention projections LoRA targets by default (Flow-GRPO's SD3 list; peft matches name suffixes).
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class FlowPolicy(PolicyBase):
    """A diffusers flow pipeline wrapped as a :class:`~flowrl.policy.Policy`.

    Args:
        pipe: a pipeline with a ``transformer`` and a ``FlowMatchEulerDiscreteScheduler``.
        sampler: transition kernel of stochastic steps (``ode``, ``flow``, ``dance``, ``sage``, ``cps``).
        noise_level: the kernel's a / η.
        num_steps: denoising steps per rollout.
        guidance_scale: CFG scale used in rollouts *and* recomputation (1 = no CFG).
        height, width: generation size in pixels (default: the adapter's).
        rollout: schedule name in ``flowrl.rollout.SCHEDULES`` (``full``: SDE at every step).
        rollout_params: the schedule's options.
        share_initial_noise: group members start from the same noise (DanceGRPO).
        store_means: keep μ_old per step (GRPO-Guard needs it).
        log_prob_reduce: ``mean`` (Flow-GRPO) or ``sum`` over latent dims.
        steps_per_backward: stored steps per backward pass in training (memory knob).
        adapter_options: options of the model family's adapter (video: ``num_frames``,
            ``negative_prompt``, ``decode_batch_size``; see ``pipelines/video_common.py``).
    """

    default_lora_targets = DEFAULT_LORA_TARGETS

    def __init__(
        self,
        pipe: Any,
        *,
        sampler: str = "flow",
        noise_level: float = 0.7,
        num_steps: int = 10,
        guidance_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        rollout: str = "full",
        rollout_params: dict[str, Any] | None = None,
        share_initial_noise: bool = False,
        store_means: bool = False,
        log_prob_reduce: str = "mean",
        steps_per_backward: int | None = 1,
        adapter: FlowAdapter | None = None,
        adapter_options: dict[str, Any] | None = None,
    ):
        KERNELS.get(sampler)  # validates the name
        if num_steps < 1:
            raise ValueError(f"num_steps must be ≥ 1, got {num_steps}")
        self.adapter = adapter if adapter is not None else adapter_for(pipe)
        if adapter_options:
            configure = getattr(self.adapter, "configure", None)
            if configure is None:
                raise ValueError(f"{type(self.adapter).__name__} takes no adapter options (got {sorted(adapter_options)}).")
            configure(**adapter_options)
        self.pipe = pipe
        self.sampler = sampler
        self.noise_level = float(noise_level)
        self.num_steps = int(num_steps)
        self.guidance_scale = float(guidance_scale)
        dh, dw = self.adapter.default_size
        self.height = int(height or dh)
        self.width = int(width or dw)
        self.rollout_name = rollout
        self.rollout_params = dict(rollout_params or {})
        self.share_initial_noise = share_initial_noise
        self.store_means = store_means
        self.log_prob_reduce = log_prob_reduce
        self.steps_per_backward = steps_per_backward
        #: incremented by the trainer; sliding schedules (MixGRPO) read it.
        self.iteration = 0
        self._reference_model = None

    @classmethod
    def from_pipeline(cls, pipe: Any, **kwargs: Any) -> "FlowPolicy":
        """Wrap ``pipe``; keyword arguments as in :class:`FlowPolicy`."""
        return cls(pipe, **kwargs)

    # ---------------------------------------------------------------------------- plumbing
    @property
    def model(self) -> torch.nn.Module:  # type: ignore[override]
        return self.adapter.pipe.transformer

    @model.setter
    def model(self, module: torch.nn.Module) -> None:
        self.adapter.pipe.transformer = module

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    def sigma_grid(self, num_steps: int | None = None) -> Tensor:
        """σ grid ``[T + 1]`` (float32) for this policy's size, ending at 0."""
        grid = self.adapter.sigmas(num_steps or self.num_steps, height=self.height, width=self.width).float()
        if grid[-1] != 0:
            grid = torch.cat([grid, grid.new_zeros(1)])
        return grid

    def encode(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        return self.adapter.encode_prompts(list(prompts), guidance_scale=self.guidance_scale)

    def velocity(self, latents: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """v(x, σ) with this policy's CFG; ``sigma`` ``[B]``. Latents and float conditioning are cast
        to the transformer's dtype (text encoders may run in another precision)."""
        dtype = self.adapter.dtype
        cond = {k: (v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v) for k, v in cond.items()}
        return self.adapter.velocity(latents.to(dtype), sigma.to(latents.device), cond, guidance_scale=self.guidance_scale, height=self.height, width=self.width)

    def initial_noise(self, num_prompts: int, group_size: int, generator: torch.Generator | None) -> Tensor:
        if self.share_initial_noise:
            z = self.adapter.initial_noise(num_prompts, height=self.height, width=self.width, generator=generator)
            return z.repeat_interleave(group_size, dim=0)
        return self.adapter.initial_noise(num_prompts * group_size, height=self.height, width=self.width, generator=generator)

    def decode(self, latents: Tensor) -> Tensor:
        return self.adapter.decode(latents, height=self.height, width=self.width)

    def transition(self, x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, *, kind: str | None = None, noise: Tensor | None = None, prev_sample: Tensor | None = None, generator: torch.Generator | None = None, noise_level: float | None = None):
        """One kernel step (``flowrl.sde.sde_step``) with this policy's kernel and reduction."""
        return sde_step(
            x, v, sigma, sigma_next, kind=kind or self.sampler,
            noise_level=self.noise_level if noise_level is None else noise_level,
            noise=noise, prev_sample=prev_sample, generator=generator, reduce=self.log_prob_reduce,
        )

    def draw_noise(self, shape: torch.Size, generator: torch.Generator | None) -> Tensor:
        from flowrl.seeding import randn

        return randn(shape, generator).to(self.device)

    # ------------------------------------------------------------------------------ Policy
    def rollout(self, prompts: Sequence[str], *, group_size: int, generator: torch.Generator | None = None, height: int | None = None, width: int | None = None) -> Trajectories:
        """Sample ``group_size`` images per prompt with the configured rollout schedule."""
        from flowrl.rollout import SCHEDULES

        if group_size < 1:
            raise ValueError(f"group_size must be ≥ 1, got {group_size}")
        if height or width:
            self.height, self.width = int(height or self.height), int(width or self.width)
        schedule = SCHEDULES.get(self.rollout_name)
        with torch.no_grad():
            return schedule(self, list(prompts), group_size=group_size, generator=generator, **self.rollout_params)

    def evaluate(self, traj: Trajectories, steps: Tensor | None = None) -> PolicyEval:
        """Re-run the current weights on stored steps → log-probs ``[B, T']``, means, stds.

        Uses the stored σ, σ' and conditioning; the kernel and noise level recorded at rollout.

        Structured rollouts (``flowrl.rollout``: singular, tree) may set in ``traj.meta``:
        ``state_key`` ``[B, T]`` long — rows with equal keys at a step share its state and
        conditioning, so their velocity is computed once; ``evaluate_masked_only`` — rows whose
        ``mask`` is False at a step are not run (their log-prob is the stored one, their mean the
        stored action: they carry no loss); ``std_scale`` ``[B, T]`` — the step's noise was scaled
        at rollout (BranchGRPO split noise), so the log-prob and std use the scaled std."""
        if steps is None:
            steps = torch.arange(traj.num_steps)
        kind = traj.meta.get("kernel", self.sampler)
        noise_level = traj.meta.get("noise_level", self.noise_level)
        std_scale = traj.meta.get("std_scale")
        log_probs, means, stds = [], [], []
        for j in steps.tolist():
            x = traj.states[:, j].to(self.device)
            sigma = traj.sigmas[:, j].to(self.device)
            sigma_next = traj.sigmas_next[:, j].to(self.device)
            v, active = self._stored_velocity(traj, j, x, sigma)
            prev = traj.actions[:, j].to(self.device).float()
            out = sde_step(
                x.float(), v.float(), sigma, sigma_next, kind=kind, noise_level=noise_level,
                prev_sample=prev, reduce=self.log_prob_reduce,
            )
            log_prob, mean, std = out.log_prob, out.mean, out.std
            if std_scale is not None:
                std = std * std_scale[:, j].to(self.device).float().view(-1, *([1] * (std.dim() - 1)))
                log_prob = gaussian_log_prob(prev, mean, std, reduce=self.log_prob_reduce)
            if active is not None:
                log_prob = torch.where(active, log_prob, traj.log_probs[:, j].to(self.device).float())
                mean = torch.where(active.view(-1, *([1] * (mean.dim() - 1))), mean, prev)
            log_probs.append(log_prob)
            means.append(mean)
            stds.append(std.flatten(1)[:, 0])
        return PolicyEval(log_prob=torch.stack(log_probs, 1), mean=torch.stack(means, 1), std=torch.stack(stds, 1))

    def _stored_velocity(self, traj: Trajectories, j: int, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor | None]:
        """Velocity of stored step ``j`` for every row, honouring ``meta["state_key"]`` (one
        evaluation per distinct state) and ``meta["evaluate_masked_only"]`` → ``(v, active)``,
        ``active`` ``[B]`` bool or None when every row was run."""
        keys = traj.meta.get("state_key")
        masked_only = bool(traj.meta.get("evaluate_masked_only", False))
        if keys is None and not masked_only:
            return self.velocity(x.to(self.adapter.dtype), sigma, traj.cond), None
        batch = x.shape[0]
        active = traj.mask[:, j].to(torch.bool) if masked_only else torch.ones(batch, dtype=torch.bool)
        rows = torch.nonzero(active.cpu()).flatten()
        v = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if len(rows) == 0:
            return v, active.to(x.device)
        if keys is not None:
            _, inverse = torch.unique(keys[:, j].cpu()[rows], return_inverse=True)
            first = torch.full((int(inverse.max()) + 1,), len(rows), dtype=torch.long).scatter_reduce(0, inverse, torch.arange(len(rows)), "amin")
            rep = rows[first]
        else:
            rep, inverse = rows, torch.arange(len(rows))
        cond = {k: (c[rep.to(c.device)] if isinstance(c, Tensor) and c.dim() > 0 and c.shape[0] == batch else c) for k, c in traj.cond.items()}
        v_rep = self.velocity(x[rep.to(x.device)].to(self.adapter.dtype), sigma[rep.to(sigma.device)], cond).float()
        v = v.index_copy(0, rows.to(x.device), v_rep[inverse.to(x.device)])
        return v, active.to(x.device)

    def save_lora(self, directory) -> None:
        """Save the transformer's LoRA in the diffusers format: stock ``pipe.load_lora_weights(dir)``
        loads it (pipelines with a LoRA loader mixin; others get the same file layout)."""
        from pathlib import Path

        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.model)  # the layout diffusers' own training scripts save
        saver = getattr(type(self.pipe), "save_lora_weights", None)
        Path(directory).mkdir(parents=True, exist_ok=True)
        # Stock loaders infer alpha = rank (scale 1) from weights alone, and diffusers 0.42 drops
        # attention projections when adapter metadata is given; so fold the scale α/r into lora_B.
        cfg = self.model.peft_config["default"]
        scale = float(cfg.lora_alpha) / float(cfg.r)
        state = {k: (v * scale if "lora_B" in k else v).detach().cpu().contiguous() for k, v in state.items()}
        if saver is not None:
            saver(str(directory), transformer_lora_layers=state)
        else:
            from safetensors.torch import save_file

            save_file({f"transformer.{k}": v.detach().cpu().contiguous() for k, v in state.items()}, str(Path(directory) / "pytorch_lora_weights.safetensors"))

    # ----------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, generator: torch.Generator | None = None, num_steps: int | None = None, kind: str = "ode") -> Tensor:
        """Plain sampling for evaluation: images ``[B, C, H, W]`` in [0, 1] (ODE by default)."""
        cond = self.encode(prompts)
        grid = self.sigma_grid(num_steps)
        x = self.adapter.initial_noise(len(prompts), height=self.height, width=self.width, generator=generator)
        for i in range(len(grid) - 1):
            sigma = grid[i].expand(len(prompts)).to(self.device)
            v = self.velocity(x, sigma, cond)
            x = self.transition(x.float(), v.float(), sigma, grid[i + 1].expand(len(prompts)).to(self.device), kind=kind, generator=generator).prev_sample.to(x.dtype)
        return self.decode(x)


def chain_rollout(policy: FlowPolicy, prompts: list[str], *, group_size: int, generator: torch.Generator | None, stochastic: Sequence[bool] | None = None, grid: Tensor | None = None, ode_solver: str = "euler") -> Trajectories:
    """Sample one chain per sample; steps with ``stochastic[i]`` use the policy's kernel and are
    stored, the others are deterministic ODE steps (window schedules). ``stochastic=None``: all steps.

    ``grid``: the σ grid (default: the policy's). ``ode_solver``: ``euler`` for every ODE step, or
    ``dpm2`` (MixGRPO-Flash): DPM-Solver++(2M) for the ODE steps *after* the last stochastic step
    (:func:`flowrl.sde.dpm2_step`, multistep on the x̂0 predictions of the previous steps, the
    window's included, as the MixGRPO reference); ODE steps before the window stay Euler."""
    from flowrl.sde import dpm2_step

    if ode_solver not in ("euler", "dpm2"):
        raise ValueError(f"unknown ode_solver '{ode_solver}'. Known: euler, dpm2.")
    grid = policy.sigma_grid() if grid is None else grid
    num_steps = len(grid) - 1
    stochastic = list(stochastic) if stochastic is not None else [True] * num_steps
    if len(stochastic) != num_steps:
        raise ValueError(f"stochastic mask has {len(stochastic)} entries for {num_steps} steps")
    prompts_rep = [p for p in prompts for _ in range(group_size)]
    batch = len(prompts_rep)
    cond_unique = policy.encode(prompts)
    cond = {k: v.repeat_interleave(group_size, dim=0) for k, v in cond_unique.items()}
    x = policy.initial_noise(len(prompts), group_size, generator)
    states, actions, log_probs, means, sig, sig_next = [], [], [], [], [], []
    last_sde = max([i for i, s in enumerate(stochastic) if s], default=-1)
    prev_x0 = prev_sigma = None
    for i in range(num_steps):
        sigma = grid[i].expand(batch).to(policy.device)
        sigma_next = grid[i + 1].expand(batch).to(policy.device)
        v = policy.velocity(x, sigma, cond)
        x0_pred = None
        if ode_solver == "dpm2":
            shape = (-1,) + (1,) * (x.dim() - 1)
            x0_pred = x.float() - sigma.view(shape) * v.float()
        if stochastic[i]:
            noise = policy.draw_noise(x.shape, generator)
            out = policy.transition(x.float(), v.float(), sigma, sigma_next, noise=noise)
            x_next = out.prev_sample.to(x.dtype)
            # log-prob of the stored (possibly down-cast) sample, exactly what recomputation sees
            lp = policy.transition(x.float(), v.float(), sigma, sigma_next, prev_sample=x_next.float()).log_prob
            states.append(x.float().cpu())
            actions.append(x_next.float().cpu())
            log_probs.append(lp.cpu())
            if policy.store_means:
                means.append(out.mean.float().cpu())
            sig.append(sigma.cpu())
            sig_next.append(sigma_next.cpu())
        elif x0_pred is not None and i > last_sde:  # MixGRPO-Flash: 2nd-order multistep after the window
            x_next = dpm2_step(x.float(), x0_pred, sigma.view(shape), sigma_next.view(shape), prev_x0,
                               None if prev_sigma is None else prev_sigma.view(shape)).to(x.dtype)
        else:
            x_next = policy.transition(x.float(), v.float(), sigma, sigma_next, kind="ode").prev_sample.to(x.dtype)
        if x0_pred is not None:
            prev_x0, prev_sigma = x0_pred, sigma
        x = x_next
    images = policy.decode(x)
    num_prompts = len(prompts)
    group_ids = torch.arange(num_prompts).repeat_interleave(group_size)
    if not states:
        raise ValueError("the rollout schedule made no step stochastic, so nothing can be trained.")
    return Trajectories(
        prompts=prompts_rep,
        group_ids=group_ids,
        log_probs=torch.stack(log_probs, 1),
        mask=torch.ones(batch, len(states), dtype=torch.bool),
        states=torch.stack(states, 1),
        actions=torch.stack(actions, 1),
        sigmas=torch.stack(sig, 1),
        sigmas_next=torch.stack(sig_next, 1),
        means=torch.stack(means, 1) if means else None,
        outputs=images.float().cpu(),
        cond={k: v.detach() for k, v in cond.items()},
        meta={
            "kernel": policy.sampler,
            "noise_level": policy.noise_level,
            "log_prob_reduce": policy.log_prob_reduce,  # GRPO-Guard's b must use the same reduction
            "step_index": torch.tensor([i for i, s in enumerate(stochastic) if s]).repeat(batch, 1),
            "final_latents": x.float().cpu(),
            "model_evals": float(num_steps * (2 if policy.guidance_scale > 1 else 1)),
            "model_evals_total": float(num_steps * (2 if policy.guidance_scale > 1 else 1) * batch),
            "transformer_calls": float(num_steps),  # one batched call per step (CFG rows included)
        },
    )
