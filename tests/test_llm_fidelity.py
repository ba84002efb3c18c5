"""One test per language-model fidelity defect: β without a KL form, Dr.GRPO's normaliser with a given
policy, zero-advantage rows, and TRL names with TRL meanings."""

import pytest
import torch

torch.set_num_threads(1)

import flowrl.rewards as rewards  # noqa: E402
from flowrl.advantages import group_advantages  # noqa: E402
from flowrl.algorithms import LLM_PRESETS, PRESETS  # noqa: E402
from flowrl.config import ConfigError, TrainConfig  # noqa: E402
from flowrl.losses import LossInputs, aggregate, policy_loss  # noqa: E402
from flowrl.pipelines.causal_lm import TokenPolicy, build_tiny_causal_lm  # noqa: E402
from flowrl.policy import PolicyEval  # noqa: E402
from flowrl.rewards.verifiers import arithmetic_prompts  # noqa: E402


def _lm(algorithm: str, **extra) -> TrainConfig:
    return TrainConfig.from_dict({"algorithm": algorithm, "model": {"kind": "causal_lm"}, **extra})


# ------------------------------------------------------------------------- defect 3: β needs a KL
def test_beta_turns_on_k3_for_token_presets_without_a_kl_form():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 3, generator=g)
    ref = lp + 0.5 * torch.randn(4, 3, generator=g)
    inputs = LossInputs(log_prob=lp, old_log_prob=lp, advantages=torch.zeros(4, 3), mask=torch.ones(4, 3),
                        current=PolicyEval(log_prob=lp), reference=PolicyEval(log_prob=ref))
    d = ref - lp
    k3 = torch.exp(d) - d - 1
    without_kl = [n for n in LLM_PRESETS if PRESETS.get(n).loss.kl is None]
    assert {"dr_grpo", "dapo", "gspo"} <= set(without_kl)
    for name in without_kl:
        spec = _lm(name, loss={"beta": 0.1}).resolved().preset.loss
        assert spec.kl == "k3", name
        if spec.clip != "ppo_clip":
            continue  # other rules read more inputs; the KL part is the same code
        loss, metrics = policy_loss(inputs, spec)  # A = 0: the loss is β·KL alone
        assert float(loss) == pytest.approx(0.1 * float(aggregate(k3, inputs.mask, spec.aggregation, max_len=spec.max_len)), rel=1e-6), name
        assert metrics["kl/ref"] > 0


def test_beta_without_a_kl_form_on_a_diffusion_preset_is_an_error():
    cfg = TrainConfig.from_dict({"algorithm": "dance_grpo", "loss": {"beta": 0.1}})
    with pytest.raises(ConfigError, match="loss.kl"):
        cfg.resolved()
    assert TrainConfig.from_dict({"algorithm": "dance_grpo", "loss": {"beta": 0.1, "kl": "gaussian"}}).resolved().preset.loss.kl == "gaussian"


# ------------------------------------------------------------ defect 4: Dr.GRPO's constant normaliser
class Parity(rewards.Reward):
    name = "parity"

    def __call__(self, outputs, prompts, meta=None):
        return torch.tensor([float(len(o) % 2 == 0) for o in outputs])


class Constant(rewards.Reward):
    name = "constant"

    def __call__(self, outputs, prompts, meta=None):
        return torch.ones(len(outputs))


@pytest.fixture(scope="module")
def tiny_lm_path(tmp_path_factory):
    return build_tiny_causal_lm(str(tmp_path_factory.mktemp("tiny_llama_fidelity")), seed=3)


def _trainer_config(tmp_path, algorithm, max_new_tokens=6, reward="tests.test_llm_fidelity:Parity", **loss):
    return TrainConfig.from_dict({
        "algorithm": algorithm,
        "model": {"pipeline": "tiny-llama", "kind": "causal_lm", "device": "cpu"},
        "sampler": {"max_new_tokens": max_new_tokens},
        "reward": {"rewards": {reward: 1.0}},
        "loss": loss,
        "train": {"prompts": arithmetic_prompts("train")[:4], "num_generations": 4, "prompts_per_iteration": 2, "iterations": 1,
                  "train_batch_size": 8, "lora_rank": 4, "output_dir": str(tmp_path / algorithm), "progress": False},
    })


def test_dr_grpo_normaliser_is_max_new_tokens_with_a_given_policy(tmp_path, tiny_lm_path):
    from flowrl.trainer import Trainer

    cfg = _trainer_config(tmp_path, "dr_grpo")
    assert cfg.resolved().preset.loss.max_len == 6  # resolved, whoever builds the policy
    policy = TokenPolicy.from_pretrained(tiny_lm_path, lora={"r": 4}, max_new_tokens=6)
    trainer = Trainer(cfg, policy=policy)
    assert trainer.resolved.preset.loss.max_len == 6
    # a batch whose completions all stopped before L_max: the loss divides by G·L_max, not by its width
    loss = torch.ones(8, 3)
    assert float(aggregate(loss, torch.ones(8, 3), "seq-mean-token-sum-norm", max_len=trainer.resolved.preset.loss.max_len)) == pytest.approx(3 / 6)
    with pytest.raises(ConfigError, match="max_new_tokens=6"):
        Trainer(_trainer_config(tmp_path, "dr_grpo", max_new_tokens=8), policy=policy)


