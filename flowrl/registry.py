"""One small registry helper for every swappable component (kernels, advantages, losses,
rewards, pipelines).

A duplicate name is an error; an unknown name lists the known ones; a dotted path
``package.module:object`` resolves a user's own object without registering it.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


def _import_with_cwd(module_name: str) -> Any:
    """Import ``module_name``; when its top-level package is not importable, look in the working
    directory too (``python -m`` puts it on ``sys.path``; the ``flowrl`` command does not), so a
    ``my_rewards.py`` beside the config you run works without ``PYTHONPATH=.``."""
    import os
    import sys

    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        if exc.name != module_name.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(module_name)


def load_dotted(path: str) -> Any:
    """Import ``package.module:attr`` (or ``package.module.attr``) and return the object."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"'{path}' is not a dotted path; write it as 'package.module:object'.")
    try:
        module = _import_with_cwd(module_name)
    except ImportError as exc:
        raise ImportError(
            f"could not import module '{module_name}' for '{path}' ({exc}); install the package that provides it, "
            f"or put the folder holding '{module_name.split('.')[0]}' on PYTHONPATH"
        ) from exc
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ImportError(f"module '{module_name}' has no attribute '{attr}' (from '{path}')") from exc
    return obj


class Registry(Generic[T]):
    """Name → object map with clear errors.

    >>> ADV = Registry("advantage estimator")
    >>> @ADV.register("group")
    ... def group(...): ...
    >>> ADV.get("group")
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        def deco(o: T) -> T:
            if name in self._items and self._items[name] is not o:
                raise ValueError(f"{self.kind} '{name}' is already registered; pick another name.")
            self._items[name] = o
            return o

        return deco(obj) if obj is not None else deco

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        if ":" in name:
            return load_dotted(name)
        known = ", ".join(sorted(self._items)) or "(none)"
        raise ValueError(f"unknown {self.kind} '{name}'. Known: {known}; or give a dotted path 'pkg.module:object'.")

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
