"""Wan, HunyuanVideo 1.5 and Qwen-Image adapters on tiny random pipelines (saved and reloaded):
the ODE kernel reproduces each stock ``__call__`` from the same seed, rollouts of every kernel and
schedule recompute to ratio 1 on 5-D video latents, each family's σ grid and CFG rule."""

from __future__ import annotations

import copy

import pytest
import torch

from flowrl.pipelines.flow_policy import FlowPolicy
from tests._tolerance import EPS32, assert_recomputed_log_probs

PROMPTS = ["a cat", "a dog runs"]


def _stock(pipe, family: str, prompts, *, guidance: float, steps: int, seed: int):
    """The stock pipeline's own output (``output_type="pt"``) for ``prompts``."""
    pipe = copy.deepcopy(pipe)  # the session fixture is shared: the guider swap stays local
    pipe.set_progress_bar_config(disable=True)
    d = pipe.flowrl_defaults
    h, w = d["size"]
    gen = torch.Generator().manual_seed(seed)
    if family == "wan":
        return pipe(prompt=prompts, height=h, width=w, num_frames=d["num_frames"], num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="pt").frames
    if family == "hunyuan":
        pipe.guider = pipe.guider.new(guidance_scale=guidance)
        return pipe(prompt=prompts, height=h, width=w, num_frames=d["num_frames"], num_inference_steps=steps, generator=gen, output_type="pt").frames
    cfg = dict(true_cfg_scale=guidance, negative_prompt=" ") if guidance > 1 else dict(true_cfg_scale=1.0)
    return pipe(prompt=prompts, height=h, width=w, num_inference_steps=steps, generator=gen, output_type="pt", **cfg).images


@pytest.fixture
def family_pipe(request):
    return request.getfixturevalue({"wan": "tiny_wan", "hunyuan": "tiny_hunyuan_video", "qwen": "tiny_qwen_image"}[request.param])


FAMILIES = ["wan", "hunyuan", "qwen"]


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("family_pipe", FAMILIES, indirect=True)
def test_ode_reproduces_the_stock_pipeline(family_pipe, guidance, request):
    family = request.node.callspec.params["family_pipe"]
    # the HunyuanVideo 1.5 VAE decodes one video per call (the stock pipeline fails with two prompts)
    prompts = PROMPTS[:1] if family == "hunyuan" else PROMPTS
    ref = _stock(family_pipe, family, prompts, guidance=guidance, steps=3, seed=0)
    policy = FlowPolicy(family_pipe, num_steps=3, guidance_scale=guidance)
    ours = policy.generate(prompts, generator=torch.Generator().manual_seed(0))
    assert ours.shape == ref.shape
    if family != "qwen":
        assert ours.dim() == 5 and ours.shape[1] == family_pipe.flowrl_defaults["num_frames"]  # [B, F, C, H, W]
    assert ours.min() >= 0 and ours.max() <= 1
    # measured: 0 (Qwen-Image), ≤ 1.5e-6 (Wan, HunyuanVideo: CFG rows batched in one call, float32)
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("family_pipe", FAMILIES, indirect=True)
def test_rollout_recomputes_to_ratio_one(family_pipe, guidance, request):
    policy = FlowPolicy(family_pipe, num_steps=3, guidance_scale=guidance, store_means=True)
    traj = policy.rollout(PROMPTS, group_size=2, generator=torch.Generator().manual_seed(1))
    assert traj.log_probs.shape == (4, 3)
    latent = tuple(policy.adapter.initial_noise(1, height=policy.height, width=policy.width, generator=None).shape[1:])
    assert tuple(traj.states.shape) == (4, 3, *latent)
    if request.node.callspec.params["family_pipe"] != "qwen":
        assert len(latent) == 4  # [C, F', h, w]: video latents
        assert traj.outputs.shape[:2] == (4, 5)
    ev = policy.evaluate(traj)
    # measured bit-identical on one machine (same batch composition and CFG as the rollout); other
    # BLAS builds or thread counts may reorder the float32 sums: held to their bound
    assert_recomputed_log_probs(ev.log_prob, traj.log_probs, traj.actions, ev.mean, ev.std)
    # the means: a few ulps (4) of the values that enter them (|x| + |μ|), as the bound assumes
    torch.testing.assert_close(ev.mean, traj.means, rtol=0, atol=4 * EPS32 * float((traj.means.abs() + traj.actions.abs()).max()))
    # group members differ (independent noise), prompts differ
    assert not torch.equal(traj.outputs[0], traj.outputs[1])


