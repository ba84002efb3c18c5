"""One adapter for every diffusers Modular Pipeline (``ModularPipeline``) with a flow-matching loop.

A modular pipeline is a list of blocks: encoders (text, image), an input/prepare stage (batch
expansion, σ grid, initial latents, RoPE ids, image latents), a denoising loop
(``LoopSequentialPipelineBlocks`` whose sub-blocks are ``[before_denoiser,] denoiser,
after_denoiser``) and decoders. Everything model-specific lives in those blocks; flowrl replaces
only the loop's ``after_denoiser`` (the ``scheduler.step``) with its own kernels and calls the
other blocks as diffusers wrote them:

- ``encode_texts``  runs the encoder blocks on the strings (rows: every batch-first tensor they
  output — prompt embeddings, masks, the negative prompt's embeddings when the guider needs them);
- ``initial_noise`` runs the prepare stage with the pipeline's generator, so the noise is the stock
  call's noise;
- ``sigmas``        reads the σ grid the prepare stage set on the scheduler;
- ``velocity``      runs the prepare stage on the given latents (``latents=`` input, no noise drawn)
  and then the loop's sub-blocks up to the denoiser, i.e. the transformer call and diffusers'
  guider (CFG, APG, ...), and returns its ``noise_pred``; with gradients enabled the blocks'
  ``torch.no_grad`` wrapper is bypassed so the update can differentiate through them. ``t`` is the
  row's own scheduler timestep, so one call can hold rows of different steps (batched update);
- ``decode``        runs the blocks after the loop (unpacking, VAE decoding) with ``output_type="pt"``.

The loop block's state is captured the way the stock loop builds it: the loop is entered with its
``loop_step`` intercepted at step 0, so any field the loop wrapper sets before its first step is there.

Extending it (image-conditioned families): a prompt may be a dict of per-row call inputs
(``{"prompt": ..., "image": ...}``, :meth:`ModularAdapter.encode_prompts`), fixed call inputs go in
``configure(**inputs)`` (``FlowPolicy(adapter_options=...)``), inputs that arrive per row but select
blocks (``image``) in ``ModularAdapter.row_inputs``; a family-specific fix is one entry of ``SHIMS``
(a block class → a function patching that block instance) or ``GUIDED_CALL_DEFAULTS``, with its reason.

The only requirement: the loop's last sub-block is named ``after_denoiser`` and its scheduler is a
``FlowMatchEulerDiscreteScheduler``; and the denoiser writes ``block_state.noise_pred`` (the
velocity the scheduler's Euler step integrates). Families whose after-denoiser does more than one
Euler step on ``latents`` (LTX-2: it also steps the audio latents) are refused with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowrl.pipelines.base import FlowAdapter, adapter_for, check_flow_scheduler, register_adapter, register_fallback

try:
    from diffusers.modular_pipelines import LoopSequentialPipelineBlocks, ModularPipeline, PipelineState
except ImportError:  # pragma: no cover
    ModularPipeline = None

#: regular pipeline class → modular pipeline class (diffusers 0.42 names); ``to_modular`` uses it.
MODULAR_EQUIVALENT: dict[str, str] = {
    "StableDiffusion3Pipeline": "StableDiffusion3ModularPipeline",
    "FluxPipeline": "FluxModularPipeline",
    "FluxKontextPipeline": "FluxKontextModularPipeline",
    "Flux2Pipeline": "Flux2ModularPipeline",
    "Flux2KleinPipeline": "Flux2KleinModularPipeline",
    "QwenImagePipeline": "QwenImageModularPipeline",
    "QwenImageEditPipeline": "QwenImageEditModularPipeline",
    "QwenImageEditPlusPipeline": "QwenImageEditPlusModularPipeline",
    "ZImagePipeline": "ZImageModularPipeline",
    "WanPipeline": "WanModularPipeline",
    "WanImageToVideoPipeline": "WanImage2VideoModularPipeline",
    "HunyuanVideo15Pipeline": "HunyuanVideo15ModularPipeline",
    "HunyuanVideo15ImageToVideoPipeline": "HunyuanVideo15ModularPipeline",
    "LTX2Pipeline": "LTX2ModularPipeline",
    "LTXPipeline": "LTXModularPipeline",
    "Krea2Pipeline": "Krea2ModularPipeline",
    "ErnieImagePipeline": "ErnieImageModularPipeline",
}


def to_modular(pipe: Any) -> Any:
    """The diffusers ``ModularPipeline`` of a regular pipeline, sharing its components (no copy).

    Wan with two experts (``boundary_ratio`` set) becomes the Wan 2.2 modular pipeline, and a Flux.2
    Klein whose ``is_distilled`` is false the Klein base one, as diffusers' own mapping does."""
    import diffusers

    if ModularPipeline is not None and isinstance(pipe, ModularPipeline):
        return pipe
    name = MODULAR_EQUIVALENT.get(type(pipe).__name__)
    if name is None:
        known = ", ".join(sorted(MODULAR_EQUIVALENT))
        raise TypeError(f"diffusers has no modular pipeline flowrl knows for {type(pipe).__name__}. Known: {known}.")
    config = dict(getattr(pipe, "config", {}) or {})
    if name.startswith("Wan") and config.get("boundary_ratio") is not None:
        name = name.replace("Wan", "Wan22", 1)
    if name == "Flux2KleinModularPipeline" and config.get("is_distilled") is False:
        name = "Flux2KleinBaseModularPipeline"
    if name == "Krea2ModularPipeline" and config.get("is_distilled"):
        name = "Krea2TurboModularPipeline"
    modular = getattr(diffusers, name)()
    wanted = set(modular.component_names)
    comps = {k: v for k, v in pipe.components.items() if k in wanted and v is not None}
    modular.update_components(**comps)
    for key in ("boundary_ratio", "is_distilled", "expand_timesteps"):  # pipeline configs the blocks read
        if key in config and key in getattr(modular, "config", {}):
            modular.register_to_config(**{key: config[key]})
    if getattr(pipe, "flowrl_defaults", None):
        modular.flowrl_defaults = pipe.flowrl_defaults
    return modular


