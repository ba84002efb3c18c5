"""Transition kernels against their math (closed forms that need no weights)."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowrl.sde import KERNELS, SAGE_DELTA, gaussian_log_prob, sage_variance, sde_step
from tests._tolerance import EPS32


def shifted_grid(steps: int, shift: float) -> torch.Tensor:
    s = FlowMatchEulerDiscreteScheduler(shift=shift)
    s.set_timesteps(steps)
    return s.sigmas.double()


def exact_velocity_affine(sigma: float, m: float, s: float) -> tuple[float, float]:
    """v(x, σ) = α·x + β for Gaussian data N(m, s²) (spec formula), returned as (α, β)."""
    q = (1 - sigma) ** 2 * s**2 + sigma**2
    # v = (σ/q)(x − (1−σ)m) − [m + ((1−σ)s²/q)(x − (1−σ)m)]
    alpha = sigma / q - (1 - sigma) * s**2 / q
    beta = -alpha * (1 - sigma) * m - m
    return alpha, beta


def propagate(kind: str, steps: int, m: float, s: float, noise_level: float, shift: float = 1.0) -> tuple[float, float]:
    """Exact mean/variance of x after all steps, starting from N(0, 1): every kernel here is affine
    in x with additive Gaussian noise, so moments propagate without sampling error."""
    grid = shifted_grid(steps, shift)
    mean, var = 0.0, 1.0
    for i in range(steps):
        sig, nxt = float(grid[i]), float(grid[i + 1])
        a, b = exact_velocity_affine(sig, m, s)
        x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
        v = a * x + b
        mu, std = KERNELS.get(kind)(x, v, torch.full((2, 1), sig, dtype=torch.float64), torch.full((2, 1), nxt, dtype=torch.float64), noise_level)
        c0, c1 = float(mu[0]), float(mu[1] - mu[0])  # μ = c0 + c1·x
        sd = float(torch.as_tensor(std).flatten()[0])
        mean, var = c0 + c1 * mean, c1**2 * var + sd**2
    return mean, var


@pytest.mark.parametrize("kind,noise", [("ode", 0.0), ("flow", 0.7), ("dance", 0.3), ("sage", 0.5)])
def test_marginal_preserved_as_steps_grow(kind, noise):
    m, s = 1.5, 0.4
    errs = []
    for steps in (20, 100, 1000):
        mean, var = propagate(kind, steps, m, s, noise)
        errs.append(abs(mean - m) / m + abs(var - s**2) / s**2)
    assert errs[2] < 5e-3, errs  # within ~0.5% at 1000 steps
    assert errs[2] < errs[0], errs  # converges: finer grids are closer


def test_flow_with_zero_noise_is_scheduler_euler_step_bit_for_bit():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    expected = sched.step(v, sched.timesteps[1], sched.step(v, sched.timesteps[0], x).prev_sample).prev_sample
    x1 = sde_step(x, v, sched.sigmas[0], sched.sigmas[1], kind="flow", noise_level=0.0).prev_sample
    x2 = sde_step(x1, v, sched.sigmas[1], sched.sigmas[2], kind="flow", noise_level=0.0).prev_sample
    assert torch.equal(x2, expected)


@pytest.mark.parametrize("kind", ["flow", "dance", "sage", "cps"])
def test_log_prob_is_normal_log_density_averaged(kind):
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    sigma, sigma_next = torch.tensor([0.9, 0.5, 1.0]), torch.tensor([0.7, 0.3, 0.8])
    out = sde_step(x, v, sigma, sigma_next, kind=kind, noise_level=0.6, generator=g)
    ref = torch.distributions.Normal(out.mean, out.std.expand_as(out.mean)).log_prob(out.prev_sample).mean(dim=(1, 2))
    torch.testing.assert_close(out.log_prob, ref, rtol=1e-5, atol=1e-5)
    # evaluating at a given sample reproduces it; the sum reduction is the joint density
    again = sde_step(x, v, sigma, sigma_next, kind=kind, noise_level=0.6, prev_sample=out.prev_sample)
    torch.testing.assert_close(again.log_prob, out.log_prob)
    summed = gaussian_log_prob(out.prev_sample, out.mean, out.std, reduce="sum")
    torch.testing.assert_close(summed, out.log_prob * 20, rtol=1e-5, atol=1e-4)


def test_whitened_residuals_are_standard_normal():
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(4, 20000, generator=g), torch.randn(4, 20000, generator=g)
    out = sde_step(x, v, 0.6, 0.5, kind="flow", noise_level=0.7, generator=g)
    z = (out.prev_sample - out.mean) / out.std
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02


def test_dance_is_flow_with_constant_sigma_t():
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    sigma, nxt, eta = 0.8, 0.6, 0.3
    dt = nxt - sigma
    expected = x * (1 + eta**2 * dt / (2 * sigma)) + v * (1 + eta**2 * (1 - sigma) / (2 * sigma)) * dt
    out = sde_step(x, v, sigma, nxt, kind="dance", noise_level=eta, generator=g)
    # the same formula arranged otherwise: a handful of float32 operations on values ≤ 3 (8 ulps)
    torch.testing.assert_close(out.mean, expected, rtol=0, atol=8 * EPS32 * 3)
    assert torch.allclose(out.std, torch.tensor(eta * math.sqrt(sigma - nxt)))


def test_flow_first_step_uses_next_sigma_in_denominator():
    x, v = torch.zeros(1, 3), torch.ones(1, 3)
    out = sde_step(x, v, 1.0, 0.8, kind="flow", noise_level=0.7)
    sigma_t = 0.7 * math.sqrt(1.0 / (1 - 0.8))
    assert math.isclose(float(out.std.flatten()[0]), sigma_t * math.sqrt(0.2), rel_tol=1e-6)


def test_ode_has_no_log_prob_and_says_so():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    assert sde_step(x, v, 0.5, 0.4, kind="ode").log_prob is None
    with pytest.raises(ValueError, match="deterministic"):
        sde_step(x, v, 0.5, 0.4, kind="ode", prev_sample=x)
    with pytest.raises(ValueError, match="Known"):
        sde_step(x, v, 0.5, 0.4, kind="nope")


def test_sage_variance_matches_reference_and_quadrature():
    eta = 0.5
    sig, nxt = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.8, 0.4, 0.0])
    ref = eta**2 * (-(sig - nxt) + torch.log((1 - nxt) / (1 - sig)))
    torch.testing.assert_close(sage_variance(sig, nxt, eta), ref)
    # quadrature of η²·u/(1−u) on [σ', σ] (σ < 1 − δ)
    for a, b in zip(nxt.tolist(), sig.tolist()):
        u = torch.linspace(a, b, 20001, dtype=torch.float64)
        integral = torch.trapezoid(eta**2 * u / (1 - u), u)
        assert math.isclose(float(sage_variance(torch.tensor(b), torch.tensor(a), eta)), float(integral), rel_tol=1e-4)


@pytest.mark.parametrize("steps", [20, 100, 1000])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_sage_variance_positive_and_finite_on_fine_grids(steps, shift):
    grid = shifted_grid(steps, shift).float()
    var = sage_variance(grid[:-1], grid[1:], 0.5)
    assert torch.isfinite(var).all() and (var > 0).all()
    ref = 0.25 * (-(grid[:-1] - grid[1:]) + torch.log((1 - grid[1:]) / (1 - grid[:-1].clamp(max=1 - SAGE_DELTA))))
    ok = ref > 0
    torch.testing.assert_close(var[ok], ref[ok])


def test_sage_euler_overestimates_integral_near_noise():
    grid = shifted_grid(20, 5.0)
    eta = 0.5
    for i, expected in ((1, 1.49), (2, 1.27)):
        sig, nxt = grid[i], grid[i + 1]
        euler = eta**2 * sig / (1 - sig) * (sig - nxt)
        ratio = float(euler / sage_variance(sig, nxt, eta))
        assert abs(ratio - expected) < 0.02, (i, ratio)


def test_sigma_as_float_or_batch_tensor_agree():
    g = torch.Generator().manual_seed(4)
    x, v, z = torch.randn(3, 2, 2, generator=g), torch.randn(3, 2, 2, generator=g), torch.randn(3, 2, 2, generator=g)
    a = sde_step(x, v, 0.7, 0.5, kind="flow", noise=z)
    b = sde_step(x, v, torch.full((3,), 0.7), torch.full((3,), 0.5), kind="flow", noise=z)
    torch.testing.assert_close(a.prev_sample, b.prev_sample)
    torch.testing.assert_close(a.log_prob, b.log_prob)
