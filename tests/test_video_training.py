"""Training on video through the one loop, unchanged: two iterations with a per-frame image reward
and with a tiny random VideoAlign reward, the video-relevant presets (GRPO-Guard, Pref-GRPO with a
pairwise judge on a frame, DiffusionNFT), a timestep subset, and gradient checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch

from flowrl import TrainConfig
from flowrl.pipelines.flow_policy import FlowPolicy
from flowrl.trainer import Trainer
from tests._tolerance import float32_sum_tol

FRAME_REWARD = "reward.rewards={jpeg_compressibility: {weight: 1.0, frames: every_k, frame_every: 2, frame_aggregate: min}}"


def _config(tmp_path, *extra):
    return TrainConfig().override([
        f"train.output_dir={tmp_path / 'run'}", "train.iterations=2", "sampler.num_steps=3", "model.device=cpu",
        "train.lora_rank=4", "train.lora_alpha=8", "train.num_generations=2", "train.prompts_per_iteration=2",
        "train.train_batch_size=4", "train.progress=false", "train.learning_rate=1e-3",
        "train.prompts=[a cat, a dog runs]", *extra,
    ])


def _policy(pipe, cfg):
    r = cfg.resolved()
    return FlowPolicy.from_pipeline(
        copy.deepcopy(pipe), sampler=r.preset.kernel, noise_level=r.preset.noise_level, num_steps=cfg.sampler.num_steps,
        guidance_scale=cfg.sampler.guidance_scale, rollout=r.preset.rollout, rollout_params=r.preset.rollout_params,
        share_initial_noise=r.preset.share_initial_noise, store_means=True,
    )


def _lora(policy):
    return {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_B" in n}


def _changed(before, policy):
    after = _lora(policy)
    return any(not torch.equal(before[n], after[n]) for n in before)


def test_two_iterations_with_a_per_frame_image_reward(tmp_path, tiny_wan):
    cfg = _config(tmp_path, FRAME_REWARD, "train.eval_prompts=[a cat]", "sampler.eval_num_steps=2")
    trainer = Trainer(cfg, policy=_policy(tiny_wan, cfg))
    before = _lora(trainer.policy)
    result = trainer.train()
    assert len(result.history) == 2
    assert set(result.eval_before) == {"jpeg_compressibility", "num_prompts", "num_samples"}  # evaluation scores videos too
    assert (tmp_path / "run" / "before_after.png").is_file()  # poster frames of the base and tuned videos
    for h in result.history:
        assert h["ratio/mean"] == pytest.approx(1.0, abs=1e-5)  # one on-policy update per iteration
        assert h["reward/jpeg_compressibility"] < 0 and h["samples/generated"] == 4
    assert _changed(before, trainer.policy)
    assert trainer._last_traj.outputs.shape == (4, 5, 3, 32, 32)
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.fixture(scope="module")
def videoalign_dir(tmp_path_factory):
    from fixtures_rewards import tiny_qwen2vl_reward

    from flowrl.rewards.videoalign import VideoAlign

    model, processor = tiny_qwen2vl_reward()
    path = str(tmp_path_factory.mktemp("videoalign"))
    norm = {"VQ_mean": 0.1, "VQ_std": 2.0, "MQ_mean": -0.2, "MQ_std": 0.5, "TA_mean": 0.0, "TA_std": 4.0}
    return VideoAlign.save(path, model, processor, max_frame_pixels=28 * 28 * 4, min_pixels=28 * 28, norm=norm)


def test_two_iterations_sage_grpo_with_videoalign(tmp_path, tiny_hunyuan_video, videoalign_dir):
    """SAGE-GRPO's video setting in miniature: VideoAlign VQ/MQ/TA with weights 0.5/0.5/1.0."""
    cfg = _config(tmp_path, "algorithm=sage_grpo", "sampler.guidance_scale=2.0",
                  f"reward.rewards={{videoalign: {{weight: 1.0, path: {videoalign_dir}, component_weights: {{VQ: 0.5, MQ: 0.5, TA: 1.0}}}}}}")
    trainer = Trainer(cfg, policy=_policy(tiny_hunyuan_video, cfg))
    before = _lora(trainer.policy)
    result = trainer.train()
    assert len(result.history) == 2
    last = result.history[-1]
    traj = trainer._last_traj
    cols = {n: traj.rewards[:, i] for i, n in enumerate(traj.reward_names)}
    assert set(cols) == {"videoalign/VQ", "videoalign/MQ", "videoalign/TA"}
    combined = 0.5 * cols["videoalign/VQ"] + 0.5 * cols["videoalign/MQ"] + cols["videoalign/TA"]
    assert last["reward/mean"] == pytest.approx(float(combined.mean()), abs=1e-5)
    assert torch.isfinite(combined).all() and combined.std() > 0  # the reward tells the videos apart
    assert _changed(before, trainer.policy)


