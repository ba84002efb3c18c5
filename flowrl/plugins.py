"""The plug-point registries of the training loop, in a module of their own so that adapters,
rewards and objectives can register themselves without importing the loop.

- ``OBJECTIVES``: name → objective ``fn(policy, batch, steps, ctx) -> (loss, metrics)`` or a class
  building one (see :func:`make_objective`).
- ``POLICY_BUILDERS``: ``model.kind`` → ``fn(resolved: ResolvedConfig, run_dir: Path) -> Policy``.
- ``REWARD_TRANSFORMS``: name → ``fn(table [B, K], names, group_ids, traj, **params) -> (table, names)``,
  applied before advantages (Pref-GRPO's win rates).
- ``PIPELINE_SOURCES``: built-in names for ``model.pipeline`` → ``fn(run_dir) -> pipeline``.
"""

from __future__ import annotations

from typing import Any, Callable

from flowrl.registry import Registry, import_if_present

OBJECTIVES: Registry[Callable[..., Any]] = Registry("training objective")
#: name → fn(resolved: ResolvedConfig, run_dir: Path) -> Policy
POLICY_BUILDERS: Registry[Callable[..., Any]] = Registry("policy builder")
#: name → fn(table [B, K], names, group_ids, traj, **params) -> (table, names) transforms before advantages
REWARD_TRANSFORMS: Registry[Callable[..., Any]] = Registry("reward transform")
#: built-in model sources for ``model.pipeline`` (name → fn(run_dir) -> pipeline)
PIPELINE_SOURCES: Registry[Callable[..., Any]] = Registry("pipeline source")


def make_objective(name: str, **params: Any) -> Any:
    """A ready objective ``fn(policy, batch, steps, ctx) -> (loss, metrics)``: a registered class is
    instantiated with ``params`` (it may keep state: ``state_dict``/``load_state_dict`` are
    checkpointed, ``before_advantages(trainer, traj)`` runs after the rewards and before the advantages,
    ``on_update(trainer)`` after every optimizer step, ``on_iteration_end(trainer, it) -> metrics`` after
    every update phase); a
    function is bound with ``params``."""
    import functools
    import inspect

    obj = OBJECTIVES.get(name)
    if inspect.isclass(obj):
        return obj(**params)
    return functools.partial(obj, **params) if params else obj


#: modules that register built-in objectives, rollout schedules and reward transforms on import
BUILTIN_COMPONENT_MODULES = ("flowrl.nft", "flowrl.matching", "flowrl.reference", "flowrl.gardo", "flowrl.trpa", "flowrl.co_grpo", "flowrl.rewards.pairwise", "flowrl.trust_region", "flowrl.care")


def import_builtin_components() -> None:
    import_if_present(BUILTIN_COMPONENT_MODULES)

