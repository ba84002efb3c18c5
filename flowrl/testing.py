"""Conformance kit for a pipeline flowrl drives: ``check_pipeline(pipe)``.

The pipeline runs on flowrl's modular path, or (``modular=False``, and by default for a regular
pipeline diffusers has no modular pipeline for that flowrl can use, e.g. the image-conditioned
families) through its hand-written adapter, compared with the stock regular pipeline call. A family
conditioned on a source image gets one small deterministic source image per prompt, made by the kit.

One row of measurements per pipeline (``flowrl check-pipeline PATH_OR_FAMILY`` prints it):

- ``ratio``: for every stochastic kernel, max |π_new/π_old − 1| over a rollout re-evaluated with
  unchanged weights (on-policy: the update's ratio must be exactly 1; batched recomputation may move
  the last float bits);
- ``parity``: max |flowrl ODE sampling − the stock modular call| on the same seed, steps, size and
  call inputs (the stock call integrates with ``scheduler.step``; flowrl with its own Euler step);
- ``lora``: max |output with a LoRA flowrl saved, loaded by the stock ``load_lora_weights`` − the
  policy's own output with that LoRA|;
- seconds (and CUDA peak memory) of one rollout step and one update step (forward + backward of
  one stored step).
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

def stochastic_kernels() -> list[str]:
    """Every stochastic transition kernel flowrl ships (the ratio check runs each)."""
    from flowrl.sde import KERNELS

    return [k for k in KERNELS.names() if k != "ode"]


@dataclass
class CheckResult:
    """One pipeline's conformance row (see the module docstring)."""

    family: str
    pipeline: str
    task: str
    guidance: str
    path: str = "modular"
    ratio_err: dict[str, float] = field(default_factory=dict)
    parity_err: float | None = None
    lora_err: float | None = None
    rollout_step_s: float | None = None
    update_step_s: float | None = None
    rollout_peak_mb: float | None = None
    update_peak_mb: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def max_ratio_err(self) -> float | None:
        return max(self.ratio_err.values()) if self.ratio_err else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_ratio_err": self.max_ratio_err}


def _fmt(x: float | None, spec: str = ".1e") -> str:
    if x is None:
        return "–"
    return "0" if x == 0 else format(x, spec)


TABLE_HEAD = "| family | pipeline | task | path | guidance | ratio − 1 (all kernels) | stock parity | LoRA round trip | rollout step | update step |"


def table(results: Sequence[CheckResult]) -> str:
    """A Markdown table of results (one row each)."""
    lines = [TABLE_HEAD, "|" + "---|" * 10]
    for r in results:
        mem = lambda mb: f", {mb:.0f} MB" if mb is not None else ""  # noqa: E731
        lines.append(
            f"| {r.family} | {r.pipeline} | {r.task} | {r.path} | {r.guidance} | {_fmt(r.max_ratio_err)} | {_fmt(r.parity_err)} | {_fmt(r.lora_err)} "
            f"| {_fmt(r.rollout_step_s, '.3f')} s{mem(r.rollout_peak_mb)} | {_fmt(r.update_step_s, '.3f')} s{mem(r.update_peak_mb)} |"
        )
    return "\n".join(lines)


def _guidance_form(mp: Any, policy: Any) -> str:
    guider = getattr(mp, "guider", None)
    if guider is not None:
        scale = float(guider.config.get("guidance_scale", 1.0))
        return f"{type(guider).__name__} {scale:g}" if policy.guidance_scale > 1 else f"{type(guider).__name__} (off)"
    g = policy.adapter.call_kwargs.get("guidance_scale", getattr(mp, "default_call_parameters", {}).get("guidance_scale"))
    return f"embedded {g:g}" if isinstance(g, (int, float)) else "none"


def _task(mp: Any, policy: Any) -> str:
    ck = policy.adapter.call_kwargs
    video = "num_frames" in policy.adapter.plan().inputs
    if ck.get("image") is not None:
        return "image-to-video" if video else "image editing"
    return "text-to-video" if video else "text-to-image"


