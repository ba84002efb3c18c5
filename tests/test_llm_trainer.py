"""LLM presets through the one trainer, TRL-style config names, and one loss object training both
a token policy (tiny Llama) and a diffusion policy (tiny SD3)."""

import copy

import pytest
import torch

torch.set_num_threads(1)

import flowrl.rewards as rewards  # noqa: E402
from flowrl.advantages import group_advantages  # noqa: E402
from flowrl.algorithms import LLM_PRESETS, PRESETS, trl_aliases  # noqa: E402
from flowrl.config import TrainConfig  # noqa: E402
from flowrl.losses import LossInputs, LossSpec, policy_loss  # noqa: E402
from flowrl.pipelines.causal_lm import TokenPolicy, build_tiny_causal_lm  # noqa: E402
from flowrl.rewards.verifiers import arithmetic_prompts  # noqa: E402


class Parity(rewards.Reward):
    """A varied 0/1 'correctness' for random tiny models: 1 if the completion has an even length."""

    name = "parity"

    def __call__(self, outputs, prompts, meta=None):
        return torch.tensor([float(len(o) % 2 == 0) for o in outputs])


class Brevity(rewards.Reward):
    """A second, graded column in [0, 1] (a stand-in process / thinking reward): 1/(1 + #chars/10)."""

    name = "brevity"

    def __call__(self, outputs, prompts, meta=None):
        return torch.tensor([1.0 / (1.0 + len(o) / 10) for o in outputs])


if "test_parity" not in rewards.REWARDS:
    rewards.register("test_parity")(Parity)
    rewards.register("test_brevity")(Brevity)


def _config(tmp_path, algorithm, **train):
    t = {
        "prompts": arithmetic_prompts("train")[:8], "num_generations": 4, "prompts_per_iteration": 2, "iterations": 1,
        "train_batch_size": 8, "lora_rank": 4, "lora_alpha": 8, "output_dir": str(tmp_path / algorithm), "progress": False,
        "learning_rate": 1e-2,
    }
    t.update(train)
    return TrainConfig.from_dict({
        "algorithm": algorithm,
        "model": {"pipeline": "tiny-llama", "kind": "causal_lm", "device": "cpu"},
        "sampler": {"max_new_tokens": 4},
        "reward": {"rewards": {"test_parity": 1.0, "test_brevity": 0.1}},
        "train": t,
    })


@pytest.fixture(scope="module")
def shared_policy(tmp_path_factory):
    path = build_tiny_causal_lm(str(tmp_path_factory.mktemp("tiny_llama_trainer")), seed=1)
    torch.manual_seed(0)
    return TokenPolicy.from_pretrained(path, lora={"r": 4}, max_new_tokens=4)


def test_every_llm_preset_trains_through_the_trainer(tmp_path, shared_policy):
    from flowrl.trainer import Trainer

    assert set(LLM_PRESETS) <= set(PRESETS.names())
    initial = copy.deepcopy(shared_policy.model.state_dict())
    for name in LLM_PRESETS:
        shared_policy.model.load_state_dict(initial)  # every preset starts from the same weights
        trainer = Trainer(_config(tmp_path, name), policy=shared_policy)
        before = {n: p.detach().clone() for n, p in shared_policy.model.named_parameters() if p.requires_grad}
        record = trainer.train().history[-1]
        assert record["update/steps"] >= 1, name
        assert torch.isfinite(torch.tensor(record["loss/policy"])), name
        if "ratio/mean" in record:  # one optimizer step over all samples: evaluated on-policy
            assert record["ratio/mean"] == pytest.approx(1.0, abs=1e-5), name
        moved = sum(float((p.detach() - before[n]).abs().sum()) for n, p in shared_policy.model.named_parameters() if p.requires_grad)
        assert moved > 0, name
        if name == "grpo_care":  # the EMA reference scored every answer before the advantages
            assert 0 < record["care/confidence"] <= 0.95 and record["care/bonus"] >= 0


