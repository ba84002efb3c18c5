"""Batched recomputation: several stored steps of a minibatch in one transformer call give the
per-step loop's log-probs, losses and gradients (up to the last bits a batch composition changes),
with and without CFG, for structured rollouts and under gradient checkpointing."""

import copy

import pytest
import torch

from flowrl import FlowPolicy, TrainConfig
from flowrl.policy import group_step_chunks
from flowrl.trainer import Trainer
from tests._tolerance import float32_sum_tol


def _policy(pipe, **kw):
    kw.setdefault("num_steps", 4)
    return FlowPolicy.from_pipeline(copy.deepcopy(pipe), height=16, width=16, **kw)


@pytest.mark.parametrize("family", ["tiny_sd3", "tiny_flux"])
@pytest.mark.parametrize("cfg", [1.0, 4.5])
def test_all_steps_in_one_call_equal_the_per_step_loop(family, cfg, request):
    policy = _policy(request.getfixturevalue(family), guidance_scale=cfg)
    traj = policy.rollout(["a cat", "a dog"], group_size=2, generator=torch.Generator().manual_seed(0))
    calls = []
    hook = policy.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    batched = policy.evaluate(traj)
    assert calls == [4 * 4 * (2 if cfg > 1 else 1)]  # one call: samples × steps (× CFG)
    per_step = [policy.evaluate(traj, torch.tensor([j])) for j in range(traj.num_steps)]
    policy.max_rows_per_call = 6  # a memory cap splits the rows over several calls, same numbers
    calls.clear()
    capped = policy.evaluate(traj)
    hook.remove()
    assert max(calls) <= 6 and sum(calls) == 16 * (2 if cfg > 1 else 1)
    loop_lp = torch.cat([e.log_prob for e in per_step], 1)
    # measured on CPU float32: bit-identical (other BLAS backends may change the last bits)
    torch.testing.assert_close(batched.log_prob, loop_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(capped.log_prob, loop_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.mean, torch.cat([e.mean for e in per_step], 1), atol=1e-5, rtol=0)
    # exact: the std comes from the σ grid alone (no model call, the same arithmetic per step)
    torch.testing.assert_close(batched.std, torch.cat([e.std for e in per_step], 1), atol=0, rtol=0)
    # ratio 1 still holds against the rollout's own log-probs (rows batched differently there too)
    assert (torch.exp(batched.log_prob - traj.log_probs) - 1).abs().max() < 1e-4


def test_tree_rollouts_batch_their_shared_states(tiny_sd3):
    policy = _policy(tiny_sd3, rollout="tree", rollout_params={"split_steps": [0, 2], "branch": 2})
    traj = policy.rollout(["a cat"], group_size=4, generator=torch.Generator().manual_seed(0))
    calls = []
    hook = policy.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    batched = policy.evaluate(traj)
    hook.remove()
    # one call for the distinct (state, step) pairs that own a trained edge
    keys, mask = traj.meta["state_key"], traj.mask
    assert calls == [sum(len(torch.unique(keys[mask[:, j], j])) for j in range(traj.num_steps))]
    loop = torch.cat([policy.evaluate(traj, torch.tensor([j])).log_prob for j in range(traj.num_steps)], 1)
    torch.testing.assert_close(batched.log_prob, loop, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.log_prob, traj.log_probs, atol=1e-5, rtol=0)


def test_group_step_chunks_respects_the_row_budget():
    chunks = list(torch.split(torch.arange(5), 1))
    assert [len(g) for g in group_step_chunks(chunks, 8, 16)] == [2, 2, 1]
    assert [len(g) for g in group_step_chunks(chunks, 8, None)] == [5]
    assert [len(g) for g in group_step_chunks(chunks, 8, 4)] == [1] * 5  # a chunk above the budget goes alone
    assert [len(g) for g in group_step_chunks(list(torch.split(torch.arange(5), 2)), 8, 32)] == [2, 1]


def _trained(pipe, max_rows, *, checkpointing=False, extra=()):
    cfg = TrainConfig().override([
        "train.iterations=1", "sampler.num_steps=4", "train.lora_rank=4", "train.lora_alpha=8",
        "train.num_generations=2", "train.prompts_per_iteration=2", "train.train_batch_size=4", "train.progress=false",
        "train.learning_rate=1e-2", "train.output_dir=/tmp/unused", f"train.max_rows_per_call={max_rows}", "sampler.guidance_scale=4.5",
        "loss.beta=0.04", "loss.kl=gaussian", "loss.clip_range=0.2", *extra,
    ])
    r = cfg.resolved()
    policy = FlowPolicy.from_pipeline(copy.deepcopy(pipe), sampler=r.preset.kernel, noise_level=r.preset.noise_level, num_steps=4,
                                      guidance_scale=4.5, height=16, width=16)
    trainer = Trainer(cfg, policy=policy)
    if checkpointing:
        trainer.policy.model.enable_gradient_checkpointing()
    calls, grads = [], {}
    hook = policy.model.register_forward_pre_hook(lambda m, a, kw: calls.append(torch.is_grad_enabled()), with_kwargs=True)
    named = [(n, p) for n, p in policy.model.named_parameters() if p.requires_grad]
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    opt.register_step_pre_hook(lambda *_: grads.update({n: p.grad.detach().clone() for n, p in named}))
    metrics = trainer.iteration(1)
    hook.remove()
    return grads, metrics, calls


def test_batched_update_equals_the_per_timestep_update(tiny_sd3):
    ref_params, ref_m, ref_calls = _trained(tiny_sd3, 1)  # one stored step per call: the per-timestep loop
    params, m, calls = _trained(tiny_sd3, "null")  # every stored step of the minibatch in one call
    # grad calls in the update: one per trained step (Flow-GRPO's timestep_fraction 0.99 trains 3 of
    # 4) vs one; the rollout and the KL reference run without grad
    assert ref_calls.count(True) == 3 and calls.count(True) == 1
    # loss/policy ≈ 0 on-policy (advantages sum to 0 per group): a float32 mean of 2·2·3 terms
    # ratio·A, |A| ≤ 5, in other batch shapes, so an absolute bound
    for k in ("loss/policy", "loss/kl", "ratio/mean", "grad_norm"):
        assert m[k] == pytest.approx(ref_m[k], rel=1e-4, abs=float32_sum_tol(5.0, 12)), k
    scale = max(g.abs().max() for g in ref_params.values())
    # the accumulated gradients: measured ≤ 2.4e-5 × the largest entry apart (backward reduces over
    # other batch shapes; the log-probs themselves are bit-identical here)
    for n in params:
        torch.testing.assert_close(params[n], ref_params[n], atol=3e-4 * float(scale), rtol=0)
    ck_params, ck_m, _ = _trained(tiny_sd3, "null", checkpointing=True)
    # gradient checkpointing composes with the batched call (measured: identical — the forward is
    # recomputed in the same shapes); bound: the weights move by lr·Adam steps built from gradient
    # entries that are float32 sums over ≤ 4096 rows × tokens, a few ulps of the largest entry each
    for n in params:
        torch.testing.assert_close(ck_params[n], params[n], atol=float32_sum_tol(float(scale), 4096), rtol=0)


def test_seq_mean_aggregation_keeps_its_per_chunk_loss(tiny_sd3):
    # a non-token-mean aggregation is computed per chunk exactly as before: batching changes cost only
    extra = ("loss.aggregation=seq-mean-token-mean", "sampler.steps_per_backward=2")
    ref_params, ref_m, _ = _trained(tiny_sd3, 1, extra=extra)
    params, m, _ = _trained(tiny_sd3, "null", extra=extra)
    assert m["loss/policy"] == pytest.approx(ref_m["loss/policy"], rel=1e-4, abs=float32_sum_tol(5.0, 12))
    scale = max(g.abs().max() for g in ref_params.values())
    for n in params:
        torch.testing.assert_close(params[n], ref_params[n], atol=3e-4 * float(scale), rtol=0)
