"""Co-GRPO: one MDP over masked-token decoding and its schedule (Co-GRPO, 2025; docs/algorithms.md "Co-GRPO").

A masked-token model (aMUSEd's ``UVit2DModel``, or any :class:`MaskedTokenModel`) unmasks a grid of
``L`` tokens in ``N`` steps. At step i a small :class:`SchedulePolicy` φ reads the decoder state
(step, masked fraction, stock ratio, mean entropy of the model's predictions) and draws a Gaussian
action a_i ∈ R⁴ mapped to the step's controls:

- re-mask ratio = sigmoid(logit(cos(π/2·(i+1)/N)) + a₀)  (residual on the stock cosine schedule),
- sampling temperature τ_s = softplus(softplus⁻¹(1) + a₁),
- re-mask temperature τ_r = max(softplus(softplus⁻¹(T_i) + a₂), τ_min), stock T_i = linspace(2, 0, N),
- CFG scale w = 1 + softplus(softplus⁻¹(w₀ − 1) + a₃)  (w₀ the stock scale),

(``residual=False``: the same maps applied to a alone). Then, as aMUSEd's scheduler does: every masked
position samples a token from softmax(logits_w/τ_s); the ``k = M − clamp(⌊L·ratio⌋, 1, M−1)`` masked
positions with the highest confidence log p(token) + τ_r·Gumbel are committed (all at the last step).
That Gumbel top-k is Plackett–Luce sampling without replacement from softmax(log p/τ_r); the ordered
selection has the log-prob Σ_m [s_{π_m} − logsumexp_{j ∉ π_<m} s_j], s = log p/τ_r.

Trajectory log-prob (AdaNAT-style; the paper's exact parameterisation is not public — inferred):
two columns per step, so each gets its own PPO ratio:
column i (token policy θ): Σ_{masked at i} log p_θ(token | x_i, w_i, τ_s,i) + log PL(order | s) — every
masked position's sampled token counts, committed or not: the uncommitted ones decide the commit
order through their confidences, so leaving them out (as a "committed tokens only" column would)
is not the density of what was sampled and biases the score-function gradient;
column N + i (schedule policy φ): log N(a_i; μ_φ(f_i), σ_φ²) summed over the 4 action dims, with the
features f_i recomputed from the current token model's logits when it trains (the entropy feature
depends on θ, so the joint policy's θ-gradient has a term through φ's column too).
Log-probs come from the model's logits at the stored state; the decoding chain is never
back-propagated through (states are stored tokens). One group-normalised terminal advantage drives
both (the ``group`` estimator broadcast to every column).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flowrl.policy import PolicyBase, PolicyEval, Trajectories

NUM_CONTROLS = 4
CONTROL_NAMES = ("remask_ratio", "sample_temperature", "remask_temperature", "cfg_scale")
FEATURES = ("step_fraction", "masked_fraction", "stock_ratio", "mean_entropy")


class MaskedTokenModel(Protocol):
    """What Co-GRPO needs from a masked-token generator (see ``pipelines/amused.py``).

    ``mask_id``, ``vocab_size`` (codebook, without the mask token), ``seq_len`` L;
    ``module`` (the trainable network, or None); ``device``;
    ``encode(prompts, *, cfg) -> dict`` batch-first conditioning;
    ``logits_pair(tokens [B, L], cond) -> (cond_logits [B, L, V], uncond_logits [B, L, V] or None)``;
    ``decode(tokens [B, L]) -> outputs`` (images ``[B, C, H, W]`` in [0, 1], or anything a reward reads).
    """

    mask_id: int
    vocab_size: int
    seq_len: int

    def encode(self, prompts: list[str], *, cfg: bool) -> dict[str, Tensor]: ...

    def logits_pair(self, tokens: Tensor, cond: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]: ...

    def decode(self, tokens: Tensor) -> Any: ...


def _softplus_inv(y: float) -> float:
    y = max(float(y), 1e-4)
    return y + math.log(-math.expm1(-y))


def stock_schedule(i: int, num_steps: int) -> tuple[float, float]:
    """aMUSEd's stock controls at step i of N: masked fraction cos(π/2·(i+1)/N) and re-mask
    temperature linspace(2, 0, N)[i]."""
    ratio = math.cos(math.pi / 2 * (i + 1) / num_steps)
    temp = 2.0 * (1 - i / (num_steps - 1)) if num_steps > 1 else 0.0
    return ratio, temp


class SchedulePolicy(torch.nn.Module):
    """φ: features ``[B, 4]`` → Gaussian action means ``[B, 4]``, learnable state-independent log-std.

    The output layer starts at zero, so with ``residual=True`` the initial mean action reproduces the
    stock schedule exactly; ``init_std`` sets the exploration noise."""

    def __init__(self, *, hidden: int = 32, init_std: float = 0.3, residual: bool = True, min_remask_temperature: float = 0.05):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(len(FEATURES), hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, NUM_CONTROLS))
        torch.nn.init.zeros_(self.net[2].weight)
        torch.nn.init.zeros_(self.net[2].bias)
        self.log_std = torch.nn.Parameter(torch.full((NUM_CONTROLS,), math.log(init_std)))
        self.residual = residual
        self.min_remask_temperature = float(min_remask_temperature)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean [..., 4], std [4])``."""
        return self.net(features.float()), self.log_std.exp()

    def log_prob(self, features: Tensor, actions: Tensor) -> Tensor:
        """log N(a; μ_φ(f), σ²) summed over the 4 action dims, ``[...]``."""
        mean, std = self(features)
        return torch.distributions.Normal(mean, std).log_prob(actions.float()).sum(-1)

    def controls(self, actions: Tensor, i: int, num_steps: int, stock_cfg: float) -> Tensor:
        """Map actions ``[B, 4]`` at step i to controls ``[B, 4]`` (ratio, τ_s, τ_r, w); see module doc."""
        a = actions.float()
        ratio0, temp0 = stock_schedule(i, num_steps)
        if self.residual:
            off = a.new_tensor([math.log(ratio0 / max(1 - ratio0, 1e-6)) if 0 < ratio0 < 1 else (-10.0 if ratio0 <= 0 else 10.0),
                                _softplus_inv(1.0), _softplus_inv(max(temp0, 1e-3)), _softplus_inv(max(stock_cfg - 1.0, 1e-3))])
            a = a + off
        ratio = torch.sigmoid(a[:, 0])
        tau_s = F.softplus(a[:, 1]).clamp(min=1e-3)
        tau_r = F.softplus(a[:, 2]).clamp(min=self.min_remask_temperature)
        cfg = 1.0 + F.softplus(a[:, 3])
        return torch.stack([ratio, tau_s, tau_r, cfg], dim=1)


