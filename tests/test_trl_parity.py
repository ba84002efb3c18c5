"""Parity of the language-model loss with TRL's ``GRPOTrainer`` on identical inputs.

A config written with TRL ``GRPOConfig`` field names goes through ``TrainConfig.from_dict`` →
``resolved()``; flowrl's advantage estimator and ``policy_loss`` then run on fixed log-probs. TRL's own
``GRPOTrainer._compute_loss`` runs on the same numbers, with the model call stubbed to return those
log-probs (``_get_per_token_logps_and_entropies``) and the trainer's attributes set from the same
``GRPOConfig`` the way ``GRPOTrainer.__init__`` sets them. Loss values and gradients with respect to the
current log-probs must agree, over loss types, importance-sampling levels, β (with and without TRL's
ratio-weighted KL), ε_high and reward scaling.

TRL's advantage lines (group mean, ``nanstd``, ``/(std + 1e-4)``) live inside its rollout method, which
needs a model and a generation backend; the test restates them with TRL's own ``nanstd``.
"""

import itertools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

torch.set_num_threads(1)

trl = pytest.importorskip("trl")
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

from flowrl.advantages import AdvantageInputs, make_estimator  # noqa: E402
from flowrl.config import TrainConfig  # noqa: E402
from flowrl.losses import LossInputs, policy_loss  # noqa: E402
from flowrl.policy import PolicyEval  # noqa: E402
from tests._tolerance import EPS32, float32_sum_tol  # noqa: E402

G, PROMPTS, T, L_MAX = 4, 3, 5, 8  # completions narrower than max_completion_length (Dr.GRPO's normaliser)


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    B = G * PROMPTS
    rewards = torch.randint(0, 3, (B,), generator=g).float()
    rewards[:G] = torch.tensor([0.0, 1.0, 1.0, 2.0])  # at least one group with a spread
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    logp = -torch.rand(B, T, generator=g) * 2 - 0.05
    old = logp + 0.3 * torch.randn(B, T, generator=g)  # off-policy: some ratios leave [1 − ε, 1 + ε]
    ref = logp + 0.2 * torch.randn(B, T, generator=g)
    return rewards, mask, logp, old, ref


def _trl_advantages(rewards: torch.Tensor, scale_rewards: str) -> torch.Tensor:
    """TRL GRPOTrainer (sum_then_normalize): group mean, then ÷(std + 1e-4) with TRL's ``nanstd``."""
    mean = rewards.view(-1, G).mean(1).repeat_interleave(G)
    if scale_rewards == "group":
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G)
    else:
        std = nanstd(rewards).expand_as(rewards)
    adv = rewards - mean
    return adv if scale_rewards == "none" else adv / (std + 1e-4)


def _trl_loss(args: GRPOConfig, logp, old, ref, mask, adv):
    """TRL's ``_compute_loss`` on the given numbers; returns (loss, ∂loss/∂logp)."""
    current = logp.clone().requires_grad_(True)
    fake = SimpleNamespace(
        args=args, beta=args.beta, loss_type=args.loss_type, importance_sampling_level=args.importance_sampling_level,
        epsilon_low=args.epsilon, epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        max_completion_length=args.max_completion_length, top_entropy_quantile=args.top_entropy_quantile,
        off_policy_mask_threshold=args.off_policy_mask_threshold, use_vllm=False, vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1, model=SimpleNamespace(training=True), _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x),
        _get_per_token_logps_and_entropies=lambda *a, **k: (current, torch.zeros_like(current), None),
        get_high_entropy_mask=None,
    )
    B = logp.shape[0]
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    loss.backward()
    return loss.detach(), current.grad


def _flowrl_loss(fields: dict, rewards, logp, old, ref, mask):
    cfg = TrainConfig.from_dict({**fields, "model": {"kind": "causal_lm"}})
    preset = cfg.resolved().preset
    estimator = make_estimator(preset.advantage, **preset.advantage_params)
    adv = estimator(AdvantageInputs(rewards=rewards, group_ids=torch.arange(PROMPTS).repeat_interleave(G)))
    current = logp.clone().requires_grad_(True)
    inputs = LossInputs(
        log_prob=current, old_log_prob=old, advantages=adv[:, None].expand(-1, T), mask=mask,
        current=PolicyEval(log_prob=current), reference=PolicyEval(log_prob=ref),
    )
    loss, _ = policy_loss(inputs, preset.loss)
    loss.backward()
    return loss.detach(), current.grad, adv, cfg


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_loss_and_gradient_equal_trl(tmp_path, loss_type, level, bias_correction):
    checked = 0
    for seed, beta, eps_high, scale in itertools.product([0, 1], [0.0, 0.05], [None, 0.28], ["group", "batch", "none"]):
        if beta == 0.0 and not bias_correction:
            continue  # the KL correction only matters with a KL term
        fields = {
            "loss_type": loss_type, "importance_sampling_level": level, "beta": beta, "epsilon": 0.2,
            "scale_rewards": scale, "max_completion_length": L_MAX, "num_generations": G,
            "use_bias_correction_kl": bias_correction,
        }
        if eps_high is not None:
            fields["epsilon_high"] = eps_high
        args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=G * PROMPTS, report_to=[], use_cpu=True, **fields)
        rewards, mask, logp, old, ref = _batch(seed)
        ours, our_grad, our_adv, cfg = _flowrl_loss(fields, rewards, logp, old, ref, mask)
        assert cfg.algorithm == "trl_grpo" and cfg.train.num_generations == G
        trl_adv = _trl_advantages(rewards, args.scale_rewards)
        # group / batch means and stds of ≤ 12 rewards in {0, 1, 2}, another summation order: |A| ≤ 4
        torch.testing.assert_close(our_adv, trl_adv, rtol=0, atol=float32_sum_tol(4.0, G * PROMPTS))
        theirs, their_grad = _trl_loss(args, logp, old, ref, mask, trl_adv)
        # the loss: a float32 sum over the B·T tokens of ratio·A (+ β·KL) terms of size ≤ 3·4;
        # the gradient: one term per token, a few roundings apart (cancellation near 0: 4 ulps of the largest)
        assert float(ours) == pytest.approx(float(theirs), rel=1e-5, abs=float32_sum_tol(12.0, G * PROMPTS * T)), (fields, seed)
        torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=4 * EPS32 * float(their_grad.abs().max()))
        assert float(our_grad.abs().sum()) > 0
        checked += 1
    assert checked >= 12


def test_trl_defaults_are_the_trl_grpo_preset(tmp_path):
    """Fields a TRL config leaves unset take TRL's defaults (read from GRPOConfig itself)."""
    args = GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    cfg = TrainConfig.from_dict({"num_generations": args.num_generations, "model": {"kind": "causal_lm"}})
    r = cfg.resolved()
    loss = r.preset.loss
    assert cfg.algorithm == "trl_grpo"
    assert loss.clip_params == {"clip_range": args.epsilon}  # epsilon_high None: symmetric
    assert loss.beta == args.beta and loss.kl_ratio_weight == args.use_bias_correction_kl
    assert loss.aggregation == {"dapo": "token-mean"}[args.loss_type]
    assert loss.ratio == args.importance_sampling_level
    assert r.preset.advantage_params["std"] == {"group": "group"}[args.scale_rewards]
    assert r.preset.advantage_params["std_estimator"] == "unbiased"
    assert cfg.train.inner_epochs == args.num_iterations
    assert r.learning_rate == args.learning_rate
    assert r.preset.skip_zero_advantage is False
