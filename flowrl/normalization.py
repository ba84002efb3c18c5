"""Group and batch normalisation of reward tables: the group z-score (Flow-GRPO), the weighted
sum of reward columns and GDPO's decoupled normalisation. Pure tensor math, shared by the reward
set (``reward.combine``) and the advantage estimators."""

from __future__ import annotations

import torch
from torch import Tensor


def group_zscore(values: Tensor, group_ids: Tensor, *, eps: float = 1e-4) -> Tensor:
    """``(r - mean_g) / (std_g + eps)`` inside each group, population std (Flow-GRPO's ``np.std``).

    NaN entries are ignored by the statistics and stay NaN. A group with one finite member gets 0.
    """
    out = torch.full_like(values, float("nan"))
    for g in torch.unique(group_ids):
        idx = (group_ids == g).nonzero(as_tuple=True)[0]
        v = values[idx]
        ok = torch.isfinite(v)
        if ok.sum() == 0:
            continue
        mean = v[ok].mean()
        std = v[ok].std(unbiased=False) if ok.sum() > 1 else torch.zeros(())
        z = (v - mean) / (std + eps)
        out[idx] = torch.where(ok, z, torch.full_like(z, float("nan")))
    return out


def weighted_sum(table: Tensor, weights: Tensor) -> Tensor:
    """Flow-GRPO multi-reward: ``r_i = Σ_k w_k · table[i, k]``; NaN in a used column stays NaN.

    Columns with weight 0 are skipped (a NaN there does not poison the sum).
    """
    used = weights != 0
    return (table[:, used] * weights[used]).sum(dim=1)


def gdpo(table: Tensor, weights: Tensor, group_ids: Tensor, *, eps: float = 1e-4) -> Tensor:
    """GDPO (group reward-decoupled normalisation): z-score every column inside its group, take
    the weighted sum, then z-score that sum over the whole batch.

    ``a_i = BN( Σ_k w_k · (r_ik − mean_g(k)) / (std_g(k) + eps) )`` with ``BN(x) = (x − mean) /
    (std + eps)`` over the finite entries of the batch (population std). The result is already an
    advantage-like quantity (zero mean, unit std over the batch).
    """
    z = torch.stack([group_zscore(table[:, k], group_ids, eps=eps) for k in range(table.shape[1])], dim=1)
    s = weighted_sum(z, weights)
    ok = torch.isfinite(s)
    if ok.sum() == 0:
        return s
    std = s[ok].std(unbiased=False) if ok.sum() > 1 else torch.zeros(())
    return (s - s[ok].mean()) / (std + eps)