def plackett_luce_log_prob(scores: Tensor, order: Tensor, k: Tensor, candidates: Tensor) -> Tensor:
    """log-prob of drawing ``order[:, :k]`` (in that order) without replacement from
    softmax(scores) over ``candidates``; ``[B, L]`` scores, ``[B, L]`` permutation with the selected
    positions first, ``[B]`` k, ``[B, L]`` bool candidates → ``[B]``."""
    s = torch.where(candidates, scores, torch.full_like(scores, -1e30))
    s_sorted = torch.gather(s, 1, order)
    suffix_lse = torch.logcumsumexp(s_sorted.flip(-1), dim=-1).flip(-1)
    terms = s_sorted - suffix_lse
    take = torch.arange(s.shape[1], device=s.device)[None, :] < k[:, None]
    return torch.where(take, terms, torch.zeros_like(terms)).sum(-1)


def step_features(tokens: Tensor, cond_logits: Tensor, mask_id: int, i: int, num_steps: int) -> Tensor:
    """``[B, 4]``: step fraction i/N, masked fraction, stock masked ratio, mean entropy of the
    conditional prediction over masked positions divided by log V."""
    unknown = tokens == mask_id
    logp = torch.log_softmax(cond_logits.float(), -1)
    ent = -(logp.exp() * logp).sum(-1) / math.log(cond_logits.shape[-1])
    ent = (ent * unknown).sum(1) / unknown.sum(1).clamp(min=1)
    b = tokens.shape[0]
    ratio0, _ = stock_schedule(i, num_steps)
    return torch.stack([torch.full((b,), i / num_steps, device=tokens.device), unknown.float().mean(1),
                        torch.full((b,), ratio0, device=tokens.device), ent], dim=1)


