"""Image-conditioned families (Flux Kontext editing, Wan 2.1 and HunyuanVideo 1.5 image-to-video): the source image of
each prompt row is in the conditioning; ODE sampling reproduces the stock call from the same
generator; recomputed log-probs equal the rollout's; another source gives another sample."""

import copy

import pytest
import torch

from flowrl import FlowPolicy
from flowrl.prompts import ImagePrompt


def _png(path, seed, size):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(arr).save(path)
    return str(path)


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    from flowrl.pipelines.tiny import save_and_reload, tiny_flux_kontext_pipeline

    pipe = save_and_reload(tiny_flux_kontext_pipeline(), tmp_path_factory.mktemp("kontext"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def wan_i2v(tmp_path_factory):
    from flowrl.pipelines import tiny_video
    from flowrl.pipelines.tiny import save_and_reload

    return tiny_video.with_test_defaults(save_and_reload(tiny_video.tiny_wan_i2v_pipeline(), tmp_path_factory.mktemp("wan_i2v")))


@pytest.fixture(scope="module")
def hv15_i2v(tmp_path_factory):
    from flowrl.pipelines import tiny_video
    from flowrl.pipelines.tiny import save_and_reload

    return tiny_video.with_test_defaults(save_and_reload(tiny_video.tiny_hunyuan_video15_i2v_pipeline(), tmp_path_factory.mktemp("hv15_i2v")))


FAMILIES = {"kontext": dict(height=32, width=32), "wan_i2v": dict(height=32, width=32), "hv15_i2v": dict(height=32, width=32)}


def _policy(pipe, family, **kw):
    return FlowPolicy.from_pipeline(pipe, num_steps=2, **FAMILIES[family], **kw)


def _stock(pipe, family, prompts, images, guidance):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    if family == "kontext":
        kw = dict(true_cfg_scale=guidance, negative_prompt="" if guidance > 1 else None, _auto_resize=False, max_area=32 * 32)
        outs = [pipe(prompt=p, image=Image.open(i[0]).convert("RGB"), height=32, width=32, num_inference_steps=2, generator=g, output_type="pt", **kw).images
                for p, i in zip(prompts, images)]
    elif family == "hv15_i2v":  # size from the frame (target_size bucket: 32×32); CFG from the guider
        guider = pipe.guider
        pipe.guider = guider.new(guidance_scale=guidance)
        try:
            outs = [pipe(prompt=p, image=Image.open(i[0]).convert("RGB"), num_frames=5, num_inference_steps=2, generator=g, output_type="pt").frames
                    for p, i in zip(prompts, images)]
        finally:
            pipe.guider = guider
    else:
        kw = dict(guidance_scale=guidance, negative_prompt="" if guidance > 1 else None, num_frames=5)
        outs = [pipe(prompt=p, image=Image.open(i[0]).convert("RGB"), height=32, width=32, num_inference_steps=2, generator=g, output_type="pt", **kw).frames
                for p, i in zip(prompts, images)]
    return torch.cat(outs)


@pytest.mark.parametrize("family", ["kontext", "wan_i2v", "hv15_i2v"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_ode_generate_equals_the_stock_image_conditioned_call(family, guidance, request, tmp_path):
    pipe = request.getfixturevalue(family)
    src = [[_png(tmp_path / "a.png", 0, 32)], [_png(tmp_path / "b.png", 1, 32)]]
    prompts = [ImagePrompt("make it red", src[0]), ImagePrompt("a cat", src[1])]
    policy = _policy(pipe, family, guidance_scale=guidance)
    # one prompt at a time, as the stock call (which draws one noise per call from the running generator)
    g = torch.Generator().manual_seed(0)
    ours = torch.cat([policy.generate([p], generator=g, num_steps=2) for p in prompts])
    stock = _stock(pipe, family, prompts, src, guidance)
    assert ours.shape == stock.shape
    torch.testing.assert_close(ours, stock.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["kontext", "wan_i2v", "hv15_i2v"])
def test_rollout_log_probs_recompute_and_the_source_matters(family, request, tmp_path):
    pipe = request.getfixturevalue(family)
    a, b = _png(tmp_path / "a.png", 0, 32), _png(tmp_path / "b.png", 1, 32)
    prompts = [ImagePrompt("edit", [a]), ImagePrompt("edit", [b])]  # same text, other source
    policy = _policy(pipe, family, guidance_scale=2.0)
    traj = policy.rollout(prompts, group_size=2, generator=torch.Generator().manual_seed(0))
    ev = policy.evaluate(traj)
    torch.testing.assert_close(ev.log_prob.float(), traj.log_probs.float(), atol=1e-4, rtol=0)
    assert torch.equal(traj.group_ids, torch.tensor([0, 0, 1, 1]))
    # the same text, state and σ with the other source image give another velocity
    cond = policy.encode(prompts)
    x = traj.states[::2, 0].to(policy.adapter.dtype)
    v = policy.velocity(x, traj.sigmas[::2, 0], cond)
    v_same = policy.velocity(x[:1].expand_as(x), traj.sigmas[::2, 0], cond)
    rel = ((v_same[0] - v_same[1]).norm() / v_same[0].norm()).item()
    assert rel > 1e-4, rel  # measured: 1.4e-3 (Kontext); 0 if the source were ignored
    torch.testing.assert_close(v[0], v_same[0])
    # a prompt without a source image: one clear error
    with pytest.raises(ValueError, match="has none: give its prompt row an 'image' column"):
        policy.rollout(["edit"], group_size=1)


def test_modular_path_refuses_per_row_sources_instead_of_ignoring_them(tmp_path):
    from flowrl.pipelines.modular import to_modular
    from flowrl.pipelines.tiny import tiny_flux_pipeline

    policy = FlowPolicy.from_pipeline(to_modular(tiny_flux_pipeline()), height=16, width=16, num_steps=2)
    with pytest.raises(ValueError, match="carries a source image .* cannot condition on per row yet"):
        policy.rollout([ImagePrompt("edit", [_png(tmp_path / "a.png", 0, 16)])], group_size=1)


@pytest.mark.parametrize("family", ["kontext", "wan_i2v", "hv15_i2v"])
def test_on_policy_ratio_is_one_for_every_kernel(family, request, tmp_path):
    """The conformance kit's ratio row for the image-conditioned hand adapters: a rollout
    re-evaluated with unchanged weights gives π_new/π_old = 1 for every stochastic kernel."""
    from flowrl.testing import stochastic_kernels

    pipe = request.getfixturevalue(family)
    prompt = ImagePrompt("edit", [_png(tmp_path / "a.png", 0, 32)])
    errs = {}
    for kernel in stochastic_kernels():
        policy = FlowPolicy.from_pipeline(pipe, num_steps=3, sampler=kernel, noise_level=0.5, rollout="window", **FAMILIES[family],
                                          rollout_params={"window_size": 2, "window_range": (0, 2), "mode": "random"})  # the kit's: σ' > 0
        traj = policy.rollout([prompt], group_size=2, generator=torch.Generator().manual_seed(1))
        errs[kernel] = (policy.evaluate(traj).log_prob.double() - traj.log_probs.double()).exp().sub(1).abs().max().item()
    assert max(errs.values()) < 1e-4, errs


def test_image_conditioning_is_cached_per_source_and_size_and_dropped_when_the_vae_changes(kontext, tmp_path):
    a, b = _png(tmp_path / "a.png", 0, 32), _png(tmp_path / "b.png", 1, 32)
    policy = _policy(kontext, "kontext")
    ad = policy.adapter
    c1 = policy.encode([ImagePrompt("x", [a]), ImagePrompt("y", [a]), ImagePrompt("x", [b])])
    assert len(ad._image_cache) == 2  # per source image (and size), not per text
    assert torch.equal(c1["image_latents"][0], c1["image_latents"][1]) and not torch.equal(c1["image_latents"][0], c1["image_latents"][2])
    policy.height = policy.width = 16
    policy.encode([ImagePrompt("x", [a])])
    assert len(ad._image_cache) == 3
    original = kontext.vae
    try:
        kontext.vae = copy.deepcopy(original)  # the module fixture's VAE stays untouched
        before = policy.encode([ImagePrompt("x", [a])])["image_latents"]
        assert len(ad._image_cache) == 1  # another VAE: the cache starts over
        with torch.no_grad():
            for p in kontext.vae.encoder.parameters():
                p.mul_(1.5)  # in-place changes of the VAE's weights
        after = policy.encode([ImagePrompt("x", [a])])["image_latents"]
        assert len(ad._image_cache) == 1 and not torch.equal(before, after)  # re-encoded, not served stale
    finally:
        kontext.vae = original
