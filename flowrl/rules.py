"""Compatibility rules between a config's parts, checked before anything loads.

Each rule is a small function of the resolved config that raises a
:class:`~flowrl.config.ConfigError` naming the field and the fix; :func:`check_compatibility` runs
them all (the trainer calls it before it reads prompts, rewards or the model; ``flowrl config show``
calls it without running anything). A rule needs only the config: the step grid, the group size,
the preset's kernel and schedule, the reward names. Rules are a registry, so a plug-in schedule or
model kind adds its own.

The rules (docs/configuration.md, "Checked before a run starts"):

- ``schedule_steps``: every step a rollout schedule names (tree split steps, SDE window, G²RPO's
  k steps, depth pruning) lies inside ``sampler.num_steps``;
- ``tree_group``: a tree of ``branch^len(split_steps)`` leaves per prompt matches
  ``train.num_generations``;
- ``schedule_options``: ``sampler.rollout_params`` names only options the schedule takes;
- ``kernel_schedule``: a policy-gradient schedule draws its stored steps from a stochastic kernel
  (an ODE kernel or a zero noise level has no log-probability to train);
- ``model_kind``: the preset fits ``model.kind`` (token presets for causal LMs, the masked schedule
  for masked models, a diffusion kernel for flow models);
- ``reward_kind``: each reward scores what the model makes (text rewards for LMs, image and video
  rewards for diffusion models);
- ``report_column``: ``train.report`` names a reward column (``<reward>`` or
  ``<reward>/<component>``).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from flowrl.registry import Registry

RULES: Registry[Callable[[Any], None]] = Registry("compatibility rule")
#: rule names in the order they run (registration order: cheap structural rules first)
ORDER: list[str] = []


def rule(name: str) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Register a rule ``fn(resolved) -> None`` (raises ConfigError) under ``name``."""

    def deco(fn: Callable[[Any], None]) -> Callable[[Any], None]:
        RULES.register(name, fn)
        if name not in ORDER:
            ORDER.append(name)
        return fn

    return deco


def _error(message: str):
    from flowrl.errors import ConfigError

    return ConfigError(message)


def check_compatibility(resolved: Any, *, rewards: bool = True) -> None:
    """Run every registered rule on ``resolved`` (a :class:`~flowrl.config.ResolvedConfig`); the
    first violation raises a ConfigError. ``rewards=False`` skips the rules about the configured
    rewards (a caller that scores with its own reward set)."""
    for name in ORDER:
        if not rewards and name in ("reward_kind", "report_column"):
            continue
        RULES.get(name)(resolved)


def _step(value: Any, num_steps: int, field: str, *, allow_end: bool = False) -> int:
    from flowrl.rollout import resolve_step

    try:
        return resolve_step(value, num_steps, field=field, allow_end=allow_end)
    except ValueError as exc:
        raise _error(str(exc)) from None


def _schedule_params(resolved: Any) -> dict[str, Any]:
    return dict(resolved.preset.rollout_params)


@rule("schedule_steps")
def schedule_steps(resolved: Any) -> None:
    """Steps named by the rollout schedule lie inside ``sampler.num_steps``."""
    preset, T = resolved.preset, resolved.config.sampler.num_steps
    p = _schedule_params(resolved)
    where = "sampler.rollout_params"
    if preset.rollout == "tree":
        splits = [_step(s, T, f"{where}.split_steps") for s in p.get("split_steps", ())]
        if len(set(splits)) != len(splits):
            raise _error(f"{where}.split_steps {list(p['split_steps'])} resolve to repeated steps {splits} at sampler.num_steps={T}; give distinct steps.")
        for s in p.get("depth_prune", ()) or ():
            _step(s, T, f"{where}.depth_prune")
    if preset.rollout == "singular" and p.get("k_steps") is not None:
        ks = [_step(k, T, f"{where}.k_steps") for k in p["k_steps"]]
        if len(set(ks)) != len(ks):
            raise _error(f"{where}.k_steps resolve to repeated steps {ks} at sampler.num_steps={T}; give distinct steps.")
    if preset.rollout in ("window", "tree") and p.get("window_size") is not None:
        from flowrl.rollout import window_position

        try:
            window_position(T, window_size=int(p["window_size"]), window_range=p.get("window_range", (0, 1.0)), mode="sliding")
        except ValueError as exc:
            raise _error(f"{where}: {exc} (sampler.num_steps={T})") from None


@rule("tree_group")
def tree_group(resolved: Any) -> None:
    """A tree's leaves per prompt equal the group size."""
    if resolved.preset.rollout != "tree":
        return
    p = _schedule_params(resolved)
    branch, splits = int(p.get("branch", 2)), list(p.get("split_steps", ()))
    leaves = branch ** len(splits)
    G = resolved.config.train.num_generations
    if leaves != G:
        raise _error(
            f"train.num_generations is {G} but algorithm {resolved.config.algorithm}'s tree has branch^len(split_steps) = "
            f"{branch}^{len(splits)} = {leaves} leaves per prompt; set train.num_generations={leaves} "
            "(or change sampler.rollout_params.split_steps / branch)."
        )


