"""The one training configuration: nested dataclasses, YAML in and out, validation with errors that
name the field and the fix.

Sections: ``model`` (what to load), ``sampler`` (how rollouts are drawn), ``reward`` (what scores
them), ``algorithm`` overrides (advantage / loss knobs on top of the preset), ``train`` (optimiser,
LoRA, schedule, outputs). ``TrainConfig.from_yaml(path)``, ``cfg.to_yaml(path)``,
``cfg.override(["train.learning_rate=1e-4", ...])``. Unset (None) algorithm fields take the
preset's value (``flowrl.algorithms``); ``resolved()`` fills them in.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import yaml

from flowrl.algorithms import ResolvedConfig  # noqa: F401  (re-exported: resolution lives with the presets)
from flowrl.errors import ConfigError  # noqa: F401  (re-exported: flowrl.config.ConfigError)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` as a string; configs mean the number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    __import__("re").compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def load_yaml(text: str):
    """Parse YAML the way configs mean it (``1e-4`` is a float)."""
    return yaml.load(text, Loader=_Loader)


@dataclass
class ModelConfig:
    pipeline: str = "tiny-sd3"
    """What to train: a local diffusers pipeline folder, a causal-LM folder (``kind: causal_lm``),
    or a built-in: ``digits`` (the shipped embedded default), ``tiny-sd3``, ``tiny-flux``, ``tiny-wan``,
    ``tiny-hunyuan-video``, ``tiny-qwen-image``, ``tiny-flux-kontext``, ``tiny-wan-i2v``, ``tiny-hunyuan-video-i2v`` (random tiny test models of each family)."""
    kind: Literal["flow", "causal_lm", "masked"] = "flow"
    """``flow`` wraps a diffusers flow pipeline in FlowPolicy; ``causal_lm`` a transformers LM in TokenPolicy;
    ``masked`` a masked-token image model (aMUSEd) in the Co-GRPO policy (``pipelines/amused.py``)."""
    gguf_file: str | None = None
    """For ``causal_lm`` checkpoints stored as GGUF: the file name inside ``pipeline``."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype of the trained model (rollouts run in it; log-probs always in float32)."""
    device: str = "auto"
    """``auto`` (accelerate's choice), ``cpu``, ``cuda``, ``cuda:1``..."""
    vae_tiling: bool = False
    """Decode with the VAE in overlapping spatial tiles (``vae.enable_tiling()``): less memory for
    large frames, tiny seams possible."""
    vae_slicing: bool = False
    """Decode a batch one sample at a time inside the VAE (``vae.enable_slicing()``)."""
    decode_batch_size: int | None = None
    """Video / Qwen-Image models: samples per VAE decode call after a rollout (default: 1 for
    video, all for images). Smaller bounds decode memory; the output is the same."""
    offload_text_encoders: bool = False
    """Keep the text encoders on the CPU and move them to the training device only to encode
    prompts not yet in the prompt cache (``sampler.prompt_cache_mb``; each prompt is encoded once
    per run), then back. Frees their memory on the GPU (SD3.5's T5-XXL: ~9.5 GB in bf16) for a
    host↔device copy per new prompt; the samples are the same. Wan, HunyuanVideo and Qwen-Image
    encode without the cache, so their encoders move for every rollout call."""