# ------------------------------------------------------------------ defect 5: zero-advantage rows
def test_zero_advantage_rows_are_kept_for_llm_presets_only(tmp_path, tiny_lm_path):
    from flowrl.trainer import Trainer

    assert all(PRESETS.get(n).skip_zero_advantage is False for n in LLM_PRESETS)
    assert PRESETS.get("flow_grpo").skip_zero_advantage is True
    assert TrainConfig.from_dict({"algorithm": "grpo", "loss": {"skip_zero_advantage": True}}).resolved().preset.skip_zero_advantage
    # every reward equal: every advantage is 0; GRPO's rows still carry β·KL and count in the denominators
    policy = TokenPolicy.from_pretrained(tiny_lm_path, lora={"r": 4}, max_new_tokens=6)
    cfg = _trainer_config(tmp_path, "grpo", reward="tests.test_llm_fidelity:Constant")
    record = Trainer(cfg, policy=policy).train().history[-1]
    assert record["adv/abs_mean"] == 0.0
    assert record["samples/trained"] == 8 and record["update/steps"] == 1
    assert "loss/kl" in record  # the KL term was evaluated on rows with A = 0
    # a new run: its own output_dir (a used one with checkpoints is refused)
    cfg = _trainer_config(tmp_path / "skip", "grpo", reward="tests.test_llm_fidelity:Constant", skip_zero_advantage=True)
    record = Trainer(cfg, policy=policy).train().history[-1]
    assert record["samples/trained"] == 0 and record["update/steps"] == 0


# --------------------------------------------------------------------------- defect 6: TRL names
def test_trl_num_iterations_means_updates_per_batch():
    cfg = TrainConfig.from_dict({"num_iterations": 3, "model": {"kind": "causal_lm"}})
    assert cfg.train.inner_epochs == 3 and cfg.train.iterations == 10  # μ, not the run length
    with pytest.raises(ConfigError, match="inner_epochs.*train.iterations"):
        TrainConfig.from_dict({"train": {"num_iterations": 3}})
    with pytest.raises(ConfigError, match="inner_epochs"):
        TrainConfig().override(["train.num_iterations=3"])


def test_a_run_saved_before_the_rename_still_loads(tmp_path):
    """A run directory's config.yaml (it has a ``resolved:`` block) written before the run length
    was renamed keeps its meaning: there ``train.num_iterations`` was the run length."""
    old = {"train": {"num_iterations": 7, "seed": 3}, "resolved": {"learning_rate": 1e-4}}
    cfg = TrainConfig.from_dict(old)
    assert cfg.train.iterations == 7 and cfg.train.inner_epochs == 1 and cfg.train.seed == 3
    with pytest.raises(ConfigError, match="inner_epochs"):  # without resolved: still ambiguous, refused
        TrainConfig.from_dict({"train": {"num_iterations": 7}})


def test_sequence_token_is_not_a_trl_level():
    with pytest.raises(ConfigError, match="not a TRL value.*gspo_token"):
        TrainConfig.from_dict({"importance_sampling_level": "sequence_token"})
    with pytest.raises(ConfigError, match="no flowrl equivalent"):
        TrainConfig.from_dict({"loss_type": "cispo"})
    assert TrainConfig.from_dict({"importance_sampling_level": "sequence", "model": {"kind": "causal_lm"}}).resolved().preset.loss.ratio == "sequence"


def test_group_std_estimators():
    r = torch.tensor([0.0, 1.0, 1.0, 3.0, 2.0, 2.0, 2.0, 5.0])
    gid = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    for est, unbiased in (("population", False), ("unbiased", True)):
        adv = group_advantages(r, gid, std_estimator=est, clip=None)
        ref = torch.cat([(x - x.mean()) / (x.std(unbiased=unbiased) + 1e-4) for x in r.view(2, 4)])
        torch.testing.assert_close(adv, ref)
        glob = group_advantages(r, gid, std="global", std_estimator=est, clip=None)
        torch.testing.assert_close(glob, (r - r.view(2, 4).mean(1).repeat_interleave(4)) / (r.std(unbiased=unbiased) + 1e-4))
    # which each preset uses: unbiased for the language-model presets (TRL, verl), population for Flow-GRPO
    for name in LLM_PRESETS:
        params = PRESETS.get(name).advantage_params
        assert params.get("std_estimator", "unbiased") == "unbiased", name
    assert "std_estimator" not in PRESETS.get("flow_grpo").advantage_params
    assert _lm("grpo", loss={"std_estimator": "population"}).resolved().preset.advantage_params["std_estimator"] == "population"
    with pytest.raises(ConfigError, match="std_estimator"):
        _lm("spo", loss={"std_estimator": "population"}).resolved()


def test_kl_ratio_weight_multiplies_k3_by_the_importance_ratio():
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(3, 4, generator=g)
    old = lp + 0.1 * torch.randn(3, 4, generator=g)
    ref = lp + 0.3 * torch.randn(3, 4, generator=g)
    mask = torch.ones(3, 4)
    inputs = LossInputs(log_prob=lp, old_log_prob=old, advantages=torch.zeros(3, 4), mask=mask,
                        current=PolicyEval(log_prob=lp), reference=PolicyEval(log_prob=ref))
    spec = _lm("grpo", use_bias_correction_kl=True, loss={"beta": 1.0}).resolved().preset.loss
    assert spec.kl_ratio_weight
    d = ref - lp
    expected = ((torch.exp(d) - d - 1) * torch.exp(lp - old)).mean(-1).mean()
    loss, _ = policy_loss(inputs, spec)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