def token_step_log_prob(logits_c: Tensor, logits_u: Tensor | None, controls: Tensor, tokens: Tensor, sampled: Tensor, order: Tensor, k: Tensor, mask_id: int, last: bool) -> tuple[Tensor, Tensor]:
    """Column i of the token policy, the log-density of what step i sampled: Σ over every masked
    position of log p(sampled token) (committed or not — the uncommitted tokens set the confidences
    that decide the order) + log PL(order) (not at the last step, where every masked position
    commits); and the per-position log-probs ``[B, L, V]``. ``[B]``."""
    logits = logits_c.float()
    if logits_u is not None:
        w = controls[:, 3].view(-1, 1, 1)
        logits = logits_u.float() + w * (logits - logits_u.float())
    logp = torch.log_softmax(logits / controls[:, 1].view(-1, 1, 1), -1)
    unknown = tokens == mask_id
    tok_lp = torch.gather(logp, 2, sampled.clamp(max=logp.shape[-1] - 1)[..., None])[..., 0]  # [B, L]
    total = (tok_lp * unknown).sum(1)
    if not last:
        total = total + plackett_luce_log_prob(tok_lp / controls[:, 2:3], order, k, unknown)
    return total, logp


class CoGRPOModules(torch.nn.Module):
    """The trainable parts: the token model ``transformer`` (LoRA or full) and the ``schedule`` φ.
    LoRA calls are forwarded to the transformer, so the trainer's LoRA setup and the reference
    (adapters disabled) work unchanged; φ is always trained in full."""

    def __init__(self, transformer: torch.nn.Module | None, schedule: SchedulePolicy):
        super().__init__()
        self.transformer = transformer
        self.schedule = schedule

    def add_adapter(self, config: Any, adapter_name: str = "default") -> None:
        if self.transformer is None:
            raise ValueError("this Co-GRPO policy has no token model to put LoRA on; use train.lora_rank 0.")
        self.transformer.add_adapter(config, adapter_name=adapter_name)

    @property
    def peft_config(self) -> Any:
        return getattr(self.transformer, "peft_config", None)

    def disable_adapters(self) -> None:
        self.transformer.disable_adapters()

    def enable_adapters(self) -> None:
        self.transformer.enable_adapters()


