"""The modular path (``flowrl.pipelines.modular``) and the conformance kit (``flowrl.testing``) on
every tiny family of the kit (text-to-image / text-to-video on the modular path; editing and
image-to-video through their hand adapters against the stock regular call, with source images the
kit makes): ratio 1 on-policy for every kernel, ODE sampling equal to the stock call, a LoRA flowrl
saves loading with the stock loader."""

import copy

import pytest
import torch

from flowrl import FlowPolicy
from flowrl.pipelines.tiny_modular import TINY_FAMILIES

# Bounds: measured maxima over the families at 1 and 2 threads (CPU float32) were 3.6e-7 (ratio − 1:
# recomputation in another batch composition moves the last bits), 8.9e-7 (stock parity: the stock
# call steps with scheduler.step, flowrl with its own Euler step) and 1.1e-6 (LoRA round trip, the
# same plus the LoRA); the bound leaves ~10× room, far below any real mismatch (a wrong timestep,
# noise draw or guidance moves these by 1e-3 or more).
RATIO_TOL = 1e-5
PARITY_TOL = 1e-5
LORA_TOL = 1e-5


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_the_kit_passes_on_every_family(family, tmp_path):
    from flowrl.testing import check_family, stochastic_kernels

    res = check_family(family, str(tmp_path), num_steps=2)
    spec = TINY_FAMILIES[family]
    assert res.path == ("modular" if spec.modular else "hand adapter")
    assert spec.modular or res.task in ("image editing", "image-to-video")  # the kit gave each prompt a source image
    assert sorted(res.ratio_err) == sorted(stochastic_kernels()), res.notes
    assert res.max_ratio_err <= RATIO_TOL
    assert res.parity_err <= PARITY_TOL
    assert res.lora_err <= LORA_TOL
    assert not any("did not change" in n for n in res.notes), res.notes
    assert res.rollout_step_s > 0 and res.update_step_s > 0


def test_the_kit_picks_the_hand_adapter_for_image_conditioned_pipelines_and_makes_their_sources(tmp_path):
    from flowrl.pipelines.tiny import tiny_flux_kontext_pipeline, tiny_flux_pipeline
    from flowrl.testing import _image_conditioned_hand, source_image

    assert _image_conditioned_hand(tiny_flux_kontext_pipeline()) and not _image_conditioned_hand(tiny_flux_pipeline())
    a = source_image(str(tmp_path / "a.png"), seed=0, height=16, width=24)
    b = source_image(str(tmp_path / "b.png"), seed=0, height=16, width=24)
    c = source_image(str(tmp_path / "c.png"), seed=1, height=16, width=24)
    from PIL import Image
    import numpy as np

    arr = [np.asarray(Image.open(x)) for x in (a, b, c)]
    assert arr[0].shape == (16, 24, 3) and (arr[0] == arr[1]).all() and not (arr[0] == arr[2]).all()


def test_a_regular_pipeline_becomes_its_modular_pipeline(tiny_flux):
    from flowrl.pipelines.modular import ModularAdapter

    policy = FlowPolicy.from_pipeline(tiny_flux, modular=True, height=16, width=16, num_steps=2)
    assert isinstance(policy.adapter, ModularAdapter)
    assert type(policy.pipe).__name__ == "FluxModularPipeline"
    assert policy.model is tiny_flux.transformer  # components are shared, not copied
    # with a hand adapter registered, the default stays the hand adapter
    assert not isinstance(FlowPolicy.from_pipeline(tiny_flux).adapter, ModularAdapter)


def test_a_family_without_a_hand_adapter_goes_modular_by_default():
    from flowrl.pipelines.modular import ModularAdapter
    from flowrl.pipelines.tiny_modular import tiny_z_image_pipeline

    policy = FlowPolicy.from_pipeline(tiny_z_image_pipeline(), height=32, width=32, num_steps=2, adapter_options={"max_sequence_length": 32})
    assert isinstance(policy.adapter, ModularAdapter) and type(policy.pipe).__name__ == "ZImageModularPipeline"


def test_the_update_differentiates_through_diffusers_blocks_with_batched_timesteps(tiny_sd3):
    from flowrl.builders import add_lora

    pipe = copy.deepcopy(tiny_sd3)
    policy = FlowPolicy.from_pipeline(pipe, modular=True, height=16, width=16, num_steps=3, guidance_scale=4.5)
    add_lora(policy.model, rank=2, alpha=2, targets=list(policy.default_lora_targets), seed=0)
    traj = policy.rollout(["a cat", "a dog"], group_size=2, generator=torch.Generator().manual_seed(0))
    ev = policy.evaluate(traj)  # all 3 steps in one call: rows carry their own timestep
    ev.log_prob.sum().backward()
    grads = [p.grad for n, p in policy.model.named_parameters() if "lora_B" in n]  # B starts at 0, so only its grad is non-zero
    assert grads and all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    with torch.no_grad():
        per_step = torch.cat([policy.evaluate(traj, steps=[k]).log_prob for k in range(traj.num_steps)], 1)
    torch.testing.assert_close(ev.log_prob.detach(), per_step, atol=2e-6, rtol=0)


