"""Rewards in their own process: a small HTTP server (``flowrl serve-rewards``), its client (the
reward ``remote``), and a client for the pickle-over-HTTP protocol of Flow-GRPO's reward servers
(the reward ``remote_pickle``).

Protocol of ``flowrl serve-rewards`` (standard library only; bound to 127.0.0.1 by default):

* ``GET /health`` → JSON ``{"status": "ok", "rewards": [...], "weights": {column: weight}, "scale": {...}}``.
* ``POST /score`` with either

  - ``Content-Type: application/x-safetensors``: a safetensors file with the tensor ``outputs``
    (uint8 ``[B, C, H, W]`` or ``[B, F, C, H, W]``, the images as round(x·255), i.e. what a PNG
    holds) and, in its metadata, ``request`` = JSON ``{"prompts": [...], "meta": {...}}``;
  - ``Content-Type: application/json``: ``{"prompts": [...], "meta": {...}}`` with ``"images":
    [base64 PNG, ...]`` or ``"texts": [...]`` (language-model completions).

  → JSON ``{"columns": [...], "scores": [[...] per sample], "errors": {reward: message}}`` with
  ``null`` for a sample a reward failed on.

Nothing is ever unpickled by the flowrl server or client. The server scores every request with
one :class:`~flowrl.rewards.RewardSet` (models loaded once, calls serialised by a lock), which
isolates failures per sample: a sample that fails comes back ``null`` (NaN), the others keep their
scores.

Client failure semantics (both clients): a request that fails after ``max_retries`` retries with
exponential back-off (connection refused/reset, timeout, HTTP 408/429/5xx), or an answer that
cannot be read, raises; the reward set then marks the batch's samples NaN, which count toward
``reward.max_failures`` (past it, the run stops). Per-sample NaNs from the server count the same
way. Scores arrive through the reward set, so they overlap the next rollout as local rewards do
(``train.overlap_rewards``).
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import math
import pickle
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .base import Reward, RewardError, register

SAFETENSORS_TYPE = "application/x-safetensors"


# ------------------------------------------------------------------------------ encoding
def to_uint8(outputs: Tensor) -> Tensor:
    """Images/videos in [0, 1] → uint8 by round(x·255) (what saving a PNG does)."""
    return (outputs.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def encode_safetensors(outputs: Tensor, prompts: Sequence[str], meta: Mapping[str, Any] | None) -> bytes:
    from safetensors.torch import save

    request = json.dumps({"prompts": list(prompts), "meta": _json_meta(meta)})
    return save({"outputs": to_uint8(outputs).contiguous()}, metadata={"request": request})


def encode_png(image: Tensor) -> str:
    """One ``[C, H, W]`` image → base64 PNG."""
    from PIL import Image

    arr = to_uint8(image).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: str) -> Tensor:
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1)


def _json_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """The JSON-representable part of a reward's ``meta`` (per-sample metadata; tensors dropped)."""
    out: dict[str, Any] = {}
    for k, v in (meta or {}).items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out


def decode_request(body: bytes, content_type: str) -> tuple[Any, list[str], dict[str, Any]]:
    """A ``/score`` body → ``(outputs, prompts, meta)``; outputs float in [0, 1] or a list of strings."""
    if content_type.startswith(SAFETENSORS_TYPE):
        from safetensors.torch import load

        tensors = load(body)
        if "outputs" not in tensors:
            raise ValueError("the safetensors body has no tensor 'outputs'.")
        header = json.loads(body[8 : 8 + int.from_bytes(body[:8], "little")])  # the metadata lives in the header
        request = json.loads((header.get("__metadata__") or {}).get("request", "{}"))
        x = tensors["outputs"]
        outputs = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    elif content_type.startswith("application/json"):
        request = json.loads(body)
        if "texts" in request:
            outputs = [str(t) for t in request["texts"]]
        elif "images" in request:
            outputs = torch.stack([decode_png(s) for s in request["images"]]).float() / 255
        else:
            raise ValueError("a JSON /score request needs 'images' (base64 PNG) or 'texts'.")
    else:
        raise ValueError(f"unsupported Content-Type {content_type!r}; send {SAFETENSORS_TYPE} or application/json.")
    prompts = [str(p) for p in request.get("prompts", [])]
    n = outputs.shape[0] if isinstance(outputs, Tensor) else len(outputs)
    if len(prompts) != n:
        raise ValueError(f"{n} samples but {len(prompts)} prompts.")
    return outputs, prompts, dict(request.get("meta") or {})