# ------------------------------------------------------------------------------------ shims
# Every family-specific line of the modular path is here, with its reason. A shim is installed on a
# block instance of the pipeline (so the stock call gets it too) and leaves the block's math alone.


def _shim_always_encode_negative(block: Any) -> None:
    """Wan and LTX (diffusers 0.42.1): their denoisers require ``negative_prompt_embeds`` even with
    guidance off, but their text encoders make it only when the guider needs it (Wan's then even
    raises UnboundLocalError); so the negative is always encoded (a guider with guidance off never
    reads it)."""
    if getattr(block, "_flowrl_shimmed", False):
        return
    orig = block.encode_prompt

    def encode_prompt(*args, **kwargs):
        kwargs["prepare_unconditional_embeds"] = True
        return orig(*args, **kwargs)

    block.encode_prompt = encode_prompt
    block._flowrl_shimmed = True


#: encoder block class name → call inputs set (unless given) when guidance is on. SD3: its modular
#: text encoder encodes a negative only when one is given, so without it the call silently runs with
#: no CFG; "" is the regular pipeline's negative.
GUIDED_CALL_DEFAULTS = {"StableDiffusion3TextEncoderStep": {"negative_prompt": ""}}

#: block class name → shim installed on each such block of a wrapped pipeline.
SHIMS = {"WanTextEncoderStep": _shim_always_encode_negative, "LTXTextEncoderStep": _shim_always_encode_negative}


def _install_shims(blocks: Any) -> None:
    if type(blocks).__name__ in SHIMS:
        SHIMS[type(blocks).__name__](blocks)
    for sub in (getattr(blocks, "sub_blocks", None) or {}).values():
        _install_shims(sub)


#: cond-key suffix of the row lengths of a list-valued conditioning (see ``encode_texts``).
LENGTHS = "#lengths"