@dataclass
class SamplerConfig:
    num_steps: int = 10
    """Denoising steps per training rollout (Flow-GRPO: 10 for training, 40 for evaluation)."""
    eval_num_steps: int = 40
    """Denoising steps of the deterministic (ODE) evaluation samples."""
    kernel: str | None = None
    """Transition kernel of stochastic steps: ode, flow, dance, sage, cps (default: the preset's)."""
    noise_level: float | dict[str, float] | None = None
    """The kernel's a (flow, default 0.7; Flux 0.9) or η (dance 0.3, sage 0.5); default: the preset's.
    A noise level belongs to one kernel: a number in a config file applies to the kernel of that
    file's algorithm and is recorded as ``{kernel: value}`` (e.g. ``{flow: 0.9}``), so switching
    ``algorithm`` to a preset with another kernel gives that preset its own level. A mapping may
    give a level per kernel; a number set from Python or ``--set`` applies to the run's kernel."""
    guidance_scale: float = 1.0
    """CFG scale in rollouts and recomputation (1 = CFG-free; SD3.5-M Flow-GRPO: 4.5)."""
    height: int | None = None
    """Image height in pixels (default: the model's)."""
    width: int | None = None
    """Image width in pixels (default: the model's)."""
    eval_height: int | None = None
    """Evaluation image height (default: ``height``). Training below the evaluation size (e.g. 256
    for 512) is a cheap option every preset can use."""
    eval_width: int | None = None
    """Evaluation image width (default: ``width``)."""
    eval_guidance_scale: float | None = None
    """CFG scale of evaluation samples (default: ``guidance_scale``). With ``guidance_scale: 1``
    training is CFG-free (the conditional model alone) while evaluation may still use CFG."""
    rollout: str | None = None
    """Rollout schedule (full, window, singular, tree, ...); default: the preset's."""
    rollout_params: dict[str, Any] = field(default_factory=dict)
    """Options of the rollout schedule (merged over the preset's)."""
    share_initial_noise: bool | None = None
    """Group members start from the same noise (DanceGRPO); default: the preset's."""
    log_prob_reduce: Literal["mean", "sum"] = "mean"
    """Reduction of a step's Gaussian log-density over latent dims (mean: Flow-GRPO's convention)."""
    steps_per_backward: int = 1
    """Stored steps whose loss is aggregated together (1: Flow-GRPO's per-timestep loss). Several
    such chunks share one transformer call and one backward pass, up to ``train.max_rows_per_call``."""
    max_sequence_length: int | None = None
    """Text-encoder (T5) token length of the prompt conditioning; default: the stock pipeline's
    (SD3 256, Flux 512; Flow-GRPO trains SD3 with 128)."""
    prompt_cache_mb: float = 512.0
    """Budget of the prompt-embedding cache: a fixed prompt set is encoded once and reused while the
    text encoders' weights do not change (0 disables)."""
    max_new_tokens: int = 32
    """Language models: completion length limit."""
    temperature: float = 1.0
    """Language models: sampling temperature (log-probs are taken at this temperature)."""
    shift: float | None = None
    """Time shift of the σ grid: the scheduler's ``shift`` (Wan's UniPC: ``flow_shift``); SAGE-GRPO
    uses 5 on HunyuanVideo 1.5. Default: the pipeline's scheduler config. Not for schedulers with
    dynamic shifting (Flux, Qwen-Image: their shift follows the image size)."""
    num_frames: int | None = None
    """Video models: frames per sample (default: the model's; Wan 81, HunyuanVideo 1.5 121; both
    need 4k + 1)."""
    negative_prompt: str | None = None
    """Negative prompt of CFG for the families that take one (Wan, HunyuanVideo 1.5, Qwen-Image);
    default: the stock pipeline's ("" for Wan and HunyuanVideo, " " for Qwen-Image)."""


@dataclass
class RewardConfig:
    rewards: dict[str, Any] = field(default_factory=lambda: {"jpeg_compressibility": 1.0})
    """``{name or pkg.module:Class: weight}`` or ``{name: {weight: w, **options}}``, e.g.
    ``{pickscore: {weight: 1.0, path: /models/pickscore}, clipscore: 0.5}``."""
    combine: Literal["weighted_sum", "gdpo"] = "weighted_sum"
    """weighted_sum: sum before normalisation (Flow-GRPO); gdpo: z-score each reward per group, then sum."""
    max_failures: int = 0
    """Samples a reward may fail on (exception or NaN) before the run stops with an error."""
    transform: str | None = None
    """Reward transform before advantages (e.g. ``win_rate`` for Pref-GRPO); default: the preset's."""
    device: str | None = None
    """Default device of every reward model that takes one: ``auto`` (this process's device — its
    own GPU under several processes), ``cpu``, ``cuda``, ``cuda:1``...; None: each reward's own
    default (the CPU). A reward's own option wins: ``{pickscore: {weight: 1, device: cuda:1}}``."""
    track: dict[str, Any] = field(default_factory=dict)
    """Rewards scored at every evaluation but never trained on (a guard against reward hacking):
    ``{name: options}`` as in ``rewards`` (a weight, if given, is ignored). Logged as
    ``eval/track/<name>`` next to the trained reward; see ``track_stop`` for the alarm."""
    track_window: int = 3
    """K of the alarm: it compares each evaluation with the one K evaluations earlier."""
    track_stop: bool = False
    """When the alarm fires (trained reward up, a tracked one down by more than its 95 % confidence
    interval over ``track_window`` evaluations), stop the run; ``<run>/best_track`` then holds the
    checkpoint with the best tracked reward. False: log a warning and go on."""


