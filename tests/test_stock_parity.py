"""FlowPolicy's defaults are the stock diffusers pipelines' call: same conditioning (T5 length,
negative prompt), timestep, σ grid, image size and Euler steps, so ODE sampling reproduces
``pipe(...)`` from the same generator."""

import pytest
import torch

from flowrl import FlowPolicy

PROMPTS = ["a cat", "a dog left of a 3"]


def _stock(pipe, family, guidance, **kw):
    if family == "tiny_flux":  # FluxPipeline's true CFG needs a negative prompt; ours is "" like SD3's
        kw.update(true_cfg_scale=guidance, negative_prompt="" if guidance > 1 else None)
    else:
        kw.update(guidance_scale=guidance)
    return pipe(prompt=PROMPTS, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images


@pytest.mark.parametrize("family", ["tiny_sd3", "tiny_flux"])
@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_ode_generate_equals_the_stock_pipeline_call(family, guidance, request):
    pipe = request.getfixturevalue(family)
    policy = FlowPolicy.from_pipeline(pipe, guidance_scale=guidance, height=16, width=16)
    ours = policy.generate(PROMPTS, generator=torch.Generator().manual_seed(0), num_steps=4)
    stock = _stock(pipe, family, guidance, height=16, width=16)
    assert ours.shape == stock.shape == (2, 3, 16, 16)
    # measured on CPU float32: bit-identical, except Flux with CFG (5.4e-7: the stock call runs the
    # negative and positive rows in two transformer calls, we batch them in one)
    torch.testing.assert_close(ours, stock.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,length,default", [("tiny_sd3", 77, 256), ("tiny_flux", 64, 512)])
def test_a_shorter_text_length_is_an_option_and_changes_the_output(family, length, default, request):
    pipe = request.getfixturevalue(family)
    policy = FlowPolicy.from_pipeline(pipe, height=16, width=16, guidance_scale=4.5)
    assert policy.adapter.max_sequence_length == default  # the stock __call__'s default
    short = FlowPolicy.from_pipeline(pipe, height=16, width=16, guidance_scale=4.5, max_sequence_length=length)
    assert short.encode(["a cat"])["prompt_embeds"].shape[1] < policy.encode(["a cat"])["prompt_embeds"].shape[1]
    a = policy.generate(["a cat"], generator=torch.Generator().manual_seed(0), num_steps=4)
    b = short.generate(["a cat"], generator=torch.Generator().manual_seed(0), num_steps=4)
    assert (a - b).abs().max() > 1e-3  # measured 0.012 (SD3) / 0.009 (Flux): the old defaults were visibly off


def test_default_size_comes_from_the_pipeline(tiny_sd3, tiny_flux):
    # default_sample_size × vae_scale_factor, as the stock __call__ (a hard-coded 512 broke tiny SD3)
    sd3 = FlowPolicy.from_pipeline(tiny_sd3, num_steps=2)
    assert (sd3.height, sd3.width) == (tiny_sd3.default_sample_size * tiny_sd3.vae_scale_factor,) * 2 == (16, 16)
    assert sd3.generate(["a cat"], generator=torch.Generator().manual_seed(0)).shape == (1, 3, 16, 16)
    flux = FlowPolicy.from_pipeline(tiny_flux)
    assert flux.height == tiny_flux.default_sample_size * tiny_flux.vae_scale_factor == 256


def test_sd3_timestep_is_passed_in_float32_like_the_stock_call():
    from flowrl.pipelines.tiny import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline().to(torch.bfloat16)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].clone()), with_kwargs=True)
    policy = FlowPolicy.from_pipeline(pipe, height=16, width=16, num_steps=10)
    policy.generate(["a cat"], generator=torch.Generator().manual_seed(0))
    hook.remove()
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(10)
    assert all(t.dtype == torch.float32 for t in seen)
    # bf16 would round these (e.g. 913.04 → 912): the stock call passes scheduler.timesteps as they are
    assert torch.equal(torch.stack([t[0] for t in seen]), sched.timesteps.float())


@pytest.mark.parametrize("family", ["tiny_sd3", "tiny_flux"])
def test_prompts_and_negative_are_encoded_in_one_call_and_cached(family, request):
    pipe = request.getfixturevalue(family)
    policy = FlowPolicy.from_pipeline(pipe, height=16, width=16, guidance_scale=4.5)
    ad = policy.adapter
    cond = policy.encode(["a cat", "a dog", "a cat"])
    # with the cache on, each distinct string (prompts and "") is encoded alone, once, so a row never
    # depends on the batch that first met it (exact resume); repeats in the batch are not re-encoded
    assert ad.text_encoder_calls == 3
    # rows equal the stock encode_prompt of each prompt and of the negative
    if family == "tiny_sd3":
        pe, npe, pooled, npooled = pipe.encode_prompt(prompt=["a cat", "a dog", "a cat"], prompt_2=None, prompt_3=None, do_classifier_free_guidance=True, negative_prompt=[""] * 3)
    else:
        pe, pooled, _ = pipe.encode_prompt(prompt=["a cat", "a dog", "a cat"], prompt_2=None)
        npe, npooled, _ = pipe.encode_prompt(prompt=[""] * 3, prompt_2=None)
    # another batch composition changes the last bits: measured ≤ 5.6e-6 (SD3's T5 rows)
    for ours, stock in ((cond["prompt_embeds"], pe), (cond["pooled"], pooled), (cond["neg_prompt_embeds"], npe), (cond["neg_pooled"], npooled)):
        torch.testing.assert_close(ours, stock, atol=3e-5, rtol=0)
    again = policy.encode(["a dog", "a cat"])
    assert ad.text_encoder_calls == 3  # served from the cache
    torch.testing.assert_close(again["prompt_embeds"], cond["prompt_embeds"][[1, 0]], atol=0, rtol=0)  # the cached tensors themselves
    policy.encode(["a new prompt"])
    assert ad.text_encoder_calls == 4


def test_prompt_cache_is_dropped_when_the_text_encoder_changes():
    from flowrl.pipelines.tiny import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    policy = FlowPolicy.from_pipeline(pipe, height=16, width=16)
    before = policy.encode(["a cat"])["prompt_embeds"]
    with torch.no_grad():
        next(pipe.text_encoder_3.parameters()).mul_(1.5)  # in place: the cache must notice
    after = policy.encode(["a cat"])["prompt_embeds"]
    assert policy.adapter.text_encoder_calls == 2 and not torch.equal(before, after)
    pipe.text_encoder.train()  # an encoder in training mode (dropout) is never cached
    policy.encode(["a cat"])
    policy.encode(["a cat"])
    assert policy.adapter.text_encoder_calls == 4
    off = FlowPolicy.from_pipeline(tiny_sd3_pipeline(), height=16, width=16, prompt_cache_mb=0)
    off.encode(["a cat"])
    off.encode(["a cat"])
    assert off.adapter.text_encoder_calls == 2