class _Captured(Exception):
    """Raised from the intercepted ``loop_step``: carries the loop's block state at step 0."""

    def __init__(self, block_state: Any):
        super().__init__("captured")
        self.block_state = block_state


@dataclass
class _Plan:
    encode: list  # [(name, block)] encoder blocks (rows of conditioning)
    prepare: list  # [(name, block)] input / prepare stage before the loop
    loop: Any  # the LoopSequentialPipelineBlocks
    steps: list  # [(name, block)] loop sub-blocks run per velocity (before the after-denoiser)
    decode: list  # [(name, block)] blocks after the loop
    inputs: dict  # execution blocks' input name → default


def split_blocks(blocks: Any, name: str = "pipeline") -> _Plan:
    """Execution blocks (a flat ``SequentialPipelineBlocks``) → encode / prepare / loop / decode.

    Encoders are the blocks before the loop outside the loop's top-level group (``text_encoder``,
    ``vae_encoder``, ...); the prepare stage is the loop group's blocks before it (``denoise.input``,
    ``denoise.set_timesteps``, ...). Raises TypeError, with the reason, for a loop flowrl cannot
    drive: not exactly one loop, a loop not ending in ``after_denoiser``, or an after-denoiser that
    steps a second latent stream (LTX-2's audio)."""
    items = list(blocks.sub_blocks.items())
    loops = [i for i, (_, b) in enumerate(items) if isinstance(b, LoopSequentialPipelineBlocks)]
    if len(loops) != 1:
        raise TypeError(f"{name}: flowrl drives pipelines with one denoising loop; its blocks have {len(loops)}.")
    li = loops[0]
    loop_name, loop = items[li]
    subs = list(loop.sub_blocks.items())
    if not subs or subs[-1][0] != "after_denoiser" or "denoiser" not in loop.sub_blocks:
        raise TypeError(
            f"{name}: its loop {type(loop).__name__} has sub-blocks {[n for n, _ in subs]}; flowrl needs "
            "[before_denoiser,] denoiser, after_denoiser (the after-denoiser is the scheduler step it replaces)."
        )
    after = subs[-1][1]
    touched = {p.name for p in after.intermediate_outputs} | {p.name for p in after.inputs if p.name}
    others = sorted(n for n in touched if n != "latents" and (n.endswith("latents") or n.endswith("scheduler")))
    if others:
        raise TypeError(
            f"{name}: its after-denoiser ({type(after).__name__}) also steps {others}, not only `latents` "
            "(e.g. LTX-2's joint audio latents); flowrl's kernels step one latent tensor, so this family is "
            "not supported on the modular path."
        )
    top = loop_name.split(".")[0]
    encode = [(n, b) for n, b in items[:li] if n.split(".")[0] != top]
    prepare = [(n, b) for n, b in items[:li] if n.split(".")[0] == top]
    inputs = {p.name: p.default for p in blocks.inputs if p.name}
    return _Plan(encode=encode, prepare=prepare, loop=loop, steps=subs[:-1], decode=items[li + 1 :], inputs=inputs)


def _call(block: Any, *args: Any, **kwargs: Any) -> Any:
    """``block(*args)``; with gradients enabled, bypass a ``@torch.no_grad()`` on its ``__call__``
    (diffusers' loop blocks carry one) so the update can differentiate through diffusers' code."""
    fn = type(block).__call__
    if torch.is_grad_enabled():
        fn = getattr(fn, "__wrapped__", fn)
    return fn(block, *args, **kwargs)


