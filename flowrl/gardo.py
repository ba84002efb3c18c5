"""GARDO (He et al. 2025, "GARDO: Reinforcing Diffusion Models without Reward Hacking"): gated and
adaptive regularisation on top of Flow-GRPO.

- **Gate.** The KL term acts only on the samples whose proxy reward is least trustworthy: the
  uncertainty of sample i is u_i = ρ_main(i) − mean_k ρ_aux,k(i), ρ the rank of the sample's reward
  in the batch (normalised to [0, 1], higher = better) under the main (optimised) reward and under
  auxiliary rewards; the samples with u > 0 above the (1 − f) quantile of the positive u (a fraction
  f of them) are gated. The KL is averaged over the gated samples only
  (``KL_TERMS["gated_gaussian_reference"]``).
- **Adaptive reference.** The reference is a copy of the policy, refreshed when an update's KL
  exceeded a threshold or when ``reset_every`` iterations passed since the last refresh
  (:class:`GARDOObjective`, a :class:`~flowrl.reference.MovingReferenceObjective`).

The paper's third part, diversity-aware advantage shaping (amplifying high-reward samples that are
far from the group in a DINO feature space), needs an image-feature model and is not included.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flowrl.errors import ConfigError
from flowrl.losses import KL_TERMS, LossInputs, gaussian_kl_reference_form
from flowrl.plugins import OBJECTIVES
from flowrl.reference import MovingReferenceObjective, check_unsharded


def normalised_ranks(x: Tensor) -> Tensor:
    """ρ_i = (#{j: x_j < x_i} + ½·#{j ≠ i: x_j = x_i}) / (N − 1) ∈ [0, 1] (ties share the mean rank;
    independent of the row order). N = 1 gives ½."""
    x = x.float().flatten()
    n = len(x)
    if n == 1:
        return torch.full_like(x, 0.5)
    less = (x[None, :] < x[:, None]).sum(1).float()
    equal = (x[None, :] == x[:, None]).sum(1).float() - 1
    return (less + 0.5 * equal) / (n - 1)


def rank_uncertainty(main: Tensor, aux: Tensor) -> Tensor:
    """u = ρ(main) − mean_k ρ(aux[:, k]) ``[B]``: positive where the optimised reward ranks a sample
    higher than the auxiliary rewards do (a suspected hack). ``main`` ``[B]``, ``aux`` ``[B, K]``."""
    if aux.dim() != 2 or aux.shape[1] == 0:
        raise ValueError("rank_uncertainty needs at least one auxiliary reward column.")
    return normalised_ranks(main) - torch.stack([normalised_ranks(aux[:, k]) for k in range(aux.shape[1])], 1).mean(1)


def uncertainty_gate(u: Tensor, fraction: float) -> Tensor:
    """Gated samples ``[B]`` bool: u > q, q the (1 − fraction) quantile of the non-negative u (the
    reference code's ``percentile(u[u ≥ 0], 100 − 100·fraction)``). No non-negative u: none."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"GARDO's gate fraction must be in (0, 1], got {fraction}.")
    pos = u[u >= 0]
    if len(pos) == 0:
        return torch.zeros_like(u, dtype=torch.bool)
    q = torch.quantile(pos.double(), 1.0 - fraction).to(u.dtype)
    return u > q


@KL_TERMS.register("gated_gaussian_reference")
def gated_gaussian_reference_kl(inputs: LossInputs) -> Tensor:
    """Flow-GRPO's reference-form KL on the gated samples only, scaled so the token-mean aggregation
    gives the mean over gated entries: kl·g·Σm/Σ(m·g) with g = ``traj.meta["kl_gate"]`` (all zero
    when no sample is gated; every sample when there is no gate)."""
    kl = gaussian_kl_reference_form(inputs)
    gate = None if inputs.traj is None else inputs.traj.meta.get("kl_gate")
    if gate is None:
        return kl
    g = gate.to(kl.device).float()[:, None].expand_as(kl)
    m = inputs.mask.float()
    gated = (m * g).sum()
    if float(gated) == 0:
        return kl * 0.0
    return kl * g * (m.sum() / gated)


class GARDOObjective(MovingReferenceObjective):
    """``OBJECTIVES["gardo"]``: the preset's policy-gradient objective with GARDO's gate and
    adaptive reference.

    Args:
        main_reward: the reward column optimised (default: the first); the other columns are the
            auxiliary rewards of the uncertainty (at least one is needed).
        gate_fraction: f, the share of the samples with u ≥ 0 that are gated (0.1; *inferred* —
            the reference adapts it during training).
        kl_threshold: refresh the reference after an iteration in which a chunk's KL exceeded it
            (the reference code's ``kl_thres`` 3e-4, "set per task").
        reset_every: refresh at the latest every this many iterations (15).

    Metrics add ``gardo/gated`` (share of gated samples) and ``ref/refreshes``."""

    def __init__(self, *, inner: str = "policy_gradient", inner_params: dict[str, Any] | None = None, main_reward: str | None = None,
                 gate_fraction: float = 0.1, kl_threshold: float = 3e-4, reset_every: int = 15, **_: Any):
        super().__init__(inner=inner, inner_params=inner_params, mode="periodic", every=1)
        uncertainty_gate(torch.zeros(1), gate_fraction)  # validates
        if reset_every < 1:
            raise ConfigError(f"loss.objective_options.reset_every must be ≥ 1 (iterations), got {reset_every}.")
        self.main_reward, self.gate_fraction = main_reward, float(gate_fraction)
        self.kl_threshold, self.reset_every = float(kl_threshold), int(reset_every)
        self.last_refresh, self.exceeded, self.gated_share = 0, False, 0.0

    def before_advantages(self, trainer: Any, traj: Any) -> None:
        """Gate this process's samples from every process's reward table (ranks are over the whole batch)."""
        check_unsharded(trainer)
        names = list(traj.reward_names)
        if traj.rewards is None or len(names) < 2:
            raise ConfigError(
                "algorithm gardo gates the KL by the disagreement between the optimised reward and auxiliary rewards: "
                "give at least two rewards in reward.rewards (the main one first, or name it in loss.objective_options.main_reward)."
            )
        main = names.index(self.main_reward) if self.main_reward is not None else 0
        if self.main_reward is not None and self.main_reward not in names:
            raise ConfigError(f"loss.objective_options.main_reward '{self.main_reward}' is not a reward column; columns: {', '.join(names)}.")
        table = traj.rewards.float().cpu()
        sizes = trainer.dist.gather_uneven(torch.tensor([len(table)]))
        offset = int(sizes[: trainer.accelerator.process_index].sum())
        full = trainer.dist.gather_uneven(table)
        aux = torch.cat([full[:, :main], full[:, main + 1 :]], 1)
        gate = uncertainty_gate(rank_uncertainty(full[:, main], aux), self.gate_fraction)
        self.gated_share = float(gate.float().mean())
        traj.meta["kl_gate"] = gate[offset : offset + len(table)].float()
        self.inner_hook("before_advantages", trainer, traj)

    def observe(self, result: tuple[Tensor, dict[str, float]]) -> tuple[Tensor, dict[str, float]]:
        if result[1].get("kl/ref", 0.0) > self.kl_threshold:
            self.exceeded = True
        return result

    def on_update(self, trainer: Any) -> None:  # the reference moves per iteration, not per step
        self.updates += 1
        self.params(trainer.policy)
        self.inner_hook("on_update", trainer)

    def on_iteration_end(self, trainer: Any, it: int) -> dict[str, float]:
        out = dict(self.inner_hook("on_iteration_end", trainer, it) or {})
        refresh = trainer.dist.any_process(self.exceeded) or it - self.last_refresh >= self.reset_every
        if refresh:
            with torch.no_grad():
                for s, p in zip(self.shadow, self.params(trainer.policy)):
                    s.copy_(p.detach())
            self.refreshes += 1
            self.last_refresh = it
        self.exceeded = False
        out.update({"ref/refreshes": float(self.refreshes), "gardo/gated": self.gated_share})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_refresh": self.last_refresh}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.last_refresh = int(state.get("last_refresh", 0))


if "gardo" not in OBJECTIVES:
    OBJECTIVES.register("gardo", GARDOObjective)