@pytest.mark.parametrize("kernel", ["flow", "dance", "sage", "cps"])
def test_every_kernel_on_video_latents(tiny_wan, kernel):
    # cps has zero std on the last step (σ' = 0): stochastic steps in the first two only
    schedule = {"rollout": "window", "rollout_params": {"window_size": 2, "window_range": [0, 2], "mode": "random"}} if kernel == "cps" else {}
    policy = FlowPolicy(tiny_wan, sampler=kernel, noise_level=0.5, num_steps=3, **schedule)
    traj = policy.rollout(PROMPTS[:1], group_size=2, generator=torch.Generator().manual_seed(2))
    ev = policy.evaluate(traj)
    assert torch.isfinite(traj.log_probs).all()
    # a float32 bound, not 1e-6: another 2-core machine measured 1.43e-6 on cps (its small step std
    # amplifies the rounding of the recomputed mean), this one ≤ 9.5e-7
    assert_recomputed_log_probs(ev.log_prob, traj.log_probs, traj.actions, ev.mean, ev.std)
    # the stored log-prob is the Gaussian density of the stored action averaged over all C·F'·h·w dims
    from flowrl.sde import gaussian_log_prob

    std = ev.std[:, 0].view(-1, 1, 1, 1, 1)
    lp = gaussian_log_prob(traj.actions[:, 0], ev.mean[:, 0], std)
    torch.testing.assert_close(lp, traj.log_probs[:, 0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("rollout,params", [
    ("window", {"window_size": 2, "window_range": [0, 3], "mode": "random"}),
    ("singular", {"k_steps": None}),
    ("tree", {"split_steps": [0, 1], "branch": 2, "split_noise_scale": 2.0}),
])
def test_structured_rollouts_on_video(tiny_wan, rollout, params):
    policy = FlowPolicy(tiny_wan, sampler="flow" if rollout != "tree" else "dance", num_steps=3, rollout=rollout, rollout_params=params)
    traj = policy.rollout(PROMPTS[:1], group_size=4, generator=torch.Generator().manual_seed(3))
    assert traj.outputs.dim() == 5
    ev = policy.evaluate(traj)
    assert_recomputed_log_probs(ev.log_prob, traj.log_probs, traj.actions, ev.mean, ev.std)


def test_wan_unipc_release_scheduler_rolls_out_on_the_euler_grid_with_its_shift(tmp_path):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from flowrl.pipelines import tiny_video
    from flowrl.pipelines.tiny import save_and_reload

    pipe = tiny_video.with_test_defaults(save_and_reload(tiny_video.tiny_wan_pipeline(unipc=True, shift=5.0), tmp_path))
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    policy = FlowPolicy(pipe, num_steps=4)
    ref = FlowMatchEulerDiscreteScheduler(shift=5.0)
    ref.set_timesteps(4)
    torch.testing.assert_close(policy.sigma_grid(), ref.sigmas.float())
    traj = policy.rollout(["a cat"], group_size=2, generator=torch.Generator().manual_seed(0))
    ev = policy.evaluate(traj)
    assert_recomputed_log_probs(ev.log_prob, traj.log_probs, traj.actions, ev.mean, ev.std)
    pipe.scheduler = DDIMScheduler()
    with pytest.raises(TypeError, match="FlowMatchEulerDiscreteScheduler"):
        FlowPolicy(pipe)


@pytest.mark.parametrize("variant", ["two_experts", "expand_timesteps"])
def test_wan22_variants_match_the_stock_pipeline(tiny_wan, variant):
    """Wan 2.2 A14B (a low-noise expert ``transformer_2`` below ``boundary_ratio``) and TI2V-5B
    (``expand_timesteps``: one timestep per latent token)."""
    from diffusers import WanPipeline

    parts = {k: copy.deepcopy(getattr(tiny_wan, k)) for k in ("tokenizer", "text_encoder", "vae", "scheduler", "transformer")}
    if variant == "two_experts":
        second = copy.deepcopy(parts["transformer"])
        with torch.no_grad():
            for p in second.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        pipe = WanPipeline(**parts, transformer_2=second, boundary_ratio=0.6)
    else:
        pipe = WanPipeline(**parts, expand_timesteps=True)
    pipe.flowrl_defaults = dict(tiny_wan.flowrl_defaults)
    ref = _stock(pipe, "wan", PROMPTS, guidance=2.0, steps=4, seed=5)
    ours = FlowPolicy(pipe, num_steps=4, guidance_scale=2.0).generate(PROMPTS, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=1e-5)
    if variant == "two_experts":  # the second expert really ran: without it the result differs
        single = FlowPolicy(WanPipeline(**parts), num_steps=4, guidance_scale=2.0, height=32, width=32, adapter_options={"num_frames": 5})
        assert (single.generate(PROMPTS, generator=torch.Generator().manual_seed(5)) - ours).abs().max() > 1e-4


def test_frame_count_and_size_errors_name_the_field(tiny_wan, tiny_hunyuan_video):
    with pytest.raises(ValueError, match=r"sampler.num_frames=4: Wan needs 4k \+ 1"):
        FlowPolicy(tiny_wan, adapter_options={"num_frames": 4}).generate(["a"])
    with pytest.raises(ValueError, match="multiples of 16"):
        FlowPolicy(tiny_wan, height=40, width=32).generate(["a"])
    with pytest.raises(ValueError, match="multiples of 16"):
        FlowPolicy(tiny_hunyuan_video, height=24, width=32).generate(["a"])
    with pytest.raises(ValueError, match="no option 'frames'"):
        FlowPolicy(tiny_wan, adapter_options={"frames": 5})


def test_adapter_options_on_an_image_family_are_a_config_error(tiny_sd3):
    from flowrl.builders import _checked_adapter_options
    from flowrl.config import ConfigError

    with pytest.raises(ConfigError, match="sampler.num_frames only apply to video"):
        _checked_adapter_options(tiny_sd3, {"num_frames": 5})


def test_negative_prompt_and_cfg_change_the_velocity(tiny_wan):
    """CFG mixes v_u + w·(v_c − v_u) with the negative prompt's prediction (checked by hand)."""
    a = FlowPolicy(tiny_wan, guidance_scale=3.0, adapter_options={"negative_prompt": "blurry"})
    x = a.adapter.initial_noise(1, height=32, width=32, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7])
    cond = a.encode(["a cat"])
    plain = FlowPolicy(tiny_wan, guidance_scale=1.0)
    v_c = plain.velocity(x, sigma, plain.encode(["a cat"]))
    v_u = plain.velocity(x, sigma, plain.encode(["blurry"]))
    torch.testing.assert_close(a.velocity(x, sigma, cond), v_u + 3.0 * (v_c - v_u), rtol=0, atol=1e-5)


def test_hunyuan_guider_settings_are_kept(tiny_hunyuan_video):
    from flowrl.pipelines.hunyuan_video import guided_velocity

    vc, vu = torch.randn(2, 3, 2, 2, 2, generator=torch.Generator().manual_seed(0)).unbind(0)[0][None], torch.zeros(1, 3, 2, 2, 2)
    torch.testing.assert_close(guided_velocity(vc, vu, 6.0), 6.0 * vc)  # v_u + w(v_c − v_u) with v_u = 0
    torch.testing.assert_close(guided_velocity(vc, vu, 6.0, original_formulation=True), 7.0 * vc)  # v_c + w(v_c − v_u)
    pipe = copy.deepcopy(tiny_hunyuan_video)
    pipe.guider = pipe.guider.new(start=0.2)
    with pytest.raises(ValueError, match="start=0.2"):
        FlowPolicy(pipe)
