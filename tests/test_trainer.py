"""The training loop end to end on the tiny SD3 pipeline: learning, no-op updates, resume, errors."""

import copy
import json

import pytest
import torch

from flowrl import FlowPolicy, TrainConfig
from flowrl.config import ConfigError
from flowrl.trainer import Trainer
from tests._tolerance import assert_recomputed_log_probs


def _config(tmp_path, *extra):
    return TrainConfig().override([
        f"train.output_dir={tmp_path / 'run'}", "train.iterations=2", "sampler.num_steps=4",
        "sampler.height=16", "sampler.width=16", "train.lora_rank=4", "train.lora_alpha=8",
        "train.num_generations=4", "train.prompts_per_iteration=2", "train.train_batch_size=8",
        "train.progress=false", "sampler.eval_num_steps=4", *extra,
    ])


def _policy(pipe, cfg):
    r = cfg.resolved()
    return FlowPolicy.from_pipeline(copy.deepcopy(pipe), sampler=r.preset.kernel, noise_level=r.preset.noise_level,
                                    num_steps=cfg.sampler.num_steps, height=cfg.sampler.height, width=cfg.sampler.width)


def _trainable(policy):
    return {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}


class ZeroReward:
    name = "zero"

    def __call__(self, outputs, prompts, meta=None):
        return torch.zeros(len(prompts))


def test_zero_advantage_update_changes_nothing(tmp_path, tiny_sd3):
    from flowrl.rewards import build_rewards

    cfg = _config(tmp_path, "train.iterations=1", "loss.skip_zero_advantage=false", "train.weight_decay=0")
    trainer = Trainer(cfg, policy=_policy(tiny_sd3, cfg), reward_set=build_rewards({"tests.test_trainer:ZeroReward": 1.0}))
    before = _trainable(trainer.policy)
    traj = trainer.policy.rollout(["a cat"], group_size=4, generator=torch.Generator().manual_seed(0))
    trainer.train()
    after = _trainable(trainer.policy)
    assert trainer.history[0]["adv/abs_mean"] == 0.0
    for n in before:  # exact: A = 0 and no KL or weight decay give zero gradients, and Adam steps of 0
        torch.testing.assert_close(after[n], before[n], rtol=0, atol=0)
    ev = trainer.policy.evaluate(traj)  # the weights did not move: ratio 1 to float32 rounding
    assert_recomputed_log_probs(ev.log_prob, traj.log_probs, traj.actions, ev.mean, ev.std)


def test_grpo_raises_jpeg_compressibility(tmp_path, tiny_sd3):
    # Asserted on held-out samples drawn from the same noise before and after training (a paired
    # difference), not on the noisy training means. Measured eval gain (after − before) at train.seed
    # 0..4: +0.0376, +0.0195, +0.0218, +0.0101, +0.0111 (1 and 2 threads bit-identical for seeds 0, 1);
    # the training-mean gain the test used to assert (> 0.015) was 0.021, 0.016, 0.014, 0.004, 0.008,
    # i.e. it failed for 3 of 5 seeds. Margin 0.004 (< half the smallest gain). Control runs trained on
    # jpeg_incompressibility moved compressibility by +0.013, -0.002, +0.017, -0.002 (seeds 0-3): part
    # of the gain is drift common to any update at this learning rate, so this test is a smoke test of
    # the direction; the digits test is the learning test.
    # (measured with 77 T5 tokens, kept here: the stock default 256 samples other images)
    cfg = _config(tmp_path, "train.iterations=10", "sampler.height=32", "sampler.width=32", "train.lora_rank=8", "sampler.max_sequence_length=77",
                  "train.lora_alpha=16", "train.learning_rate=3e-2", "train.num_generations=8", "train.train_batch_size=16",
                  "loss.beta=0", "reward.rewards={jpeg_compressibility: 1.0}", "train.eval_samples_per_prompt=4",
                  "train.eval_prompts=['a photo of a cat', 'a photo of a dog', 'a red apple', 'a blue car']")
    result = Trainer(cfg).train()
    before, after = result.eval_before["jpeg_compressibility"], result.eval_after["jpeg_compressibility"]
    assert after > before + 0.004, (before, after)
    assert all(h["ratio/mean"] == pytest.approx(1.0, abs=1e-5) for h in result.history)  # one on-policy update per iteration


