"""One small registry helper for every swappable component (kernels, advantages, losses,
rewards, pipelines).

A duplicate name is an error; an unknown name lists the known ones; a dotted path
``package.module:object`` resolves a user's own object without registering it.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


#: run folders whose code is not imported (a run's config.yaml may name a module sitting there);
#: see :func:`distrust` and :func:`trust_run_code`
_UNTRUSTED: list[Path] = []
_TRUST_RUN_CODE = [False]


def distrust(folder: str | Path) -> None:
    """Never import a module from ``folder`` (a run folder being loaded) unless
    :func:`trust_run_code` was called; a module also importable from elsewhere is imported from there."""
    path = Path(folder).resolve()
    if path not in _UNTRUSTED:
        _UNTRUSTED.append(path)


def trust_run_code(flag: bool = True) -> None:
    """``--trust-run-code``: allow importing modules that sit in a loaded run's folder."""
    _TRUST_RUN_CODE[0] = bool(flag)


def _inside_untrusted(location: str | os.PathLike | None) -> Path | None:
    if not location:
        return None
    where = Path(location or ".").resolve()
    return next((d for d in _UNTRUSTED if where == d or d in where.parents), None)


def _import_checked(module_name: str, path: str) -> Any:
    """``importlib.import_module`` that refuses a module found in an untrusted run folder (or takes
    it from another ``sys.path`` entry when one holds it)."""
    top = module_name.split(".")[0]
    if _TRUST_RUN_CODE[0] or not _UNTRUSTED or top in sys.modules:
        return importlib.import_module(module_name)
    from importlib import machinery, util

    spec = util.find_spec(top)
    if spec is None:
        return importlib.import_module(module_name)  # raises the usual ModuleNotFoundError
    origin = spec.origin if spec.origin not in (None, "namespace") else next(iter(spec.submodule_search_locations or []), None)
    folder = _inside_untrusted(origin)
    if folder is None:
        return importlib.import_module(module_name)
    safe = [p for p in sys.path if _inside_untrusted(p or os.getcwd()) is None]
    if machinery.PathFinder.find_spec(top, safe) is not None:
        saved = sys.path[:]
        sys.path[:] = safe
        try:
            return importlib.import_module(module_name)
        finally:
            sys.path[:] = saved
    from flowrl.errors import ConfigError

    raise ConfigError(
        f"'{path}' would import {origin}, which sits in the run folder {folder}: loading a run never runs code from "
        "its folder. Pass --trust-run-code if you trust this run, or install the module (or put its folder on PYTHONPATH) elsewhere."
    )


def import_if_present(modules: Any) -> None:
    """Import each module of ``modules`` that is installed (its registrations run); one that is
    missing is skipped, while an import error *inside* an installed module is raised."""
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def _import_with_cwd(module_name: str, path: str) -> Any:
    """:func:`_import_checked`; when the module's top-level package is not importable, look in the
    working directory too (``python -m`` puts it on ``sys.path``; the ``flowrl`` command does not),
    so a ``my_rewards.py`` beside the config you run works without ``PYTHONPATH=.``."""
    try:
        return _import_checked(module_name, path)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        if exc.name != module_name.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return _import_checked(module_name, path)


def load_dotted(path: str) -> Any:
    """Import ``package.module:attr`` (or ``package.module.attr``) and return the object. A module
    that sits in a distrusted run folder (:func:`distrust`) is refused with a clear error."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"'{path}' is not a dotted path; write it as 'package.module:object'.")
    try:
        module = _import_with_cwd(module_name, path)
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
