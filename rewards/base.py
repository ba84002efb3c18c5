"""The reward protocol, the reward registry, and :class:`RewardSet` (several rewards, one table).

A reward is any callable ``reward(outputs, prompts, meta=None)`` where ``outputs`` are

- images: float ``[B, C, H, W]`` in [0, 1],
- video: float ``[B, F, C, H, W]`` in [0, 1] (frames first: ``outputs[:, k]`` is frame k of every
  sample as an image batch; an image reward scores chosen frames with the ``frames`` options of
  :mod:`flowrl.rewards.frames`),
- or a ``list[str]`` of completions for language models,

and which returns float scores ``[B]`` or a dict of named ``[B]`` components. It declares
``name``, ``differentiable``, ``device``, ``dtype``, ``batch_size`` (``None`` = whole batch at
once) and ``scale`` (a human-readable note of its output range, shown in logs). Subclassing
:class:`Reward` gives those defaults.

Names resolve, in order, through: the registry (:func:`register`), installed plug-ins in the
``flowrl.rewards`` entry-point group, and dotted paths ``package.module:Class``.

Combination (issue 6.3): ``weighted_sum`` is Flow-GRPO's multi-reward rule (weighted sum of raw
scores, normalised later by the advantage estimator); ``gdpo`` is GDPO's decoupled rule (z-score
every reward column inside its group, weighted sum, then re-normalise over the batch).
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from flowrl.normalization import gdpo, group_zscore, weighted_sum  # noqa: F401  (re-exported)
from flowrl.registry import Registry, load_dotted

from .interface import Reward, RewardError, batch_size_of, slice_batch  # noqa: F401  (re-exported)

ENTRY_POINT_GROUP = "flowrl.rewards"
COMBINE_MODES = ("weighted_sum", "gdpo")


class FunctionReward(Reward):
    """Wrap a plain function ``fn(outputs, prompts, meta=None, **kwargs)`` as a :class:`Reward`."""

    def __init__(self, fn: Callable[..., Any], name: str | None = None, **kwargs: Any):
        self.fn = fn
        self.kwargs = kwargs
        self.name = name or getattr(fn, "__name__", "reward")
        self.scale = getattr(fn, "scale", "unspecified")
        self.batch_size = getattr(fn, "batch_size", None)

    def __call__(self, outputs, prompts, meta=None):
        return self.fn(outputs, prompts, meta, **self.kwargs)


# --------------------------------------------------------------------------- registry

REWARDS: Registry[Any] = Registry("reward")


def register(name: str) -> Callable[[Any], Any]:
    """Decorator: register a reward class (or factory) under ``name``.

    >>> @register("brightness")
    ... class Brightness(Reward):
    ...     def __call__(self, outputs, prompts, meta=None):
    ...         return outputs.mean(dim=(1, 2, 3))

    A class whose ``name`` is still the base default gets ``name`` set to the registered one.
    """

    def deco(obj: Any) -> Any:
        REWARDS.register(name)(obj)  # raises on a duplicate before anything is changed
        if inspect.isclass(obj) and obj.__dict__.get("name") is None and getattr(obj, "name", "reward") == "reward":
            obj.name = name
        return obj

    return deco


def entry_point_rewards() -> dict[str, importlib.metadata.EntryPoint]:
    """Installed plug-ins: entry points of group ``flowrl.rewards`` (name -> entry point)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


# Built-in modules imported on first lookup of a name that is not registered yet (kept out of
# ``import flowrl.rewards`` because they pull extra dependencies or data).
LAZY_MODULES = ("flowrl.rewards.videoalign", "flowrl.rewards.verifiers", "flowrl.rewards.digits")
_lazy_errors: dict[str, str] = {}


def _load_lazy_modules() -> None:
    import importlib

    for mod in LAZY_MODULES:
        if mod in _lazy_errors:
            continue
        try:
            importlib.import_module(mod)
            _lazy_errors[mod] = ""
        except Exception as exc:  # noqa: BLE001 - reported with the unknown-name error
            _lazy_errors[mod] = f"{type(exc).__name__}: {exc}"


