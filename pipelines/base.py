"""Thin adapters from diffusers flow-matching pipelines to what :class:`flowrl.FlowPolicy` needs.

An adapter knows one model family's plumbing — prompt encoding, latent layout (Flux packs 2×2
patches), the σ grid its scheduler produces (static or dynamic shift), the transformer call with
CFG, and decoding — and nothing about RL. ``FlowPolicy`` does the sampling math with
``flowrl.sde`` and never calls the stateful ``scheduler.step()``.

Register a new family with ``@register_adapter(PipelineClass)``; ``adapter_for(pipe)`` finds the
adapter of a pipeline (or of its nearest registered base class).
"""

from __future__ import annotations

import contextlib

from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import Tensor

_ADAPTERS: dict[type, type["FlowAdapter"]] = {}


def register_adapter(pipeline_cls: type) -> Callable[[type["FlowAdapter"]], type["FlowAdapter"]]:
    def deco(adapter_cls: type["FlowAdapter"]) -> type["FlowAdapter"]:
        if pipeline_cls in _ADAPTERS and _ADAPTERS[pipeline_cls] is not adapter_cls:
            raise ValueError(f"an adapter for {pipeline_cls.__name__} is already registered")
        _ADAPTERS[pipeline_cls] = adapter_cls
        return adapter_cls

    return deco


#: Adapters tried, in order, for a pipeline class with no registered adapter: each takes the
#: pipeline and returns an adapter or None. The generic modular adapter registers one (a regular
#: pipeline whose family diffusers describes as a Modular Pipeline); kept as a hook so this bottom
#: module never imports the adapters built on it.
_FALLBACKS: list[Callable[[Any], "FlowAdapter | None"]] = []


def register_fallback(fallback: Callable[[Any], "FlowAdapter | None"]) -> Callable[[Any], "FlowAdapter | None"]:
    """Register a fallback for :func:`adapter_for` (see :data:`_FALLBACKS`)."""
    if fallback not in _FALLBACKS:
        _FALLBACKS.append(fallback)
    return fallback


def adapter_for(pipe: Any) -> "FlowAdapter":
    """The registered adapter for ``pipe`` (checked: a transformer and a flow-matching scheduler)."""
    _import_builtin_adapters()
    for cls in type(pipe).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls](pipe)
    for fallback in _FALLBACKS:  # no hand adapter: e.g. diffusers' modular pipeline of it
        adapter = fallback(pipe)
        if adapter is not None:
            return adapter
    known = ", ".join(sorted(c.__name__ for c in _ADAPTERS))
    raise TypeError(
        f"flowrl has no adapter for {type(pipe).__name__}. Supported pipelines: {known}. "
        "Write one with flowrl.pipelines.base.register_adapter (see pipelines/sd3.py)."
    )


def has_hand_adapter(pipe: Any) -> bool:
    """True when a family adapter (not a generic one such as the modular adapter) is registered for
    ``pipe``'s class."""
    _import_builtin_adapters()
    return any(cls in _ADAPTERS and not getattr(_ADAPTERS[cls], "generic", False) for cls in type(pipe).__mro__)


def _import_builtin_adapters() -> None:
    import importlib

    for mod in ("sd3", "flux", "digits", "wan", "hunyuan_video", "qwen_image", "flux_kontext", "wan_i2v", "hunyuan_video_i2v", "modular"):
        try:
            importlib.import_module(f"flowrl.pipelines.{mod}")
        except ModuleNotFoundError as exc:  # an adapter module not written yet, or an optional dep
            if exc.name and exc.name.startswith("flowrl.pipelines"):
                continue
            raise