def _check_ratios(policy, prompts, res, *, num_steps: int, kernels, seed: int, say) -> None:
    """Ratio 1 on-policy for every stochastic kernel: roll out (noise on every step but the last,
    where CPS has none), recompute with unchanged weights, record max |exp(Δ log p) − 1| in
    ``res.ratio_err``; a kernel that refuses this grid / noise level leaves its reason in ``res.notes``."""
    last = max(num_steps - 1, 1)
    policy.rollout_name, policy.rollout_params = "window", {"window_size": last, "window_range": (0, last), "mode": "random"}
    for kind in kernels or stochastic_kernels():
        policy.sampler = kind
        try:
            traj = policy.rollout(prompts, group_size=2, generator=torch.Generator().manual_seed(seed + 1))
            with torch.no_grad():
                ev = policy.evaluate(traj)
            res.ratio_err[kind] = float((ev.log_prob.double() - traj.log_probs.to(ev.log_prob.device).double()).exp().sub(1).abs().max())
        except ValueError as exc:
            res.notes.append(f"{kind}: {exc}")
        say(f"ratio {kind}: {res.ratio_err.get(kind)}")


def _add_test_lora(policy, traj, res, *, seed: int, timings: bool) -> None:
    """Give the policy a rank-4 LoRA whose B matrices are random (so it changes the output), and
    with ``timings`` time one update step (the first step's log-prob, backward) into ``res``."""
    from flowrl.builders import add_lora

    add_lora(policy.model, rank=4, alpha=4, targets=list(policy.default_lora_targets), seed=seed)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed + 3)) if p.device.type == "cpu" else p.copy_(torch.randn_like(p) * 0.05)
    if timings:
        _peak_reset(policy.device)
        t0 = time.perf_counter()
        ev = policy.evaluate(traj, steps=[0])
        ev.log_prob.sum().backward()
        res.update_step_s = time.perf_counter() - t0
        res.update_peak_mb = _peak_mb(policy.device)
        policy.model.zero_grad(set_to_none=True)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def _stock_output(mp: Any, prompts: list[str], *, steps: int, height: int, width: int, seed: int, call_kwargs: dict) -> torch.Tensor:
    from flowrl.pipelines.modular import _output_tensor

    call_kwargs = {k: v for k, v in call_kwargs.items() if k != "decode_batch_size"}
    state = mp(prompt=list(prompts), num_inference_steps=steps, height=height, width=width, generator=torch.Generator().manual_seed(seed), output_type="pt", **call_kwargs)
    return _output_tensor(state, [], type(mp).__name__)


def check_family(name: str, directory: str, **kwargs: Any) -> CheckResult:
    """:func:`check_pipeline` on the tiny random pipeline of family ``name``
    (``flowrl.pipelines.tiny_modular.TINY_FAMILIES``), saved to ``directory`` and loaded back."""
    from flowrl.pipelines.tiny_modular import TINY_FAMILIES, build_family

    fam = TINY_FAMILIES[name] if name in TINY_FAMILIES else None
    pipe = build_family(name, directory)
    h, w = fam.size or (None, None)
    opts = {"family": name, "guidance_scale": fam.guidance_scale, "adapter_options": dict(fam.options) or None,
            "prompts": fam.prompts, "height": h, "width": w, "modular_fix": fam.modular_fix, "modular": fam.modular,
            "stock_kwargs": dict(fam.stock_kwargs) or None}
    return check_pipeline(pipe, **{**opts, **kwargs})


def _load_lora_stock(pipe: Any, directory: str, notes: list[str]) -> Any:
    """Load a LoRA folder the stock way → the modular pipeline to call: the regular pipeline's
    ``load_lora_weights`` when it has one, else the modular pipeline's, else the transformer's own
    ``load_lora_adapter`` (diffusers' model-level loader; noted in the row)."""
    from flowrl.pipelines.modular import to_modular

    for obj in (pipe, None):
        target = pipe if obj is not None else to_modular(pipe)
        try:
            loader = getattr(target, "load_lora_weights")
        except AttributeError:
            continue
        loader(directory)
        return to_modular(target)
    mp = to_modular(pipe)
    mp.transformer.load_lora_adapter(directory, prefix="transformer")
    notes.append(f"{type(pipe).__name__} has no load_lora_weights; loaded with transformer.load_lora_adapter")
    return mp