def resolve(name: str) -> Any:
    """The class/factory/function behind ``name``: registry, then entry points, then dotted path."""
    if name not in REWARDS and ":" not in name:
        _load_lazy_modules()
    if name in REWARDS:
        return REWARDS.get(name)
    plugins = entry_point_rewards()
    if name in plugins:
        try:
            return plugins[name].load()
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise ImportError(
                f"reward plug-in '{name}' (entry point '{plugins[name].value}' in group "
                f"'{ENTRY_POINT_GROUP}') failed to import: {exc}"
            ) from exc
    if ":" in name:
        return load_dotted(name)
    known = sorted(set(REWARDS.names()) | set(plugins))
    import difflib

    close = difflib.get_close_matches(name, known, n=3)
    suggestion = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    broken = "".join(f" (built-in module {m} failed to import: {e})" for m, e in _lazy_errors.items() if e and "No module named 'flowrl.rewards." not in e)
    raise ValueError(
        f"unknown reward '{name}'{suggestion}. Known: {', '.join(known) or '(none)'}; or give a dotted path "
        f"'pkg.module:Class', or install a plug-in in entry-point group '{ENTRY_POINT_GROUP}'.{broken}"
    )


def get(name: str, **kwargs: Any) -> Any:
    """Build the reward ``name`` with constructor ``kwargs`` and return the instance.

    A class (or a function registered as a factory via a class) is called with ``kwargs``; a plain
    function ``fn(outputs, prompts, meta=None, **kw)`` is wrapped in :class:`FunctionReward` with
    ``kwargs`` bound. Anything else callable (an already built instance) is returned as is.
    The frame options ``frames``, ``frame_every``, ``frame_aggregate``, ``frame_batch_size`` wrap
    the reward in :class:`~flowrl.rewards.frames.FrameReward` (an image reward on video frames).
    """
    from .frames import FrameReward, split_frame_options

    obj = resolve(name)
    kwargs, frame_options = split_frame_options(kwargs)
    if frame_options:  # an image reward on chosen frames of videos (rewards/frames.py)
        return FrameReward(get(name, **kwargs), **frame_options)
    if inspect.isclass(obj):
        try:
            reward = obj(**kwargs)
        except TypeError as exc:
            raise TypeError(f"could not build reward '{name}' ({obj.__name__}) with arguments {sorted(kwargs)}: {exc}") from exc
    elif inspect.isfunction(obj) or inspect.ismethod(obj):
        reward = FunctionReward(obj, name=None if ":" in name else name, **kwargs)
    elif callable(obj):
        if kwargs:
            raise TypeError(f"reward '{name}' resolved to an instance; it takes no constructor arguments (got {sorted(kwargs)}).")
        reward = obj
    else:
        raise TypeError(f"reward '{name}' resolved to {obj!r}, which is not callable.")
    if not callable(reward):
        raise TypeError(f"reward '{name}' built {reward!r}, which is not callable as reward(outputs, prompts, meta).")
    return reward


# --------------------------------------------------------------------------- helpers


def _as_scores(value: Any, n: int, where: str) -> Tensor:
    """Validate one ``[n]`` score vector and return it as float32 on CPU (detached)."""
    if not isinstance(value, Tensor):
        value = torch.as_tensor(value)
    value = value.detach().to("cpu", torch.float32)
    if value.dim() == 2 and value.shape[1] == 1:
        value = value[:, 0]
    if value.shape != (n,):
        raise RewardError(f"{where} returned shape {tuple(value.shape)}; expected [{n}] (one score per sample).")
    return value


# --------------------------------------------------------------------------- RewardSet


def column_metrics(table: Tensor, names: Sequence[str]) -> dict[str, float]:
    """``reward/<col>`` and ``reward/<col>/std`` of a reward table ``[B, K]`` over its finite entries
    (mean NaN when a column has none; std the population std, 0 for fewer than two)."""
    out: dict[str, float] = {}
    for k, col in enumerate(names):
        v = table[:, k]
        v = v[torch.isfinite(v)]
        out[f"reward/{col}"] = float(v.mean()) if v.numel() else math.nan
        out[f"reward/{col}/std"] = float(v.std(unbiased=False)) if v.numel() > 1 else 0.0
    return out