@rule("schedule_options")
def schedule_options(resolved: Any) -> None:
    """``sampler.rollout_params`` holds only options of the schedule."""
    from flowrl.plugins import import_builtin_components
    from flowrl.rollout import SCHEDULES

    rollout = resolved.preset.rollout
    if rollout not in SCHEDULES:
        import_builtin_components()
    if rollout not in SCHEDULES:  # a schedule its policy runs itself (Co-GRPO's masked decoding)
        return
    params = inspect.signature(SCHEDULES.get(rollout)).parameters
    if any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values()):
        return
    taken = [n for n, q in params.items() if q.kind is inspect.Parameter.KEYWORD_ONLY and n not in ("group_size", "generator")]
    unknown = [k for k in resolved.config.sampler.rollout_params if k not in taken]
    if unknown:
        raise _error(f"sampler.rollout_params.{unknown[0]} is not an option of rollout schedule '{rollout}'. Its options: {', '.join(taken) or '(none)'}.")


#: schedules whose stored steps are trained by a log-probability ratio (need a stochastic kernel)
RATIO_SCHEDULES = ("full", "window", "singular", "tree")


@rule("kernel_schedule")
def kernel_schedule(resolved: Any) -> None:
    """Policy-gradient diffusion schedules sample their stored steps stochastically."""
    preset = resolved.preset
    if resolved.config.model.kind != "flow" or preset.objective != "policy_gradient" or preset.rollout not in RATIO_SCHEDULES:
        return
    if preset.kernel == "ode" or not preset.noise_level > 0:
        raise _error(
            f"algorithm {resolved.config.algorithm} trains the log-probability of stochastic steps, but sampler.kernel "
            f"'{preset.kernel}' at noise level {preset.noise_level} draws none: choose a stochastic kernel (flow, dance, sage, cps) "
            "with sampler.noise_level > 0, or a preset made for deterministic rollouts (diffusion_nft)."
        )


@rule("model_kind")
def model_kind(resolved: Any) -> None:
    """The preset fits the kind of model."""
    kind, preset, name = resolved.config.model.kind, resolved.preset, resolved.config.algorithm
    if kind == "causal_lm" and (preset.kernel != "token" or preset.rollout != "full"):
        raise _error(f"algorithm {name} is a diffusion method; model.kind causal_lm takes a language-model preset (grpo, dr_grpo, dapo, gspo, ...).")
    if kind == "masked" and preset.rollout != "masked":
        raise _error(f"model.kind masked takes algorithm co_grpo (its masked-decoding schedule), not {name}.")
    if kind == "flow" and (preset.kernel == "token" or preset.rollout == "masked"):
        what = "a language-model" if preset.rollout != "masked" else "a masked-token"
        raise _error(f"algorithm {name} is {what} method; a diffusion model (model.kind flow) takes flow_grpo, dance_grpo, ... — or set model.kind.")


#: what each model kind produces, as rewards declare it (``Reward.modalities``)
MODEL_OUTPUTS = {"causal_lm": ("text",), "flow": ("image", "video"), "masked": ("image",)}


def reward_class(key: str) -> Any:
    """The class (or factory) behind a reward name, imported but not built (no weights load)."""
    from flowrl.rewards.base import _resolve_for_config

    return _resolve_for_config(key)


def reward_columns(config: Any) -> list[str]:
    """The column name each configured reward logs under (``reward/<column>``, ``eval/<column>``):
    the key for registered names and plug-ins; for a dotted path ``pkg.module:Class`` the class's
    ``name`` attribute when it sets one, else the object's name lower-cased (``Class`` → ``class``)."""
    from flowrl.rewards.base import _column_name

    return [_column_name(key, reward_class(key)) if ":" in key else key for key in config.reward.rewards]


@rule("reward_kind")
def reward_kind(resolved: Any) -> None:
    """Every reward scores the kind of output the model makes."""
    cfg = resolved.config
    makes = MODEL_OUTPUTS.get(cfg.model.kind)
    if makes is None:
        return
    for key in cfg.reward.rewards:
        takes = getattr(reward_class(key), "modalities", None)
        if takes and not set(takes) & set(makes):
            raise _error(
                f"reward.rewards.{key} scores {' or '.join(takes)}, but model.kind {cfg.model.kind} makes {' or '.join(makes)}; "
                f"choose a reward for {makes[0]} (docs/rewards.md)."
            )


@rule("report_column")
def report_column(resolved: Any) -> None:
    """``train.report`` names a reward column."""
    report = resolved.config.train.report
    if not report:
        return
    known: list[str] = []  # columns a reward declares; "<reward>/*" where it returns undeclared components
    for key, col in zip(resolved.config.reward.rewards, reward_columns(resolved.config)):
        parts = getattr(reward_class(key), "components", None)
        known += [f"{col}/{c}" for c in parts] if parts else [col, f"{col}/*"]
    head = report.split("/")[0]
    if report in known or (f"{head}/*" in known and "/" in report):
        return
    import difflib

    named = [k for k in known if not k.endswith("/*")]
    close = difflib.get_close_matches(report, named, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise _error(
        f"train.report '{report}' is not a reward column{hint}. The rewards log {', '.join(k.replace('/*', '/<component>') for k in known)}; "
        "a reward returning components logs <reward>/<component>, e.g. digits/correct."
    )


# structural rules first: a language-model preset on an image model is named as such, not as a kernel
ORDER[:] = ["model_kind", "schedule_steps", "tree_group", "schedule_options", "kernel_schedule", "reward_kind", "report_column"] + [
    n for n in ORDER if n not in ("model_kind", "schedule_steps", "tree_group", "schedule_options", "kernel_schedule", "reward_kind", "report_column")
]
