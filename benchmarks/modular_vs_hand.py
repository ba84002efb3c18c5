"""Hand adapters vs the modular path on the same weights (issue: retire a hand adapter only where the
two agree bit for bit).

For each family with a hand adapter (SD3, Flux, Qwen-Image, Wan 2.1, HunyuanVideo 1.5) and each
guidance setting, on the tiny random pipeline: the max |Δ| between the two paths' ODE samples (same
seed), and between the log-probs each path computes for the *same* stored trajectory (a rollout of
the hand path, re-evaluated by both). 0 means bitwise equal.

    python benchmarks/modular_vs_hand.py
"""

from __future__ import annotations

import copy
import warnings

import torch

warnings.simplefilter("ignore")


def families():
    from flowrl.pipelines.tiny import tiny_flux_pipeline, tiny_sd3_pipeline
    from flowrl.pipelines.tiny_modular import short_hunyuan_video15_context
    from flowrl.pipelines.tiny_video import tiny_hunyuan_video15_pipeline, tiny_qwen_image_pipeline, tiny_wan_pipeline, with_test_defaults

    video = {"num_frames": 5}
    return [
        ("SD3", tiny_sd3_pipeline, (1.0, 4.5), {}, (16, 16), None),
        ("Flux", tiny_flux_pipeline, (1.0,), {}, (16, 16), None),
        ("Qwen-Image", tiny_qwen_image_pipeline, (1.0, 4.0), {"negative_prompt": " "}, (64, 64), None),
        ("Wan 2.1", tiny_wan_pipeline, (1.0, 5.0), video, (32, 32), None),
        ("HunyuanVideo 1.5", lambda: with_test_defaults(tiny_hunyuan_video15_pipeline()), (1.0, 6.0), video, (32, 32), short_hunyuan_video15_context),
    ]


def compare(build, guidance, options, size, fix, prompts=("a cat",), steps=3):
    from flowrl import FlowPolicy
    from flowrl.pipelines.modular import to_modular

    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    h, w = size
    hand_options = {k: v for k, v in options.items() if k != "negative_prompt" or hasattr(type(pipe), "_flowrl_unused")}
    hand = FlowPolicy.from_pipeline(pipe, modular=False, guidance_scale=guidance, height=h, width=w, num_steps=steps, adapter_options=hand_options or None)
    mp = to_modular(copy.copy(pipe))
    if fix:
        mp = fix(mp)
    mod_options = dict(options)
    mod = FlowPolicy.from_pipeline(mp, guidance_scale=guidance, height=h, width=w, num_steps=steps, adapter_options=mod_options or None)
    a = hand.generate(list(prompts), generator=torch.Generator().manual_seed(0))
    b = mod.generate(list(prompts), generator=torch.Generator().manual_seed(0))
    traj = hand.rollout(list(prompts), group_size=2, generator=torch.Generator().manual_seed(1))
    traj_m = copy.copy(traj)
    traj_m.cond = mod.encode(traj.prompts)
    with torch.no_grad():
        lp_h = hand.evaluate(traj).log_prob
        lp_m = mod.evaluate(traj_m).log_prob
    sig_h, sig_m = hand.sigma_grid(), mod.sigma_grid()
    return float((a - b).abs().max()), float((lp_h - lp_m).abs().max()), float((sig_h - sig_m).abs().max())


def main() -> None:
    print("| family | guidance | ODE sample Δ | log-prob Δ (same trajectory) | σ grid Δ |")
    print("|---|---|---|---|---|")
    for name, build, scales, options, size, fix in families():
        for g in scales:
            try:
                d_img, d_lp, d_sig = compare(build, g, options, size, fix)
                print(f"| {name} | {g:g} | {d_img:.1e} | {d_lp:.1e} | {d_sig:.1e} |", flush=True)
            except Exception as exc:  # noqa: BLE001 - a row per failure, the table goes on
                print(f"| {name} | {g:g} | error: {type(exc).__name__}: {str(exc)[:80]} | | |", flush=True)


if __name__ == "__main__":
    main()