class RewardSet:
    """Several rewards, scored into one ``[B, K]`` table and combined into ``[B]``.

    Build with :func:`build_rewards`. Metrics (:meth:`metrics`): ``reward/<column>`` (mean of the
    finite entries of the last table), ``reward/<column>/std``, ``reward/failures/<name>``
    (cumulative failed samples) and anything a reward's own ``metrics()`` reports, as
    ``reward/<name>/<key>``.
    """

    def __init__(
        self,
        rewards: Mapping[str, Any],
        weights: Mapping[str, float],
        *,
        combine: str = "weighted_sum",
        max_failures: int = 0,
        component_weights: Mapping[str, Mapping[str, float]] | None = None,
        eps: float = 1e-4,
        move_to_device: bool = True,
    ):
        if combine not in COMBINE_MODES:
            raise ValueError(f"unknown reward combine '{combine}'. Known: {', '.join(COMBINE_MODES)}.")
        if max_failures < 0:
            raise ValueError(f"max_failures must be >= 0 (got {max_failures}).")
        for name in rewards:
            if name not in weights:
                raise ValueError(f"reward '{name}' has no weight; give one, e.g. {{'{name}': 1.0}}.")
        self.rewards = dict(rewards)
        self.weights = {k: float(weights[k]) for k in rewards}
        self.combine_mode = combine
        self.max_failures = int(max_failures)
        self.component_weights = {k: dict(v) for k, v in (component_weights or {}).items()}
        self.eps = eps
        self.move_to_device = move_to_device
        self.failures: dict[str, int] = {name: 0 for name in rewards}
        self.last_errors: dict[str, str] = {}
        self._components: dict[str, list[str] | None] = {}
        self._last: tuple[Tensor, list[str]] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    # 1. score ------------------------------------------------------------------------------
    def score(self, outputs: Any, prompts: Sequence[str], meta: dict | None = None) -> tuple[Tensor, list[str]]:
        """Evaluate every reward; returns ``(table [B, K] float32 CPU, column names)``.

        A dict-returning reward gives one column per component, named ``<name>/<component>``.
        Each reward sees batches of at most its ``batch_size``. When a call raises, its samples are
        scored one by one (unless the reward sets ``isolate_failures = False``), so only the samples
        that fail on their own are lost. Samples whose call raised or whose score is NaN/inf become
        NaN and count as failures (the error names the prompt); past ``max_failures`` this raises
        :class:`RewardError`.
        """
        n = batch_size_of(outputs)
        if len(prompts) != n:
            raise ValueError(f"got {n} outputs but {len(prompts)} prompts; pass one prompt per sample.")
        columns: list[Tensor] = []
        names: list[str] = []
        for name, reward in self.rewards.items():
            cols = self._score_one(name, reward, outputs, list(prompts), meta, n)
            for col_name, col in cols.items():
                names.append(col_name)
                columns.append(col)
        table = torch.stack(columns, dim=1) if columns else torch.zeros(n, 0)
        self._last = (table, names)
        return table, names

    def _score_one(self, name: str, reward: Any, outputs: Any, prompts: list[str], meta: dict | None, n: int) -> dict[str, Tensor]:
        bs = getattr(reward, "batch_size", None) or n
        device = getattr(reward, "device", None)
        pieces: list[tuple[int, int, Any]] = []
        first_error: str | None = None

        def call(start: int, stop: int) -> tuple[Any, str | None]:
            out = slice_batch(outputs, start, stop, n)
            if self.move_to_device and device is not None and isinstance(out, Tensor):
                out = out.to(device)
            try:
                with torch.no_grad():  # RL scoring; call a differentiable reward directly for gradients
                    return reward(out, prompts[start:stop], slice_batch(meta, start, stop, n) if meta else meta), None
            except Exception as exc:  # noqa: BLE001 - counted, reported, re-raised past the threshold
                where = f"prompt {prompts[start]!r}" if stop - start == 1 else f"a batch of {stop - start} from prompt {prompts[start]!r}"
                return None, f"{type(exc).__name__}: {exc} ({where})"

        isolate = bool(getattr(reward, "isolate_failures", True))
        for start in range(0, n, bs):
            stop = min(start + bs, n)
            result, error = call(start, stop)
            if result is None and isolate and stop - start > 1:
                # one bad sample must not spoil the batch: score the samples one by one
                for i in range(start, stop):
                    one, err = call(i, i + 1)
                    if one is None:
                        first_error = first_error or err
                    pieces.append((i, i + 1, one))
                continue
            if result is None:
                first_error = first_error or error
            pieces.append((start, stop, result))

        # 2. assemble columns (component names from the first successful piece, or a previous call)
        keys = self._components.get(name)
        for _, _, result in pieces:
            if isinstance(result, Mapping):
                keys = list(result)
                break
            if result is not None:
                keys = None
                break
        self._components[name] = keys
        col_names = [name] if keys is None else [f"{name}/{k}" for k in keys]
        cols = {c: torch.full((n,), float("nan")) for c in col_names}
        for start, stop, result in pieces:
            if result is None:
                continue
            where = f"reward '{name}'"
            if keys is None:
                if isinstance(result, Mapping):
                    raise RewardError(f"{where} returned a dict on some batches and a tensor on others.")
                cols[name][start:stop] = _as_scores(result, stop - start, where)
            else:
                if not isinstance(result, Mapping) or list(result) != keys:
                    raise RewardError(f"{where} returned components {list(result) if isinstance(result, Mapping) else 'tensor'}; expected {keys} on every batch.")
                for k in keys:
                    cols[f"{name}/{k}"][start:stop] = _as_scores(result[k], stop - start, f"{where} component '{k}'")

        # 3. count failures: a sample fails if any of its components is NaN/inf
        bad = torch.zeros(n, dtype=torch.bool)
        for c in col_names:
            bad |= ~torch.isfinite(cols[c])
            cols[c][~torch.isfinite(cols[c])] = float("nan")
        n_bad = int(bad.sum())
        if n_bad:
            self.failures[name] = self.failures.get(name, 0) + n_bad
            self.last_errors[name] = first_error or "returned NaN/inf"
            if self.failures[name] > self.max_failures:
                raise RewardError(
                    f"reward '{name}' failed on {n_bad} of {n} samples in this batch "
                    f"({self.failures[name]} so far, more than max_failures={self.max_failures}); "
                    f"first problem: {self.last_errors[name]}. Fix the reward (inputs: [B,C,H,W] in [0,1] "
                    f"or [B,F,C,H,W], one prompt per sample), or raise reward max_failures to tolerate "
                    f"failed samples (they are NaN in the table, never 0)."
                )
        return cols

    def score_async(self, outputs: Any, prompts: Sequence[str], meta: dict | None = None) -> concurrent.futures.Future:
        """Run :meth:`score` in a background thread (one worker, calls run in order) and return a
        ``Future`` of ``(table, names)``, so scoring overlaps the next rollout. Do not modify
        ``outputs`` in place until the future is done; ``future.result()`` re-raises errors."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowrl-reward")
        if isinstance(outputs, Tensor):
            outputs = outputs.detach()
        return self._executor.submit(self.score, outputs, list(prompts), meta)

    def close(self) -> None:
        """Stop the background thread (if any)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # 2. combine ----------------------------------------------------------------------------
    def column_weights(self, names: Sequence[str]) -> Tensor:
        """Weight of every table column: the reward's weight × the component's weight."""
        out = []
        for col in names:
            name, _, comp = col.partition("/")
            if name not in self.weights:
                raise ValueError(f"column '{col}' belongs to no reward in this set ({', '.join(self.weights)}).")
            w = self.weights[name]
            if comp:
                per = dict(getattr(self.rewards[name], "component_weights", None) or {})
                per.update(self.component_weights.get(name, {}))
                w *= float(per.get(comp, 1.0))
            out.append(w)
        return torch.tensor(out, dtype=torch.float32)

    def combine(self, table: Tensor, names: Sequence[str], group_ids: Tensor | Sequence[int] | None = None) -> Tensor:
        """Combine the ``[B, K]`` table into ``[B]`` per ``combine`` (see module doc).

        ``group_ids`` ``[B]`` is required for ``gdpo``. Samples with NaN in a used column stay NaN:
        the caller must drop or mask them (never silently zero).
        """
        table = table.to(torch.float32)
        w = self.column_weights(names).to(table.device)
        if self.combine_mode == "weighted_sum":
            return weighted_sum(table, w)
        if group_ids is None:
            raise ValueError("combine='gdpo' normalises inside groups; pass group_ids [B].")
        group_ids = torch.as_tensor(group_ids, device=table.device)
        return gdpo(table, w, group_ids, eps=self.eps)

    # 3. metrics ----------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Flat metrics for the logger (see class doc for the names)."""
        out: dict[str, float] = {f"reward/failures/{k}": float(v) for k, v in self.failures.items()}
        if self._last is not None:
            out.update(column_metrics(*self._last))
        for name, reward in self.rewards.items():
            fn = getattr(reward, "metrics", None)
            if callable(fn):
                for k, v in fn().items():
                    out[f"reward/{name}/{k}"] = float(v)
        return out

    # 4. remote rewards (flowrl.rewards.remote) ----------------------------------------------
    def health_check(self) -> None:
        """Call every reward's ``health_check()`` (remote rewards: is the server up and answering
        JSON?); raises :class:`RewardError` naming the reward and the URL."""
        for reward in self.rewards.values():
            fn = getattr(reward, "health_check", None)
            if callable(fn):
                fn()

    def describe_limits(self) -> list[str]:
        """One line per remote reward: its URL and the worst-case wait of one request."""
        out = []
        for name, reward in self.rewards.items():
            fn = getattr(reward, "describe_limits", None)
            text = fn() if callable(fn) else None
            if text:
                out.append(f"reward '{name}': {text}")
        return out

    def check_not_all_failed(self, table: Tensor, names: Sequence[str]) -> None:
        """Raise :class:`RewardError` when every sample of a reward failed (all its columns NaN):
        training on it would train on nothing. The one-line message names the reward, its URL
        (``endpoint``) and its last error."""
        if table.shape[0] == 0:
            return
        for name, reward in self.rewards.items():
            cols = [i for i, c in enumerate(names) if c == name or c.startswith(name + "/")]
            if not cols or torch.isfinite(table[:, cols]).any():
                continue
            url = getattr(reward, "endpoint", None)
            fn = getattr(reward, "last_error", None)
            last = (fn() if callable(fn) else None) or self.last_errors.get(name) or "returned NaN/inf"
            raise RewardError(
                f"reward '{name}'{f' at {url}' if url else ''} failed on all {table.shape[0]} samples of this iteration; "
                f"last error: {last}. Nothing would be trained; fix the reward (or its server) and resume."
            )

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}×{self.weights[k]:g}" for k in self.rewards)
        return f"RewardSet({parts}; combine={self.combine_mode}, max_failures={self.max_failures})"


