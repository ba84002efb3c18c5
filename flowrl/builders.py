"""Build what a config names: the pipeline (a built-in source or a local folder), the policy
(``POLICY_BUILDERS`` by ``model.kind``), LoRA adapters, the reward set and the prompt lists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flowrl.config import ConfigError, ResolvedConfig, TrainConfig
from flowrl.plugins import PIPELINE_SOURCES, POLICY_BUILDERS, import_builtin_components


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


def load_pipeline(spec: str, run_dir: Path, dtype: torch.dtype = torch.float32):
    """A diffusers pipeline from a built-in name (``PIPELINE_SOURCES``) or a local folder."""
    _import_pipeline_sources()
    if spec in PIPELINE_SOURCES:
        pipe = PIPELINE_SOURCES.get(spec)(run_dir)
    else:
        path = local_model_folder(spec, builtins=PIPELINE_SOURCES.names())
        pipe = _pipeline_class(path).from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
    if dtype != torch.float32 and hasattr(pipe, "to"):
        pipe = pipe.to(dtype=dtype)
    return pipe


#: single-file checkpoint suffixes (one file holding a whole model, as UIs share them)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def local_model_folder(spec: str, *, field: str = "model.pipeline", builtins: Any = ()) -> Path:
    """The folder ``model.pipeline`` names: a local folder, or a Hugging Face id already in the
    local cache (``org/name``, resolved with ``local_files_only``: nothing is downloaded). A
    single-file checkpoint is refused with the conversion that makes it a folder."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        raise ConfigError(
            f"{field} '{spec}' is a single-file checkpoint; flowrl loads folders written by save_pretrained. Convert it once "
            "with diffusers (e.g. StableDiffusion3Pipeline.from_single_file(path, config=<a local pipeline folder of the same "
            "model>).save_pretrained(folder)) and point the config at that folder."
        )
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(spec, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the cache (or not an id): the error below says what to do
            pass
    known = f" nor a built-in ({', '.join(builtins)})" if builtins else ""
    raise ConfigError(
        f"{field} '{spec}' is neither a local folder{known} nor a Hugging Face id in the local cache. "
        "flowrl never downloads: point it at a local checkpoint folder (or fetch it once with `huggingface-cli download`)."
    )


def _pipeline_class(path: Path):
    """The class named in ``model_index.json``: a flowrl pipeline with a registered adapter (e.g.
    ``DigitsPipeline``, which ``DiffusionPipeline`` cannot resolve by name), else ``DiffusionPipeline``."""
    import json

    from diffusers import DiffusionPipeline

    from flowrl.pipelines.base import _ADAPTERS, _import_builtin_adapters

    index = path / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"model.pipeline: {path} has no model_index.json; point it at a folder written by save_pretrained.")
    name = json.loads(index.read_text()).get("_class_name")
    _import_builtin_adapters()
    for cls in _ADAPTERS:
        if cls is not None and cls.__name__ == name and not cls.__module__.startswith("diffusers"):
            return cls
    return DiffusionPipeline


def _import_pipeline_sources() -> None:
    import importlib

    for mod in ("flowrl.pipelines.digits",):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def _tiny_source(builder_name: str):
    def build(run_dir: Path):
        from flowrl.pipelines import tiny

        pipe = getattr(tiny, builder_name)()
        return tiny.save_and_reload(pipe, Path(run_dir) / "base_model")

    return build


def _digits_source(run_dir: Path):
    from flowrl.pipelines.digits import load_default_digits_pipeline

    return load_default_digits_pipeline()


def _tiny_video_source(builder_name: str):
    def build(run_dir: Path):
        from flowrl.pipelines import tiny, tiny_video

        pipe = tiny.save_and_reload(getattr(tiny_video, builder_name)(), Path(run_dir) / "base_model")
        return tiny_video.with_test_defaults(pipe)

    return build


PIPELINE_SOURCES.register("digits", _digits_source)
PIPELINE_SOURCES.register("tiny-sd3", _tiny_source("tiny_sd3_pipeline"))
PIPELINE_SOURCES.register("tiny-flux", _tiny_source("tiny_flux_pipeline"))
PIPELINE_SOURCES.register("tiny-wan", _tiny_video_source("tiny_wan_pipeline"))
PIPELINE_SOURCES.register("tiny-hunyuan-video", _tiny_video_source("tiny_hunyuan_video15_pipeline"))
PIPELINE_SOURCES.register("tiny-qwen-image", _tiny_video_source("tiny_qwen_image_pipeline"))


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


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing of a diffusers (``enable_gradient_checkpointing``) or transformers
    (``activation_checkpointing_enable`` / ``gradient_checkpointing_enable``) model, always the
    non-reentrant form (``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``): the
    reentrant one runs a block's backward outside the outer autograd pass, which breaks DDP with
    ``find_unused_parameters=True`` (a parameter is marked ready twice) and drops gradients of LoRA
    weights whose block inputs do not require grad."""
    import functools

    from torch.utils.checkpoint import checkpoint

    if getattr(model, "_supports_gradient_checkpointing", None) is not None and hasattr(model, "enable_gradient_checkpointing"):  # diffusers
        if not model._supports_gradient_checkpointing:
            raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing; set it to false.")
        model.enable_gradient_checkpointing(lambda module, *args: checkpoint(module.__call__, *args, use_reentrant=False))
        return
    kwargs = {"use_reentrant": False}
    for name, key in (("activation_checkpointing_enable", "activation_checkpointing_kwargs"), ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs")):
        fn = getattr(model, name, None)
        if fn is not None:
            try:
                fn(**{key: kwargs})
            except ValueError as exc:  # transformers: "... does not support activation checkpointing"
                raise ConfigError(f"train.gradient_checkpointing: {exc} Set it to false.") from None
            return
    raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing; set it to false.")


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.model.device != "auto":
        return torch.device(cfg.model.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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