# ------------------------------------------------------------------------------ the server
class RewardServer:
    """Serve a :class:`~flowrl.rewards.RewardSet` over HTTP (module doc). ``start()`` runs it in a
    background thread (tests, notebooks); ``serve_forever()`` blocks (the CLI)."""

    def __init__(self, reward_set: Any, host: str = "127.0.0.1", port: int = 18090, *, max_body_mb: float = 512.0):
        self.reward_set = reward_set
        self.reward_set.max_failures = 10**12  # the server never stops: failures go back as null
        self.lock = threading.Lock()
        self.max_body = int(max_body_mb * 2**20)
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: one line per request would flood a training log
                pass

            def _send(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/") in ("/health", ""):
                    self._send(200, server.health())
                else:
                    self._send(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})

            def do_POST(self):
                if self.path.rstrip("/") != "/score":
                    self._send(404, {"error": f"unknown path {self.path}; use POST /score"})
                    return
                n = int(self.headers.get("Content-Length") or 0)
                if n > server.max_body:
                    self._send(413, {"error": f"request of {n} bytes is over the server's limit of {server.max_body}"})
                    return
                body = self.rfile.read(n)
                try:
                    outputs, prompts, meta = decode_request(body, self.headers.get("Content-Type", ""))
                except Exception as exc:  # noqa: BLE001 - a bad request is the client's problem
                    self._send(400, {"error": f"bad request: {type(exc).__name__}: {exc}"})
                    return
                try:
                    self._send(200, server.score(outputs, prompts, meta))
                except Exception as exc:  # noqa: BLE001 - reported to the client, the server lives on
                    self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

        self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def health(self) -> dict[str, Any]:
        rs = self.reward_set
        names = list(getattr(rs, "rewards", {}))
        weights = {}
        for name, reward in getattr(rs, "rewards", {}).items():
            weights[name] = rs.weights[name]
            for comp, w in {**(getattr(reward, "component_weights", None) or {}), **rs.component_weights.get(name, {})}.items():
                weights[f"{name}/{comp}"] = rs.weights[name] * float(w)
        scale = {n: str(getattr(r, "scale", "")) for n, r in getattr(rs, "rewards", {}).items()}
        return {"status": "ok", "rewards": names, "weights": weights, "scale": scale, "requests": self.requests}

    def score(self, outputs: Any, prompts: list[str], meta: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.requests += 1
            table, names = self.reward_set.score(outputs, prompts, meta or None)
            errors = dict(getattr(self.reward_set, "last_errors", {}))
            if hasattr(self.reward_set, "last_errors"):
                self.reward_set.last_errors.clear()
        rows = [[v if math.isfinite(v) else None for v in row] for row in table.tolist()]
        return {"columns": list(names), "scores": rows, "errors": errors}

    def start(self) -> "RewardServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="flowrl-reward-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


# ------------------------------------------------------------------------------ HTTP client
class HTTPClient:
    """GET/POST with the shared retry policy of remote rewards (:class:`~flowrl.rewards.remote.RetryPolicy`:
    a timeout per attempt and up to ``max_retries`` retries, back-off ``backoff·2^attempt`` s capped at
    ``max_backoff``, on connection errors, timeouts and HTTP 408/429/5xx)."""

    def __init__(self, url: str, *, timeout: float = 60.0, max_retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0):
        from .remote import RetryPolicy

        self.url = url.rstrip("/")
        try:
            self.policy = RetryPolicy(timeout=float(timeout), max_retries=int(max_retries), backoff=float(backoff), max_backoff=float(max_backoff))
        except ValueError as exc:
            raise ValueError(f"{self.url}: {exc}") from None
        self.attempts = 0
        self.last_error: str | None = None

    def worst_case_seconds(self) -> float:
        return self.policy.worst_case_seconds()

    def describe(self) -> str:
        return f"{self.url}: {self.policy.describe()}"

    def request(self, path: str, data: bytes | None = None, content_type: str | None = None) -> bytes:
        from .remote import error_text

        headers = {"Content-Type": content_type} if content_type else {}
        before = self.attempts

        def once() -> bytes:
            req = urllib.request.Request(self.url + path, data=data, headers=headers, method="POST" if data is not None else "GET")
            self.attempts += 1
            with urllib.request.urlopen(req, timeout=self.policy.timeout) as resp:
                return resp.read()

        try:
            return self.policy.call(once)
        except urllib.error.HTTPError as exc:
            problem = f"HTTP {exc.code} from {self.url + path}: {_error_text(exc)}"
        except Exception as exc:  # noqa: BLE001 - one line naming the URL and the last error
            reason = getattr(exc, "reason", None)
            problem = f"no answer from {self.url + path}: {error_text(reason if isinstance(reason, BaseException) else exc)}"
        n = self.attempts - before
        self.last_error = f"{problem} (after {n} attempt{'s' * (n != 1)})"
        raise RewardError(self.last_error)


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        body = exc.read().decode("utf-8", "replace")
        return str(json.loads(body).get("error", body))[:300]
    except Exception:  # noqa: BLE001
        return str(exc.reason)


@register("remote")
class RemoteReward(Reward):
    """Client of ``flowrl serve-rewards`` at ``url``. Returns one component per column the server
    scores (named as on the server, e.g. ``remote/pickscore``), each weighted by the server's own
    weight, so the trained reward is the server's weighted sum.

    ``encoding``: ``safetensors`` (uint8 tensor, default) or ``png``. ``health_check``: ask
    ``/health`` when built (fails fast, naming the URL, when no server answers).
    """

    name = "remote"
    isolate_failures = False  # the server isolates per sample; retrying sample by sample would multiply a dead server's timeouts
    scale = "as served"

    def __init__(self, url: str = "http://127.0.0.1:18090", *, timeout: float = 120.0, max_retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0,
                 encoding: str = "safetensors", batch_size: int | None = None, health_check: bool = True):
        if encoding not in ("safetensors", "png"):
            raise ValueError(f"remote: encoding must be 'safetensors' or 'png', got {encoding!r}.")
        self.client = HTTPClient(url, timeout=timeout, max_retries=max_retries, backoff=backoff, max_backoff=max_backoff)
        self.encoding, self.batch_size = encoding, batch_size
        self.component_weights: dict[str, float] | None = None
        self.server_errors: dict[str, str] = {}
        self.check_health = bool(health_check)
        if self.check_health:  # the served columns' weights come with the answer
            self.health()

    @property
    def endpoint(self) -> str:
        return self.client.url

    def health_check(self) -> None:
        """Before the first rollout (the trainer's check of every reward): ``GET /health``."""
        if self.check_health:
            self.health()

    def describe_limits(self) -> str:
        return self.client.describe()

    def last_error(self) -> str | None:
        return self.client.last_error

    def health(self) -> dict[str, Any]:
        """``GET /health``; sets the component weights and scale from the server's answer."""
        try:
            info = json.loads(self.client.request("/health"))
        except (RewardError, json.JSONDecodeError) as exc:
            raise RewardError(f"reward remote: the reward server at {self.client.url} is not answering /health ({exc}). "
                              "Start it with `flowrl serve-rewards --config rewards.yaml`, or fix reward.rewards.remote.url.") from None
        self.component_weights = {str(k): float(v) for k, v in (info.get("weights") or {}).items()}
        self.scale = "; ".join(f"{k}: {v}" for k, v in (info.get("scale") or {}).items()) or "as served"
        return info

    def _body(self, outputs: Any, prompts: list[str], meta: Mapping[str, Any] | None) -> tuple[bytes, str]:
        if not isinstance(outputs, Tensor):
            return json.dumps({"texts": [str(o) for o in outputs], "prompts": prompts, "meta": _json_meta(meta)}).encode(), "application/json"
        if self.encoding == "png":
            if outputs.dim() != 4:
                raise ValueError("remote: encoding 'png' sends images [B, C, H, W]; use encoding 'safetensors' for video.")
            return json.dumps({"images": [encode_png(x) for x in outputs], "prompts": prompts, "meta": _json_meta(meta)}).encode(), "application/json"
        return encode_safetensors(outputs, prompts, meta), SAFETENSORS_TYPE

    def __call__(self, outputs, prompts, meta=None):
        prompts = list(prompts)
        body, ctype = self._body(outputs, prompts, meta)
        raw = self.client.request("/score", body, ctype)
        try:
            answer = json.loads(raw)
            columns, rows = list(answer["columns"]), answer["scores"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise RewardError(f"reward remote: unreadable answer from {self.client.url}/score ({type(exc).__name__}: {str(exc)[:100]}; starts {raw[:60]!r}).") from None
        if len(rows) != len(prompts) or any(len(r) != len(columns) for r in rows):
            raise RewardError(f"reward remote: the server answered {len(rows)} rows for {len(prompts)} samples.")
        self.server_errors = dict(answer.get("errors") or {})
        table = torch.tensor([[math.nan if v is None else float(v) for v in r] for r in rows], dtype=torch.float32).reshape(len(prompts), len(columns))
        return {c: table[:, i] for i, c in enumerate(columns)}

    def metrics(self) -> dict[str, float]:
        return {"http_attempts": float(self.client.attempts)}


# ------------------------------------------------------------------------------ Flow-GRPO's pickle protocol
class RefusedPickle(pickle.UnpicklingError):
    """An answer's pickle names a global that :class:`RestrictedUnpickler` does not allow."""


class RestrictedUnpickler(pickle.Unpickler):
    """Reads only plain containers (dict, list, tuple, set), numbers, strings, bytes, None and
    numpy arrays/scalars; any other global (a class, a function such as ``os.system``) raises
    :class:`pickle.UnpicklingError` naming it."""

    ALLOWED = {
        ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"), ("builtins", "bytearray"),
        ("_codecs", "encode"),  # protocol 2 writes bytes as _codecs.encode(text, "latin1")
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5 arrays
    }

    def find_class(self, module: str, name: str) -> Any:
        if (("builtins" if module == "__builtin__" else module), name) in self.ALLOWED:  # protocol 2 names Python 2's module
            return super().find_class(module, name)
        if (module == "numpy" and name.endswith("DType")) or module == "numpy.dtypes":
            return super().find_class(module, name)
        raise RefusedPickle(
            f"refused to unpickle {module}.{name}: a reward server's answer may hold only dicts, lists, tuples, numbers, "
            "strings and numpy arrays (anything else could run code on this machine)."
        )


def safe_loads(data: bytes) -> Any:
    """``pickle.loads`` through :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


@register("remote_pickle")
class PickleRemoteReward(Reward):
    """Client of a Flow-GRPO-style reward server (GenEval, OCR, UnifiedReward, DeQA servers): the
    request is a pickled dict ``{"images": [JPEG bytes], ...}`` POSTed to ``url``, the answer a
    pickled dict read with :class:`RestrictedUnpickler`.

    ``send``: which extra fields go in the request — ``prompts`` (as ``"prompts"``) and/or
    ``metadata`` (the prompts' metadata rows, as ``"meta_datas"``); ``extra``: constant fields
    (GenEval's server: ``{"only_strict": false}``). ``keys``: which answer lists to return; one key →
    a score, several → components (GenEval's server: ``[scores, strict_rewards]``).
    ``jpeg_quality``: 75, PIL's default, which Flow-GRPO's client uses.
    """

    name = "remote_pickle"
    isolate_failures = False
    scale = "as served"

    def __init__(self, url: str = "http://127.0.0.1:18085", *, keys: Sequence[str] | str = "outputs", send: Sequence[str] = ("prompts",), extra: Mapping[str, Any] | None = None,
                 timeout: float = 120.0, max_retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0, jpeg_quality: int = 75, batch_size: int | None = 64):
        unknown = set(send) - {"prompts", "metadata"}
        if unknown:
            raise ValueError(f"remote_pickle: send may list 'prompts' and 'metadata'; got {sorted(unknown)}.")
        self.client = HTTPClient(url, timeout=timeout, max_retries=max_retries, backoff=backoff, max_backoff=max_backoff)
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        self.send, self.extra, self.jpeg_quality, self.batch_size = tuple(send), dict(extra or {}), jpeg_quality, batch_size

    @property
    def endpoint(self) -> str:
        return self.client.url

    def describe_limits(self) -> str:
        return self.client.describe()

    def last_error(self) -> str | None:
        return self.client.last_error

    def _jpeg(self, image: Tensor) -> bytes:
        from PIL import Image

        arr = to_uint8(image).permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="JPEG", quality=self.jpeg_quality)
        return buf.getvalue()

    def __call__(self, outputs, prompts, meta=None):
        if not isinstance(outputs, Tensor) or outputs.dim() != 4:
            raise ValueError("remote_pickle sends images [B, C, H, W] as JPEG (Flow-GRPO's protocol).")
        data: dict[str, Any] = {"images": [self._jpeg(x) for x in outputs]}
        if "prompts" in self.send:
            data["prompts"] = list(prompts)
        if "metadata" in self.send:
            data["meta_datas"] = list((meta or {}).get("metadata") or [{} for _ in prompts])
        data.update(self.extra)
        raw = self.client.request("", pickle.dumps(data), "application/octet-stream")
        try:
            answer = safe_loads(raw)
        except RefusedPickle as exc:
            raise RewardError(f"reward remote_pickle: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - garbage bytes raise all sorts
            raise RewardError(f"reward remote_pickle: unreadable answer from {self.client.url} ({type(exc).__name__}: {str(exc)[:100]}; starts {raw[:40]!r}).") from None
        if not isinstance(answer, dict) or any(k not in answer for k in self.keys):
            have = sorted(answer) if isinstance(answer, dict) else type(answer).__name__
            raise RewardError(f"reward remote_pickle: the answer lacks {self.keys} (has {have}); set `keys` to the lists the server returns.")
        cols = {}
        for k in self.keys:
            v = np.asarray(answer[k], dtype=np.float64).reshape(-1)
            if len(v) != len(prompts):
                raise RewardError(f"reward remote_pickle: '{k}' has {len(v)} values for {len(prompts)} samples.")
            cols[k] = torch.from_numpy(v).float()
        return cols[self.keys[0]] if len(self.keys) == 1 else cols

    def metrics(self) -> dict[str, float]:
        return {"http_attempts": float(self.client.attempts)}


__all__ = ["RewardServer", "RemoteReward", "PickleRemoteReward", "RestrictedUnpickler", "RefusedPickle", "safe_loads", "HTTPClient"]
