"""Peak GPU memory and seconds of one LoRA training iteration at the real SD3.5-Medium transformer
size (random weights, nothing downloaded): bf16, 512×512, 10 SDE steps, CFG 4.5, G = 8 samples.

    python benchmarks/gpu_memory.py            # on a CUDA machine; prints a markdown table
    python benchmarks/gpu_memory.py --tiny     # the same code on a tiny model on the CPU (a smoke run)

Rows: activation (gradient) checkpointing off/on, and the text encoders (T5-XXL + CLIP-L + CLIP-G,
random bf16 weights) resident on the GPU during training or not (prompt embeddings computed once
and the encoders kept elsewhere: what ``model.offload_text_encoders: true`` gives once every prompt
is in the prompt cache). One iteration = one FlowPolicy rollout of 8 images (10 steps,
CFG doubles the batch, VAE decode) + one update that backpropagates every stored step
(``steps_per_backward`` 1) through the LoRA (rank 32 on the attention projections, float32
weights under bf16 autocast) and one AdamW step. Prompt embeddings are random tensors of the
shapes the stock pipeline produces (77 CLIP + 256 T5 tokens × 4096, pooled 2048).

Not a test: it prints numbers, it asserts nothing. Without CUDA (and without --tiny) it says so
and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time

import torch

#: stabilityai/stable-diffusion-3.5-medium transformer/config.json
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
#: its VAE (16 latent channels, scale factor 8)
SD35_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
)
TINY = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=16)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)


def text_encoders(device, dtype, tiny: bool):
    """T5-XXL encoder + CLIP-L + CLIP-G text models (random weights) — what stays resident when the
    encoders are not moved off the GPU."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if tiny:
        cfgs = [T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=128)]
        clips = [CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=16, vocab_size=128)]
    else:
        cfgs = [T5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128, feed_forward_proj="gated-gelu")]
        clips = [CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768),
                 CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280)]
    with torch.device(device):
        mods = [T5EncoderModel(c) for c in cfgs] + [CLIPTextModelWithProjection(c) for c in clips]
    return [m.to(dtype).eval() for m in mods]


def build_policy(device, tiny: bool, checkpointing: bool):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from flowrl.builders import add_lora
    from flowrl.pipelines.flow_policy import DEFAULT_LORA_TARGETS, FlowPolicy

    dtype = torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**(TINY if tiny else SD35_MEDIUM))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD35_VAE))
    transformer.to(dtype)
    vae.to(dtype)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    add_lora(transformer, rank=32, alpha=32, targets=DEFAULT_LORA_TARGETS, seed=0)
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trained weights in float32, the frozen base in bf16
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    size = 32 if tiny else 512
    policy = FlowPolicy.from_pipeline(pipe, sampler="flow", noise_level=0.7, num_steps=10, guidance_scale=4.5,
                                      height=size, width=size, steps_per_backward=1)
    d_txt, d_pool = (32, 16) if tiny else (4096, 2048)
    seq = 8 if tiny else 77 + 256

    def encode(prompts):  # precomputed embeddings: the stock pipeline's shapes
        n = len(prompts)
        g = torch.Generator().manual_seed(1)
        emb = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
        return {"prompt_embeds": emb(n, seq, d_txt), "pooled": emb(n, d_pool), "neg_prompt_embeds": emb(n, seq, d_txt), "neg_pooled": emb(n, d_pool)}

    policy.encode = encode
    return policy


def one_iteration(policy, device) -> dict[str, float]:
    """Rollout (no grad) → update over every stored step → AdamW step."""
    params = [p for p in policy.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    policy.model.eval()
    with autocast:
        traj = policy.rollout(["a photo"], group_size=8, generator=torch.Generator().manual_seed(0))
    sync()
    t1 = time.perf_counter()
    adv = torch.randn(len(traj), generator=torch.Generator().manual_seed(2)).to(device)
    policy.model.train()
    for steps in policy.step_chunks(traj):
        with autocast:
            ev = policy.evaluate(traj, steps)
        ratio = torch.exp(ev.log_prob.float() - traj.log_probs[:, steps].to(device))
        loss = -(adv[:, None] * ratio).mean() * (len(steps) / traj.num_steps)
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    t2 = time.perf_counter()
    return {"rollout_s": t1 - t0, "update_s": t2 - t1}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU: check the script, not the numbers")
    args = ap.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        print("benchmarks/gpu_memory.py: no CUDA device here; nothing measured (run it on a GPU, or --tiny for a CPU smoke run).")
        return 0
    device = torch.device("cpu" if args.tiny else "cuda")
    rows = []
    for checkpointing, resident in ((False, False), (True, False), (False, True), (True, True)):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        encoders = text_encoders(device, torch.bfloat16, args.tiny) if resident else []
        policy = build_policy(device, args.tiny, checkpointing)
        one_iteration(policy, device)  # warm-up (kernels, allocator)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = one_iteration(policy, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        rows.append((checkpointing, resident, peak, times))
        del policy, encoders
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (tiny smoke run)"
    print(f"SD3.5-Medium transformer (random weights), LoRA r=32, bf16, 512², 10 steps, CFG 4.5, G=8 — {name}, torch {torch.__version__}")
    print("| gradient checkpointing | text encoders on GPU | peak memory (GiB) | rollout (s) | update (s) |")
    print("|---|---|---|---|---|")
    for ckpt, resident, peak, t in rows:
        print(f"| {'on' if ckpt else 'off'} | {'yes' if resident else 'no'} | {peak:.1f} | {t['rollout_s']:.2f} | {t['update_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