def check_pipeline(
    pipe: Any,
    *,
    family: str | None = None,
    prompts: Sequence[str] = ("a cat", "a dog left of a 3"),
    num_steps: int = 3,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float = 1.0,
    adapter_options: dict[str, Any] | None = None,
    kernels: Sequence[str] | None = None,
    lora: bool = True,
    timings: bool = True,
    seed: int = 0,
    verbose: bool = False,
    modular_fix: Any = None,
    modular: bool | None = None,
    stock_kwargs: dict[str, Any] | None = None,
) -> CheckResult:
    """Run the conformance checks on ``pipe`` (a regular diffusers pipeline diffusers has a modular
    pipeline for, or a ``ModularPipeline``) and return its :class:`CheckResult`. ``pipe`` is not
    modified (the LoRA check works on a copy).

    ``modular``: True checks the modular path; False the hand adapter against the stock regular
    call (``stock_kwargs``: extra inputs of that call, e.g. ``num_frames``); None picks the modular
    path where diffusers has a modular pipeline flowrl knows for ``pipe`` and it is not
    image-conditioned, else the hand adapter."""
    from flowrl.pipelines.base import has_hand_adapter
    from flowrl.pipelines.modular import MODULAR_EQUIVALENT

    if modular is None:
        name = type(pipe).__name__
        modular = hasattr(pipe, "blocks") or (name in MODULAR_EQUIVALENT and not (has_hand_adapter(pipe) and _image_conditioned_hand(pipe)))
    if not modular:
        return _check_hand(pipe, family=family, prompts=prompts, num_steps=num_steps, height=height, width=width, guidance_scale=guidance_scale,
                           adapter_options=adapter_options, kernels=kernels, lora=lora, timings=timings, seed=seed, verbose=verbose,
                           stock_kwargs=stock_kwargs)
    from flowrl.pipelines.flow_policy import FlowPolicy
    from flowrl.pipelines.modular import to_modular

    prompts = list(prompts)
    original = pipe
    pipe = copy.deepcopy(pipe)  # the LoRA and guider changes stay on the copy
    fix = modular_fix or (lambda m: m)
    mp = to_modular(pipe)
    pipeline_name = type(mp).__name__
    mp = fix(mp)
    policy = FlowPolicy.from_pipeline(mp, num_steps=num_steps, guidance_scale=guidance_scale, height=height, width=width, adapter_options=adapter_options)
    res = CheckResult(family=family or type(original).__name__, pipeline=pipeline_name, task=_task(mp, policy), guidance=_guidance_form(mp, policy))
    say = print if verbose else (lambda *a, **k: None)

    mp.set_progress_bar_config(disable=True)
    # 1. ratio 1 on-policy, every stochastic kernel (on every step but the last: CPS has no noise there)
    _check_ratios(policy, prompts, res, num_steps=num_steps, kernels=kernels, seed=seed, say=say)
    policy.sampler, policy.rollout_name, policy.rollout_params = "flow", "full", {}

    # 2. ODE sampling vs the stock modular call
    ours = policy.generate(prompts, generator=torch.Generator().manual_seed(seed), num_steps=num_steps)
    call = dict(policy.adapter.call_kwargs)
    stock = _stock_output(mp, prompts, steps=num_steps, height=policy.height, width=policy.width, seed=seed, call_kwargs=call)
    if ours.shape != stock.shape:
        raise AssertionError(f"flowrl's output {tuple(ours.shape)} and the stock call's {tuple(stock.shape)} differ in shape")
    res.parity_err = float((ours.float().cpu() - stock.cpu()).abs().max())
    say(f"parity {res.parity_err}")

    # 3. timings (one rollout step, one update step)
    if timings:
        dev = policy.device
        _peak_reset(dev)
        t0 = time.perf_counter()
        traj = policy.rollout(prompts, group_size=1, generator=torch.Generator().manual_seed(seed + 2))
        res.rollout_step_s = (time.perf_counter() - t0) / num_steps
        res.rollout_peak_mb = _peak_mb(dev)

    # 4. LoRA: flowrl saves, stock load_lora_weights loads, same output
    if lora:
        _add_test_lora(policy, traj, res, seed=seed, timings=timings)
        policy.adapter.clear_prompt_cache()
        with tempfile.TemporaryDirectory() as d:
            policy.save_lora(d)
            fresh = copy.deepcopy(original)
            fresh_mp = fix(_load_lora_stock(fresh, d, res.notes))
            fresh_mp.set_progress_bar_config(disable=True)
            mine = policy.generate(prompts, generator=torch.Generator().manual_seed(seed), num_steps=num_steps)
            # the same guider / call inputs as the policy's, then the stock call with the loaded LoRA
            fresh_call = FlowPolicy.from_pipeline(fresh_mp, num_steps=num_steps, guidance_scale=guidance_scale, adapter_options=adapter_options).adapter.call_kwargs
            theirs = _stock_output(fresh_mp, prompts, steps=num_steps, height=policy.height, width=policy.width, seed=seed, call_kwargs=dict(fresh_call))
            res.lora_err = float((mine.float().cpu() - theirs.float().cpu()).abs().max())
            if float((mine - ours.to(mine.device)).abs().max()) == 0:
                res.notes.append("the LoRA did not change the output (its targets matched nothing that is used)")
        say(f"lora {res.lora_err}")
    return res