@dataclass
class AlgorithmConfig:
    """Overrides of the preset's choices; None keeps the preset's value (``flowrl.algorithms``)."""

    advantage: str | None = None
    """Advantage estimator name (group, ...)."""
    std: Literal["group", "global", "none"] | None = None
    """Advantage scaling: per-prompt std, batch std (Flow-GRPO global_std), or none (Dr.GRPO)."""
    std_estimator: Literal["population", "unbiased"] | None = None
    """The std of that scaling: ``population`` (÷n, Flow-GRPO's ``np.std``; the diffusion presets) or
    ``unbiased`` (÷(n − 1), TRL's and verl's ``torch.std``; the language-model presets). Default: the preset's."""
    adv_clip_max: float | None = None
    """Clip advantages to ±adv_clip_max (Flow-GRPO: 5)."""
    clip_range: float | None = None
    """PPO ε (Flow-GRPO 1e-4 on mean-reduced log-probs; TRL ``epsilon``)."""
    clip_range_high: float | None = None
    """Upper ε for clip-higher (DAPO 0.28; TRL ``epsilon_high``)."""
    beta: float | None = None
    """KL coefficient against the reference policy (TRL ``beta``); 0 disables the KL term. With β > 0
    and no KL form (``kl`` unset here and in the preset), language models get ``k3`` (as TRL); other
    models stop with an error asking for ``loss.kl``."""
    kl: str | None = None
    """KL form: gaussian (exact per-step), gaussian_reference (Flow-GRPO code: ×Δ), k3 (tokens)."""
    kl_ratio_weight: bool | None = None
    """Multiply the per-step KL by the importance ratio π_θ/π_old (TRL ``use_bias_correction_kl``, on by
    default in TRL ≥ 1.x; DeepSeek-V3.2's unbiased KL gradient). Default: the preset's (off)."""
    ratio: str | None = None
    """Ratio level: token (per step), sequence (GSPO), gspo_token, segment, hybrid (``flowrl.losses.RATIOS``)."""
    clip: str | None = None
    """Clip/weight rule (``flowrl.losses.CLIP_RULES``): ppo_clip, dispo, etr, ..."""
    clip_params: dict[str, Any] = field(default_factory=dict)
    """Extra options of the clip rule (merged over the preset's)."""
    aggregation: str | None = None
    """Loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm."""
    timestep_fraction: float | None = None
    """Fraction of stored steps trained (first ⌊T·f⌋; 0.99 drops the last, near-deterministic step)."""
    timestep_selection: Literal["first", "random"] | None = None
    """first: the first ⌊T·f⌋ steps (Flow-GRPO); random: a random subset per sample (DanceGRPO)."""
    skip_zero_advantage: bool | None = None
    """Leave samples whose advantage is exactly 0 out of the update (default: the preset's — on for the
    Flow-GRPO-style diffusion presets, as their reference does; off for the language-model presets, as
    TRL and verl keep those rows). It is not free: with β > 0 such rows still carry the KL term's
    gradient, and dropping them changes the per-sequence denominators of the seq-mean aggregations
    (GRPO's mean over sequences, Dr.GRPO's G·L_max)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra options passed to the advantage estimator (merged over the preset's)."""
    nft_beta: float | None = None
    """DiffusionNFT's β: how far the implicit positive/negative policies v± = v_old ± β(v_θ − v_old)
    sit from the old policy (1.0; 0.1 for OCR / multi-reward). Not the KL coefficient ``beta``."""
    objective_options: dict[str, Any] = field(default_factory=dict)
    """Extra options of the preset's training objective (merged over the preset's), e.g. DiffusionNFT
    ``{x0_adaptive: true, decay: delayed}``."""
    reference: str | None = None
    """The KL term's reference: ``base`` (the model before training: LoRA disabled, or the frozen
    copy), ``ema`` (an EMA of the trained weights) or ``periodic`` (a copy of them refreshed every
    ``reference_options.every`` optimizer steps). Default: the preset's (``base`` for most)."""
    reference_options: dict[str, Any] = field(default_factory=dict)
    """Options of a moving reference: ``decay`` (EMA d, 0.99) and ``every`` (optimizer steps between
    updates, 1); merged over the preset's."""


