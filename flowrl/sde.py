"""Transition kernels of flow-matching samplers: mean, std and log-prob of one step.

Conventions (docs/algorithms.md): σ runs from 1 (noise) to 0 (data), ``x_σ = (1−σ)·x0 + σ·ε``,
``v = ε − x0``, ``dt = σ' − σ < 0``, ``Δ = −dt``, ``x̂0 = x − σ·v``, ``x̂1 = x + (1−σ)·v``,
``score = −x̂1/σ``. A step's log-prob is the full Gaussian log-density of the next sample, computed
in float32 and averaged over all non-batch dims (the Flow-GRPO reduction; ``reduce="sum"`` sums).

Kernels (``KERNELS`` registry, each ``fn(x, v, sigma, sigma_next, noise_level) -> (mean, std)``):

- ``ode``   Euler: μ = x + dt·v, s = 0. No log-prob.
- ``flow``  Flow-GRPO (Liu et al. 2025, eq. 9): σ_t = a·√(σ/(1−σ)),
            μ = x + dt·[v + σ_t²/(2σ)·x̂1], s = σ_t·√Δ.
- ``dance`` DanceGRPO (Xue et al. 2025): the flow drift with σ_t ≡ η, s = η·√Δ.
- ``sage``  SAGE-GRPO manifold-aware SDE: Var = η²·∫_{σ'}^{σ} u/(1−u) du (exact step variance),
            μ = x + dt·v + ½·Var·score, s = √Var.
- ``cps``   coefficients-preserving sampling: s = σ'·sin(aπ/2), μ = (1−σ')·x̂0 + √(σ'² − s²)·x̂1.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from flowrl.registry import Registry

#: σ̃ = min(σ, 1 − SAGE_DELTA) in the SAGE reference variance (the integral diverges at σ = 1).
SAGE_DELTA = 3e-3

KernelFn = Callable[[Tensor, Tensor, Tensor, Tensor, float], "tuple[Tensor, Tensor]"]
KERNELS: Registry[KernelFn] = Registry("transition kernel")


class SDEStep(NamedTuple):
    """One transition: the next sample, its Gaussian mean and std (broadcastable to x), and the
    log-prob of ``prev_sample`` (``[B]`` float32; None for the deterministic ``ode`` kernel)."""

    prev_sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor | None


def _as_batch(sigma: float | Tensor, x: Tensor) -> Tensor:
    """σ as a tensor broadcastable to ``x`` (``[B, 1, 1, ...]``), in x's dtype/device."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.dim() == 0:
        s = s.expand(x.shape[0])
    if s.dim() != 1 or s.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must be a float or a [B] tensor with B={x.shape[0]}; got shape {tuple(s.shape)}")
    return s.view(-1, *([1] * (x.dim() - 1)))


def flow_sigma_t(sigma: Tensor, sigma_next: Tensor, noise_level: float) -> Tensor:
    """Flow-GRPO diffusion coefficient σ_t = a·√(σ/(1−σ)); at σ = 1 the denominator uses the next
    grid value (1 − σ'), as the reference does for the first step."""
    denom = torch.where(sigma >= 1.0, 1.0 - sigma_next, 1.0 - sigma)
    return noise_level * torch.sqrt(sigma / denom)


def _marginal_drift_mean(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, sigma_t: Tensor) -> Tensor:
    """μ = x + dt·[v + σ_t²/(2σ)·x̂1] — the Euler step of the reverse SDE whose marginals match the
    flow ODE (drift v − ½σ_t²·score)."""
    dt = sigma_next - sigma
    x1_hat = x + (1.0 - sigma) * v
    return x + dt * (v + sigma_t**2 / (2.0 * sigma) * x1_hat)


@KERNELS.register("ode")
def ode_kernel(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: float) -> tuple[Tensor, Tensor]:
    """Euler ODE step μ = x + (σ' − σ)·v, s = 0 (identical to ``FlowMatchEulerDiscreteScheduler.step``)."""
    return x + (sigma_next - sigma) * v, torch.zeros_like(sigma)