def _column_name(key: str, reward: Any) -> str:
    """Spec key for registered names and plug-ins; for a dotted path, the reward's own name."""
    if ":" not in key:
        return key
    own = getattr(reward, "name", None)
    if isinstance(own, str) and own and own != "reward" and "/" not in own:
        return own
    return key.rpartition(":")[2].lower()


def build_rewards(
    spec: Mapping[str, float | Mapping[str, Any]] | Sequence[str] | str,
    *,
    combine: str = "weighted_sum",
    max_failures: int = 0,
    eps: float = 1e-4,
    **defaults: Any,
) -> RewardSet:
    """Build a :class:`RewardSet` from a config spec.

    ``spec`` maps a reward name (registered, plug-in or ``pkg.module:Class``) to its weight, or to a
    dict ``{"weight": w, "component_weights": {...}, **constructor_kwargs}``::

        build_rewards({"pickscore": 1.0, "clipscore": {"weight": 0.5, "path": "/models/clip"}})

    ``defaults`` (e.g. ``device="cuda:1"``) are passed to every constructor that accepts them.
    """
    if isinstance(spec, str):
        raise TypeError(f"reward spec must map names to weights, e.g. {{'{spec}': 1.0}}; got the string '{spec}'.")
    if not isinstance(spec, Mapping):
        raise TypeError(f"reward spec must map names to weights, e.g. {{'pickscore': 1.0}}; got {type(spec).__name__}.")
    if not spec:
        raise ValueError("reward spec is empty; give at least one reward, e.g. {'jpeg_compressibility': 1.0}.")
    rewards: dict[str, Any] = {}
    weights: dict[str, float] = {}
    comp_w: dict[str, dict[str, float]] = {}
    for key, value in spec.items():
        if isinstance(value, Mapping):
            kwargs = dict(value)
            if "weight" not in kwargs:
                raise ValueError(f"reward '{key}' has no weight; write {{'{key}': {{'weight': 1.0, ...}}}}.")
            weight = kwargs.pop("weight")
            cw = kwargs.pop("component_weights", None)
        elif value is None:
            raise ValueError(f"reward '{key}' has no weight; write {{'{key}': 1.0}}.")
        else:
            weight, kwargs, cw = value, {}, None
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"reward '{key}' weight must be a number; got {weight!r}.") from None
        if not math.isfinite(weight):
            raise ValueError(f"reward '{key}' weight must be finite; got {weight}.")
        cls = _resolve_for_config(key)
        for dk, dv in defaults.items():
            if dk not in kwargs and _accepts(cls, dk):
                kwargs[dk] = dv
        from flowrl.secrets import expand

        kwargs = expand(kwargs, f"reward.rewards.{key}")  # api_key: ${VAR} / api_key_env: VAR, read now
        _check_paths(key, kwargs)
        try:
            reward = get(key, **kwargs)
        except OSError as exc:  # weights that are neither a local path nor in the Hugging Face cache
            from flowrl.errors import ConfigError

            paths = {k: v for k, v in kwargs.items() if isinstance(v, str) and k.lower().endswith(_PATH_KEYS)}
            named = ", ".join(f"{k}={v!r}" for k, v in paths.items()) or "its weights"
            raise ConfigError(
                f"reward.rewards.{key}: could not load {named}: {_first_line(exc)}. Give a local folder or file "
                "(flowrl never downloads; a Hugging Face id works only if it is in the local cache)."
            ) from None
        col = _column_name(key, reward)
        if col in rewards:
            raise ValueError(f"two rewards are both named '{col}'; give the class a distinct `name`.")
        rewards[col] = reward
        weights[col] = weight
        if cw:
            comp_w[col] = {str(k): float(v) for k, v in cw.items()}
    return RewardSet(rewards, weights, combine=combine, max_failures=max_failures, component_weights=comp_w, eps=eps)