def test_same_seed_same_numbers_and_exact_resume(tmp_path, tiny_sd3):
    def run(path, iters, resume=None):
        extra = [f"train.output_dir={path}", f"train.iterations={iters}", "train.save_every=2", "loss.beta=0.04",
                 "train.learning_rate=1e-2", "train.ema_decay=0.5", "train.ema_ramp=true", "train.ema_update_every=2"]
        if resume:
            extra.append(f"train.resume_from={resume}")
        cfg = _config(tmp_path, *extra)
        trainer = Trainer(cfg, policy=_policy(tiny_sd3, cfg))
        return trainer.train(), trainer

    full, t_full = run(tmp_path / "a", 4)
    again, _ = run(tmp_path / "b", 4)
    keys = ["reward/mean", "loss/policy", "kl/ref", "grad_norm"]
    assert [[h[k] for k in keys] for h in full.history] == [[h[k] for k in keys] for h in again.history]
    half, _ = run(tmp_path / "c", 2)
    resumed, t_res = run(tmp_path / "c", 4, resume=str(tmp_path / "c" / "checkpoints" / "iter_000002"))
    assert [[h[k] for k in keys] for h in resumed.history] == [[h[k] for k in keys] for h in full.history]
    a, b = _trainable(t_full.policy), _trainable(t_res.policy)
    # exact: a resume replays the same computations (seeded streams, same shapes) on the same
    # machine and thread count; across machines only the same-seed runs on each one are comparable
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
    assert t_res.ema.steps == t_full.ema.steps > 0  # the EMA (and its ramp) continues where it stopped
    for x, y in zip(t_full.ema.shadow, t_res.ema.shadow):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    lines = [json.loads(l) for l in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [l["iteration"] for l in lines if "reward/mean" in l] == [1, 2, 3, 4]
    assert full.history[-1]["kl/ref"] > 0


def test_lora_saved_in_diffusers_format_loads_with_stock_pipeline(tmp_path, tiny_sd3):
    cfg = _config(tmp_path, "train.learning_rate=5e-2", "loss.beta=0")
    trainer = Trainer(cfg, policy=_policy(tiny_sd3, cfg))
    trainer.train()
    lora_dir = tmp_path / "run" / "lora"
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()
    pipe = copy.deepcopy(tiny_sd3)
    base = FlowPolicy.from_pipeline(pipe, num_steps=4, height=16, width=16).generate(["a cat"], generator=torch.Generator().manual_seed(0))
    pipe.load_lora_weights(str(lora_dir))
    tuned_stock = FlowPolicy.from_pipeline(pipe, num_steps=4, height=16, width=16).generate(["a cat"], generator=torch.Generator().manual_seed(0))
    tuned_ours = trainer.policy.generate(["a cat"], generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(base, tuned_stock)
    torch.testing.assert_close(tuned_stock, tuned_ours, atol=1e-5, rtol=0)


class NaNAtSecondCall:
    name = "nan_later"
    calls = 0

    def __call__(self, outputs, prompts, meta=None):
        type(self).calls += 1
        value = float("nan") if type(self).calls >= 2 else 0.0
        return torch.full((len(prompts),), value) + torch.arange(len(prompts)) * (value == value)


def test_nan_reward_stops_with_clear_error_and_no_half_checkpoint(tmp_path, tiny_sd3):
    from flowrl.rewards import RewardError, build_rewards

    NaNAtSecondCall.calls = 0
    cfg = _config(tmp_path, "train.iterations=3", "train.save_every=1")
    trainer = Trainer(cfg, policy=_policy(tiny_sd3, cfg), reward_set=build_rewards({"tests.test_trainer:NaNAtSecondCall": 1.0}))
    with pytest.raises(RewardError, match="nan_later|NaN"):
        trainer.train()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["iter_000001"]
    assert (tmp_path / "run" / "checkpoints" / "iter_000001" / "state.json").is_file()


def test_bad_inputs_get_errors_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match="num_generations"):
        _config(tmp_path, "train.num_generations=1").validate()
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        _config(tmp_path, "train.lerning_rate=1")
    with pytest.raises(ConfigError, match="reward.rewards.clip has no weight"):
        _config(tmp_path, "reward.rewards={clip: {path: /x}}").validate()

    class TwoProcs:
        num_processes, process_index, is_main_process = 2, 0, True

    with pytest.raises(ConfigError, match="prompts_per_iteration=3 is not divisible by the 2 processes"):
        Trainer(_config(tmp_path, "train.prompts_per_iteration=3"), accelerator=TwoProcs(), policy=object(), reward_set=object())


def test_cli_train_runs_and_prints_summary(tmp_path, capsys):
    from flowrl.cli import main

    cfg = _config(tmp_path, "train.iterations=1", "train.eval_prompts=['a cat']")
    path = tmp_path / "cfg.yaml"
    cfg.to_yaml(path)
    assert main(["train", "--config", str(path), "--set", "train.learning_rate=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "jpeg_compressibility: base" in out and "(held-out, 1 prompts)" in out
    saved = TrainConfig.from_dict({k: v for k, v in __import__("yaml").safe_load((tmp_path / "run" / "config.yaml").read_text()).items() if k != "resolved"})
    assert saved.train.learning_rate == 1e-3
    assert (tmp_path / "run" / "reward_curve.png").is_file() and (tmp_path / "run" / "before_after.png").is_file()
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2


class FirstSampleFails:
    name = "flaky"

    def __call__(self, outputs, prompts, meta=None):
        r = outputs.float().mean(dim=(1, 2, 3))
        r[0] = float("nan")
        return r


def test_tolerated_reward_failures_are_counted_and_not_trained(tmp_path, tiny_sd3):
    from flowrl.rewards import build_rewards

    cfg = _config(tmp_path, "train.iterations=2")
    rs = build_rewards({"tests.test_trainer:FirstSampleFails": 1.0}, max_failures=10)
    result = Trainer(cfg, policy=_policy(tiny_sd3, cfg), reward_set=rs).train()
    assert [h["samples/trained"] for h in result.history] == [7.0, 7.0]
    assert result.history[-1]["reward/failures/flaky"] == 2.0
    assert all(h["reward/mean"] == h["reward/mean"] for h in result.history)  # finite: NaN rows left out


def test_bf16_autocast_keeps_on_policy_ratio_one(tmp_path, tiny_sd3):
    cfg = _config(tmp_path, "train.iterations=1", "train.mixed_precision=bf16", "model.device=cpu")
    result = Trainer(cfg, policy=_policy(tiny_sd3, cfg)).train()
    assert result.history[0]["ratio/mean"] == pytest.approx(1.0, abs=1e-6)
    assert result.history[0]["ratio/max_abs_log"] < 1e-5


def test_cli_eval_and_gallery_load_a_runs_lora(tmp_path, capsys):
    from flowrl.cli import main

    cfg = _config(tmp_path, "train.iterations=1", "train.learning_rate=5e-2", "loss.beta=0", "train.eval_prompts=['a cat', 'a dog']")
    path = tmp_path / "cfg.yaml"
    cfg.to_yaml(path)
    assert main(["train", "--config", str(path)]) == 0
    capsys.readouterr()
    lora = str(tmp_path / "run" / "lora")
    assert main(["eval", "--config", str(path), "--lora", lora, "--out", str(tmp_path / "eval_tuned.json")]) == 0
    tuned = capsys.readouterr().out
    assert main(["eval", "--config", str(path), "--out", str(tmp_path / "eval_base.json")]) == 0
    base = capsys.readouterr().out
    assert "| jpeg_compressibility |" in tuned and tuned != base  # the LoRA changed the samples
    assert main(["gallery", "--config", str(path), "--lora", lora, "--out", str(tmp_path / "g")]) == 0
    page = (tmp_path / "g" / "index.html").read_text()
    assert page.count('<td class="cell"') == 4 and "a dog" in page  # 2 prompts × (base, the LoRA)
    assert main(["sample", "--config", str(path), "--prompt", "a cat", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()


def test_ema_weights_are_used_for_evaluation_and_live_weights_come_back(tmp_path, tiny_sd3):
    cfg = _config(tmp_path, "train.iterations=2", "train.ema_decay=0.9", "train.learning_rate=5e-2", "loss.beta=0")
    trainer = Trainer(cfg, policy=_policy(tiny_sd3, cfg))
    trainer.train()
    live = _trainable(trainer.policy)
    with trainer.ema.active():
        inside = _trainable(trainer.policy)
    after = _trainable(trainer.policy)
    names = [n for n in live if "lora_B" in n]
    assert any(not torch.equal(live[n], inside[n]) for n in names)  # EMA differs from the live weights
    for n in live:  # exact: swapping the EMA in and out copies tensors, no arithmetic
        torch.testing.assert_close(after[n], live[n], rtol=0, atol=0)
    shadow = dict(zip([n for n, p in trainer.policy.model.named_parameters() if p.requires_grad], trainer.ema.shadow))
    for n in names:
        torch.testing.assert_close(inside[n], shadow[n], rtol=0, atol=0)
    # the exported lora/ holds the evaluated (EMA) weights, and the run says so
    info = json.loads((tmp_path / "run" / "weights.json").read_text())
    assert info["evaluated"] == info["lora_weights"] == "ema" and info["ema"]["decay"] == 0.9
    pipe = copy.deepcopy(tiny_sd3)
    pipe.load_lora_weights(str(tmp_path / "run" / "lora"))
    stock = FlowPolicy.from_pipeline(pipe, num_steps=4, height=16, width=16).generate(["a cat"], generator=torch.Generator().manual_seed(0))
    with trainer.ema.active():
        evaluated = trainer.policy.generate(["a cat"], generator=torch.Generator().manual_seed(0))
    live_images = trainer.policy.generate(["a cat"], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(stock, evaluated, atol=1e-5, rtol=0)
    assert (stock - live_images).abs().max() > 1e-4  # not the live weights


def test_flow_grpo_ema_ramps_its_decay_and_updates_every_n_steps():
    from flowrl.ema import EMA, ema_decay_at

    assert [ema_decay_at(t, 0.9, ramp=True) for t in (1, 2, 80, 100)] == pytest.approx([2 / 11, 3 / 12, 0.9, 0.9])
    assert ema_decay_at(1, 0.9, ramp=False) == 0.9
    w = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([w], 0.9, ramp=True, update_every=2)
    want = torch.zeros(3)
    for t in range(1, 7):
        with torch.no_grad():
            w.add_(1.0)  # the optimizer step
        ema.update()
        if t % 2 == 0:  # steps 2, 4, 6: d = 3/12, 5/14, 7/16
            d = (1 + t) / (10 + t)
            want = d * want + (1 - d) * w.detach()
        torch.testing.assert_close(ema.shadow[0], want)
    state = ema.state_dict()
    other = EMA([torch.nn.Parameter(torch.zeros(3))], 0.9, ramp=True, update_every=2)
    other.load_state_dict(state)
    assert other.steps == 6 and torch.equal(other.shadow[0], ema.shadow[0])


def test_a_saved_digits_folder_loads_through_model_pipeline(tmp_path):
    from flowrl.pipelines.digits import DigitsPipeline, load_default_digits_pipeline
    from flowrl.trainer import load_pipeline

    load_default_digits_pipeline().save_pretrained(tmp_path / "digits")
    pipe = load_pipeline(str(tmp_path / "digits"), tmp_path)
    assert isinstance(pipe, DigitsPipeline)
    with pytest.raises(ConfigError, match="no model_index.json"):
        load_pipeline(str(tmp_path), tmp_path)


def test_cosine_learning_rate_schedule():
    from flowrl.trainer import learning_rate_at

    lrs = [learning_rate_at(i, 5, 1.0, "cosine", 0.1) for i in range(1, 6)]
    # base·(0.1 + 0.9·½(1 + cos(π·k/4))), k = 0..4
    assert lrs == pytest.approx([1.0, 0.1 + 0.9 * 0.5 * (1 + 2**-0.5), 0.55, 0.1 + 0.9 * 0.5 * (1 - 2**-0.5), 0.1])
    assert learning_rate_at(3, 5, 2e-3, "constant", 0.1) == 2e-3