@KERNELS.register("flow")
def flow_kernel(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: float) -> tuple[Tensor, Tensor]:
    """Flow-GRPO SDE: σ_t = a·√(σ/(1−σ)); μ = x·(1 + σ_t²·dt/(2σ)) + v·(1 + σ_t²(1−σ)/(2σ))·dt;
    s = σ_t·√Δ. a = 0 is the Euler step bit for bit."""
    if noise_level == 0:
        return ode_kernel(x, v, sigma, sigma_next, 0.0)
    sigma_t = flow_sigma_t(sigma, sigma_next, noise_level)
    return _marginal_drift_mean(x, v, sigma, sigma_next, sigma_t), sigma_t * torch.sqrt(sigma - sigma_next)


@KERNELS.register("dance")
def dance_kernel(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: float) -> tuple[Tensor, Tensor]:
    """DanceGRPO SDE: the flow drift with a constant σ_t ≡ η (``noise_level``): μ = x + v·dt −
    ½η²·score·dt, s = η·√Δ."""
    if noise_level == 0:
        return ode_kernel(x, v, sigma, sigma_next, 0.0)
    eta = torch.full_like(sigma, float(noise_level))
    return _marginal_drift_mean(x, v, sigma, sigma_next, eta), eta * torch.sqrt(sigma - sigma_next)


def sage_variance(sigma: Tensor, sigma_next: Tensor, eta: float, *, delta: float = SAGE_DELTA) -> Tensor:
    """Exact step variance of the flow kernel's diffusion, η²·∫_{σ'}^{σ} u/(1−u) du.

    Reference (SAGE-GRPO): Var = η²·[−(σ − σ') + log((1 − σ')/(1 − σ̃))], σ̃ = min(σ, 1 − δ).
    That expression is ≤ 0 (NaN std in the reference) when σ' is within ~δ of 1; there we fall back to
    the integrand capped at its value at 1 − δ: η²·(σ − σ')·(1 − δ)/δ, which is positive and finite.
    """
    sigma_c = torch.clamp(sigma, max=1.0 - delta)
    ref = eta**2 * (-(sigma - sigma_next) + torch.log((1.0 - sigma_next) / (1.0 - sigma_c)))
    fallback = eta**2 * (sigma - sigma_next) * (1.0 - delta) / delta
    ok = torch.isfinite(ref) & (ref > 0)
    return torch.where(ok, ref, fallback)


@KERNELS.register("sage")
def sage_kernel(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: float) -> tuple[Tensor, Tensor]:
    """SAGE-GRPO manifold-aware SDE: μ = x + dt·v + ½·Var·score, s = √Var, Var from
    :func:`sage_variance` with η = ``noise_level``."""
    if noise_level == 0:
        return ode_kernel(x, v, sigma, sigma_next, 0.0)
    var = sage_variance(sigma, sigma_next, noise_level)
    score = -(x + (1.0 - sigma) * v) / sigma
    return x + (sigma_next - sigma) * v + 0.5 * var * score, torch.sqrt(var)


@KERNELS.register("cps")
def cps_kernel(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: float) -> tuple[Tensor, Tensor]:
    """Coefficients-preserving sampling: s = σ'·sin(aπ/2), μ = (1−σ')·x̂0 + √(σ'² − s²)·x̂1.

    The reference's log-prob drops the constants and the 1/(2s²) factor (it is −(x'−μ)² only); here
    the log-prob is the proper Gaussian density, so its clip ranges are not comparable one-to-one.
    CPS does not converge to the data marginal as the number of steps grows.
    """
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    x0_hat = x - sigma * v
    x1_hat = x + (1.0 - sigma) * v
    mean = (1.0 - sigma_next) * x0_hat + torch.sqrt(torch.clamp(sigma_next**2 - std**2, min=0.0)) * x1_hat
    return mean, std


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor, *, reduce: str = "mean") -> Tensor:
    """log N(sample; mean, std²) in float32, reduced over non-batch dims → ``[B]``.

    ``reduce="mean"`` is the Flow-GRPO convention (clip ranges like 1e-4 assume it); ``"sum"`` is
    the joint density of the step.
    """
    sample, mean, std = sample.float(), mean.float(), std.float()
    std = std.expand_as(sample) if std.dim() == sample.dim() else std
    lp = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    dims = tuple(range(1, lp.dim()))
    if reduce == "mean":
        return lp.mean(dim=dims)
    if reduce == "sum":
        return lp.sum(dim=dims)
    raise ValueError(f"unknown log-prob reduction '{reduce}'. Known: mean, sum.")


