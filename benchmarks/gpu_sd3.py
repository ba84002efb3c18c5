"""Rollout and update throughput on real-size SD3.5-Medium and FLUX.1-dev transformers (GPU).

    python benchmarks/gpu_sd3.py [--models sd3 flux] [--steps 10] [--group 8] [--size 512] [--peak-tflops N]

Random weights at the published configurations (nothing is downloaded), bf16, 512×512, 10 steps,
G = 8 images of one prompt. Text encoders keep their real output widths (CLIP-L 768, CLIP-G 1280,
T5-XXL 4096, real token lengths) but have one layer each: the prompt embeddings are cached after
the first call anyway; the VAE is the real architecture. LoRA rank 32 on the attention
projections, gradient checkpointing on.

Reports per model: rollout images/s (SDE kernel, log-probs kept), update seconds per iteration
(one optimizer step over the G samples' stored steps) with per-timestep recomputation (one call
per stored step, ``train.max_rows_per_call`` = rows of one step) and batched recomputation
(``--batched-rows`` rows per call), peak GPU memory of each phase, and the update's model-FLOPs
utilisation: FLOPs of forward + backward counted by ``torch.utils.flop_counter`` on one row, times
rows, over the measured time and the card's dense bf16 peak (H100/H200 989 TFLOP/s; A100 312;
override with ``--peak-tflops``). Without CUDA it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: dense bf16 peaks (TFLOP/s) by a substring of torch.cuda.get_device_name()
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0, "4090": 165.0, "L4": 121.0}

SD35_MEDIUM = dict(  # stabilityai/stable-diffusion-3.5-medium transformer/config.json
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
FLUX1_DEV = dict(  # black-forest-labs/FLUX.1-dev transformer/config.json
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
VAE_16CH = dict(  # the SD3 / Flux VAE architecture (16 latent channels, scale factor 8)
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
)


def _text_encoders(clip_widths: tuple[int, ...], t5_width: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from flowrl.pipelines.tiny import clip_tokenizer, t5_tokenizer

    tok, t5tok = clip_tokenizer(), t5_tokenizer()
    clips = []
    for w in clip_widths:
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=w, intermediate_size=w, num_hidden_layers=1, num_attention_heads=w // 64,
                             max_position_embeddings=77, projection_dim=w, bos_token_id=len(tok) - 2, eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1)
        clips.append(CLIPTextModelWithProjection(cfg) if len(clip_widths) > 1 else CLIPTextModel(cfg))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5tok), d_model=t5_width, d_ff=512, d_kv=64, num_layers=1, num_heads=8))
    return tok, t5tok, clips, t5


def build_pipeline(name: str, device: str):
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # random init directly in bf16, on the GPU
    try:
        with torch.device(device):
            if name == "sd3":
                tok, t5tok, (c1, c2), t5 = _text_encoders((768, 1280), 4096)
                pipe = StableDiffusion3Pipeline(
                    transformer=SD3Transformer2DModel(**SD35_MEDIUM), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                    vae=AutoencoderKL(**VAE_16CH, scaling_factor=1.5305, shift_factor=0.0609), text_encoder=c1, tokenizer=tok,
                    text_encoder_2=c2, tokenizer_2=copy.deepcopy(tok), text_encoder_3=t5, tokenizer_3=t5tok,
                )
            else:
                tok, t5tok, (c1,), t5 = _text_encoders((768,), 4096)
                sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                        base_image_seq_len=256, max_image_seq_len=4096)
                pipe = FluxPipeline(transformer=FluxTransformer2DModel(**FLUX1_DEV), scheduler=sched,
                                    vae=AutoencoderKL(**VAE_16CH, scaling_factor=0.3611, shift_factor=0.1159),
                                    text_encoder=c1, tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5tok)
    finally:
        torch.set_default_dtype(prev)
    return pipe.to(device)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (kernels, allocator, prompt cache)
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_gib(fn) -> float:
    if not torch.cuda.is_available():
        fn()
        return float("nan")
    _sync()
    torch.cuda.reset_peak_memory_stats()
    fn()
    _sync()
    return torch.cuda.max_memory_allocated() / 2**30


def row_flops(policy, traj) -> float:
    """FLOPs of forward + backward of one stored step of one sample (CFG rows included)."""
    from torch.utils.flop_counter import FlopCounterMode

    one = traj.select([0])
    ckpt = policy.model.is_gradient_checkpointing
    policy.model.disable_gradient_checkpointing()  # count the model's FLOPs, not the recomputation
    policy.model.train()
    with FlopCounterMode(display=False) as counter:
        policy.evaluate(one, torch.tensor([0])).log_prob.sum().backward()
    policy.model.zero_grad(set_to_none=True)
    if ckpt:
        policy.model.enable_gradient_checkpointing()
    policy.model.eval()
    return float(counter.get_total_flops())


def bench(name: str, args, device: str) -> dict:
    from flowrl import FlowPolicy, TrainConfig
    from flowrl.trainer import Trainer

    if args.check:  # the same code path on the tiny pipelines, on the CPU (no GPU needed)
        from flowrl.pipelines.tiny import tiny_flux_pipeline, tiny_sd3_pipeline

        pipe = (tiny_sd3_pipeline if name == "sd3" else tiny_flux_pipeline)().to(torch.bfloat16)
    else:
        pipe = build_pipeline(name, device)
    cfg_scale = 4.5 if name == "sd3" else 1.0  # FLUX.1-dev: distilled guidance (3.5), no true CFG
    cfg_rows = 2 if cfg_scale > 1 else 1
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig().override([
            f"train.output_dir={tmp}", "train.iterations=100", f"sampler.num_steps={args.steps}", f"sampler.height={args.size}",
            f"sampler.width={args.size}", f"sampler.guidance_scale={cfg_scale}", "model.dtype=bfloat16", f"model.device={device}",
            f"train.num_generations={args.group}", "train.prompts_per_iteration=1", f"train.train_batch_size={args.group}",
            "train.lora_rank=32", "train.lora_alpha=64", "train.progress=false", "loss.timestep_fraction=1.0", "loss.beta=0.0",
            "loss.skip_zero_advantage=false", "train.prompts=[a photo of a cat]",
        ])
        r = cfg.resolved()
        policy = FlowPolicy.from_pipeline(pipe, sampler=r.preset.kernel, noise_level=r.preset.noise_level, num_steps=args.steps,
                                          guidance_scale=cfg_scale, height=args.size, width=args.size)
        trainer = Trainer(cfg, policy=policy)
        policy.model.enable_gradient_checkpointing()
        policy.model.eval()
        gen = torch.Generator(device="cpu").manual_seed(0)
        rollout = lambda: policy.rollout(["a photo of a cat"], group_size=args.group, generator=gen)  # noqa: E731
        t_roll = timed(rollout, args.repeats)
        mem_roll = peak_gib(rollout)
        traj = rollout()
        traj.advantages = torch.randn(len(traj), generator=torch.Generator().manual_seed(1))
        traj.meta["reward"] = torch.zeros(len(traj))
        keep = torch.ones(len(traj), dtype=torch.bool)
        out = {"model": name, "params_B": sum(p.numel() for p in policy.model.parameters()) / 1e9,
               "rollout_img_s": args.group / t_roll, "rollout_peak_GiB": mem_roll}
        flops = row_flops(policy, traj) * len(traj) * traj.num_steps
        for label, rows in (("per_timestep", len(traj) * cfg_rows), ("batched", args.batched_rows)):
            trainer.config.train.max_rows_per_call = rows
            policy.max_rows_per_call = rows
            upd = lambda: trainer.update(traj, keep, 1)  # noqa: E731
            t_upd = timed(upd, args.repeats)
            out[f"update_{label}_s"] = t_upd
            out[f"update_{label}_peak_GiB"] = peak_gib(upd)
            out[f"update_{label}_mfu"] = flops / t_upd / (args.peak_tflops * 1e12)
    del pipe, policy, trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["sd3", "flux"], choices=["sd3", "flux"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batched-rows", type=int, default=64, help="train.max_rows_per_call of the batched update")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card (default: from its name)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--check", action="store_true", help="run the code path on the tiny pipelines on the CPU (16 px, 2 steps, G=2)")
    args = ap.parse_args()
    if args.check:
        args.size, args.steps, args.group, args.repeats, args.batched_rows = 16, 2, 2, 1, 8
        args.peak_tflops = args.peak_tflops or 1.0
        rows = [bench(m, args, "cpu") for m in args.models]
        print("\n".join(f"{r}" for r in rows))
        return
    if not torch.cuda.is_available():
        print("gpu_sd3.py: CUDA is not available on this machine; this benchmark needs a GPU. Skipping.")
        return
    name = torch.cuda.get_device_name()
    if args.peak_tflops is None:
        args.peak_tflops = next((v for k, v in PEAKS.items() if k in name), 989.0)
    rows = [bench(m, args, "cuda") for m in args.models]
    import diffusers

    lines = [f"{name}, torch {torch.__version__}, diffusers {diffusers.__version__}, bf16, {args.size}², {args.steps} steps, G={args.group}, "
             f"LoRA r32, gradient checkpointing, batched = {args.batched_rows} rows per call, peak {args.peak_tflops:.0f} TFLOP/s"]
    head = ["model", "params (B)", "rollout img/s", "rollout GiB", "upd per-step s", "GiB", "MFU", "upd batched s", "GiB", "MFU"]
    lines.append(" | ".join(head))
    for r in rows:
        lines.append(" | ".join([
            r["model"], f"{r['params_B']:.2f}", f"{r['rollout_img_s']:.2f}", f"{r['rollout_peak_GiB']:.1f}",
            f"{r['update_per_timestep_s']:.2f}", f"{r['update_per_timestep_peak_GiB']:.1f}", f"{r['update_per_timestep_mfu']:.1%}",
            f"{r['update_batched_s']:.2f}", f"{r['update_batched_peak_GiB']:.1f}", f"{r['update_batched_mfu']:.1%}",
        ]))
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