class CoGRPOPolicy(PolicyBase):
    """The Co-GRPO policy over a :class:`MaskedTokenModel`: a token policy θ plus a schedule policy φ.

    Trajectory layout (``N`` steps, ``L`` tokens): ``log_probs [B, 2N]`` (columns 0..N−1 token
    policy, N..2N−1 schedule policy), ``states [B, N, L]`` tokens before each step,
    ``actions [B, N, 4]`` schedule actions, ``meta``: ``sampled [B, N, L]`` (tokens drawn at every
    position), ``order [B, N, L]`` (committed positions first, by Gumbel score), ``k [B, N]``,
    ``controls [B, N, 4]``, ``features [B, N, 4]``, ``tokens`` (final ``[B, L]``).

    Args:
        model: the masked-token model adapter. num_steps: decoding steps N (aMUSEd: 12).
        guidance_scale: the stock CFG scale w₀ (aMUSEd: 10; ≤ 1 = no CFG and the action is ignored).
        schedule: a :class:`SchedulePolicy` (default: residual on the stock schedule, σ 0.3).
        train_tokens / train_schedule: which columns are trained (schedule-only learning: False/True).
    """

    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    #: the trained modules are called piecewise (token model, schedule), never through ``model``'s
    #: forward, so the trainer all-reduces gradients itself instead of wrapping ``model`` in DDP
    forward_calls_model = False

    def __init__(self, model: Any, *, num_steps: int = 12, guidance_scale: float = 10.0, schedule: SchedulePolicy | None = None,
                 train_tokens: bool = True, train_schedule: bool = True, steps_per_backward: int | None = None):
        if num_steps < 1:
            raise ValueError(f"num_steps must be ≥ 1, got {num_steps}")
        self.tm = model
        self.num_steps = int(num_steps)
        self.guidance_scale = float(guidance_scale)
        self.train_tokens, self.train_schedule = train_tokens, train_schedule
        self.steps_per_backward = steps_per_backward
        self.modules = CoGRPOModules(getattr(model, "module", None), schedule or SchedulePolicy())
        self.iteration = 0
        self._reference_model = None

    @property
    def model(self) -> torch.nn.Module:  # type: ignore[override]
        return self.modules

    @model.setter
    def model(self, module: torch.nn.Module) -> None:
        self.modules = module

    @property
    def device(self) -> torch.device:
        return getattr(self.tm, "device", torch.device("cpu"))

    @property
    def schedule(self) -> SchedulePolicy:
        return self.modules.schedule

    def always_trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.schedule.parameters())

    @property
    def use_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def _logits(self, tokens: Tensor, cond: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        c, u = self.tm.logits_pair(tokens.to(self.device), cond)
        return c, (u if self.use_cfg else None)

    # --------------------------------------------------------------------------------- decode
    def _decode(self, prompts: list[str], cond: dict[str, Tensor], generator: torch.Generator | None, *, deterministic_schedule: bool = False) -> dict[str, Tensor]:
        b, L, N = len(prompts), self.tm.seq_len, self.num_steps
        dev = self.device
        from flowrl.seeding import rand, randn

        x = torch.full((b, L), self.tm.mask_id, dtype=torch.long, device=dev)
        rec = {k: [] for k in ("states", "actions", "sampled", "order", "k", "controls", "features", "lp_tok", "lp_sched")}
        for i in range(N):
            last = i == N - 1
            logits_c, logits_u = self._logits(x, cond)
            feats = step_features(x, logits_c, self.tm.mask_id, i, N)
            mean, std = self.schedule(feats)
            noise = randn(mean.shape, generator, device=dev)
            a = mean if deterministic_schedule else mean + std * noise
            ctrl = self.schedule.controls(a, i, N, self.guidance_scale)
            logits = logits_c.float() if logits_u is None else logits_u.float() + ctrl[:, 3].view(-1, 1, 1) * (logits_c.float() - logits_u.float())
            logp = torch.log_softmax(logits / ctrl[:, 1].view(-1, 1, 1), -1)
            u = rand(logp.shape[:2] + (1,), generator, device=dev)
            sampled = torch.searchsorted(logp.exp().cumsum(-1).contiguous(), u.contiguous())[..., 0].clamp(max=logp.shape[-1] - 1)
            unknown = x == self.tm.mask_id
            m = unknown.sum(1)
            if last:
                k = m.clone()
            else:
                mask_len = torch.floor(L * ctrl[:, 0]).long()
                mask_len = torch.minimum(torch.maximum(mask_len, torch.ones_like(mask_len)), (m - 1).clamp(min=0))
                k = (m - mask_len).clamp(min=0)
            conf = torch.gather(logp, 2, sampled[..., None])[..., 0]
            gumbel = -torch.log(-torch.log(rand(conf.shape, generator, device=dev).clamp(1e-20, 1.0 - 1e-7)))
            score = torch.where(unknown, conf / ctrl[:, 2:3] + gumbel, torch.full_like(conf, -float("inf")))
            order = torch.argsort(score, dim=1, descending=True, stable=True)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(L, device=dev).expand_as(order))
            commit = unknown & ((rank < k[:, None]) | last)
            rec["states"].append(x.clone())
            rec["actions"].append(a)
            rec["sampled"].append(sampled)
            rec["order"].append(order)
            rec["k"].append(k)
            rec["controls"].append(ctrl)
            rec["features"].append(feats)
            x = torch.where(commit, sampled, x)
        return {k: torch.stack(v, 1) for k, v in rec.items() if v} | {"tokens": x}

    def rollout(self, prompts: Sequence[str], *, group_size: int, generator: torch.Generator | None = None) -> Trajectories:
        """Decode ``group_size`` samples per prompt with sampled schedule actions; log-probs are
        computed by :meth:`evaluate` on the stored steps (so recomputation equals rollout)."""
        if group_size < 1:
            raise ValueError(f"group_size must be ≥ 1, got {group_size}")
        prompts_rep = [p for p in prompts for _ in range(group_size)]
        with torch.no_grad():
            cond_u = self.tm.encode(list(prompts), cfg=self.use_cfg)
            cond = {k: v.repeat_interleave(group_size, dim=0) for k, v in cond_u.items()}
            rec = self._decode(prompts_rep, cond, generator)
            outputs = self.tm.decode(rec["tokens"])
            b, N = len(prompts_rep), self.num_steps
            traj = Trajectories(
                prompts=prompts_rep, group_ids=torch.arange(len(prompts)).repeat_interleave(group_size),
                log_probs=torch.zeros(b, 2 * N), mask=self._column_mask(b), states=rec["states"].cpu(), actions=rec["actions"].float().cpu(),
                outputs=outputs.float().cpu() if isinstance(outputs, Tensor) else outputs,
                cond={k: v.detach() for k, v in cond.items()},
                meta={"sampled": rec["sampled"].cpu(), "order": rec["order"].cpu(), "k": rec["k"].cpu(), "controls": rec["controls"].float().cpu(),
                      "features": rec["features"].float().cpu(), "tokens": rec["tokens"].cpu(),
                      "model_evals": float(N * (2 if self.use_cfg else 1))},
            )
            traj.log_probs = self.evaluate(traj).log_prob.cpu()
        return traj

    def _column_mask(self, b: int) -> Tensor:
        n = self.num_steps
        cols = torch.tensor([self.train_tokens] * n + [self.train_schedule] * n)
        return cols.expand(b, 2 * n).clone()

    def evaluate(self, traj: Trajectories, steps: Tensor | None = None) -> PolicyEval:
        """Log-probs ``[B, T']`` of the requested columns (token columns < N, schedule columns ≥ N)."""
        n = self.num_steps
        steps = torch.arange(2 * n) if steps is None else steps
        dev = self.device
        out = []
        meta = traj.meta
        cond = {k: v.to(dev) for k, v in traj.cond.items()}
        logits: dict[int, tuple[Tensor, Tensor | None]] = {}  # step → the model's logits, once per call

        def logits_at(i: int) -> tuple[Tensor, Tensor | None]:
            if i not in logits:
                logits[i] = self._logits(traj.states[:, i].to(dev), cond)
            return logits[i]

        recompute = self.features_follow_theta
        for j in steps.tolist():
            if j >= n:
                i = j - n
                # φ reads the entropy of θ's logits: recomputed so that the schedule column's
                # θ-gradient is the joint policy's (the stored feature holds θ_old's value)
                feats = step_features(traj.states[:, i].to(dev), logits_at(i)[0], self.tm.mask_id, i, n) if recompute else meta["features"][:, i].to(dev)
                out.append(self.schedule.log_prob(feats, traj.actions[:, i].to(dev)))
                continue
            tokens = traj.states[:, j].to(dev)
            logits_c, logits_u = logits_at(j)
            lp, _ = token_step_log_prob(logits_c, logits_u, meta["controls"][:, j].to(dev), tokens, meta["sampled"][:, j].to(dev),
                                        meta["order"][:, j].to(dev), meta["k"][:, j].to(dev), self.tm.mask_id, last=j == n - 1)
            out.append(lp)
        return PolicyEval(log_prob=torch.stack(out, 1).float())

    @property
    def features_follow_theta(self) -> bool:
        """Whether :meth:`evaluate` recomputes the schedule's features from the current token model
        (any of its parameters trains); a frozen token model's features equal the stored ones, so
        the schedule columns then skip the model call."""
        module = self.modules.transformer
        return module is not None and any(p.requires_grad for p in module.parameters())

    def reference(self):
        if self.modules.transformer is None:
            return contextlib.nullcontext()
        return super().reference()

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, generator: torch.Generator | None = None, **_: Any) -> Any:
        """Evaluation samples: the schedule's mean actions, stochastic tokens from ``generator``."""
        cond = self.tm.encode(list(prompts), cfg=self.use_cfg)
        rec = self._decode(list(prompts), cond, generator, deterministic_schedule=True)
        out = self.tm.decode(rec["tokens"])
        return out.float().cpu() if isinstance(out, Tensor) else out

    def save_lora(self, directory: Any) -> None:
        """Save the token model's LoRA (peft state dict) and the schedule policy's weights."""
        from pathlib import Path

        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.modules.transformer is not None and self.modules.peft_config:
            from peft.utils import get_peft_model_state_dict

            state = get_peft_model_state_dict(self.modules.transformer)
            save_file({f"transformer.{k}": v.detach().cpu().contiguous() for k, v in state.items()}, str(d / "pytorch_lora_weights.safetensors"))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.schedule.state_dict().items()}, str(d / "schedule_policy.safetensors"))
