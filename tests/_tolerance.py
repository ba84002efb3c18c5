"""Tolerances derived from float32 rounding bounds, for comparisons of the same quantity computed in
two ways that may reorder float sums (another batch shape, another thread count, a batched call).

ε = 2⁻²³ ≈ 1.19e-7 is float32's machine epsilon (one ulp at 1). Summing n terms in another order
changes a float32 result by at most about n·ε·Σ|x_i| (worst case) and typically ε·√n·Σ|x_i| (the
roundings are independent and add like a random walk); for a mean, Σ|x_i| becomes mean|x_i|. The
helpers take the typical form times a number of ulps that covers the measured worst case with
margin (what "bit-identical" claims elsewhere in the suite mean: the same computation, same batch
shapes, on one machine and thread count).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

EPS32 = float(torch.finfo(torch.float32).eps)


def float32_sum_tol(magnitude: float, terms: int, *, ulps: float = 4.0) -> float:
    """|Δ| of a float32 sum (or mean) of ``terms`` values taken in another order: ulps·ε·√terms·
    magnitude, ``magnitude`` the sum of the values' sizes (for a mean: their mean size)."""
    return ulps * EPS32 * math.sqrt(max(int(terms), 1)) * float(magnitude)


def recomputed_log_prob_tol(actions: Tensor, mean: Tensor, std: Tensor, *, ulps: float = 4.0) -> Tensor:
    """Per-row bound ``[B]`` on |Δ log p| between a stored Gaussian step log-prob (mean over the D
    latent dims) and its recomputation, when the model's velocity — and so the step mean μ — is
    recomputed in other batch shapes (other GEMM blocking: its float32 rounding differs by a few
    ulps of the values, accumulated over the network's dot products).

    log p = mean_d[−(a − μ)²/(2s²)] − log s − ½ log 2π, so δ log p ≈ mean_d[(a − μ)·δμ]/s² with
    |δμ_d| ≤ ulps·ε·(|μ_d| + |a_d|) (a few ulps of the values entering μ, ``ulps`` covering the
    network's accumulated rounding; a small step std s amplifies it), plus the reordered mean
    itself (:func:`float32_sum_tol` of the D terms, 4 ulps). Measured on the tiny Wan and
    HunyuanVideo pipelines, 1 and 2 threads, every kernel and 3 seeds: |Δ| ≤ 0.006 of this bound
    (the largest, 9.5e-7, a CPS step; the bound there 1.8e-4). ``std`` 0 (a deterministic step,
    log-prob 0) → 0."""
    a, mu = actions.double().flatten(1), mean.double().flatten(1)
    s = std.double().reshape(std.shape[0], -1)[:, :1].expand_as(a) if std.numel() == std.shape[0] else std.double().expand_as(actions).flatten(1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    shift = (ulps * EPS32 * ((a - mu).abs() * (mu.abs() + a.abs())) / safe**2).mean(1)
    size = (((a - mu) / safe) ** 2 / 2 + safe.log().abs() + 1.0).mean(1)  # mean |term| (≥ ½ log 2π ≈ 0.92)
    reorder = torch.tensor([float32_sum_tol(float(m), a.shape[1], ulps=4.0) for m in size.tolist()])
    return torch.where((s > 0).all(1), shift + reorder, torch.zeros_like(shift)).float()


def assert_recomputed_log_probs(got: Tensor, want: Tensor, actions: Tensor, mean: Tensor, std: Tensor) -> None:
    """``got`` (recomputed) and ``want`` (stored) step log-probs ``[B, T]`` agree within
    :func:`recomputed_log_prob_tol` of every step (``actions`` / ``mean`` ``[B, T, ...]``, ``std``
    ``[B, T, ...]`` or ``[B, T]``)."""
    tol = torch.stack([recomputed_log_prob_tol(actions[:, j], mean[:, j], std[:, j]) for j in range(want.shape[1])], 1)
    diff = (got.detach().float().cpu() - want.float().cpu()).abs()
    assert bool((diff <= tol).all()), f"log-probs apart by {diff.max():.3g} where the float32 bound allows {tol.flatten()[diff.flatten().argmax()]:.3g}"


def token_log_prob_tol(log_probs: Tensor, *, hidden_size: int, vocab_size: int) -> Tensor:
    """Per-token bound on |Δ log p| for a language model's token log-probs recomputed in other batch
    shapes (other rows, other padding): the logits are float32 dot products of ``hidden_size``
    terms and log p = z − logsumexp(z) adds a sum of ``vocab_size`` exponentials, so the values in
    play have size ≈ |log p| + log V; :func:`float32_sum_tol` over the longer of the two sums."""
    size = log_probs.detach().abs().float() + math.log(vocab_size)
    return 4.0 * EPS32 * math.sqrt(max(hidden_size, vocab_size)) * size
