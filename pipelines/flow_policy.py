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
from flowrl.rollout import chain_rollout  # noqa: F401  (re-exported: the chain sampler lived here)
from flowrl.sde import KERNELS, check_steps, gaussian_log_prob, sde_step

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
        steps_per_backward: stored steps whose loss is aggregated together (1: Flow-GRPO's
            per-timestep loss). Consecutive chunks are recomputed in one transformer call and one
            backward pass as long as they fit in ``max_rows_per_call``.
        max_rows_per_call: most transformer rows (samples × stored steps, CFG rows counted) one
            recomputation call may hold; None: no limit. Memory knob of the batched update.
        max_sequence_length: text-encoder token length (default: the stock pipeline's, SD3 256,
            Flux 512).
        prompt_cache_mb: budget of the prompt-embedding cache (reused while the text encoders are
            frozen; 0 disables it).
        adapter_options: options of the model family's adapter (video: ``num_frames``,
            ``negative_prompt``, ``decode_batch_size``; see ``pipelines/video_common.py``).
    """

    default_lora_targets = DEFAULT_LORA_TARGETS
    #: most transformer rows per recomputation call (None: no limit); see the constructor.
    max_rows_per_call: int | None = None

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
        max_rows_per_call: int | None = None,
        max_sequence_length: int | None = None,
        prompt_cache_mb: float | None = None,
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
        if hasattr(self.adapter, "set_guidance"):  # modular pipelines: the guidance goes through diffusers' guider
            self.adapter.set_guidance(float(guidance_scale))
        if hasattr(self.adapter, "num_steps"):
            self.adapter.num_steps = int(num_steps)
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
        if max_rows_per_call is not None and max_rows_per_call < 1:
            raise ValueError(f"max_rows_per_call must be ≥ 1 or None (no limit), got {max_rows_per_call}")
        self.max_rows_per_call = max_rows_per_call
        if max_sequence_length is not None:
            if max_sequence_length < 1:
                raise ValueError(f"max_sequence_length must be ≥ 1, got {max_sequence_length}")
            self.adapter.max_sequence_length = int(max_sequence_length)
        if prompt_cache_mb is not None:
            self.adapter.prompt_cache_bytes = int(prompt_cache_mb * 2**20)
        #: incremented by the trainer; sliding schedules (MixGRPO) read it.
        self.iteration = 0
        self._reference_model = None

    @classmethod
    def from_pipeline(cls, pipe: Any, *, modular: bool | None = None, **kwargs: Any) -> "FlowPolicy":
        """Wrap ``pipe``; keyword arguments as in :class:`FlowPolicy`.

        ``pipe`` may be a diffusers ``ModularPipeline`` (any family whose denoising loop ends in a
        flow-matching scheduler step: ``flowrl.pipelines.modular``) or a regular pipeline.
        ``modular``: for a regular pipeline, build the modular pipeline diffusers has for it from its
        components and wrap that (True), keep the hand-written adapter (False), or (None) use the
        family's registered path: the modular one unless a hand adapter is registered for it."""
        from flowrl.pipelines.base import has_hand_adapter
        from flowrl.pipelines.modular import MODULAR_EQUIVALENT, to_modular

        if modular or (modular is None and not has_hand_adapter(pipe) and type(pipe).__name__ in MODULAR_EQUIVALENT):
            pipe = to_modular(pipe)
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
        """Conditioning rows of ``prompts``; image-conditioned families (editing, image-to-video)
        also encode each prompt's source images at this policy's size."""
        if getattr(self.adapter, "image_conditioned", False):
            return self.adapter.encode_prompts(list(prompts), guidance_scale=self.guidance_scale, height=self.height, width=self.width)
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

    def transition(self, x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, *, kind: str | None = None, noise: Tensor | None = None, prev_sample: Tensor | None = None, generator: torch.Generator | None = None, noise_level: float | None = None, validate: bool = True):
        """One kernel step (``flowrl.sde.sde_step``) with this policy's kernel and reduction."""
        return sde_step(
            x, v, sigma, sigma_next, kind=kind or self.sampler,
            noise_level=self.noise_level if noise_level is None else noise_level,
            noise=noise, prev_sample=prev_sample, generator=generator, reduce=self.log_prob_reduce, validate=validate,
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
        All requested steps are recomputed together: their rows (samples × steps, CFG rows
        included) go through the transformer in as few calls as ``max_rows_per_call`` allows (one
        call when it is None), and the kernel runs once over all of them. The numbers equal a
        per-step loop up to the last bits that a different batch composition changes (measured:
        ≤ 2e-6 in the log-probs on CPU float32).

        Structured rollouts (``flowrl.rollout``: singular, tree) may set in ``traj.meta``:
        ``state_key`` ``[B, T]`` long — rows with equal keys at a step share its state and
        conditioning, so their velocity is computed once; ``evaluate_masked_only`` — rows whose
        ``mask`` is False at a step are not run (their log-prob is the stored one, their mean the
        stored action: they carry no loss); ``std_scale`` ``[B, T]`` — the step's noise was scaled
        at rollout (BranchGRPO split noise), so the log-prob and std use the scaled std."""
        idx = torch.arange(traj.num_steps) if steps is None else torch.as_tensor(steps, dtype=torch.long).cpu()
        kind = traj.meta.get("kernel", self.sampler)
        noise_level = traj.meta.get("noise_level", self.noise_level)
        std_scale = traj.meta.get("std_scale")
        dev = self.device
        batch, k = len(traj), len(idx)
        x = traj.states[:, idx].to(dev)  # [B, K, *L]
        lat = tuple(x.shape[2:])
        prev = traj.actions[:, idx].to(dev).float()
        sigma = traj.sigmas[:, idx].to(dev)
        sigma_next = traj.sigmas_next[:, idx].to(dev)
        v, active = self._stored_velocities(traj, idx, x, sigma)

        def flat(t: Tensor) -> Tensor:
            return t.reshape(batch * k, *t.shape[2:])

        out = sde_step(
            flat(x).float(), flat(v), flat(sigma), flat(sigma_next), kind=kind, noise_level=noise_level,
            prev_sample=flat(prev), reduce=self.log_prob_reduce,
        )
        mean = out.mean.view(batch, k, *lat)
        std = out.std.view(batch, k, *out.std.shape[1:])
        log_prob = out.log_prob.view(batch, k)
        if std_scale is not None:
            std = std * std_scale[:, idx].to(dev).float().view(batch, k, *([1] * (std.dim() - 2)))
            log_prob = gaussian_log_prob(flat(prev), flat(mean), flat(std), reduce=self.log_prob_reduce).view(batch, k)
        if active is not None:
            log_prob = torch.where(active, log_prob, traj.log_probs[:, idx].to(dev).float())
            mean = torch.where(active.view(batch, k, *([1] * len(lat))), mean, prev)
        return PolicyEval(log_prob=log_prob, mean=mean, std=std.flatten(2)[:, :, 0])

    def rows_per_step(self, traj: Trajectories) -> int:
        """Transformer rows one stored step of ``traj`` costs at most (samples × CFG factor)."""
        return len(traj) * (2 if self.guidance_scale > 1.0 else 1)

    def _stored_velocities(self, traj: Trajectories, idx: Tensor, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor | None]:
        """Velocities ``[B, K, *L]`` (float32) of stored steps ``idx`` for every row, honouring
        ``meta["state_key"]`` (one evaluation per distinct state) and ``meta["evaluate_masked_only"]``
        → ``(v, active)``, ``active`` ``[B, K]`` bool or None when every row was run."""
        keys = traj.meta.get("state_key")
        masked_only = bool(traj.meta.get("evaluate_masked_only", False))
        batch, k = x.shape[:2]
        lat = tuple(x.shape[2:])
        if keys is None and not masked_only:
            rows = torch.arange(batch).repeat(k)  # step-major: all samples of step 0, then step 1, ...
            v = self._velocity_rows(x.transpose(0, 1).reshape(k * batch, *lat), sigma.transpose(0, 1).reshape(-1), rows, traj.cond, batch)
            return v.view(k, batch, *lat).transpose(0, 1), None
        active = traj.mask[:, idx].to(torch.bool).cpu() if masked_only else torch.ones(batch, k, dtype=torch.bool)
        plan = []  # per step: (rows run, representative rows, inverse)
        for c in range(k):
            rows = torch.nonzero(active[:, c]).flatten()
            if len(rows) and keys is not None:
                _, inverse = torch.unique(keys[:, idx[c]].cpu()[rows], return_inverse=True)
                first = torch.full((int(inverse.max()) + 1,), len(rows), dtype=torch.long).scatter_reduce(0, inverse, torch.arange(len(rows)), "amin")
                rep = rows[first]
            else:
                rep, inverse = rows, torch.arange(len(rows))
            plan.append((rows, rep, inverse))
        v = torch.zeros(batch, k, *lat, dtype=torch.float32, device=x.device)
        reps = [rep for _, rep, _ in plan]
        if sum(len(r) for r in reps):
            cols = torch.cat([torch.full((len(r),), c, dtype=torch.long) for c, r in enumerate(reps)]).to(x.device)
            rep_rows = torch.cat(reps)
            v_rep = self._velocity_rows(x[rep_rows.to(x.device), cols], sigma[rep_rows.to(x.device), cols], rep_rows, traj.cond, batch)
            start = 0
            for c, (rows, rep, inverse) in enumerate(plan):
                part = v_rep[start : start + len(rep)]
                start += len(rep)
                if len(rows):
                    v[:, c] = v[:, c].index_copy(0, rows.to(x.device), part[inverse.to(x.device)])
        return v, active.to(x.device)

    def _velocity_rows(self, x: Tensor, sigma: Tensor, rows: Tensor, cond: dict[str, Any], batch: int) -> Tensor:
        """v (float32) for latents ``x [N, *L]`` at ``sigma [N]`` with conditioning row ``rows[n]``
        of ``cond`` (batch-first tensors of ``batch`` rows), in calls of at most
        ``max_rows_per_call`` transformer rows."""
        n = x.shape[0]
        cfg = 2 if self.guidance_scale > 1.0 else 1
        per_call = n if self.max_rows_per_call is None else max(1, self.max_rows_per_call // cfg)
        out = []
        for s in range(0, n, per_call):
            r = rows[s : s + per_call]
            c = {}
            for key, val in cond.items():
                if isinstance(val, Tensor) and val.dim() > 0 and val.shape[0] == batch:
                    c[key] = val[r.to(val.device)]
                else:
                    c[key] = val
            out.append(self.velocity(x[s : s + per_call], sigma[s : s + per_call], c).float())
        return torch.cat(out) if len(out) > 1 else out[0]

    def save_lora(self, directory, state_dict: dict[str, Tensor] | None = None) -> None:
        """Save the transformer's LoRA in the diffusers format: stock ``pipe.load_lora_weights(dir)``
        loads it (pipelines with a LoRA loader mixin; others get the same file layout).
        ``state_dict``: the transformer's weights by parameter name to save instead of reading the
        module (under FSDP the trainer passes the whole tensors it gathered from the shards)."""
        from pathlib import Path

        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.model, state_dict=state_dict)  # the layout diffusers' own training scripts save
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
    def generate(self, prompts: Sequence[str], *, generator: torch.Generator | None = None, num_steps: int | None = None, kind: str = "ode",
                 height: int | None = None, width: int | None = None, guidance_scale: float | None = None) -> Tensor:
        """Plain sampling for evaluation: images ``[B, C, H, W]`` in [0, 1] (ODE by default).

        With ``kind="ode"`` this is the stock pipeline's ``__call__`` (same noise from the same
        generator, σ grid, timestep, CFG, Euler step and decoding), so it returns the stock images
        up to float rounding (measured on CPU float32: ≤ 1e-6 for the tiny SD3 and Flux).
        ``height``/``width``/``guidance_scale`` override the training values for this call only
        (evaluation at a higher resolution, or with CFG after CFG-free training)."""
        overrides = {k: v for k, v in (("height", height), ("width", width), ("guidance_scale", guidance_scale)) if v is not None}
        if overrides:
            saved = {k: getattr(self, k) for k in overrides}
            for k, v in overrides.items():
                setattr(self, k, type(saved[k])(v))
            try:
                return self.generate(prompts, generator=generator, num_steps=num_steps, kind=kind)
            finally:
                for k, v in saved.items():
                    setattr(self, k, v)
        cond = self.encode(prompts)
        grid = self.sigma_grid(num_steps)
        check_steps(kind, grid[:-1], grid[1:], self.noise_level, stochastic=False)
        n = len(prompts)
        x = self.adapter.initial_noise(n, height=self.height, width=self.width, generator=generator)
        grid_dev = grid.to(self.device)
        for i in range(len(grid) - 1):
            sigma, sigma_next = grid_dev[i].expand(n), grid_dev[i + 1].expand(n)
            v = self.velocity(x, sigma, cond)
            x = sde_step(x.float(), v.float(), sigma, sigma_next, kind=kind, noise_level=self.noise_level, generator=generator,
                         reduce=self.log_prob_reduce, validate=False).prev_sample.to(x.dtype)
        return self.decode(x)