def check_flow_scheduler(scheduler: Any) -> None:
    """Raise a clear error unless ``scheduler`` is a ``FlowMatchEulerDiscreteScheduler``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise TypeError(
            f"pipe.scheduler is a {type(scheduler).__name__}, not a flow-matching scheduler. flowrl's SDE "
            "samplers need σ from FlowMatchEulerDiscreteScheduler: set "
            "`pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)` "
            "if the model is a flow-matching (rectified-flow) model."
        )


class FlowAdapter:
    """Base class: one model family's plumbing. Subclasses implement the methods below.

    Shapes: ``B`` samples; latents are in the layout the transformer consumes (SD3 ``[B, C, h, w]``,
    Flux packed ``[B, N, C·4]``). ``cond`` is a dict of batch-first tensors (negatives for CFG under
    keys of their own), so slicing rows of it is always valid.

    Prompt encoding: an adapter that implements :meth:`encode_texts` (any strings → per-string
    conditioning, rows independent of each other) gets :meth:`encode_prompts` for free: the batch's
    distinct prompts and the negative prompt are encoded in **one** text-encoder call, and the rows
    are cached across calls while the text encoders' weights do not change (``prompt_cache_bytes``;
    the cache is dropped when any text-encoder parameter changes, and not used in training mode).
    """

    #: fallback generation size when the pipeline does not say (``default_sample_size``).
    fallback_size: tuple[int, int] = (64, 64)
    #: text-encoder token length (the T5 length for SD3/Flux); None: the encoder's own.
    max_sequence_length: int | None = None
    #: the negative (unconditional) prompt of classifier-free guidance (stock pipelines: "").
    negative_prompt: str = ""
    #: cond key of each positive tensor → the key of its negative (CFG) counterpart.
    negative_keys: dict[str, str] = {"prompt_embeds": "neg_prompt_embeds", "pooled": "neg_pooled"}
    #: prompt-cache budget in bytes (0 disables caching).
    prompt_cache_bytes: int = 512 * 2**20
    #: where the text encoders wait between encodings (None: they stay where the pipeline put them);
    #: see :meth:`offload_text_encoders`.
    text_encoder_offload: torch.device | None = None

    def __init__(self, pipe: Any):
        if not hasattr(pipe, "transformer") or pipe.transformer is None:
            raise TypeError(f"{type(pipe).__name__} has no `transformer`; FlowPolicy wraps transformer-based flow pipelines.")
        check_flow_scheduler(pipe.scheduler)
        self.pipe = pipe
        self._prompt_cache: OrderedDict[tuple[str, int | None], dict[str, Tensor]] = OrderedDict()
        self._prompt_cache_used = 0
        self._prompt_cache_key: Any = None
        #: text-encoder calls made so far (one per batch of distinct uncached strings).
        self.text_encoder_calls = 0
        #: every device the text encoders were moved to by :meth:`offload_text_encoders`, in order.
        self.text_encoder_moves: list[str] = []

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels the stock pipeline's ``__call__`` uses when none is given:
        ``default_sample_size × vae_scale_factor`` (SD3.5-M 1024, the tiny SD3 16)."""
        size, factor = getattr(self.pipe, "default_sample_size", None), getattr(self.pipe, "vae_scale_factor", None)
        if isinstance(size, int) and isinstance(factor, int):
            return (size * factor, size * factor)
        return tuple(self.fallback_size)  # type: ignore[return-value]

    # -- the trainable denoiser --------------------------------------------------------------
    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    # -- prompts -----------------------------------------------------------------------------
    def encode_texts(self, texts: list[str]) -> dict[str, Tensor]:
        """Conditioning of each string, batch-first ``{key: [N, ...]}``, in one text-encoder call.
        Row i must depend on ``texts[i]`` only (pad to a fixed length), so rows can be cached."""
        raise NotImplementedError

    def encode_prompts(self, prompts: list[str], *, guidance_scale: float) -> dict[str, Tensor]:
        """Prompt conditioning, batch-first, with the negative prompt's rows under
        :attr:`negative_keys` when ``guidance_scale > 1``. Distinct strings (prompts and negative)
        are encoded once (in one call without the cache, each alone with it); cached rows are reused."""
        cfg = guidance_scale > 1.0
        wanted = list(dict.fromkeys(list(prompts) + ([self.negative_prompt] if cfg else [])))
        rows = self._cached_rows(wanted)
        missing = [t for t in wanted if t not in rows]
        if missing:
            # With the cache on, a row must not depend on which iteration first met its string (the
            # text encoder's last bits change with the batch size, and a resumed run starts with an
            # empty cache): each new string is then encoded alone, once per run. Without the cache,
            # the batch's strings go in one call.
            caching = self.prompt_cache_bytes > 0 and self._prompt_cache_key is not None
            calls = [[t] for t in missing] if caching else [missing]
            with self._text_encoders_on(self.device):
                for texts in calls:
                    with torch.no_grad():
                        enc = self.encode_texts(texts)
                    self.text_encoder_calls += 1
                    for i, text in enumerate(texts):
                        rows[text] = {k: v[i] for k, v in enc.items()}
            if caching:  # moving the encoders there and back changed no weight: the cache stays valid
                self._prompt_cache_key = self._encoder_fingerprint()
            self._store_rows({t: rows[t] for t in missing})
        cond = {k: torch.stack([rows[p][k] for p in prompts]) for k in rows[wanted[0]]}
        if cfg:
            neg = rows[self.negative_prompt]
            for k, nk in self.negative_keys.items():
                cond[nk] = neg[k].unsqueeze(0).expand(len(prompts), *neg[k].shape).contiguous()
        return cond

    def offload_text_encoders(self, device: str | torch.device | None = "cpu") -> None:
        """Keep the text encoders on ``device`` (the CPU) and bring them to the denoiser's device
        only while strings missing from the prompt cache are encoded, then send them back. With the
        cache on (the default) every prompt is encoded once per run, so after the first iterations
        the encoders (SD3.5's T5-XXL: ~9.5 GB in bf16) no longer occupy the training device; the
        embeddings are the same as with resident encoders. ``None`` turns it off (the encoders
        stay where they are). Adapters that encode every call without the cache (Wan,
        HunyuanVideo, Qwen-Image) move the encoders for every rollout and evaluation call."""
        self.text_encoder_offload = torch.device(device) if device is not None else None
        if self.text_encoder_offload is not None:
            self._place_text_encoders(self.text_encoder_offload)
            self._prompt_cache_key = self._encoder_fingerprint() if self._prompt_cache_key is not None else None

    @contextlib.contextmanager
    def _text_encoders_on(self, device: torch.device):
        """Inside: the text encoders are on ``device`` (when offloading; otherwise untouched)."""
        if self.text_encoder_offload is None:
            yield
            return
        self._place_text_encoders(device)
        try:
            yield
        finally:
            self._place_text_encoders(self.text_encoder_offload)

    def _place_text_encoders(self, device: torch.device) -> None:
        for m in self._text_encoders():
            m.to(device)
        self.text_encoder_moves.append(str(device))

    def clear_prompt_cache(self) -> None:
        self._prompt_cache.clear()
        self._prompt_cache_used = 0

    def _text_encoders(self) -> list[torch.nn.Module]:
        comps = getattr(self.pipe, "components", {}) or {}
        return [m for name, m in sorted(comps.items()) if name.startswith("text_encoder") and isinstance(m, torch.nn.Module)]

    def _encoder_fingerprint(self) -> Any:
        """Identity of the text encoders' weights: None (do not cache) while an encoder is in
        training mode (dropout makes its output random); otherwise it changes whenever a parameter
        is replaced, moved, cast or modified in place (an optimizer step), which drops the cache.
        Weights edited through ``.data`` bypass the version counter: call :meth:`clear_prompt_cache`."""
        fp = []
        for m in self._text_encoders():
            if m.training:
                return None
            for p in m.parameters():
                fp.append((id(p), p._version, p.dtype, p.device, p.data_ptr()))
        return (self.max_sequence_length, self.negative_prompt, tuple(fp))

    def _cached_rows(self, texts: list[str]) -> dict[str, dict[str, Tensor]]:
        if self.prompt_cache_bytes <= 0:
            return {}
        key = self._encoder_fingerprint()
        if key is None or key != self._prompt_cache_key:
            self.clear_prompt_cache()
            self._prompt_cache_key = key
            return {}
        out = {}
        for t in texts:
            hit = self._prompt_cache.get((t, self.max_sequence_length))
            if hit is not None:
                self._prompt_cache.move_to_end((t, self.max_sequence_length))
                out[t] = hit
        return out

    def _store_rows(self, rows: dict[str, dict[str, Tensor]]) -> None:
        if self.prompt_cache_bytes <= 0 or self._prompt_cache_key is None:
            return
        for text, row in rows.items():
            row = {k: v.detach().clone() for k, v in row.items()}
            size = sum(v.numel() * v.element_size() for v in row.values())
            if size > self.prompt_cache_bytes:
                continue
            self._prompt_cache[(text, self.max_sequence_length)] = row
            self._prompt_cache_used += size
            while self._prompt_cache_used > self.prompt_cache_bytes:
                _, old = self._prompt_cache.popitem(last=False)
                self._prompt_cache_used -= sum(v.numel() * v.element_size() for v in old.values())

    # -- to implement ------------------------------------------------------------------------

    def initial_noise(self, batch: int, *, height: int, width: int, generator: torch.Generator | None) -> Tensor:
        """Standard normal latents ``[B, ...]`` in the transformer's layout."""
        raise NotImplementedError

    def sigmas(self, num_steps: int, *, height: int, width: int) -> Tensor:
        """The σ grid ``[T + 1]`` (float32, from 1 toward 0, last value 0) that the pipeline's own
        scheduler would use for this size (static shift for SD3, dynamic ``mu`` for Flux)."""
        raise NotImplementedError

    def velocity(self, latents: Tensor, sigma: Tensor, cond: dict[str, Tensor], *, guidance_scale: float, height: int, width: int) -> Tensor:
        """v(x, σ) with CFG applied if ``guidance_scale > 1``; ``sigma`` is ``[B]``."""
        raise NotImplementedError

    def decode(self, latents: Tensor, *, height: int, width: int) -> Tensor:
        """Images ``[B, C, H, W]`` float32 in [0, 1]."""
        raise NotImplementedError

    # -- shared helper -----------------------------------------------------------------------
    def scheduler_sigmas(self, num_steps: int, **set_timesteps_kwargs: Any) -> Tensor:
        """σ grid from a private copy of the pipeline's scheduler (never the live, stateful one)."""
        sched = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        sched.set_timesteps(num_steps, device="cpu", **set_timesteps_kwargs)
        return sched.sigmas.detach().float().cpu()
