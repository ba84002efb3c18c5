"""VLM judges over an OpenAI-compatible chat API (vLLM, sglang, or any ``/v1/chat/completions``
server), e.g. UnifiedReward served in a separate process so the trainer's GPUs stay for the policy.

Each image goes as a base64 JPEG data URL next to a text template; the answer is parsed with a
regex. Requests for one batch run concurrently (``max_concurrency`` threads), each with a
``timeout`` and up to ``max_retries`` retries with exponential back-off (``backoff · 2^attempt``
seconds) on connection errors, timeouts, HTTP 429 and 5xx. An answer that still fails, or does not
parse, is NaN: it counts towards ``failure_rate`` (in :meth:`metrics`, logged as
``reward/<name>/failure_rate``) and towards :class:`RewardSet`'s ``reward.max_failures``, and a batch
whose every answer failed stops the run. ``failed_value`` (opt-in) replaces NaN by a constant.
Once a request finds the server unreachable (refused, timed out), the rest of the batch fails at once.
Before the first rollout the trainer calls :meth:`health_check` (``GET <base_url>/models``).
See :mod:`flowrl.rewards.remote` for the shared rules.

Only the standard library is used (``urllib``), so there is nothing to install.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import math
import re
import threading

import torch
from torch import Tensor

from .base import Reward, register
from .compressibility import to_uint8_hwc
from .remote import RETRY_STATUS, CircuitBreaker, RetryPolicy, check_server, error_text, post_json

POINTWISE_TEMPLATE = (
    "You are shown an AI-generated image and the caption it was generated from.\n"
    'Caption: "{prompt}"\n'
    "Rate how well the image matches the caption and how good it looks, on a scale from 1 to 5.\n"
    "Think briefly, then end with a line of the form 'Final Score: <number>'."
)
#: the pointwise template of editing runs (``with_source=True``): the source image(s) come first.
EDIT_TEMPLATE = (
    "You are shown a source image and, last, an edited version of it made from an instruction.\n"
    'Instruction: "{prompt}"\n'
    "Rate how well the edit follows the instruction while keeping the rest of the source unchanged, on a scale from 1 to 5.\n"
    "Think briefly, then end with a line of the form 'Final Score: <number>'."
)
POINTWISE_PATTERN = r"Final Score:\s*\**\s*([-+]?\d+(?:\.\d+)?)"

PAIRWISE_TEMPLATE = (
    'Two AI-generated images were made from the caption: "{prompt}".\n'
    "Which image matches the caption better and looks better? Answer with exactly one of: "
    "'Image 1 is better', 'Image 2 is better', or 'Tie'."
)


def image_to_data_url(image: Tensor, *, quality: int = 95) -> str:
    """``[C, H, W]`` float in [0, 1] → ``data:image/jpeg;base64,...`` (uint8 via round(x·255))."""
    from PIL import Image

    arr = to_uint8_hwc(image[None])[0]
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def parse_score(text: str, pattern: str, low: float, high: float) -> float | None:
    """The last regex match (group 1) in ``text`` as a float in ``[low, high]``; None if absent/out of range."""
    matches = re.findall(pattern, text or "")
    if not matches:
        return None
    m = matches[-1]
    try:
        value = float(m[0] if isinstance(m, tuple) else m)
    except ValueError:
        return None
    return value if low <= value <= high and math.isfinite(value) else None


class ChatClient:
    """Minimal OpenAI-compatible ``/chat/completions`` client with timeout, retries and back-off
    (:class:`~flowrl.rewards.remote.RetryPolicy`) and a per-batch circuit breaker."""

    RETRY_STATUS = RETRY_STATUS

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 60.0, max_retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0, temperature: float = 0.0, max_tokens: int = 512):
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.policy = RetryPolicy(timeout=float(timeout), max_retries=int(max_retries), backoff=float(backoff), max_backoff=float(max_backoff))
        self.timeout, self.max_retries, self.backoff, self.max_backoff = timeout, max_retries, backoff, max_backoff
        self.temperature, self.max_tokens = temperature, max_tokens
        self.requests = 0  # HTTP attempts made (for tests and metrics)
        self.breaker = CircuitBreaker()
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the key
        return f"ChatClient(url={self.url!r}, model={self.model!r})"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _post(self, body: dict) -> dict:
        with self._lock:
            self.requests += 1
        return post_json(self.url, body, timeout=self.policy.timeout, headers=self._headers())

    def health_check(self, name: str) -> None:
        check_server(name, self.base_url + "/models", timeout=self.policy.timeout, headers=self._headers())

    def chat(self, content: list[dict]) -> str:
        """Send one user message (OpenAI content parts); return the assistant text. Raises the last
        error after ``max_retries`` retries; once the server was found unreachable in this batch
        (:meth:`CircuitBreaker.reset` starts a batch), raises at once."""
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": self.temperature, "max_tokens": self.max_tokens}

        def once() -> str:
            answer = self._post(body)["choices"][0]["message"]["content"]
            if not isinstance(answer, str):
                raise ValueError(f"the answer has no text content ({answer!r:.60})")
            return answer

        return self.breaker.run(lambda: self.policy.call(once))


class _JudgeBase:
    """What both judges share: the client, counters, the health check and the failure report."""

    def _init_client(self, base_url, model, api_key, timeout, max_retries, backoff, max_concurrency, temperature, max_tokens, jpeg_quality, health_check=True):
        self.client = ChatClient(base_url, model, api_key=api_key, timeout=timeout, max_retries=max_retries, backoff=backoff, temperature=temperature, max_tokens=max_tokens)
        self.max_concurrency = max(1, int(max_concurrency))
        self.jpeg_quality = jpeg_quality
        self.run_health_check = bool(health_check)
        self.calls = 0
        self.failed = 0
        self.last_errors: list[str] = []

    @property
    def endpoint(self) -> str:
        """The URL requests go to (named in every error)."""
        return self.client.url

    def health_check(self) -> None:
        """Raise :class:`~flowrl.rewards.RewardError` (one line) unless ``GET <base_url>/models``
        answers JSON within ``timeout`` (skipped with ``health_check=False``)."""
        if self.run_health_check:
            self.client.health_check(getattr(self, "name", "judge"))

    def describe_limits(self) -> str:
        """The worst case of one batch, stated at the start of a run."""
        return (f"{self.endpoint}: {self.client.policy.describe()}, {self.max_concurrency} concurrent; "
                "once the server is unreachable the rest of a batch fails at once")

    def last_error(self) -> str | None:
        return self.last_errors[-1] if self.last_errors else None

    def _ask(self, content: list[dict]) -> str | None:
        try:
            return self.client.chat(content)
        except Exception as exc:  # noqa: BLE001 - a failed request becomes NaN (or the opt-in failed_value)
            with self.client._lock:
                self.last_errors.append(error_text(exc))
                del self.last_errors[:-20]
            return None

    def metrics(self) -> dict[str, float]:
        """``failure_rate`` = failed or unparseable answers / all answers so far; ``requests``."""
        return {"failure_rate": self.failed / self.calls if self.calls else 0.0, "requests": float(self.client.requests)}


@register("vlm_judge")
class VLMJudge(_JudgeBase, Reward):
    """Pointwise VLM judge: one request per sample, score parsed by ``pattern`` (group 1).

    Output: the parsed score in ``[low, high]`` (default 1–5), or ``(s − low)/(high − low)`` in
    [0, 1] with ``normalize=True``; NaN for failed/unparseable answers (``failed_value``: an opt-in
    constant instead). Video
    ``[B, F, C, H, W]``: ``max_frames`` evenly spaced frames are sent as several images.

    ``with_source=True`` (editing, image-to-video): each request shows the sample's source
    image(s) first (its prompt row's ``image``, ``meta["image"]``), then the sample; the default
    template becomes :data:`EDIT_TEMPLATE`.
    """

    name = "vlm_judge"
    differentiable = False

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000/v1",
        model: str = "default",
        *,
        template: str | None = None,
        pattern: str = POINTWISE_PATTERN,
        low: float = 1.0,
        high: float = 5.0,
        normalize: bool = False,
        failed_value: float = float("nan"),
        health_check: bool = True,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_concurrency: int = 8,
        temperature: float = 0.0,
        max_tokens: int = 512,
        jpeg_quality: int = 95,
        max_frames: int = 4,
        batch_size: int | None = None,
        with_source: bool = False,
    ):
        template = template if template is not None else (EDIT_TEMPLATE if with_source else POINTWISE_TEMPLATE)
        self.with_source = bool(with_source)
        self._source_urls: dict[str, str] = {}
        if "{prompt}" not in template:
            raise ValueError("vlm_judge template must contain '{prompt}' where the caption goes.")
        re.compile(pattern)
        self._init_client(base_url, model, api_key, timeout, max_retries, backoff, max_concurrency, temperature, max_tokens, jpeg_quality, health_check)
        self.template, self.pattern, self.low, self.high = template, pattern, float(low), float(high)
        self.normalize, self.failed_value, self.max_frames, self.batch_size = normalize, float(failed_value), max_frames, batch_size
        self.scale = f"{'[0,1]' if normalize else f'[{low:g},{high:g}]'}; failed -> {failed_value:g}"

    def _frames(self, sample: Tensor) -> list[Tensor]:
        if sample.dim() == 3:
            return [sample]
        idx = torch.linspace(0, sample.shape[0] - 1, min(self.max_frames, sample.shape[0])).round().long()
        return [sample[i] for i in idx]

    def _source_url(self, path: str) -> str:
        if path not in self._source_urls:
            from .edit import load_image_tensor

            self._source_urls[path] = image_to_data_url(load_image_tensor(path)[0], quality=self.jpeg_quality)
        return self._source_urls[path]

    def _score_one(self, sample: Tensor, prompt: str, sources: list[str] = ()) -> float:
        content = [{"type": "image_url", "image_url": {"url": self._source_url(p)}} for p in sources]
        content += [{"type": "image_url", "image_url": {"url": image_to_data_url(f, quality=self.jpeg_quality)}} for f in self._frames(sample)]
        content.append({"type": "text", "text": self.template.format(prompt=prompt)})
        answer = self._ask(content)
        value = parse_score(answer, self.pattern, self.low, self.high) if answer is not None else None
        with self.client._lock:
            self.calls += 1
            if value is None:
                self.failed += 1
                if answer is not None:
                    self.last_errors.append(f"no score in the answer: {answer[:200]!r}")
        if value is None:
            return self.failed_value
        return (value - self.low) / (self.high - self.low) if self.normalize else value

    def __call__(self, outputs, prompts, meta=None):
        outputs = outputs.detach().float().cpu()
        self.client.breaker.reset()
        sources: list[list[str]] = [[] for _ in range(len(outputs))]
        if self.with_source:
            from .edit import source_paths

            sources = source_paths(meta, len(outputs), f"{self.name} with_source=True")
            for paths in sources:  # encode each source once, before the threads
                for p in paths:
                    self._source_url(p)
        with concurrent.futures.ThreadPoolExecutor(self.max_concurrency) as pool:
            scores = list(pool.map(self._score_one, list(outputs), list(prompts), sources))
        return torch.tensor(scores, dtype=torch.float32)


class VLMPairwiseJudge(_JudgeBase):
    name = "pairwise_judge"

    """Pairwise judge for :func:`~flowrl.rewards.pairwise_win_rates`: ``judge(a, b, prompt)`` returns
    1.0 ('Image 1 is better'), 0.0 ('Image 2 is better'), 0.5 (tie), or NaN when the request failed
    or the answer names neither (``failed_value``: an opt-in constant instead, e.g. 0.5).

    ``judge_batch(firsts, seconds, prompts)`` sends many pairs concurrently (``max_concurrency``
    threads), each request with ``timeout`` and ``max_retries`` retries. :meth:`metrics`:
    ``failure_rate`` (failed + unparseable / all answers), ``parse_failure_rate`` (answers that came
    back but name no winner and no tie), ``request_failure_rate`` (no answer after the retries).
    Videos ``[F, C, H, W]`` are shown as ``max_frames`` evenly spaced frames of each.
    """

    name = "pairwise_judge"

    def __init__(self, base_url: str = "http://127.0.0.1:8000/v1", model: str = "default", *, template: str = PAIRWISE_TEMPLATE, api_key: str | None = None, timeout: float = 60.0, max_retries: int = 3, backoff: float = 1.0, temperature: float = 0.0, max_tokens: int = 512, jpeg_quality: int = 95, max_concurrency: int = 8, max_frames: int = 4, failed_value: float = float("nan"), health_check: bool = True):
        self._init_client(base_url, model, api_key, timeout, max_retries, backoff, max_concurrency, temperature, max_tokens, jpeg_quality, health_check)
        self.failed_value = float(failed_value)
        self.template = template
        self.max_frames = max_frames
        self.parse_failed = 0
        self.request_failed = 0

    @staticmethod
    def parse(answer: str | None) -> float | None:
        """1.0 / 0.0 for a named winner, 0.5 for a tie, None when neither can be read."""
        text = (answer or "").lower()
        one, two = "image 1 is better" in text, "image 2 is better" in text
        if one != two:
            return 1.0 if one else 0.0
        if answer is not None and "tie" in text:
            return 0.5
        return None

    def _content(self, image_a: Tensor, image_b: Tensor) -> list[dict]:
        """Both images; videos ``[F, C, H, W]`` as ``max_frames`` evenly spaced frames each, the
        first sample's frames labelled "Image 1", the second's "Image 2"."""
        if image_a.dim() == 3:
            return [{"type": "image_url", "image_url": {"url": image_to_data_url(x, quality=self.jpeg_quality)}} for x in (image_a, image_b)]
        content: list[dict] = []
        for label, video in (("Image 1", image_a), ("Image 2", image_b)):
            idx = torch.linspace(0, video.shape[0] - 1, min(self.max_frames, video.shape[0])).round().long()
            content.append({"type": "text", "text": f"{label} ({len(idx)} frames of a video):"})
            content += [{"type": "image_url", "image_url": {"url": image_to_data_url(video[i], quality=self.jpeg_quality)}} for i in idx]
        return content

    def __call__(self, image_a: Tensor, image_b: Tensor, prompt: str) -> float:
        content = self._content(image_a, image_b)
        content.append({"type": "text", "text": self.template.format(prompt=prompt)})
        answer = self._ask(content)
        value = self.parse(answer)
        with self.client._lock:
            self.calls += 1
            if value is None:
                self.failed += 1
                if answer is None:
                    self.request_failed += 1
                else:
                    self.parse_failed += 1
                    self.last_errors.append(f"no winner in the answer: {answer[:200]!r}")
        return self.failed_value if value is None else value

    def judge_batch(self, firsts: list[Tensor], seconds: list[Tensor], prompts: list[str]) -> list[float]:
        """Judge many pairs concurrently; the i-th answer is P(firsts[i] is better)."""
        self.client.breaker.reset()
        with concurrent.futures.ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(self, [a.detach().float().cpu() for a in firsts], [b.detach().float().cpu() for b in seconds], list(prompts)))

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        n = max(self.calls, 1)
        out.update(parse_failure_rate=self.parse_failed / n, request_failure_rate=self.request_failed / n)
        return out


__all__ = ["VLMJudge", "VLMPairwiseJudge", "ChatClient", "parse_score", "image_to_data_url", "POINTWISE_TEMPLATE", "POINTWISE_PATTERN", "PAIRWISE_TEMPLATE"]