def test_trainer_builds_the_token_policy_from_config(tmp_path):
    from flowrl.trainer import Trainer

    cfg = _config(tmp_path, "dr_grpo", eval_prompts=arithmetic_prompts("test")[:2])
    trainer = Trainer(cfg)
    assert isinstance(trainer.policy, TokenPolicy)
    assert trainer.resolved.preset.loss.max_len == 4  # Dr.GRPO's constant normaliser = max_new_tokens
    result = trainer.train()
    assert result.history[-1]["update/steps"] >= 1
    assert any((tmp_path / "dr_grpo").rglob("adapter_config.json"))  # LoRA exported in peft format
    assert "test_parity" in result.eval_after


def test_trl_names_map_onto_flowrl_config():
    d = {
        "algorithm": "grpo", "num_generations": 8, "epsilon": 0.2, "epsilon_high": 0.28, "beta": 0.0,
        "scale_rewards": "batch", "loss_type": "dr_grpo", "max_completion_length": 16,
    }
    out = trl_aliases(d)
    assert out["train"]["num_generations"] == 8 and out["sampler"]["max_new_tokens"] == 16
    assert out["loss"] == {"clip_range": 0.2, "clip_range_high": 0.28, "beta": 0.0, "std": "global", "aggregation": "seq-mean-token-sum-norm"}
    assert "num_generations" in d  # input untouched
    cfg = TrainConfig.from_dict({**d, "model": {"kind": "causal_lm"}})
    r = cfg.resolved().preset
    assert (r.loss.clip_params, r.loss.beta, r.advantage_params["std"], r.loss.aggregation) == (
        {"clip_range": 0.2, "clip_range_high": 0.28}, 0.0, "global", "seq-mean-token-sum-norm")
    assert trl_aliases({"scale_rewards": False})["loss"]["std"] == "none"
    assert trl_aliases({"importance_sampling_level": "sequence"}) == {"algorithm": "trl_grpo", "loss": {"ratio": "sequence"}}
    with pytest.raises(ValueError, match="conflicts"):
        trl_aliases({"epsilon": 0.2, "loss": {"clip_range": 0.3}})
    with pytest.raises(ValueError, match="loss_type"):
        trl_aliases({"loss_type": "nope"})