def sde_step(
    x: Tensor,
    velocity: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    *,
    kind: str = "flow",
    noise_level: float = 0.7,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduce: str = "mean",
    validate: bool = True,
) -> SDEStep:
    """One transition x_σ → x_σ' with kernel ``kind`` (see module docstring).

    Args:
        x: current sample ``[B, ...]``; velocity: v predicted at (x, σ), same shape.
        sigma, sigma_next: floats or ``[B]`` tensors, σ' < σ.
        noise: standard normal noise to inject (drawn from ``generator`` if None).
        prev_sample: evaluate the log-prob at this next sample instead of sampling one.
        reduce: log-prob reduction over non-batch dims, ``"mean"`` (default) or ``"sum"``.
        validate: check σ' < σ and a positive std here (each check reads the tensors back to the
            host, a synchronisation on a GPU). Loops check their whole grid once with
            :func:`check_steps` and pass False; a zero std then always samples (the mean).

    Returns:
        :class:`SDEStep` ``(prev_sample, mean, std, log_prob)``; ``std`` is ``[B, 1, ...]``.
        ``log_prob`` is None for ``ode``.
    """
    kernel = KERNELS.get(kind)
    if velocity.shape != x.shape:
        raise ValueError(f"velocity shape {tuple(velocity.shape)} must equal x shape {tuple(x.shape)}")
    s = _as_batch(sigma, x)
    s_next = _as_batch(sigma_next, x)
    if validate and torch.any(s_next >= s):
        raise ValueError("sigma_next must be smaller than sigma (σ runs from 1 to 0).")
    mean, std = kernel(x, velocity, s, s_next, float(noise_level))
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    if std.dim() == 0:
        std = std.expand(x.shape[0]).reshape(-1, *([1] * (x.dim() - 1)))
    if not validate and kind != "ode":
        if prev_sample is None:
            if noise is None:
                gen_device = generator.device if generator is not None else x.device
                noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
            prev_sample = mean + std * noise
        return SDEStep(prev_sample, mean, std, gaussian_log_prob(prev_sample, mean, std, reduce=reduce))
    if kind == "ode":
        if prev_sample is not None:
            raise ValueError(
                "the 'ode' kernel is deterministic and has no log-prob; use a stochastic kind "
                "(flow, dance, sage, cps) for steps you train on."
            )
        return SDEStep(mean, mean, std, None)
    if prev_sample is None and not torch.any(std > 0):
        # zero noise (a = 0 or σ' = 0 for cps): the deterministic Euler/mean step, no density
        return SDEStep(mean, mean, std, None)
    if prev_sample is None:
        if noise is None:
            from flowrl.seeding import randn

            noise = randn(x.shape, generator, dtype=x.dtype).to(x.device) if generator is not None else torch.randn(x.shape, device=x.device, dtype=x.dtype)
        prev_sample = mean + std * noise
    if torch.any(std <= 0):
        raise ValueError(
            f"the '{kind}' kernel has zero std at this step (σ'={float(s_next.min()):.4g}); its log-prob is "
            "undefined. Exclude that step from training (timestep_fraction) or use another kernel."
        )
    log_prob = gaussian_log_prob(prev_sample, mean, std, reduce=reduce)
    return SDEStep(prev_sample, mean, std, log_prob)