@pytest.mark.parametrize("preset,extra", [
    ("grpo_guard", []),
    ("pref_grpo", ["reward.rewards={pairwise_judge: {weight: 1.0, judge: jpeg_compressibility, frames: first}}"]),
    ("diffusion_nft", []),
])
def test_video_presets_train(tmp_path, tiny_wan, preset, extra):
    cfg = _config(tmp_path, f"algorithm={preset}", "train.iterations=1", *(extra or [FRAME_REWARD]))
    trainer = Trainer(cfg, policy=_policy(tiny_wan, cfg))
    before = _lora(trainer.policy)
    h = trainer.train().history[0]
    assert h["update/steps"] >= 1 and torch.isfinite(torch.tensor(h["loss/policy"]))
    assert _changed(before, trainer.policy)
    if preset == "pref_grpo":  # win rates of a group of 2: one wins (1), one loses (0), or a tie (½, ½)
        rates = trainer._last_traj.rewards[:, trainer._last_traj.reward_names.index("pairwise_judge/win_rate")]
        assert sorted(rates[:2].tolist()) in ([0.0, 1.0], [0.5, 0.5])


def test_timestep_fraction_trains_a_subset_of_steps(tmp_path, tiny_wan):
    cfg = _config(tmp_path, FRAME_REWARD, "algorithm=dance_grpo", "train.iterations=1", "sampler.num_steps=4",
                  "loss.timestep_fraction=0.5", "loss.timestep_selection=random")
    trainer = Trainer(cfg, policy=_policy(tiny_wan, cfg))
    h = trainer.train().history[0]
    assert h["cost/trained_steps_per_sample"] == 2.0  # ⌊4 · 0.5⌋ of 4 stored steps
    mask = trainer._last_traj.mask
    assert mask.sum(1).tolist() == [2] * 4 and not (mask == mask[0]).all()  # random subset per sample (seed 0)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, tiny_wan):
    from flowrl.builders import build_policy

    grads = []
    for ckpt in (False, True):
        cfg = _config(tmp_path, FRAME_REWARD, "model.pipeline=tiny-wan", f"train.gradient_checkpointing={str(ckpt).lower()}", "train.iterations=0")
        trainer = Trainer(cfg)
        policy = trainer.policy
        assert policy.model.gradient_checkpointing is ckpt
        traj = policy.rollout(["a cat"], group_size=2, generator=torch.Generator().manual_seed(0))
        policy.model.train()
        policy.evaluate(traj).log_prob.sum().backward()
        grads.append({n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        # same shapes recomputed (measured identical); near-zero entries: a float32 sum over ≤ 4096
        # rows × tokens × features of terms ≤ the largest entry
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=float32_sum_tol(float(grads[0][n].abs().max()), 4096))


def test_vae_tiling_and_decode_chunks_from_the_config(tmp_path, tiny_wan):
    from flowrl.builders import build_policy

    cfg = _config(tmp_path, FRAME_REWARD, "model.pipeline=tiny-wan", "model.vae_tiling=true", "model.vae_slicing=true",
                  "model.decode_batch_size=2", "sampler.num_frames=9", "sampler.negative_prompt=blurry")
    policy = build_policy(cfg.resolved(), tmp_path)
    assert policy.pipe.vae.use_tiling and policy.pipe.vae.use_slicing
    assert policy.adapter.decode_batch_size == 2 and policy.adapter.negative_prompt == "blurry"
    x = policy.adapter.initial_noise(3, height=32, width=32, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 16, 3, 4, 4)  # 9 frames → (9 − 1)/4 + 1 = 3 latent frames
    chunked = policy.decode(x)
    policy.adapter.decode_batch_size = None
    # chunks change nothing but the batch shapes of the VAE's convolutions: pixels in [0, 1], each
    # conv output a float32 sum of ≤ 16 channels × 27 taps per layer
    torch.testing.assert_close(chunked, policy.decode(x), rtol=0, atol=float32_sum_tol(1.0, 16 * 27))
    assert chunked.shape == (3, 9, 3, 32, 32)


def test_example_configs_resolve():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "assets" / "configs"
    for name in ("hunyuan_video15_sage", "wan_t2v", "qwen_image", "sd3_flow_grpo", "flux_flow_grpo", "digits"):
        cfg = TrainConfig.from_yaml(root / f"{name}.yaml").validate()
        assert cfg.resolved().preset is not None
    sage = TrainConfig.from_yaml(root / "hunyuan_video15_sage.yaml").resolved()
    # the paper's settings: 20 steps, shift 5, η 0.5, CFG 6, G = 4, lr 1e-5
    s = sage.config.sampler
    assert (s.num_steps, s.shift, sage.preset.noise_level, s.guidance_scale, sage.config.train.num_generations, sage.learning_rate) == (20, 5.0, 0.5, 6.0, 4, 1e-5)


def test_sampler_shift_sets_the_grid_and_refuses_dynamic_shifting(tmp_path):
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flowrl.builders import build_policy
    from flowrl.config import ConfigError

    cfg = _config(tmp_path, FRAME_REWARD, "model.pipeline=tiny-hunyuan-video", "sampler.shift=7.0", "sampler.num_steps=4")
    policy = build_policy(cfg.resolved(), tmp_path)
    ref = FlowMatchEulerDiscreteScheduler(shift=7.0)
    ref.set_timesteps(sigmas=list(np.linspace(1.0, 0.0, 5)[:-1]))
    torch.testing.assert_close(policy.sigma_grid(), ref.sigmas.float())
    cfg = _config(tmp_path, FRAME_REWARD, "model.pipeline=tiny-qwen-image", "sampler.shift=3.0")
    with pytest.raises(ConfigError, match="sampler.shift.*dynamically"):
        build_policy(cfg.resolved(), tmp_path / "q")
