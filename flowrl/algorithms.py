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