class ModularAdapter(FlowAdapter):
    """:class:`FlowAdapter` over a diffusers ``ModularPipeline`` (see the module docstring).

    Options (``configure(**call_kwargs)``, from ``FlowPolicy(adapter_options=...)``): any input the
    pipeline's call takes (``num_frames``, ``negative_prompt``, ``max_sequence_length``, Flux's
    distilled ``guidance_scale``, ``image``, ...), passed to every block run. The policy's
    ``guidance_scale`` sets the pipeline's guider (``pipe.guider.new(guidance_scale=...)``), so the
    guidance form is whatever guider the pipeline carries (CFG, APG, ...)."""

    generic = True  # not a family adapter: has_hand_adapter() does not count it
    negative_keys: dict[str, str] = {}  # the encoder blocks output the negative rows themselves
    #: call inputs flowrl sets itself (an option naming one is refused).
    #: samples per decoder run (None: all at once for images, one at a time for video — HunyuanVideo
    #: 1.5's VAE decodes one video at a time; ``decode_batch_size`` option).
    decode_batch_size: int | None = None
    #: call inputs that come per row in dict prompts (``{"prompt": ..., "image": ...}``): they select
    #: the pipeline's blocks as a given input does (an image-editing workflow), so set them before use.
    row_inputs: frozenset[str] = frozenset()
    RESERVED = ("prompt", "latents", "generator", "height", "width", "num_inference_steps", "output_type", "num_images_per_prompt")

    def __init__(self, pipe: Any):
        if not hasattr(pipe, "transformer") or getattr(pipe, "transformer", None) is None:
            raise TypeError(f"{type(pipe).__name__} has no `transformer` component loaded; load it (pipe.load_components()) first.")
        check_flow_scheduler(pipe.scheduler)
        self.call_kwargs: dict[str, Any] = {}
        super().__init__(pipe)
        self._plan: _Plan | None = None
        self._grids: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._dummy_row: dict[str, Tensor] | None = None
        #: the stored-σ → (step index, scheduler timestep) map of the last grid (``velocity`` uses it).
        self._step_map: tuple[Tensor, Tensor] | None = None
        self.num_steps: int | None = None
        self._template_cache: tuple | None = None
        #: True once the denoiser showed it needs one timestep per call (see ``velocity``)
        self._per_step = False
        _install_shims(pipe._blocks)
        self.plan()  # fail early, with the reason, for a loop flowrl cannot drive

    # ------------------------------------------------------------------ options and sizes
    def configure(self, **options: Any) -> "ModularAdapter":
        inputs = {p.name for p in self.pipe._blocks.inputs if p.name} | set(self.plan().inputs)  # trigger inputs (image) included
        options = dict(options)
        if "decode_batch_size" in options:
            self.decode_batch_size = options.pop("decode_batch_size")
        for k, v in options.items():
            if k in self.RESERVED:
                raise ValueError(f"adapter option '{k}' is set by flowrl itself; use the policy's own setting instead.")
            if k not in inputs:
                raise ValueError(f"{type(self.pipe).__name__} takes no input '{k}'. Known: {', '.join(sorted(n for n in inputs if n not in self.RESERVED))}.")
            if v is not None:
                self.call_kwargs[k] = v
        self._plan = None  # an option may be a trigger input (e.g. image) that selects other blocks
        self._grids.clear()
        self._dummy_row = None
        self.clear_prompt_cache()
        return self

    @property
    def default_size(self) -> tuple[int, int]:
        size = (getattr(self.pipe, "flowrl_defaults", None) or {}).get("size")
        if size:
            return tuple(size)  # type: ignore[return-value]
        h, w = getattr(self.pipe, "default_height", None), getattr(self.pipe, "default_width", None)
        if isinstance(h, int) and isinstance(w, int):
            return (h, w)
        return super().default_size

    def set_guidance(self, guidance_scale: float) -> float:
        """Point the pipeline's guider at ``guidance_scale`` (1: guidance off) → the rows per latent
        the guider runs (2 for CFG-like guiders when on). Without a guider only 1 is accepted."""
        guider = getattr(self.pipe, "guider", None)
        if guider is None:
            if guidance_scale > 1.0:
                raise ValueError(
                    f"{type(self.pipe).__name__} has no guider, so sampler.guidance_scale={guidance_scale} cannot apply CFG; "
                    "leave it at 1 (a distilled-guidance input such as Flux's goes in adapter_options: {'guidance_scale': 3.5})."
                )
            return 1.0
        if float(guider.config.get("guidance_scale", 1.0)) != float(guidance_scale):
            self.pipe.update_components(guider=guider.new(guidance_scale=float(guidance_scale)))
            self.clear_prompt_cache()
            self._dummy_row = None
        if guidance_scale > 1.0:
            for _, block in self.plan().encode:
                for k, v in GUIDED_CALL_DEFAULTS.get(type(block).__name__, {}).items():
                    self.call_kwargs.setdefault(k, v)
        return float(guidance_scale)

    # ------------------------------------------------------------------------- the plan
    def plan(self) -> _Plan:
        """Split the execution blocks (for the current options) into encode / prepare / loop / decode."""
        if self._plan is None:
            triggers = {k: v for k, v in self.call_kwargs.items() if v is not None}
            triggers.update({k: True for k in self.row_inputs if k not in triggers})
            blocks = self.pipe._blocks.get_execution_blocks(prompt="x", **triggers)
            _install_shims(blocks)
            self._plan = split_blocks(blocks, type(self.pipe).__name__)
        return self._plan

    def _state(self, **values: Any) -> Any:
        """A ``PipelineState`` as ``ModularPipeline.__call__`` builds it: every input at its default,
        then the options, then ``values``."""
        plan = self.plan()
        state = PipelineState()
        given = {**self.call_kwargs, **values}
        for k in [k for k in given if k.endswith(LENGTHS)]:
            lengths, key = given.pop(k), k[: -len(LENGTHS)]
            given[key] = [row[: int(n)] for row, n in zip(given[key], lengths)]
        if self.max_sequence_length is not None and "max_sequence_length" in plan.inputs:
            given.setdefault("max_sequence_length", self.max_sequence_length)
        for k, default in plan.inputs.items():
            state.set(k, given.pop(k, default))
        for k, v in given.items():  # rows of conditioning the prepare stage reads (intermediates)
            state.set(k, v)
        return state

    def _run(self, blocks: list, state: Any) -> Any:
        for _, block in blocks:
            _, state = block(self.pipe, state)
        return state

    # --------------------------------------------------------------------------- prompts
    def encode_texts(self, texts: list[Any]) -> dict[str, Tensor]:
        """Rows of every batch-first tensor the encoder blocks output for ``texts``.

        An item is a prompt string or a dict of per-row call inputs (``{"prompt": ..., "image": ...}``;
        every dict of one call has the same keys); the encoder blocks get each input as a list with
        one entry per row (``prompt=[...]``, ``image=[...]``), as a batched stock call would."""
        plan = self.plan()
        n = len(texts)
        run = list(texts) if n > 1 else list(texts) + [texts[0]]  # a batch of ≥ 2 tells batch dims apart
        if isinstance(run[0], dict):
            values = {k: [r[k] for r in run] for k in run[0]}
        else:
            values = {"prompt": run}
        state = self._run(plan.encode, self._state(**values))
        out = {}
        for _, block in plan.encode:
            for p in block.intermediate_outputs:
                v = state.get(p.name)
                if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == len(run):
                    out[p.name] = v[:n]
                elif isinstance(v, Tensor) and v.dim() > 1 and v.shape[0] == 1:
                    # one row for the whole batch (Qwen-Image encodes its negative prompt once): every
                    # row gets it, as the input step's batch expansion would give
                    out[p.name] = v.expand(n, *v.shape[1:])
                elif isinstance(v, list) and len(v) == len(run) and all(isinstance(x, Tensor) for x in v):
                    # a list of per-prompt tensors of different lengths (Z-Image's unpadded embeddings):
                    # rows padded on dim 0, with their lengths, and turned back into the list in _state
                    out[p.name] = _stack_padded(v[:n])
                    out[p.name + LENGTHS] = torch.tensor([x.shape[0] for x in v[:n]])
        if not out:
            raise TypeError(f"{type(self.pipe).__name__}: its encoder blocks output no batch-first tensor to condition on.")
        return out

    def encode_prompts(self, prompts: list[Any], *, guidance_scale: float) -> dict[str, Tensor]:
        """Conditioning rows of ``prompts`` (strings, or dicts of per-row call inputs: see
        :meth:`encode_texts`). Strings are cached like every adapter's; dict rows (which may carry
        images) are encoded on every call, each distinct object once."""
        from flowrl.prompts import prompt_images

        with_images = next((p for p in prompts if prompt_images(p)), None)
        if with_images is not None:
            # The modular blocks take reference images per call (shared by the batch: Flux.2's
            # `image` list, Qwen-Image-Edit's `image`), not per row, so per-row sources are not wired
            # yet; ignoring them would train the wrong task.
            raise ValueError(
                f"{type(self.pipe).__name__} (modular path): the prompt {str(with_images)!r} carries a source image "
                "(its row's 'image' column), which this path cannot condition on per row yet. Image-conditioned "
                "families with an adapter: FluxKontextPipeline, WanImageToVideoPipeline, HunyuanVideo15ImageToVideoPipeline."
            )
        # The negative rows come from diffusers' encoder (the guider decides whether it needs them),
        # so the base class never adds "" itself. Rows of different lengths (encoders that pad to the
        # batch's longest prompt, with a mask) are zero-padded to the longest, as a batch would be.
        keys = [p if isinstance(p, str) else ("#row", id(p)) for p in prompts]
        items = dict(zip(keys, prompts))
        rows = self._cached_rows([k for k in items if isinstance(k, str)])
        missing = [k for k in items if k not in rows]
        if missing:
            caching = self.prompt_cache_bytes > 0 and self._prompt_cache_key is not None
            calls = [[k] for k in missing] if caching else [missing]
            with self._text_encoders_on(self.device):
                for ks in calls:
                    with torch.no_grad():
                        enc = self.encode_texts([items[k] for k in ks])
                    self.text_encoder_calls += 1
                    for i, k in enumerate(ks):
                        rows[k] = {name: v[i] for name, v in enc.items()}
            if caching:
                self._prompt_cache_key = self._encoder_fingerprint()
            self._store_rows({k: rows[k] for k in missing if isinstance(k, str)})
        return {name: _stack_padded([rows[k][name] for k in keys]) for name in rows[keys[0]]}

    def _dummy(self, batch: int) -> dict[str, Tensor]:
        """Conditioning rows of "" repeated ``batch`` times: the prepare stage reads only their shapes
        and dtypes when it draws noise or builds the σ grid."""
        if self._dummy_row is None:
            self._dummy_row = {k: v[0] for k, v in self.encode_prompts([""], guidance_scale=1.0).items()}
        return {k: v.unsqueeze(0).expand(batch, *v.shape).contiguous() for k, v in self._dummy_row.items()}

    # -------------------------------------------------------------------- prepare stage
    def _prepare(self, cond: dict[str, Tensor], *, height: int, width: int, generator: torch.Generator | None = None, num_steps: int | None = None) -> tuple[Any, Any]:
        """Run the prepare stage and enter the loop up to its first step → (state, loop block state).
        Its latents are drawn from ``generator`` (a private seeded one when None: the global RNG is
        never touched); callers that bring their own latents replace them."""
        plan = self.plan()
        steps = int(num_steps or self.num_steps or 10)
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        state = self._state(height=height, width=width, num_inference_steps=steps, generator=generator, **cond)
        state = self._run(plan.prepare, state)
        loop = plan.loop

        def capture(components, block_state, **kwargs):
            raise _Captured(block_state)

        loop.loop_step = capture  # the instance attribute shadows the method for this call only
        bar = getattr(loop, "_progress_bar_config", None)
        loop._progress_bar_config = {**(bar or {}), "disable": True}
        try:
            _call(loop, self.pipe, state)
        except _Captured as c:
            return state, c.block_state
        finally:
            del loop.loop_step
            if bar is None:
                del loop._progress_bar_config
            else:
                loop._progress_bar_config = bar
        raise RuntimeError(f"{type(loop).__name__} ran no step (empty timesteps?)")

    def _template(self, cond: dict[str, Tensor], batch: int, *, height: int, width: int) -> Any:
        """The loop's block state for these conditioning rows, reused while the same tensors come
        back (every step of a rollout): the prepare stage runs once per rollout, not once per step."""
        key = (batch, height, width, self.num_steps, tuple(sorted(cond)))
        hit = self._template_cache
        if hit is not None and hit[0] == key and all(hit[1][k] is v for k, v in cond.items()):
            return hit[2]
        with torch.no_grad():
            _, bs = self._prepare(cond, height=height, width=width)
        self._template_cache = (key, dict(cond), bs)
        return bs

    def initial_noise(self, batch: int, *, height: int, width: int, generator: torch.Generator | None) -> Tensor:
        """The prepare stage's own draw from ``generator``: the stock call's initial latents."""
        with torch.no_grad():
            _, bs = self._prepare(self._dummy(batch), height=height, width=width, generator=generator)
        return bs.latents.to(self.device, self.dtype)

    def sigmas(self, num_steps: int, *, height: int, width: int) -> Tensor:
        key = (int(num_steps), int(height), int(width), tuple(sorted((k, repr(v)) for k, v in self.call_kwargs.items())))
        if key not in self._grids:
            with torch.no_grad():
                _, bs = self._prepare(self._dummy(1), height=height, width=width, num_steps=num_steps)
            sig = self.pipe.scheduler.sigmas.detach().float().cpu().clone()
            self._grids[key] = (sig, bs.timesteps.detach().float().cpu().clone())
        sig, ts = self._grids[key]
        self._step_map = (sig, ts)
        self.num_steps = int(num_steps)
        return sig.clone()

    # -------------------------------------------------------------------------- velocity
    def _steps_of(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Step index and scheduler timestep of each row's σ: exact entries of the grid when σ is on
        it (the stock timesteps bit for bit), else σ·num_train_timesteps at the nearest index."""
        sig, ts = self._step_map if self._step_map is not None else (None, None)
        s = sigma.detach().float().cpu()
        n_train = float(self.pipe.scheduler.config.num_train_timesteps)
        if sig is None:
            return torch.zeros(len(s), dtype=torch.long), s * n_train
        grid = sig[: len(ts)]
        idx = (s[:, None] - grid[None, :]).abs().argmin(1)
        exact = grid[idx] == s
        t = torch.where(exact, ts[idx], s * n_train)
        return idx, t

    def velocity(self, latents: Tensor, sigma: Tensor, cond: dict[str, Tensor], *, guidance_scale: float, height: int, width: int) -> Tensor:
        """``noise_pred`` of the loop's blocks up to the denoiser (transformer + guider) at each row's σ.

        Rows of different steps share one call (the batched update) with a per-row timestep ``[N]``,
        unless the family needs one timestep per call — its guider depends on the step (a
        start/stop window, momentum), or its denoiser branches on ``t`` (Wan 2.2's expert switch):
        then each step's rows run in their own call with the scalar ``t`` the stock loop passes."""
        idx, t = self._steps_of(sigma)
        if self._step_map is None and self.num_steps:
            self.sigmas(self.num_steps, height=height, width=width)
            idx, t = self._steps_of(sigma)
        template = self._template(cond, latents.shape[0], height=height, width=width)
        single = bool((t == t[0]).all())
        if single or (not self._per_step and _step_free(getattr(self.pipe, "guider", None))):
            try:
                return self._denoise(template, latents, int(idx[0]), t[0] if single else t)
            except (RuntimeError, TypeError, ValueError):
                if single:
                    raise
                self._per_step = True  # a denoiser that branches on t: one step per call from now on
        out = None
        for step in torch.unique(idx).tolist():
            rows = torch.nonzero(idx == step).flatten()
            sub = {k: (v[rows.to(v.device)] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == len(idx) else v) for k, v in cond.items()}
            bs = self._template(sub, len(rows), height=height, width=width)
            v = self._denoise(bs, latents[rows.to(latents.device)], step, t[rows[0]])
            if out is None:
                out = v.new_empty((latents.shape[0], *v.shape[1:]))
            out = out.index_copy(0, rows.to(out.device), v)
        return out

    def _denoise(self, template: Any, latents: Tensor, step: int, t: Tensor) -> Tensor:
        """The loop's sub-blocks before the after-denoiser on a copy of ``template`` → ``noise_pred``."""
        bs = type(template)(**template.as_dict())
        bs.latents = latents
        t = t.to(latents.device)
        for _, block in self.plan().steps:
            _, bs = _call(block, self.pipe, bs, i=step, t=t)
        return bs.noise_pred

    # ---------------------------------------------------------------------------- decode
    def decode(self, latents: Tensor, *, height: int, width: int) -> Tensor:
        """The blocks after the loop with ``output_type="pt"``: images ``[B, C, H, W]`` or videos
        ``[B, F, C, H, W]``, float32 in [0, 1]."""
        from flowrl.pipelines.video_common import decode_in_chunks

        chunk = self.decode_batch_size if self.decode_batch_size is not None else (1 if self.is_video else None)
        return decode_in_chunks(lambda z: self._decode(z, height=height, width=width), latents, chunk)

    @property
    def is_video(self) -> bool:
        return "num_frames" in self.plan().inputs

    def _decode(self, latents: Tensor, *, height: int, width: int) -> Tensor:
        plan = self.plan()
        with torch.no_grad():
            state, _ = self._prepare(self._dummy(latents.shape[0]), height=height, width=width)
            state.set("latents", latents)
            state.set("output_type", "pt")
            state = self._run(plan.decode, state)
        return _output_tensor(state, [p.name for _, b in plan.decode[-1:] for p in b.intermediate_outputs], type(self.pipe).__name__)

    def _text_encoders(self) -> list[torch.nn.Module]:
        comps = self.pipe.components
        return [m for name, m in sorted(comps.items()) if name.startswith("text_encoder") and isinstance(m, torch.nn.Module)]


def _output_tensor(state: Any, names: list[str], who: str) -> Tensor:
    """The decoded images / videos in ``state`` (the decoder's output names first) as float32."""
    for name in names + ["images", "videos", "video", "image"]:
        v = state.get(name)
        if isinstance(v, Tensor):
            return v.float()
        if isinstance(v, list) and v and isinstance(v[0], Tensor):
            return torch.stack(v).float()
    raise TypeError(f"{who}: its decoder blocks returned no image or video tensor (outputs {names}).")


def _step_free(guider: Any) -> bool:
    """True when the guider's output does not depend on the step index (rows of different steps
    may share a call): no guider, or plain CFG active over the whole schedule."""
    if guider is None:
        return True
    from diffusers.guiders import ClassifierFreeGuidance

    cfg = guider.config
    return type(guider) is ClassifierFreeGuidance and float(cfg.get("start", 0.0)) == 0.0 and float(cfg.get("stop", 1.0)) == 1.0


def _stack_padded(rows: list[Tensor]) -> Tensor:
    """``torch.stack`` of rows, zero-padding each dim to the longest row (masks pad with 0: masked)."""
    shape = [max(r.shape[d] for r in rows) for d in range(rows[0].dim())]
    if all(list(r.shape) == shape for r in rows):
        return torch.stack(rows)
    out = rows[0].new_zeros((len(rows), *shape))
    for i, r in enumerate(rows):
        out[(i, *[slice(0, s) for s in r.shape])] = r
    return out


if ModularPipeline is not None:
    register_adapter(ModularPipeline)(ModularAdapter)


@register_fallback
def _modular_fallback(pipe: Any) -> FlowAdapter | None:
    """A regular pipeline without a hand adapter: the adapter of diffusers' modular pipeline of it."""
    if type(pipe).__name__ not in MODULAR_EQUIVALENT:
        return None
    return adapter_for(to_modular(pipe))