@dataclass
class TrainSection:
    prompts: list[Any] | str = field(default_factory=lambda: ["a photo of a cat", "a photo of a dog", "a red apple", "a blue car"])
    """Training prompts: a list (strings, or mappings with a prompt column), a file — ``.txt`` (one
    per line), ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` (rows with a prompt column; Flow-GRPO's
    ``*_metadata.jsonl`` as is) —, a ``datasets`` folder (``save_to_disk``), or a built-in set
    (``digits:rl``, ``arith:train``). Every column besides the prompt is metadata that rewards receive
    per sample (``meta["metadata"]`` and ``meta[column]``). A relative path is looked up next to the
    config file first."""
    eval_prompts: list[Any] | str | None = None
    """Held-out prompts for evaluation (same forms); None skips evaluation."""
    prompt_column: str = "prompt"
    """Column holding the prompt text in table-like prompt sources (jsonl, json, csv, parquet, datasets)."""
    eval_category: str | None = None
    """Metadata column the evaluation is broken down by (``eval/<reward>/<category>``); default:
    ``category``, else GenEval's ``tag``, when the eval prompts have it."""
    num_generations: int = 4
    """Group size G: samples per prompt (Flow-GRPO 24 on SD3.5-M; ≥ 2)."""
    prompts_per_iteration: int = 2
    """Prompts (groups) per iteration, over all processes; must divide by the process count."""
    iterations: int = 10
    """Rollout → update iterations: the length of the run. Not TRL's ``num_iterations`` (updates per
    batch, μ), which is ``train.inner_epochs`` here."""
    inner_epochs: int = 1
    """Passes over each iteration's samples, i.e. TRL's ``num_iterations`` μ (Flow-GRPO: 1; the 2nd+
    are off-policy)."""
    train_batch_size: int = 8
    """Samples per optimizer step; gradients accumulate over samples × steps within it."""
    learning_rate: float | None = None
    """AdamW learning rate (default: the preset's; Flow-GRPO 3e-4 with LoRA)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Learning rate per iteration: constant, or cosine from learning_rate down to lr_min_ratio × it."""
    lr_min_ratio: float = 0.1
    """Final learning rate of the cosine schedule, as a fraction of learning_rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    rollout_batch_size: int | None = None
    """Prompts per rollout call (None: all of the iteration's prompts in one call). With several
    calls, each call's rewards are scored in a background worker while the next call rolls out
    (``overlap_rewards``); the numbers are the same either way. Flat rollouts only (not tree/singular)."""
    overlap_rewards: bool = True
    """Score a rollout call's outputs while the next call rolls out (needs ``rollout_batch_size``)."""
    max_rows_per_call: int | None = 64
    """Most transformer rows (samples × stored steps, CFG rows counted twice) one recomputation call
    may hold in the update. Stored steps of a minibatch are recomputed together up to this many rows,
    with one backward pass: fewer, larger calls (faster), more activation memory. None: no limit;
    ``2 × train_batch_size`` with CFG reproduces the per-timestep loop's memory. Composes with
    gradient checkpointing."""
    max_nonfinite_updates: int = 3
    """Optimizer steps skipped because a log-prob, the loss or a gradient was NaN/inf (counted as
    ``update/skipped_nonfinite``) before the run stops with an error; 0 stops at the first one."""
    lora_rank: int = 32
    """LoRA rank (0 = full fine-tune; the reference is then a frozen copy)."""
    lora_alpha: float = 64.0
    """LoRA alpha (scale = alpha / rank)."""
    lora_targets: list[str] | None = None
    """Module-name suffixes that get LoRA (default: the attention projections)."""
    ema_decay: float = 0.0
    """EMA of the trained weights, used for evaluation and exported to lora/ (0 disables; Flow-GRPO
    uses 0.9 with ema_ramp and ema_update_every 8). <run>/weights.json says which weights lora/ holds."""
    ema_ramp: bool = False
    """Flow-GRPO's EMA warm-up: decay at optimizer step t is min(ema_decay, (1 + t)/(10 + t))."""
    ema_update_every: int = 1
    """Update the EMA after every N-th optimizer step (Flow-GRPO: 8)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """accelerate autocast for forward passes (weights stay in model.dtype)."""
    gradient_checkpointing: bool = False
    """Recompute the trained model's activations in the backward pass instead of storing them
    (less memory, about a third more compute per update)."""
    seed: int = 0
    """Everything random derives from (seed, iteration): same seed, same numbers; exact resume."""
    output_dir: str = "runs/flowrl"
    """Run directory: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, lora/."""
    save_every: int = 50
    """Checkpoint every N iterations (0: only at the end), so a crash loses at most N iterations.
    SIGTERM / SIGINT (pre-emption, Ctrl-C) save one after the iteration in progress either way."""
    eval_every: int = 0
    """Evaluate on eval_prompts every N iterations (0: only before and after training)."""
    eval_samples_per_prompt: int = 1
    """Evaluation images per held-out prompt."""
    resume_from: str | None = None
    """A checkpoint folder (``<run>/checkpoints/iter_000010``) or ``latest`` to resume exactly."""
    allow_config_change: bool = False
    """Let a resume (``train.resume_from``) use settings that differ from the run's recorded
    ``config.yaml`` (CLI: ``--allow-config-change``); without it such a resume is refused and the
    differences are listed. The previous record is kept as ``config.iter_NNNNNN.yaml``."""
    progress: bool = True
    """Show a progress bar with reward and KL."""
    report_to: list[str] | str = "tensorboard"
    """Experiment trackers (accelerate's): ``tensorboard`` (default, ``<run>/tensorboard``), ``wandb``,
    ``mlflow``, ``comet_ml``, ``aim``, ``clearml``, ``dvclive``, ``swanlab``, ``trackio``, a list of
    them, ``all`` (every installed one) or ``none``. Metrics go to each every iteration, a few
    evaluation images at every evaluation."""
    eval_images: int = 8
    """Evaluation images logged to the trackers at every evaluation (0: none)."""
    report: str | None = None
    """Reward column summarised in the final line (e.g. ``digits/correct``); default: the first."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (the oldest are deleted); None keeps all."""
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    """``adamw`` (torch) or ``adamw_8bit`` (bitsandbytes' 8-bit AdamW: optimizer state in 8 bits;
    needs the ``bnb`` extra and a CUDA device)."""
    num_threads: int | None = None
    """torch CPU threads (``torch.set_num_threads``) for the ``flowrl`` commands. Default: 1 for the
    embedded tiny models (``digits``, ``tiny-*``) on the CPU unless ``OMP_NUM_THREADS`` is set, else
    torch's default (docs/performance.md). Numbers of a CPU run depend on the thread count."""
    allow_tf32: bool = False
    """Let CUDA matmuls and convolutions use TF32 (faster on Ampere+ GPUs, ~1e-3 relative error)."""


@dataclass
class TrainConfig:
    """Everything one run needs. ``algorithm`` names a preset (``flowrl.algorithms.PRESETS``)."""

    algorithm: str = "flow_grpo"
    """Algorithm preset: flow_grpo, dance_grpo, ... (``flowrl.algorithms``)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainSection = field(default_factory=TrainSection)
    #: input paths rewritten by :meth:`from_yaml` (``field: absolute path``), recorded in the run's
    #: resolved config; not a config field
    resolved_paths: ClassVar[dict[str, str]] = {}

    # ------------------------------------------------------------------------------ YAML
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train"]["adam_betas"] = list(self.train.adam_betas)
        return d

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a mapping of sections (model, sampler, reward, loss, train), got {type(data).__name__}.")
        data = dict(data)
        # a run's saved config.yaml records the preset's filled-in values under `resolved:`; they
        # derive from the other sections, so a saved config is a valid input as it is
        saved_run = data.pop("resolved", None) is not None
        train = data.get("train")
        if saved_run and isinstance(train, dict) and "num_iterations" in train and "iterations" not in train:
            # written by flowrl before the run length was renamed: there train.num_iterations was the
            # run length (a hand-written train.num_iterations stays refused: it is ambiguous with TRL's)
            data["train"] = {("iterations" if k == "num_iterations" else k): v for k, v in train.items()}
        aliases = _trl_aliases()
        if aliases is not None:
            try:
                data = aliases(data)
            except ConfigError:
                raise
            except (ValueError, TypeError) as exc:
                raise ConfigError(str(exc)) from None
        return _build(cls, data, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        """Read a YAML config. Relative input paths in it (prompt files, ``model.pipeline`` folders,
        ``train.resume_from``, reward weight files) are resolved against the config file's folder
        (see :func:`resolve_relative_paths`); ``train.output_dir`` stays relative to the working
        directory."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; check the --config path.")
        try:
            data = load_yaml(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{where}: YAML syntax error: {problem}. Fix the YAML (indentation, quotes, a missing ':').") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text; give a YAML file.") from None
        try:
            cfg = cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        bind_noise_level(cfg)
        return resolve_relative_paths(cfg, path.resolve().parent)

    def override(self, assignments: list[str]) -> "TrainConfig":
        """Apply ``section.field=value`` strings (values parsed as YAML) and re-validate."""
        data = self.to_dict()
        for item in assignments:
            if "=" not in item:
                raise ConfigError(f"--set expects key=value, got '{item}'.")
            key, _, raw = item.partition("=")
            node = data
            parts = key.strip().split(".")
            for p in parts[:-1]:
                if p not in node or not isinstance(node[p], dict):
                    raise ConfigError(f"--set {key}: '{p}' is not a config section. Sections: {', '.join(k for k, v in data.items() if isinstance(v, dict))}.")
                node = node[p]
            try:
                node[parts[-1]] = load_yaml(raw)
            except yaml.YAMLError as exc:
                raise ConfigError(f"--set {key}: the value '{raw}' is not valid YAML ({getattr(exc, 'problem', None) or exc}); quote strings, e.g. {key}='...'.") from None
        new = TrainConfig.from_dict(data)
        new.resolved_paths = dict(getattr(self, "resolved_paths", {}))
        return new

    # ------------------------------------------------------------------------- validation
    def validate(self) -> "TrainConfig":
        from flowrl.algorithms import PRESETS

        t, s = self.train, self.sampler
        if self.algorithm not in PRESETS and ":" not in self.algorithm:
            import difflib

            close = difflib.get_close_matches(self.algorithm, PRESETS.names(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"algorithm '{self.algorithm}' is unknown{hint}. Known presets: {', '.join(PRESETS.names())}.")
        if t.num_generations < 2:
            raise ConfigError(
                f"train.num_generations is {t.num_generations}: group-relative advantages need at least 2 samples "
                "per prompt. Set train.num_generations ≥ 2 (Flow-GRPO uses 24)."
            )
        for path, value, ok, need in _range_checks(self):
            if value is not None and not ok(value):
                raise ConfigError(f"{path} must be {need}, got {value!r}.")
        if len(t.adam_betas) != 2:
            raise ConfigError(f"train.adam_betas must be two numbers [beta1, beta2] (AdamW), got {list(t.adam_betas)!r}.")
        if t.rollout_batch_size is not None and t.rollout_batch_size < 1:
            raise ConfigError(f"train.rollout_batch_size must be ≥ 1 or null (one call per iteration), got {t.rollout_batch_size}.")
        if t.max_rows_per_call is not None and t.max_rows_per_call < 1:
            raise ConfigError(f"train.max_rows_per_call must be ≥ 1 or null (no limit), got {t.max_rows_per_call}.")
        if s.max_sequence_length is not None and s.max_sequence_length < 1:
            raise ConfigError(f"sampler.max_sequence_length must be ≥ 1 or null (the pipeline's default), got {s.max_sequence_length}.")
        if s.prompt_cache_mb < 0:
            raise ConfigError(f"sampler.prompt_cache_mb must be ≥ 0 (0 disables the cache), got {s.prompt_cache_mb}.")
        if s.guidance_scale < 1.0 and s.guidance_scale != 0.0:
            raise ConfigError(f"sampler.guidance_scale must be ≥ 1 (1 = no CFG), got {s.guidance_scale}.")
        if s.kernel is not None:
            from flowrl.sde import KERNELS

            if s.kernel not in KERNELS:
                raise ConfigError(f"sampler.kernel '{s.kernel}' is unknown. Known: {', '.join(KERNELS.names())}.")
        if not self.reward.rewards:
            raise ConfigError("reward.rewards is empty: give at least one reward with a weight, e.g. {jpeg_compressibility: 1.0}.")
        for name, spec in self.reward.rewards.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"reward.rewards: {name!r} is not a reward name; use a registered name or 'pkg.module:Class'.")
            weight = spec.get("weight") if isinstance(spec, dict) else spec
            if weight is None:
                raise ConfigError(f"reward.rewards.{name} has no weight: write `{name}: 1.0` or `{name}: {{weight: 1.0, ...}}`.")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ConfigError(f"reward.rewards.{name}: weight must be a number, got {weight!r}.")
            if not math.isfinite(weight):
                raise ConfigError(f"reward.rewards.{name}: weight must be a finite number, got {weight!r}.")
        return self

    def resolved(self) -> "ResolvedConfig":
        """The config with every preset default filled in (what the run records):
        :func:`flowrl.algorithms.resolve`."""
        from flowrl.algorithms import resolve

        return resolve(self)


def bind_noise_level(cfg: "TrainConfig") -> "TrainConfig":
    """A number ``sampler.noise_level`` becomes ``{kernel: number}`` for the kernel the config runs
    (``sampler.kernel``, else its preset's): a noise level is a property of one kernel (Flow-GRPO's
    a, DanceGRPO's η), so ``--set algorithm=dance_grpo`` on a config tuned for the flow kernel must
    not hand the flow kernel's a to the dance kernel. Unknown presets leave the number as it is."""
    level = cfg.sampler.noise_level
    if level is None or isinstance(level, dict):
        return cfg
    kernel = cfg.sampler.kernel
    if kernel is None:
        from flowrl.algorithms import PRESETS

        if cfg.algorithm not in PRESETS:
            return cfg
        kernel = PRESETS.get(cfg.algorithm).kernel
    cfg.sampler.noise_level = {kernel: float(level)}
    return cfg


#: reward options that name files or folders (resolved like the other input paths)
PATH_OPTION_SUFFIXES = ("path", "checkpoint", "file", "dir")


def _relative_input(value: Any, base: Path) -> Path | None:
    """``base / value`` when ``value`` is a relative path meant relative to the config file: it
    exists there, or it is written explicitly relative (``./x``, ``../x``). Names (built-in models,
    prompt sets, Hugging Face cache ids) and absolute paths give None."""
    if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute() or ":" in value:
        return None
    candidate = base / value
    explicit = value.startswith(("./", "../", ".\\", "..\\"))
    if explicit or candidate.exists():
        return candidate.resolve() if candidate.exists() else Path(str(candidate))
    return None


def resolve_relative_paths(cfg: "TrainConfig", base: Path) -> "TrainConfig":
    """Rewrite the relative input paths of a config read from a file in folder ``base`` to absolute
    paths, so a config means the same files wherever the command runs from.

    Input paths are ``train.prompts`` / ``train.eval_prompts`` (a file), ``model.pipeline`` (a
    folder), ``train.resume_from`` and reward options whose name ends in ``path``, ``checkpoint``,
    ``file`` or ``dir``. A relative value is taken relative to ``base`` when it exists there or is
    written ``./x`` / ``../x``; otherwise it is a name (a built-in model or prompt set, a Hugging
    Face cache id) and is left alone. ``train.output_dir`` (an output) stays relative to the working
    directory. Rewritten fields are listed in ``cfg.resolved_paths`` (recorded in the run's
    ``config.yaml`` under ``resolved.paths``)."""
    base = Path(base)
    done: dict[str, str] = {}

    def fix(obj: Any, attr: str, label: str) -> None:
        new = _relative_input(getattr(obj, attr), base)
        if new is not None:
            done[label] = str(new)
            setattr(obj, attr, str(new))

    fix(cfg.model, "pipeline", "model.pipeline")
    fix(cfg.train, "prompts", "train.prompts")
    fix(cfg.train, "eval_prompts", "train.eval_prompts")
    for attr in ("prompts", "eval_prompts"):  # rows written in the config: their images are relative to it
        rows = getattr(cfg.train, attr)
        if isinstance(rows, list):
            setattr(cfg.train, attr, [_resolve_row_image(row, base) for row in rows])
    if cfg.train.resume_from != "latest":
        fix(cfg.train, "resume_from", "train.resume_from")
    for section, specs in (("rewards", cfg.reward.rewards), ("track", cfg.reward.track)):
        for name, spec in specs.items():
            if not isinstance(spec, dict):
                continue
            for key, value in list(spec.items()):
                if isinstance(key, str) and key.lower().endswith(PATH_OPTION_SUFFIXES):
                    new = _relative_input(value, base)
                    if new is not None:
                        spec[key] = str(new)
                        done[f"reward.{section}.{name}.{key}"] = str(new)
    cfg.resolved_paths = {"relative_to": str(base), **done} if done else {}
    return cfg


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _positive(x: float) -> bool:
    return _finite(x) and x > 0


def _non_negative(x: float) -> bool:
    return _finite(x) and x >= 0


def _range_checks(cfg: "TrainConfig") -> list[tuple[str, Any, Callable[[Any], bool], str]]:
    """Every numeric field with its allowed range: ``(field, value, test, what it must be)``.
    ``None`` values (``take the preset's``) are skipped by the caller."""
    t, s, a, r = cfg.train, cfg.sampler, cfg.loss, cfg.reward
    unit = lambda x: _finite(x) and 0.0 <= x < 1.0  # noqa: E731
    return [
        ("train.learning_rate", t.learning_rate, _positive, "a positive number (e.g. 3e-4 with LoRA; 0 would train nothing)"),
        ("train.prompts_per_iteration", t.prompts_per_iteration, lambda x: x >= 1, "≥ 1"),
        ("train.iterations", t.iterations, lambda x: x >= 0, "≥ 0"),
        ("train.train_batch_size", t.train_batch_size, lambda x: x >= 1, "≥ 1"),
        ("train.inner_epochs", t.inner_epochs, lambda x: x >= 1, "≥ 1"),
        ("train.lr_min_ratio", t.lr_min_ratio, lambda x: _finite(x) and 0.0 <= x <= 1.0, "in [0, 1] (a fraction of train.learning_rate)"),
        ("train.weight_decay", t.weight_decay, _non_negative, "≥ 0 (0 disables weight decay)"),
        ("train.adam_betas[0]", t.adam_betas[0] if t.adam_betas else None, unit, "in [0, 1) (AdamW default 0.9)"),
        ("train.adam_betas[1]", t.adam_betas[1] if len(t.adam_betas) > 1 else None, unit, "in [0, 1) (AdamW default 0.999)"),
        ("train.max_grad_norm", t.max_grad_norm, _non_negative, "≥ 0 (0 disables gradient clipping)"),
        ("train.max_nonfinite_updates", t.max_nonfinite_updates, lambda x: x >= 0, "≥ 0 (0 stops at the first NaN/inf update)"),
        ("train.lora_rank", t.lora_rank, lambda x: x >= 0, "≥ 0 (0 = full fine-tune)"),
        ("train.lora_alpha", t.lora_alpha, _positive, "a positive number (LoRA scale = alpha / rank)"),
        ("train.ema_decay", t.ema_decay, unit, "in [0, 1) (0 disables the EMA; Flow-GRPO uses 0.9)"),
        ("train.ema_update_every", t.ema_update_every, lambda x: x >= 1, "≥ 1 (1 = every optimizer step)"),
        ("train.save_total_limit", t.save_total_limit, lambda x: x >= 1, "≥ 1 or null (keep every checkpoint)"),
        ("train.save_every", t.save_every, lambda x: x >= 0, "≥ 0 (0 saves only at the end)"),
        ("train.eval_every", t.eval_every, lambda x: x >= 0, "≥ 0 (0 evaluates only before and after training)"),
        ("train.eval_samples_per_prompt", t.eval_samples_per_prompt, lambda x: x >= 1, "≥ 1"),
        ("train.num_threads", t.num_threads, lambda x: x >= 1, "≥ 1 (or unset: the default of docs/performance.md)"),
        ("sampler.num_steps", s.num_steps, lambda x: x >= 1, "≥ 1"),
        ("sampler.eval_num_steps", s.eval_num_steps, lambda x: x >= 1, "≥ 1"),
        *((f"sampler.noise_level.{k}" if isinstance(s.noise_level, dict) else "sampler.noise_level", v, _non_negative, "≥ 0")
          for k, v in (s.noise_level.items() if isinstance(s.noise_level, dict) else [(None, s.noise_level)])),
        ("sampler.shift", s.shift, _positive, "> 0 (1 = no shift)"),
        ("sampler.num_frames", s.num_frames, lambda x: x >= 1, "≥ 1"),
        ("model.decode_batch_size", cfg.model.decode_batch_size, lambda x: x >= 1, "≥ 1 (or unset: decode the whole batch at once)"),
        ("sampler.guidance_scale", s.guidance_scale, _finite, "a finite number"),
        ("sampler.height", s.height, lambda x: x >= 1, "a positive number of pixels (or unset: the model's)"),
        ("sampler.width", s.width, lambda x: x >= 1, "a positive number of pixels (or unset: the model's)"),
        ("sampler.eval_height", s.eval_height, lambda x: x >= 1, "a positive number of pixels (or unset: sampler.height)"),
        ("sampler.eval_width", s.eval_width, lambda x: x >= 1, "a positive number of pixels (or unset: sampler.width)"),
        ("sampler.eval_guidance_scale", s.eval_guidance_scale, lambda x: x == 0.0 or x >= 1.0, "≥ 1 (1 = no CFG; or unset: sampler.guidance_scale)"),
        ("sampler.steps_per_backward", s.steps_per_backward, lambda x: x >= 1, "≥ 1"),
        ("sampler.max_new_tokens", s.max_new_tokens, lambda x: x >= 1, "≥ 1"),
        ("sampler.temperature", s.temperature, _positive, "a positive number (1 samples the model's distribution)"),
        ("reward.max_failures", r.max_failures, lambda x: x >= 0, "≥ 0 (failed samples tolerated before the run stops)"),
        ("reward.track_window", r.track_window, lambda x: x >= 1, "≥ 1 (evaluations the alarm looks back)"),
        ("loss.adv_clip_max", a.adv_clip_max, _positive, "a positive number (advantages are clipped to ±adv_clip_max)"),
        ("loss.clip_range", a.clip_range, _non_negative, "≥ 0 (PPO ε; Flow-GRPO 1e-4, TRL 0.2)"),
        ("loss.clip_range_high", a.clip_range_high, _non_negative, "≥ 0 (upper PPO ε; DAPO 0.28)"),
        ("loss.beta", a.beta, _non_negative, "≥ 0 (KL coefficient; 0 disables the KL term)"),
        ("loss.timestep_fraction", a.timestep_fraction, lambda x: _finite(x) and 0.0 < x <= 1.0, "in (0, 1]"),
        ("loss.nft_beta", a.nft_beta, _positive, "> 0 (DiffusionNFT β, 1.0 by default)"),
    ]


def _resolve_prompt_paths(data: Any, base: Path) -> Any:
    """Relative prompt files/folders named in a YAML file are looked up next to that file first: a
    ``train.prompts`` / ``train.eval_prompts`` string that names an existing path there becomes
    that absolute path (the run's saved config then works from any directory)."""
    train = data.get("train") if isinstance(data, dict) else None
    if not isinstance(train, dict):
        return data
    for key in ("prompts", "eval_prompts"):
        spec = train.get(key)
        if isinstance(spec, str) and not Path(spec).expanduser().is_absolute():
            candidate = base / Path(spec).expanduser()
            if candidate.is_file() or candidate.is_dir():
                train = {**train, key: str(candidate.resolve())}
    return {**data, "train": train}


def _resolve_row_image(row: Any, base: Path) -> Any:
    """A prompt row of a config file with its relative ``image`` path(s) made absolute against the
    config file's folder (where they exist there; the prompt loader reports missing ones)."""
    if not isinstance(row, dict) or row.get("image") is None:
        return row

    def one(p: Any) -> Any:
        if isinstance(p, str) and p.strip() and not Path(p).expanduser().is_absolute() and (base / p).is_file():
            return str((base / p).resolve())
        return p

    value = row["image"]
    return {**row, "image": [one(p) for p in value] if isinstance(value, list) else one(value)}


def _trl_aliases():
    try:
        from flowrl.algorithms import trl_aliases  # written with the LLM presets
    except ImportError:
        return None
    return trl_aliases


_SECTIONS = {"model": ModelConfig, "sampler": SamplerConfig, "reward": RewardConfig, "loss": AlgorithmConfig, "train": TrainSection}


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = [k for k in data if k not in known]
    if unknown:
        import difflib

        hint = "; ".join(
            f"'{k}'" + (f" (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(str(k), known, n=1)) else "") for k in unknown
        )
        raise ConfigError(f"unknown field(s) in {prefix.rstrip('.') or 'config'}: {hint}. Known: {', '.join(sorted(known))}.")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        path = f"{prefix}{f.name}"
        sub = _SECTIONS.get(f.name) if cls is TrainConfig else None
        if sub is RewardConfig and isinstance(value, dict):
            value = _reward_shorthand(value)
        if sub is not None:
            kwargs[f.name] = _build(sub, value or {}, path + ".")
        else:
            kwargs[f.name] = _coerce(value, hints[f.name], path)
    return cls(**kwargs)


def _reward_shorthand(value: dict[str, Any]) -> dict[str, Any]:
    """``reward: {pickscore: 1.0, clipscore: 0.5, combine: gdpo}`` → keys that are not fields of
    :class:`RewardConfig` are rewards (name → weight or options)."""
    known = {f.name for f in fields(RewardConfig)}
    extra = {k: v for k, v in value.items() if k not in known}
    if not extra:
        return value
    out = {k: v for k, v in value.items() if k in known}
    listed = out.get("rewards") or {}
    if not isinstance(listed, dict):
        raise ConfigError(f"reward.rewards must map reward names to weights, e.g. {{jpeg_compressibility: 1.0}}; got {listed!r}.")
    out["rewards"] = {**listed, **extra}
    return out


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args or tp is Any:
            return None
        raise ConfigError(f"{path} cannot be empty (null).")
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and all(isinstance(a, str) for a in args):
            # YAML 1.1 reads `no`/`yes`/`off`/`on` as booleans: map them back to the option named so
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((a for a in args if a in words), value)
        if value not in args:
            raise ConfigError(f"{path} must be one of {', '.join(map(str, args))}; got {value!r}.")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path} must be an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{path} must be a number, got {value!r}.") from None
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}.")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}.")
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{path} must be a list of {len(args)} values, got {list(value)!r}.")
            return tuple(_coerce(v, a, path) for v, a in zip(value, args))
        return [_coerce(v, args[0], path) for v in value] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}.")
        return dict(value)
    return value