_PATH_KEYS = ("path", "checkpoint", "file", "dir")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0].rstrip(".") if lines else type(exc).__name__


def _resolve_for_config(key: str) -> Any:
    """:func:`resolve` with config errors: an unknown name suggests close ones, a dotted path whose
    module cannot be imported says how to make it importable."""
    from flowrl.errors import ConfigError

    try:
        return resolve(key)
    except ImportError as exc:  # the message says how to make the module importable
        raise ConfigError(f"reward.rewards.{key}: {_first_line(exc)}.") from None
    except ValueError as exc:  # unknown name: the message lists known ones and close matches
        raise ConfigError(f"reward.rewards.{key}: {_first_line(exc)}") from None


def _check_paths(key: str, kwargs: Mapping[str, Any]) -> None:
    """A path-like option (``path``, ``processor_path``, ``checkpoint``, ...) that is written as a
    local path (absolute, ``./``, ``../``, ``~``) must exist."""
    import os

    from flowrl.errors import ConfigError

    for k, v in kwargs.items():
        if not (isinstance(k, str) and k.lower().endswith(_PATH_KEYS) and isinstance(v, (str, os.PathLike))):
            continue
        text = os.fspath(v)
        local = os.path.isabs(os.path.expanduser(text)) or text.startswith(("./", "../", "~"))
        if local and not os.path.exists(os.path.expanduser(text)):
            raise ConfigError(
                f"reward.rewards.{key}.{k}: {text} does not exist. Point it at the downloaded weights "
                "(relative paths in a config file are taken from the config file's folder)."
            )


def _accepts(obj: Any, kwarg: str) -> bool:
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
    return kwarg in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
