"""Named algorithm presets: each algorithm is a bundle of choices at the plug points, as data.

A preset names the transition kernel and rollout schedule (diffusion), the reward transform, the
advantage estimator, the policy-loss assembly (:class:`~flowrl.losses.LossSpec`) and the training
objective. The trainer reads a preset; it never branches on the algorithm's name. Variants are
``dataclasses.replace(PRESET, ...)``; a new algorithm is one registry entry plus one preset.

Config fields override preset values (``TrainConfig.resolve_preset``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from flowrl.losses import LossSpec
from flowrl.registry import Registry


@dataclass(frozen=True)
class Preset:
    """One algorithm = one choice per plug point (see DESIGN.md's table).

    kernel / noise_level: transition kernel of stochastic steps (``flowrl.sde.KERNELS``).
    rollout / rollout_params: which steps are stochastic (``flowrl.rollout.SCHEDULES``).
    share_initial_noise: group members start from the same noise (DanceGRPO).
    reward_transform: optional transform of the reward table before advantages (e.g. win rates).
    advantage / advantage_params: estimator name in ``flowrl.advantages.ADVANTAGES``.
    loss: how the policy loss is assembled (ratio level, clip rule, step weights, aggregation, KL).
    objective: what the update step optimises (``flowrl.trainer.OBJECTIVES``): ``policy_gradient``
        (ratio-based, every GRPO variant) or another registered one (e.g. DiffusionNFT).
    prompt_selection: how prompts are drawn each iteration (``uniform``, ...).
    defaults: other config defaults this paper used (e.g. learning rate), applied unless the user
        set them.
    """

    name: str
    doc: str = ""
    kernel: str = "flow"
    noise_level: float = 0.7
    rollout: str = "full"
    rollout_params: dict[str, Any] = field(default_factory=dict)
    share_initial_noise: bool = False
    reward_transform: str | None = None
    advantage: str = "group"
    advantage_params: dict[str, Any] = field(default_factory=dict)
    loss: LossSpec = field(default_factory=LossSpec)
    objective: str = "policy_gradient"
    prompt_selection: str = "uniform"
    defaults: dict[str, Any] = field(default_factory=dict)


PRESETS: Registry[Preset] = Registry("algorithm preset")


def register_preset(preset: Preset) -> Preset:
    PRESETS.register(preset.name, preset)
    return preset


def get_preset(name: str) -> Preset:
    return PRESETS.get(name)


FLOW_GRPO = register_preset(
    Preset(
        name="flow_grpo",
        doc="Flow-GRPO (Liu et al. 2025): flow SDE at every step (a = 0.7; Flux 0.9), per-prompt z-score "
        "advantages clipped to ±5, PPO clip ε = 1e-4 on mean-reduced log-probs, analytic KL to the "
        "LoRA-disabled reference (β 0.01–0.04 on SD3.5-M; reference form divides by σ_t²).",
        kernel="flow",
        noise_level=0.7,
        advantage="group",
        advantage_params={"std": "group", "clip": 5.0},
        loss=LossSpec(clip="ppo_clip", clip_params={"clip_range": 1e-4}, aggregation="token-mean", kl="gaussian_reference", beta=0.04),
        defaults={"learning_rate": 3e-4, "timestep_fraction": 0.99},
    )
)

DANCE_GRPO = register_preset(
    replace(
        FLOW_GRPO,
        name="dance_grpo",
        doc="DanceGRPO (Xue et al. 2025): constant-η SDE (η = 0.3), group members share the initial "
        "noise, group z-score, PPO clip, no KL; a random 60% of steps trained per sample.",
        kernel="dance",
        noise_level=0.3,
        share_initial_noise=True,
        loss=LossSpec(clip="ppo_clip", clip_params={"clip_range": 1e-4}, aggregation="token-mean", kl=None, beta=0.0),
        defaults={"learning_rate": 1e-5, "timestep_fraction": 0.6, "timestep_selection": "random"},
    )
)


def resolve(config: Any) -> Any:
    """Apply a :class:`~flowrl.config.TrainConfig`'s overrides on its preset → ``ResolvedConfig``.

    Only fields the user set (not None) override the preset; dict options are merged over the
    preset's. The result is what the run directory records."""
    from flowrl.config import ConfigError, ResolvedConfig

    config.validate()
    try:
        preset = get_preset(config.algorithm)
    except ValueError as exc:
        raise ConfigError(f"algorithm: {exc}") from None
    s, a = config.sampler, config.loss
    changes: dict[str, Any] = {}
    if s.kernel is not None:
        changes["kernel"] = s.kernel
    if s.noise_level is not None:
        changes["noise_level"] = s.noise_level
    if s.rollout is not None:
        changes["rollout"] = s.rollout
    if s.rollout_params:
        changes["rollout_params"] = {**preset.rollout_params, **s.rollout_params}
    if s.share_initial_noise is not None:
        changes["share_initial_noise"] = s.share_initial_noise
    if config.reward.transform is not None:
        changes["reward_transform"] = config.reward.transform
    if a.advantage is not None:
        changes["advantage"] = a.advantage
    adv_params = dict(preset.advantage_params)
    if a.std is not None:
        adv_params["std"] = a.std
    if a.adv_clip_max is not None:
        adv_params["clip"] = a.adv_clip_max
    adv_params.update(a.options)
    changes["advantage_params"] = adv_params
    loss = preset.loss
    clip_params = dict(loss.clip_params)
    if a.clip_range is not None:
        clip_params["clip_range"] = a.clip_range
    if a.clip_range_high is not None:
        clip_params["clip_range_high"] = a.clip_range_high
    loss_changes: dict[str, Any] = {"clip_params": clip_params}
    if a.beta is not None:
        loss_changes["beta"] = a.beta
    if a.kl is not None:
        loss_changes["kl"] = a.kl
    if a.aggregation is not None:
        loss_changes["aggregation"] = a.aggregation
    changes["loss"] = replace(loss, **loss_changes)
    preset = replace(preset, **changes)
    d = preset.defaults
    lr = config.train.learning_rate if config.train.learning_rate is not None else d.get("learning_rate", 1e-4)
    frac = a.timestep_fraction if a.timestep_fraction is not None else d.get("timestep_fraction", 1.0)
    sel = a.timestep_selection if a.timestep_selection is not None else d.get("timestep_selection", "first")
    return ResolvedConfig(config=config, preset=preset, learning_rate=float(lr), timestep_fraction=float(frac), timestep_selection=sel)