def test_wan22_runs_both_experts_one_step_per_call():
    from flowrl.pipelines.tiny_modular import tiny_wan22_pipeline

    pipe = tiny_wan22_pipeline()
    policy = FlowPolicy.from_pipeline(pipe, modular=True, height=32, width=32, num_steps=2, adapter_options={"num_frames": 5})
    calls = {"transformer": 0, "transformer_2": 0}
    for name in calls:
        getattr(pipe, name).register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(name, calls[name] + 1))
    traj = policy.rollout(["a cat"], group_size=2, generator=torch.Generator().manual_seed(0))
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0  # the boundary falls inside the schedule
    with torch.no_grad():
        ev = policy.evaluate(traj)  # two steps, two experts: the denoiser branches on t, so one step per call
    assert policy.adapter._per_step
    assert float((ev.log_prob - traj.log_probs).abs().max()) <= 1e-5


def test_a_loop_that_steps_a_second_latent_stream_is_refused_with_the_reason():
    from diffusers.modular_pipelines import LTX2AutoBlocks

    from flowrl.pipelines.modular import split_blocks

    with pytest.raises(TypeError, match="audio_latents"):
        split_blocks(LTX2AutoBlocks().get_execution_blocks(prompt="x"), "LTX2ModularPipeline")


def test_an_unknown_call_input_names_the_field(tiny_flux):
    with pytest.raises(ValueError, match="num_framez.*Known:"):
        FlowPolicy.from_pipeline(tiny_flux, modular=True, adapter_options={"num_framez": 5})


def test_guidance_without_a_guider_is_refused_with_the_fix(tiny_flux):
    with pytest.raises(ValueError, match="no guider.*adapter_options"):
        FlowPolicy.from_pipeline(tiny_flux, modular=True, guidance_scale=4.5)


def test_prompts_are_encoded_once_and_cached(tiny_sd3):
    policy = FlowPolicy.from_pipeline(tiny_sd3, modular=True, height=16, width=16, num_steps=2, guidance_scale=4.5)
    ad = policy.adapter
    first = policy.encode(["a cat", "a dog", "a cat"])
    calls = ad.text_encoder_calls
    again = policy.encode(["a dog", "a cat"])
    assert ad.text_encoder_calls == calls  # every string came from the cache
    assert set(first) >= {"prompt_embeds", "negative_prompt_embeds"}  # the guider needs the negative
    torch.testing.assert_close(again["prompt_embeds"][1], first["prompt_embeds"][0], atol=0, rtol=0)


def test_check_pipeline_cli_prints_the_table(capsys):
    from flowrl.cli import main

    assert main(["check-pipeline", "ZImagePipeline", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "| Z-Image | ZImageModularPipeline | text-to-image |" in out


@pytest.mark.parametrize("family,guidance,options", [
    ("tiny_flux", 1.0, {}),
    ("tiny_wan", 1.0, {"num_frames": 5}),
    ("tiny_wan", 5.0, {"num_frames": 5}),
])
def test_hand_adapters_and_the_modular_path_agree_bit_for_bit(family, guidance, options, request):
    """Where docs/models.md says a hand adapter equals the modular path on the same weights: same
    ODE samples and the same log-probs of one stored trajectory, bit for bit (measured 0). Qwen-Image
    passed this too (with and without CFG, negative " " on both sides) and its hand adapter is retired."""
    pipe = request.getfixturevalue(family)
    hand_opts = {k: v for k, v in options.items() if k != "negative_prompt"} or None
    hand = FlowPolicy.from_pipeline(pipe, modular=False, guidance_scale=guidance, num_steps=3, adapter_options=hand_opts)
    mod = FlowPolicy.from_pipeline(pipe, modular=True, guidance_scale=guidance, num_steps=3, height=hand.height, width=hand.width, adapter_options=options or None)
    a = hand.generate(["a cat"], generator=torch.Generator().manual_seed(0))
    b = mod.generate(["a cat"], generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    traj = hand.rollout(["a cat"], group_size=2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp_hand = hand.evaluate(traj).log_prob
        traj.cond = mod.encode(traj.prompts)
        assert torch.equal(mod.evaluate(traj).log_prob, lp_hand)


def test_the_retired_qwen_image_adapter_is_the_modular_path(tiny_qwen_image):
    from flowrl.pipelines.modular import ModularAdapter

    policy = FlowPolicy(tiny_qwen_image, num_steps=2, guidance_scale=4.0)
    assert isinstance(policy.adapter, ModularAdapter)
    assert type(policy.adapter.pipe).__name__ == "QwenImageModularPipeline"
    assert policy.adapter.call_kwargs["negative_prompt"] == " "  # the model card's negative, as before
    assert "negative_prompt_embeds" in policy.encode(["a cat"])
