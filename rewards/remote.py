"""Failure semantics shared by every reward that calls a server (``vlm_judge``, ``pairwise_judge``
and any HTTP reward client): a bounded retry policy whose worst case is known in advance, a health
check run before the first rollout, and one-line errors naming the reward, the URL and the last
error.

The rules a remote reward follows:

- a request that still fails after its retries, or an answer without a score, is **NaN** (or an
  opt-in ``failed_value``), so :class:`~flowrl.rewards.RewardSet` counts it towards
  ``reward.max_failures`` — never a silent constant;
- once one request of a call has failed all its retries, the rest of that call fail at once
  (the server is down; waiting for each of them would multiply the wait), so one call costs at most
  :meth:`RetryPolicy.worst_case_seconds` of waiting;
- :func:`check_server` runs before any model loads: a closed port, a server answering something
  other than JSON, or one that never answers stops the run with one line.

Only the standard library is used (``urllib``)."""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable

from .base import RewardError

#: HTTP statuses worth retrying (rate limits, overload, gateway errors)
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
#: errors a retry may cure (a connection refused, a timeout, a garbled answer)
TRANSIENT = (urllib.error.URLError, TimeoutError, ConnectionError, OSError, json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError)


@dataclass(frozen=True)
class RetryPolicy:
    """``timeout`` seconds per attempt, ``max_retries`` retries after the first attempt, sleeping
    ``min(backoff · 2^attempt, max_backoff)`` between them."""

    timeout: float = 60.0
    max_retries: int = 3
    backoff: float = 1.0
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ValueError(f"timeout must be a positive number of seconds (got {self.timeout}).")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be ≥ 0 (got {self.max_retries}).")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff and max_backoff must be ≥ 0.")

    def sleep_before(self, attempt: int) -> float:
        """Seconds slept after failed attempt ``attempt`` (0-based)."""
        return min(self.backoff * 2**attempt, self.max_backoff)

    def worst_case_seconds(self) -> float:
        """Longest one request can take before it is given up:
        ``(max_retries + 1) · timeout + Σ_{a < max_retries} min(backoff · 2^a, max_backoff)``."""
        return (self.max_retries + 1) * self.timeout + sum(self.sleep_before(a) for a in range(self.max_retries))

    def describe(self) -> str:
        return (f"timeout {self.timeout:g} s × {self.max_retries + 1} attempts + back-off "
                f"{self.worst_case_seconds() - (self.max_retries + 1) * self.timeout:g} s = at most "
                f"{self.worst_case_seconds():g} s per request")

    def call(self, fn: Callable[[], Any], *, retry_status: tuple[int, ...] = RETRY_STATUS) -> Any:
        """``fn()`` with retries on transient errors; raises the last error."""
        for attempt in range(self.max_retries + 1):
            try:
                return fn()
            except urllib.error.HTTPError as exc:
                if exc.code not in retry_status or attempt == self.max_retries:
                    raise
            except TRANSIENT:
                if attempt == self.max_retries:
                    raise
            time.sleep(self.sleep_before(attempt))
        raise AssertionError("unreachable")


class ServerDown(RuntimeError):
    """An earlier request of the same call failed all its retries; this one was not sent."""


class CircuitBreaker:
    """Fail the rest of a call fast once one request of it failed all its retries.
    ``reset()`` at the start of every call (a new batch tries the server again)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.tripped: str | None = None

    def reset(self) -> None:
        with self._lock:
            self.tripped = None

    def run(self, fn: Callable[[], Any]) -> Any:
        if self.tripped is not None:
            raise ServerDown(f"not sent: an earlier request of this batch failed ({self.tripped})")
        try:
            return fn()
        except Exception as exc:
            if unreachable(exc):
                with self._lock:
                    self.tripped = self.tripped or error_text(exc)
            raise


def unreachable(exc: BaseException) -> bool:
    """The server could not be reached or did not answer in time (not: it answered an error)."""
    if isinstance(exc, urllib.error.HTTPError):
        return False
    return isinstance(exc, (urllib.error.URLError, TimeoutError, ConnectionError))


def error_text(exc: BaseException) -> str:
    """``Type: first line of the message`` (one line, for logs and errors)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")[:300]


def post_json(url: str, payload: dict, *, timeout: float, headers: dict[str, str] | None = None) -> Any:
    """POST ``payload`` as JSON, return the decoded JSON answer (raises on anything else: a
    ``ValueError`` naming the content type when the answer is not JSON)."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode("utf-8"), headers={"Content-Type": "application/json", **(headers or {})}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return _decode(resp)


def _decode(resp: Any) -> Any:
    raw = resp.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        kind = resp.headers.get("Content-Type", "unknown content type")
        raise ValueError(f"the server answered {kind}, not JSON ({raw[:60]!r})") from None


def check_server(name: str, url: str, *, timeout: float, headers: dict[str, str] | None = None) -> None:
    """Health check: ``GET url`` must answer JSON within ``timeout`` seconds (an OpenAI-compatible
    server answers ``GET <base_url>/models``). Raises :class:`RewardError` (one line naming the
    reward, the URL and the error) for a closed port, a timeout, an HTTP error or a non-JSON answer."""
    req = urllib.request.Request(url, headers=headers or {}, method="GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            _decode(resp)
    except Exception as exc:  # noqa: BLE001 - reported as one line
        raise RewardError(
            f"reward '{name}': health check of {url} failed ({error_text(exc)}) within {timeout:g} s. "
            "Start the server (or fix base_url), or set health_check: false to skip this check."
        ) from None


def check_remote_rewards(reward_set: Any, *, announce: bool = True) -> None:
    """Before any model loads: every remote reward of ``reward_set`` answers its health check
    (:meth:`RewardSet.health_check`), and each one's worst-case wait is printed (``announce``)."""
    import sys

    check = getattr(reward_set, "health_check", None)
    if check is not None:
        check()
    describe = getattr(reward_set, "describe_limits", None)
    if describe is not None and announce:
        for line in describe():
            print(f"[flowrl] {line}", file=sys.stderr)


def failure_summary(name: str, url: str, last_error: str | None) -> str:
    return f"reward '{name}' at {url}: last error {last_error or 'unknown'}"


__all__ = ["RetryPolicy", "CircuitBreaker", "ServerDown", "check_server", "post_json", "error_text", "failure_summary", "check_remote_rewards", "RETRY_STATUS"]
