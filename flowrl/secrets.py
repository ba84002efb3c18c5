"""Secrets in configs: any option named like a credential (``api_key``, ``token``, ``password``,
``secret``, ...) may come from the environment — ``api_key: ${JUDGE_API_KEY}`` or
``api_key_env: JUDGE_API_KEY`` — and is never written out: the run's ``config.yaml``, trackers, logs
and the gallery get ``<redacted>`` for a literal value (a ``${VAR}`` reference is kept: it holds no
secret). :func:`expand` reads the environment when a reward is built, never before."""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

REDACTED = "<redacted>"
_SECRET_WORDS = ("api_key", "apikey", "token", "password", "passwd", "secret", "authorization", "credential")
_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def is_secret_name(name: Any) -> bool:
    """``api_key``, ``hf_token``, ``db_password``, ``client_secret``... (not ``api_key_env``, which names a variable)."""
    text = str(name).lower()
    return not text.endswith("_env") and any(w in text for w in _SECRET_WORDS)


def redact(value: Any) -> Any:
    """A copy of ``value`` (nested dicts/lists) with every literal secret replaced by ``<redacted>``."""
    if isinstance(value, Mapping):
        return {k: (REDACTED if is_secret_name(k) and _literal(v) else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def _literal(v: Any) -> bool:
    return isinstance(v, str) and bool(v) and v != REDACTED and not _ENV_REF.match(v)


def expand(options: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Options with secrets read from the environment: ``key: ${VAR}`` → the variable's value,
    ``key_env: VAR`` → ``key`` = the variable's value. A missing variable, or a value redacted from a
    run's record, is a :class:`~flowrl.config.ConfigError` naming the field."""
    from flowrl.errors import ConfigError

    out = dict(options)
    for k in list(out):
        v = out[k]
        if isinstance(k, str) and k.endswith("_env") and is_secret_name(k[:-4]):
            name = out.pop(k)
            if name not in os.environ:
                raise ConfigError(f"{where}.{k}: the environment variable {name} is not set; export it before the run.")
            out[k[:-4]] = os.environ[name]
        elif is_secret_name(k) and isinstance(v, str):
            m = _ENV_REF.match(v)
            if m:
                if m.group(1) not in os.environ:
                    raise ConfigError(f"{where}.{k}: the environment variable {m.group(1)} (from '{v}') is not set; export it before the run.")
                out[k] = os.environ[m.group(1)]
            elif v == REDACTED:
                raise ConfigError(
                    f"{where}.{k} was redacted from the run's record; give it from the environment: "
                    f"{k}: ${{VAR}} or {k}_env: VAR (e.g. --set {where}.{k}_env=VAR)."
                )
    return out