def _one_update(policy, traj, spec, params, lr):
    """One step of the shared loss: group advantages → policy_loss → SGD. Returns Σ A·Δ(mean log π)."""
    rewards_ = torch.tensor([1.0, 0.0] * (len(traj) // 2))
    adv = group_advantages(rewards_, traj.group_ids, clip=None)
    (steps,) = [torch.arange(traj.num_steps)]
    mask = traj.mask[:, steps].float()
    cur = policy.evaluate(traj, steps)
    inputs = LossInputs(log_prob=cur.log_prob, old_log_prob=traj.log_probs[:, steps], advantages=adv[:, None].expand(-1, len(steps)), mask=mask, current=cur, traj=traj, steps=steps)
    loss, metrics = policy_loss(inputs, spec)
    assert metrics["ratio/mean"] == pytest.approx(1.0, abs=1e-5)
    opt = torch.optim.SGD(params, lr=lr)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        new = policy.evaluate(traj, steps).log_prob
    per_seq = lambda lp: (lp * mask).sum(-1) / mask.sum(-1)  # noqa: E731
    return float((adv * (per_seq(new) - per_seq(traj.log_probs[:, steps]))).sum())


def test_same_loss_object_trains_tiny_llama_and_tiny_sd3(shared_policy, tiny_sd3):
    from flowrl.pipelines.flow_policy import FlowPolicy

    spec = LossSpec(ratio="token", clip="ppo_clip", clip_params={"clip_range": 0.2}, aggregation="token-mean")
    loss_fn = policy_loss  # the one function object, with the one spec, for both policies
    assert loss_fn is policy_loss
    # token policy
    lm = copy.deepcopy(shared_policy)
    traj = lm.rollout(["What is 1 + 1 ?", "What is 2 * 3 ?"], group_size=2, generator=torch.Generator().manual_seed(0))
    assert _one_update(lm, traj, spec, lm.trainable_parameters(), lr=0.5) > 0
    # diffusion policy (full fine-tune of a copy of the shared tiny SD3 transformer)
    pipe = copy.deepcopy(tiny_sd3)
    flow = FlowPolicy.from_pipeline(pipe, num_steps=3, height=16, width=16)
    flow.model.requires_grad_(True)
    ftraj = flow.rollout(["a cat", "a dog"], group_size=2, generator=torch.Generator().manual_seed(0))
    assert ftraj.log_probs.shape[1] == 3 and traj.log_probs.dim() == 2
    assert _one_update(flow, ftraj, spec, [p for p in flow.model.parameters() if p.requires_grad], lr=1e-3) > 0


def test_one_update_per_batch_skips_the_old_log_prob_pass(tmp_path, monkeypatch):
    """One pass and one optimizer step per batch: the rollout's log-probs are not recomputed (no
    second forward, as TRL) and the loss takes the current log-probs detached (ratio exactly 1); the
    run equals one that recomputes them, to float rounding. μ = 2 recomputes once per batch."""
    import flowrl.objectives as objectives_mod
    from flowrl.objectives import old_log_probs_reason
    from flowrl.trainer import Trainer

    calls = []
    real = TokenPolicy.old_log_probs
    monkeypatch.setattr(TokenPolicy, "old_log_probs", lambda self, traj: calls.append(len(traj)) or real(self, traj))

    def run(name, **train):
        trainer = Trainer(_config(tmp_path, name, iterations=2, **train))
        history = trainer.train().history
        weights = {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if p.requires_grad}
        return trainer, history, weights

    trainer, skipped, w_skip = run("grpo")
    assert calls == [] and trainer._last_traj.meta["old_log_probs"] == "current"
    assert trainer.policy.compute_entropy is False  # no loss of this preset reads entropies
    assert all(r["ratio/mean"] == 1.0 and r["ratio/max_abs_log"] == 0.0 for r in skipped)
    # the same run with the recompute forced (as before): same losses and weights to float rounding
    monkeypatch.setattr(objectives_mod, "old_log_probs_reason", lambda *a: "forced")
    trainer2 = Trainer(_config(tmp_path, "grpo", iterations=2, output_dir=str(tmp_path / "forced")))
    forced = trainer2.train().history
    w_forced = {n: p.detach().clone() for n, p in trainer2.policy.model.named_parameters() if p.requires_grad}
    assert calls == [8, 8] and trainer2._last_traj.meta["old_log_probs"] == "recomputed"
    for a, b in zip(skipped, forced):
        assert a["reward/mean"] == b["reward/mean"]  # the same completions
        # measured: ratio 1 ± 3e-8 when recomputed over the whole batch; losses 1e-8 apart
        assert b["ratio/mean"] == pytest.approx(1.0, abs=1e-6)
        assert a["loss/policy"] == pytest.approx(b["loss/policy"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for n in w_skip:
        torch.testing.assert_close(w_skip[n], w_forced[n], rtol=0, atol=1e-5)
    calls.clear()
    monkeypatch.setattr(objectives_mod, "old_log_probs_reason", old_log_probs_reason)
    Trainer(_config(tmp_path, "grpo", inner_epochs=2, output_dir=str(tmp_path / "mu2"))).train()
    assert calls == [8]  # μ = 2: once per batch
    monkeypatch.undo()
    # the rule itself
    t = _config(tmp_path, "grpo").train
    assert old_log_probs_reason(t, 8, trainer.estimator, trainer.objective) is None
    assert "inner_epochs" in old_log_probs_reason(_config(tmp_path, "grpo", inner_epochs=2).train, 8, trainer.estimator, trainer.objective)
    assert "train_batch_size" in old_log_probs_reason(t, 16, trainer.estimator, trainer.objective)
    unlikely = Trainer(_config(tmp_path, "unlikeliness", output_dir=str(tmp_path / "u")))
    assert "estimator" in old_log_probs_reason(t, 8, unlikely.estimator, unlikely.objective)
