"""flowrl: reinforcement learning for flow-matching generative models and causal LMs.

Public names (README.md shows their use): :class:`FlowPolicy`, :class:`TokenPolicy`,
:class:`Trajectories`, :class:`TrainConfig`, :func:`train`.
"""

from __future__ import annotations

import os as _os

# ``pipelines/`` and ``rewards/`` live beside ``flowrl/`` in the source tree and install as
# ``flowrl.pipelines`` / ``flowrl.rewards``. When the package is imported straight from a
# checkout (cwd on sys.path), make those sub-packages resolvable too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isdir(_os.path.join(_root, "pipelines")):
    if _root not in __path__:  # type: ignore[name-defined]
        __path__.append(_root)  # type: ignore[name-defined]

__version__ = "0.1.0"

_LAZY = {
    "FlowPolicy": ("flowrl.pipelines.flow_policy", "FlowPolicy"),
    "TokenPolicy": ("flowrl.pipelines.causal_lm", "TokenPolicy"),
    "Trajectories": ("flowrl.policy", "Trajectories"),
    "Policy": ("flowrl.policy", "Policy"),
    "TrainConfig": ("flowrl.config", "TrainConfig"),
    "train": ("flowrl.trainer", "train"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'flowrl' has no attribute '{name}'")


__all__ = list(_LAZY)