def check_steps(kind: str, sigmas: Tensor, sigmas_next: Tensor, noise_level: float, *, stochastic: bool = True) -> None:
    """Raise what :func:`sde_step` would raise for these steps (σ' ≥ σ; a zero std on a step
    whose log-prob is needed), once for a whole grid, on the host: a denoising loop then calls
    ``sde_step(..., validate=False)`` without reading tensors back at every step."""
    s = torch.as_tensor(sigmas, dtype=torch.float32).reshape(-1).cpu()
    s_next = torch.as_tensor(sigmas_next, dtype=torch.float32).reshape(-1).cpu()
    if torch.any(s_next >= s):
        raise ValueError("sigma_next must be smaller than sigma (σ runs from 1 to 0).")
    if kind == "ode" or not stochastic:
        return
    zeros = torch.zeros(len(s), 1)
    _, std = KERNELS.get(kind)(zeros, zeros, s.view(-1, 1), s_next.view(-1, 1), float(noise_level))
    std = torch.as_tensor(std, dtype=torch.float32)
    if torch.any(std <= 0):
        bad = s_next.expand(len(s))[torch.as_tensor(std).reshape(-1).expand(len(s)) <= 0]
        raise ValueError(
            f"the '{kind}' kernel has zero std at this step (σ'={float(bad.min()):.4g}); its log-prob is "
            "undefined. Exclude that step from training (timestep_fraction) or use another kernel."
        )


def dpm2_step(x: Tensor, x0_pred: Tensor, sigma: Tensor, sigma_next: Tensor, prev_x0_pred: Tensor | None = None, sigma_prev: Tensor | None = None) -> Tensor:
    """One DPM-Solver++(2M) step on the flow path (α = 1 − σ, λ = log(α/σ)), data prediction.

    First order (DDIM): x' = (σ'/σ)·x + (α' − σ'·α/σ)·D with D = x̂0; at σ = 1 this is σ'·x + α'·x̂0
    (= the Euler step), at σ' = 0 it returns x̂0. Second order (Lu et al. 2022, DPM-Solver++ Alg. 2):
    D = (1 + 1/(2r))·x̂0 − 1/(2r)·x̂0_prev, r = h_prev/h, used when a previous prediction exists,
    σ_prev < 1 and σ' > 0 (first order at both ends, as diffusers' ``lower_order_final``).
    Used by DiffusionNFT's x0_only rollouts and by MixGRPO-Flash after the SDE window."""
    alpha, alpha_next = 1.0 - sigma, 1.0 - sigma_next
    d = x0_pred
    if prev_x0_pred is not None and sigma_prev is not None and bool(torch.all(sigma_prev < 1)) and bool(torch.all(sigma_next > 0)) and bool(torch.all(sigma < 1)):
        lam = lambda s: torch.log((1.0 - s) / s)
        h = lam(sigma_next) - lam(sigma)
        h_prev = lam(sigma) - lam(sigma_prev)
        r = h_prev / h
        d = (1 + 1 / (2 * r)) * x0_pred - (1 / (2 * r)) * prev_x0_pred
    return (sigma_next / sigma) * x + (alpha_next - sigma_next * alpha / sigma) * d


def mean_velocity_gain(kind: str, sigma: Tensor, sigma_next: Tensor, noise_level: float) -> Tensor:
    """∂μ/∂v of a kernel (a scalar per step): flow/dance dt·(1 + σ_t²(1−σ)/(2σ)); sage
    dt − ½·Var·(1−σ)/σ; ode dt. Used by gradient-reweighting rules (GRPO-Guard, SAGE equalizer)."""
    dt = sigma_next - sigma
    if kind == "ode" or noise_level == 0:
        return dt
    if kind == "flow":
        st = flow_sigma_t(sigma, sigma_next, noise_level)
        return dt * (1 + st**2 * (1 - sigma) / (2 * sigma))
    if kind == "dance":
        return dt * (1 + noise_level**2 * (1 - sigma) / (2 * sigma))
    if kind == "sage":
        return dt - 0.5 * sage_variance(sigma, sigma_next, noise_level) * (1 - sigma) / sigma
    if kind == "cps":
        std = sigma_next * math.sin(noise_level * math.pi / 2)
        return -(1 - sigma_next) * sigma + torch.sqrt(torch.clamp(sigma_next**2 - std**2, min=0)) * (1 - sigma)
    raise ValueError(f"unknown kernel '{kind}'. Known: {', '.join(KERNELS.names())}")
