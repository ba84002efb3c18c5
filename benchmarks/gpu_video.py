"""One LoRA training iteration on video at the real Wan 2.1 T2V-1.3B transformer config (random
weights, nothing downloaded): bf16, 33 frames at 240×416 (latents 16×9×30×52, 3,510 tokens),
10 steps, CFG 5, G = 4, Flow-GRPO. Prints seconds (rollout, rewards, update) and peak GPU memory,
with and without gradient checkpointing of the transformer (and with VAE tiling on top).

    python benchmarks/gpu_video.py                  # on a CUDA machine: the table
    python benchmarks/gpu_video.py --tiny --device cpu   # a dry run of this script on tiny models

The text encoder is a one-layer UMT5 with the real width (4096) and the VAE is Wan's real
architecture, both random; the reward is the mean pixel (no reward model), so the numbers are the
policy's cost. Not a test: CI has no GPU; without CUDA this prints a note and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

#: Wan2.1-T2V-1.3B ``transformer/config.json``
WAN21_13B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
    freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)


def build_pipeline(tiny: bool):
    """A WanPipeline: the real 1.3B transformer and VAE architectures (random), a one-layer UMT5 of
    the real width, flow-matching Euler scheduler with the 480p shift 3.0."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from flowrl.pipelines.tiny_video import tiny_wan_pipeline, umt5_tokenizer

    if tiny:
        return tiny_wan_pipeline()
    torch.manual_seed(0)
    tok = umt5_tokenizer()
    text = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=4096, d_ff=256, d_kv=64, num_layers=1, num_heads=64, relative_attention_num_buckets=32))
    return WanPipeline(
        tokenizer=tok, text_encoder=text.eval(), transformer=WanTransformer3DModel(**WAN21_13B).eval(),
        vae=AutoencoderKLWan().eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def to_bf16_like_from_pretrained(model: torch.nn.Module) -> None:
    """bf16 weights except the modules the model lists in ``_keep_in_fp32_modules`` (what
    ``from_pretrained(torch_dtype=torch.bfloat16)`` does for a released checkpoint)."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    model.to(torch.bfloat16)
    for name, module in model.named_modules():
        if keep and any(k in name.split(".") for k in keep):
            module.float()


def brightness(outputs, prompts, meta=None):
    """Mean pixel of each video: a reward with no model of its own."""
    return outputs.float().mean(dim=tuple(range(1, outputs.dim())))


def run(pipe, *, device: str, checkpointing: bool, tiling: bool, args) -> dict[str, float]:
    import copy

    from flowrl import FlowPolicy, TrainConfig
    from flowrl.rewards import RewardSet
    from flowrl.rewards.base import FunctionReward
    from flowrl.trainer import Trainer

    pipe = copy.deepcopy(pipe).to(device)
    if device.startswith("cuda"):
        to_bf16_like_from_pretrained(pipe.transformer)
        pipe.text_encoder.to(torch.bfloat16)
        pipe.vae.to(torch.bfloat16)
    if tiling:
        pipe.vae.enable_tiling()
    h, w, f = (32, 32, 5) if args.tiny else (args.height, args.width, args.frames)
    policy = FlowPolicy(pipe, sampler="flow", noise_level=0.7, num_steps=args.steps, guidance_scale=args.cfg, height=h, width=w, adapter_options={"num_frames": f})
    with tempfile.TemporaryDirectory() as d:
        cfg = TrainConfig().override([
            f"train.output_dir={d}", "train.iterations=1", f"train.num_generations={args.group_size}", "train.prompts_per_iteration=1",
            f"train.train_batch_size={args.group_size}", f"train.lora_rank={args.lora_rank}", f"train.lora_alpha={2 * args.lora_rank}",
            "train.progress=false", "loss.beta=0", f"model.device={device}", "train.learning_rate=1e-4", "train.prompts=[a corgi running on the beach]",
            f"sampler.num_steps={args.steps}", f"sampler.guidance_scale={args.cfg}",
        ])
        trainer = Trainer(cfg, policy=policy, reward_set=RewardSet({"brightness": FunctionReward(brightness)}, {"brightness": 1.0}))
        if checkpointing:
            policy.model.enable_gradient_checkpointing()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        rec = trainer.iteration(1)
        if device == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"total": total, "rollout": rec["time/rollout"], "rewards": rec["time/rewards"], "update": rec["time/update"], "peak": peak, "ratio": rec.get("ratio/mean", float("nan"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny random Wan (a dry run of the script)")
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--width", type=int, default=416)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=32)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_video: no CUDA device here, nothing measured (run on a GPU machine, or --tiny --device cpu for a dry run).")
        return 0
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    size = "tiny Wan, 5×32×32" if args.tiny else f"Wan 2.1 1.3B config, {args.frames}×{args.height}×{args.width}"
    print(f"# gpu_video — {name}, torch {torch.__version__}; {size}, {args.steps} steps, CFG {args.cfg}, G={args.group_size}, LoRA r={args.lora_rank}, bf16")
    pipe = build_pipeline(args.tiny)
    n = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"transformer parameters: {n / 1e9:.3f} B")
    print("| gradient checkpointing | VAE tiling | iteration s | rollout s | rewards s | update s | peak GiB | ratio/mean |")
    print("|---|---|---|---|---|---|---|---|")
    for ckpt, tiling in ((False, False), (True, False), (True, True)):
        try:
            r = run(pipe, device=args.device, checkpointing=ckpt, tiling=tiling, args=args)
            print(f"| {'on' if ckpt else 'off'} | {'on' if tiling else 'off'} | {r['total']:.1f} | {r['rollout']:.1f} | {r['rewards']:.1f} | {r['update']:.1f} | {r['peak']:.1f} | {r['ratio']:.4f} |")
        except torch.cuda.OutOfMemoryError:
            print(f"| {'on' if ckpt else 'off'} | {'on' if tiling else 'off'} | out of memory | | | | | |")
            torch.cuda.empty_cache()
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