# ------------------------------------------------------------------------------- hand adapters
def _image_conditioned_hand(pipe: Any) -> bool:
    from flowrl.pipelines.base import _ADAPTERS, _import_builtin_adapters
    from flowrl.pipelines.image_cond import ImageConditionMixin

    _import_builtin_adapters()
    return any(cls in _ADAPTERS and issubclass(_ADAPTERS[cls], ImageConditionMixin) for cls in type(pipe).__mro__)


def source_image(path: str, *, seed: int, height: int, width: int) -> str:
    """Write a deterministic ``height × width`` RGB test image (smooth gradients + seeded noise) to
    ``path`` and return it: the kit's source image for image-conditioned families."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    base = torch.stack([xx, yy, (xx + yy) / 2], -1)
    arr = (0.7 * base + 0.3 * torch.rand(height, width, 3, generator=g)).clamp(0, 1).mul(255).round().to(torch.uint8)
    Image.fromarray(arr.numpy()).save(path)
    return path


def _stock_hand(pipe: Any, prompts: Sequence[Any], *, steps: int, height: int, width: int, seed: int, guidance_scale: float, stock_kwargs: dict) -> torch.Tensor:
    """The stock regular call, one prompt per call from one running generator (as flowrl's
    per-prompt ``generate`` below); a prompt's source image goes in ``image``. A pipeline with a
    guider gets it at ``guidance_scale`` for the call."""
    import inspect

    from flowrl.prompts import load_source_images, prompt_images

    params = inspect.signature(pipe.__call__).parameters
    g = torch.Generator().manual_seed(seed)
    guider = getattr(pipe, "guider", None)
    if guider is not None:
        pipe.guider = guider.new(guidance_scale=guidance_scale)
    try:
        outs = []
        for p in prompts:
            kw = dict(stock_kwargs)
            kw.update({k: v for k, v in (("height", height), ("width", width)) if k in params})
            images = prompt_images(p)
            if images:
                kw["image"] = load_source_images(images[0])
            out = pipe(prompt=str(p), num_inference_steps=steps, generator=g, output_type="pt", **kw)
            outs.append(torch.as_tensor(out.frames if hasattr(out, "frames") else out.images))
        return torch.cat(outs)
    finally:
        if guider is not None:
            pipe.guider = guider


def _hand_guidance(pipe: Any, policy: Any) -> str:
    guider = getattr(pipe, "guider", None)
    if guider is not None:
        return f"{type(guider).__name__} {policy.guidance_scale:g}" if policy.guidance_scale > 1 else f"{type(guider).__name__} (off)"
    if policy.guidance_scale > 1:
        return f"classifier-free {policy.guidance_scale:g}"
    if getattr(getattr(pipe.transformer, "config", {}), "get", lambda *_: None)("guidance_embeds"):
        return f"embedded {policy.adapter.embedded_guidance:g}"
    return "classifier-free (off)"


def _check_hand(pipe: Any, *, family: str | None, prompts: Sequence[str], num_steps: int, height: int | None, width: int | None,
                guidance_scale: float, adapter_options: dict | None, kernels: Sequence[str] | None, lora: bool, timings: bool,
                seed: int, verbose: bool, stock_kwargs: dict | None) -> CheckResult:
    """:func:`check_pipeline` through the hand adapter registered for ``pipe``'s class, against
    the stock regular call."""
    from flowrl.pipelines.flow_policy import FlowPolicy
    from flowrl.pipelines.image_cond import ImageConditionMixin
    from flowrl.prompts import ImagePrompt

    original = pipe
    pipe = copy.deepcopy(pipe)
    stock_kwargs = dict(stock_kwargs or {})
    say = print if verbose else (lambda *a, **k: None)
    policy = FlowPolicy.from_pipeline(pipe, modular=False, num_steps=num_steps, guidance_scale=guidance_scale, height=height, width=width, adapter_options=adapter_options)
    needs_image = isinstance(policy.adapter, ImageConditionMixin)
    with tempfile.TemporaryDirectory() as src_dir:
        if needs_image:
            prompts = [ImagePrompt(str(p), [source_image(f"{src_dir}/{i}.png", seed=seed + i, height=policy.height, width=policy.width)]) for i, p in enumerate(prompts)]
        prompts = list(prompts)
        res = CheckResult(family=family or type(original).__name__, pipeline=type(original).__name__, task="", guidance=_hand_guidance(pipe, policy), path="hand adapter")

        def ours_per_prompt(pol: Any) -> torch.Tensor:
            g = torch.Generator().manual_seed(seed)
            return torch.cat([pol.generate([p], generator=g, num_steps=num_steps) for p in prompts])

        def stock(p: Any) -> torch.Tensor:
            p.set_progress_bar_config(disable=True)
            return _stock_hand(p, prompts, steps=num_steps, height=policy.height, width=policy.width, seed=seed, guidance_scale=guidance_scale, stock_kwargs=stock_kwargs)

        # 1. ratio 1 on-policy, every stochastic kernel
        _check_ratios(policy, prompts, res, num_steps=num_steps, kernels=kernels, seed=seed, say=say)
        policy.sampler, policy.rollout_name, policy.rollout_params = "flow", "full", {}

        # 2. ODE sampling vs the stock regular call
        ours = ours_per_prompt(policy)
        theirs = stock(pipe)
        if ours.shape != theirs.shape:
            raise AssertionError(f"flowrl's output {tuple(ours.shape)} and the stock call's {tuple(theirs.shape)} differ in shape")
        res.parity_err = float((ours.float().cpu() - theirs.float().cpu()).abs().max())
        video = ours.ndim == 5
        res.task = ("image-to-video" if video else "image editing") if needs_image else ("text-to-video" if video else "text-to-image")
        say(f"parity {res.parity_err}")

        # 3. timings
        if timings:
            _peak_reset(policy.device)
            t0 = time.perf_counter()
            traj = policy.rollout(prompts, group_size=1, generator=torch.Generator().manual_seed(seed + 2))
            res.rollout_step_s = (time.perf_counter() - t0) / num_steps
            res.rollout_peak_mb = _peak_mb(policy.device)

        # 4. LoRA: flowrl saves, the stock loader loads into a fresh copy, same output
        if lora:
            _add_test_lora(policy, traj, res, seed=seed, timings=timings)
            with tempfile.TemporaryDirectory() as d:
                policy.save_lora(d)
                fresh = copy.deepcopy(original)
                if hasattr(fresh, "load_lora_weights"):
                    fresh.load_lora_weights(d)
                else:
                    fresh.transformer.load_lora_adapter(d, prefix="transformer", weight_name="pytorch_lora_weights.safetensors")
                    res.notes.append(f"{type(fresh).__name__} has no load_lora_weights; loaded with transformer.load_lora_adapter")
                with torch.no_grad():
                    mine = ours_per_prompt(policy)
                    res.lora_err = float((mine.float().cpu() - stock(fresh).float().cpu()).abs().max())
                if float((mine - ours.to(mine.device)).abs().max()) == 0:
                    res.notes.append("the LoRA did not change the output (its targets matched nothing that is used)")
            say(f"lora {res.lora_err}")
    return res
