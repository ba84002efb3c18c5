"""Build what a config names: the pipeline (a built-in source or a local folder), the policy
(``POLICY_BUILDERS`` by ``model.kind``), LoRA adapters, the reward set and the prompt lists; and
the training set-up: the accelerator (DDP / FSDP2), the optimizer, the trainable parameters and EMA."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from flowrl.config import ResolvedConfig, TrainConfig
from flowrl.errors import ConfigError
from flowrl.devices import choose_device as _device, enable_gradient_checkpointing  # noqa: F401  (re-exported)
from flowrl.ema import EMA
from flowrl.losses import loss_reads_entropy
from flowrl.pipelines.sources import _pipeline_class, load_pipeline  # noqa: F401  (re-exported; registers the built-in sources)
from flowrl.plugins import POLICY_BUILDERS, import_builtin_components
from flowrl.seeding import derive_seed
from flowrl.sharding import fsdp_modules


def add_lora(model: torch.nn.Module, *, rank: int, alpha: float, targets: list[str] | tuple[str, ...], seed: int) -> None:
    """Add a peft LoRA adapter on ``targets`` (name suffixes) and train only it."""
    from peft import LoraConfig

    present = [t for t in targets if any(n.endswith(t) for n, _ in model.named_modules())]
    if not present:
        raise ConfigError(
            f"train.lora_targets {list(targets)} match no module of {type(model).__name__}. "
            "Give module-name suffixes such as to_q, to_k, to_v, to_out.0 (or q_proj, v_proj for LMs)."
        )
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # seeded init without resetting the caller's global RNG
        torch.manual_seed(seed)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=present))
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)


def _load_prompts(spec: Any, field_name: str) -> list[str]:
    return _load_prompt_set(spec, field_name).prompts


def _load_prompt_set(spec: Any, field_name: str, column: str = "prompt"):
    """Prompts and their metadata (:class:`flowrl.prompts.PromptSet`); errors as ConfigError."""
    from flowrl.prompts import load_prompt_set

    try:
        return load_prompt_set(spec, field=field_name, column=column)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _build_reward_set(config: TrainConfig, *, process_device: torch.device | str | None = None):
    """The reward set of ``reward.rewards``; ``reward.device`` is the default ``device`` of every
    reward model that takes one (a reward's own ``device`` option wins): ``auto`` is this process's
    device (``process_device``: ``cuda:<local rank>`` under several processes, else the model's)."""
    from flowrl.rewards import build_rewards

    defaults = {}
    device = config.reward.device
    if device is not None:
        if device == "auto":
            device = process_device if process_device is not None else _device(config)
        try:
            defaults["device"] = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"reward.device: '{device}' is not a device ({exc}); use cpu, cuda, cuda:1 or auto.") from None
    return build_rewards(config.reward.rewards, combine=config.reward.combine, max_failures=config.reward.max_failures, **defaults)


@POLICY_BUILDERS.register("flow")
def build_flow_policy(resolved: ResolvedConfig, run_dir: Path):
    from flowrl.pipelines.flow_policy import FlowPolicy

    cfg, preset = resolved.config, resolved.preset
    dtype = getattr(torch, cfg.model.dtype)
    pipe = load_pipeline(cfg.model.pipeline, run_dir, dtype)
    device = _device(cfg)
    pipe.to(device)
    s = cfg.sampler
    if s.shift is not None:
        set_scheduler_shift(pipe, s.shift)
    options = {"num_frames": s.num_frames, "negative_prompt": s.negative_prompt, "decode_batch_size": cfg.model.decode_batch_size}
    options = {k: v for k, v in options.items() if v is not None}
    policy = FlowPolicy.from_pipeline(
        pipe, sampler=preset.kernel, noise_level=preset.noise_level, num_steps=s.num_steps, guidance_scale=s.guidance_scale,
        height=s.height, width=s.width, rollout=preset.rollout, rollout_params=preset.rollout_params,
        share_initial_noise=preset.share_initial_noise, store_means=bool(preset.loss.step_weight != "none" or preset.loss.ratio != "token"),
        log_prob_reduce=s.log_prob_reduce, steps_per_backward=s.steps_per_backward, adapter_options=_checked_adapter_options(pipe, options),
        max_rows_per_call=cfg.train.max_rows_per_call, max_sequence_length=s.max_sequence_length, prompt_cache_mb=s.prompt_cache_mb,
    )
    apply_memory_options(policy, cfg)
    return policy


def set_scheduler_shift(pipe: Any, shift: float) -> None:
    """Replace ``pipe.scheduler`` by a copy with time shift ``shift`` (``shift``, or ``flow_shift``
    for UniPC with flow sigmas); ``sampler.shift`` in the config."""
    config = pipe.scheduler.config
    if config.get("use_dynamic_shifting", False):
        raise ConfigError(
            f"sampler.shift: {type(pipe.scheduler).__name__} of {type(pipe).__name__} shifts dynamically with the image "
            "size (mu); a fixed shift does not apply. Remove sampler.shift."
        )
    key = "flow_shift" if "flow_shift" in config else "shift"
    if key not in config:
        raise ConfigError(f"sampler.shift: {type(pipe.scheduler).__name__} has no time shift; remove sampler.shift.")
    pipe.scheduler = type(pipe.scheduler).from_config(config, **{key: float(shift)})


def _checked_adapter_options(pipe: Any, options: dict[str, Any]) -> dict[str, Any] | None:
    """Adapter options from the config; a clear error naming the field when the model family takes none."""
    if not options:
        return None
    from flowrl.pipelines.base import adapter_for

    if not hasattr(adapter_for(pipe), "configure"):
        fields = {"num_frames": "sampler.num_frames", "negative_prompt": "sampler.negative_prompt", "decode_batch_size": "model.decode_batch_size"}
        raise ConfigError(
            f"{', '.join(fields[k] for k in options)} only apply to video / Qwen-Image models; "
            f"{type(pipe).__name__} does not take them. Remove them from the config."
        )
    return options


def apply_memory_options(policy: Any, cfg: TrainConfig) -> None:
    """``model.vae_tiling`` / ``model.vae_slicing`` on the pipeline's VAE,
    ``train.gradient_checkpointing`` on the trained model and ``model.offload_text_encoders``
    (text encoders parked on the CPU between encodings)."""
    vae = getattr(getattr(policy, "pipe", None), "vae", None)
    for flag, method in (("vae_tiling", "enable_tiling"), ("vae_slicing", "enable_slicing")):
        if getattr(cfg.model, flag, False):
            if vae is None or not hasattr(vae, method):
                raise ConfigError(f"model.{flag}: {type(vae).__name__ if vae is not None else 'this model'} has no {method}(); set it to false.")
            getattr(vae, method)()
    if getattr(cfg.train, "gradient_checkpointing", False):
        enable_gradient_checkpointing(policy.model)
    if getattr(cfg.model, "offload_text_encoders", False):
        adapter = getattr(policy, "adapter", None)
        if adapter is None or not hasattr(adapter, "offload_text_encoders"):
            raise ConfigError("model.offload_text_encoders applies to diffusion pipelines with text encoders; set it to false.")
        adapter.offload_text_encoders("cpu")


def build_policy(resolved: ResolvedConfig, run_dir: Path):
    kind = resolved.config.model.kind
    if resolved.config.model.offload_text_encoders and kind != "flow":
        raise ConfigError(f"model.offload_text_encoders applies to diffusion pipelines (model.kind: flow), not to a {kind} model; set it to false.")
    if kind == "causal_lm" and kind not in POLICY_BUILDERS:
        import flowrl.pipelines.causal_lm  # noqa: F401  (registers its builder)
    if kind == "masked" and kind not in POLICY_BUILDERS:
        import flowrl.pipelines.amused  # noqa: F401  (registers its builder and the tiny-amused source)
    import_builtin_components()
    return POLICY_BUILDERS.get(kind)(resolved, run_dir)


# ------------------------------------------------------------------------ training set-up
def make_selector(trainer: Any):
    """The preset's prompt selector (``flowrl.prompt_selection``); a selector that takes a value
    ``tracker`` shares the advantage estimator's (SPO)."""
    import inspect

    from flowrl.prompt_selection import PROMPT_SELECTORS, make_selector

    name = trainer.resolved.preset.prompt_selection
    params = inspect.signature(PROMPT_SELECTORS.get(name).__init__).parameters
    kwargs: dict[str, Any] = {}
    if "tracker" in params and getattr(trainer.estimator, "tracker", None) is not None:
        kwargs["tracker"] = trainer.estimator.tracker
    if "prompts" in params:
        kwargs["prompts"] = trainer.train_prompts
    if "group_size" in params:  # selectors that allocate rollouts (Knapsack RL) count them in groups of G
        kwargs["group_size"] = trainer.config.train.num_generations
    return make_selector(name, len(trainer.train_prompts), **kwargs)


def setup_training(trainer: Any) -> None:
    """Make the trainer's model trainable (LoRA, or every weight plus a frozen reference copy when
    a KL term needs one), build the optimizer, ``accelerator.prepare`` both, and set up the EMA:
    sets ``params``, ``prepared_model``, ``optimizer``, ``sharded`` and ``ema`` on ``trainer``."""
    t = trainer.config.train
    model = trainer.policy.model
    if t.lora_rank > 0:
        targets = t.lora_targets or list(getattr(trainer.policy, "default_lora_targets", ("q_proj", "k_proj", "v_proj", "o_proj")))
        if not getattr(model, "peft_config", None):
            add_lora(model, rank=t.lora_rank, alpha=t.lora_alpha, targets=targets, seed=derive_seed(t.seed, "lora"))
    else:
        model.requires_grad_(True)
        if trainer.resolved.preset.loss.beta > 0 and trainer.resolved.preset.loss.kl:
            trainer.policy.set_reference_model(copy.deepcopy(model))
    if hasattr(trainer.policy, "recompute_old_log_probs"):  # token policies: the loop recomputes when needed
        trainer.policy.recompute_old_log_probs = False  # (flowrl.objectives.settle_old_log_probs)
        trainer.policy.compute_entropy = loss_reads_entropy(trainer.resolved.preset.loss)
    for p in getattr(trainer.policy, "always_trainable_parameters", lambda: [])():
        p.requires_grad_(True)  # trained in full even when the rest of the model gets LoRA
    trainer.params = [p for p in model.parameters() if p.requires_grad]
    if not trainer.params:
        raise ConfigError("the model has no trainable parameters; check train.lora_rank / train.lora_targets.")
    optimizer = make_optimizer(t.optimizer, trainer.params, lr=trainer.resolved.learning_rate, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
    trainer._bare_model = model
    trainer.prepared_model, trainer.optimizer = prepare_training(trainer.accelerator, model, optimizer, wrap=getattr(trainer.policy, "forward_calls_model", True))
    trainer.sharded = bool(fsdp_modules(model))
    if trainer.sharded:  # fully_shard replaced the parameters by sharded ones (DTensor), in place
        trainer.params = [p for p in model.parameters() if p.requires_grad]
    trainer.ema = EMA(trainer.params, t.ema_decay, ramp=t.ema_ramp, update_every=t.ema_update_every) if t.ema_decay > 0 else None


def make_optimizer(name: str, params: list[torch.nn.Parameter], **kwargs: Any) -> torch.optim.Optimizer:
    """``adamw`` (torch.optim.AdamW) or ``adamw_8bit`` (bitsandbytes.optim.AdamW8bit: the two
    moment buffers quantised to 8 bits, Dettmers et al. 2022)."""
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if name == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("train.optimizer=adamw_8bit needs bitsandbytes: pip install 'flowrl[bnb]' (CUDA only), or set train.optimizer=adamw.") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    raise ConfigError(f"train.optimizer must be adamw or adamw_8bit, got '{name}'.")


def prepare_training(accelerator: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, wrap: bool):
    """``accelerator.prepare`` the trained module and the optimizer. With several processes the
    module comes back wrapped (DDP): its backward all-reduces the gradients. The wrapper forwards
    unknown attributes (``config``, ``dtype``, peft's ``disable_adapters``) to the module, so a
    policy can call it in place of the bare module during the update. Policies whose model is not
    called through its ``forward`` (``forward_calls_model = False``) are not wrapped; the trainer
    all-reduces their gradients itself before each optimizer step.

    FSDP (accelerate's plugin, ``fsdp_version: 2``): ``fully_shard`` is applied to the module in
    place (each transformer block, then the whole); its parameters become shards, the optimizer
    holds shards of its state, and backward reduce-scatters the gradients."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ConfigError(
            f"the accelerate config selects {kind.value}, which flowrl does not support: it cannot be tested without GPUs "
            "(on the CPU accelerate's DeepSpeed integration gives every process rank 0 of 1). Shard with FSDP instead "
            "(assets/accelerate/fsdp.yaml: distributed_type FSDP, fsdp_version 2 — parameters, gradients and optimizer state "
            "sharded like ZeRO-3), or use DDP (assets/accelerate/ddp.yaml); memory: LoRA, train.gradient_checkpointing, adamw_8bit."
        )
    if kind == DistributedType.FSDP:
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise ConfigError(
                f"the accelerate config selects FSDP with fsdp_version {version}; flowrl supports FSDP2 only "
                "(torch's fully_shard). Set fsdp_config.fsdp_version: 2 (see assets/accelerate/fsdp.yaml)."
            )
        if not wrap:
            raise ConfigError(
                "FSDP shards a model that the policy calls through its forward; this policy calls its model's "
                "parts directly (forward_calls_model = False). Launch it with a DDP config (assets/accelerate/ddp.yaml)."
            )
    if not wrap or (accelerator.num_processes == 1 and kind != DistributedType.FSDP):  # FSDP2: model and optimizer together, always
        return model, accelerator.prepare(optimizer)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    inner = getattr(wrapped, "module", wrapped)
    if "_original_forward" in inner.__dict__:  # the trainer autocasts itself; keep the module's own forward
        inner.forward = inner.__dict__.pop("_original_forward")
    if wrapped is not model:
        cls = type(wrapped)

        def __getattr__(self, name):
            try:
                return cls.__getattr__(self, name)
            except AttributeError:
                return getattr(self.module, name)

        wrapped.__class__ = type(cls.__name__, (cls,), {"__getattr__": __getattr__, "__module__": cls.__module__})
    return wrapped, optimizer


def make_accelerator(*, cpu: bool, mixed_precision: str):
    """An ``Accelerator``; in a single process, a previous trainer's state (accelerate keeps one per
    process) is reset when this run asks for another precision or device."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if state and PartialState().num_processes == 1:
        same = str(state.get("_mixed_precision", "no")) == mixed_precision and bool(state.get("_cpu", False)) == cpu
        if not same:
            AcceleratorState._reset_state(reset_partial_state=True)
    from accelerate.utils import DistributedDataParallelKwargs

    # find_unused_parameters: LoRA may sit on a projection a model skips (SD3's last context block);
    # broadcast_buffers=False: no collective in forward passes (processes run different numbers)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)
    fsdp = fsdp_plugin_from_env()
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, kwargs_handlers=[ddp], fsdp_plugin=fsdp)
    if fsdp is not None:
        from accelerate.utils import DistributedType

        if accelerator.distributed_type == DistributedType.MULTI_CPU:
            # accelerate applies its FSDP plugin on accelerators only and silently falls back to DDP on
            # the CPU; torch's fully_shard runs on the CPU too (gloo), so shard as the config asks
            from accelerate.state import PartialState

            accelerator.state.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does for GPUs
            accelerator.state.fsdp_plugin = fsdp
    return accelerator


def fsdp_plugin_from_env():
    """accelerate's FSDP plugin when the launch asks for FSDP (``accelerate launch`` with an FSDP
    config exports ``ACCELERATE_USE_FSDP=true`` and ``FSDP_*``; with ``torchrun`` set them
    yourself), else None."""
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin()
