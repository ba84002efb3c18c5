"""GPU checks that CPU CI cannot make: ratio 1 on CUDA (fp32 and bf16 weights), a few training
iterations on CUDA with bf16 autocast, and rollout/update timings of the tiny pipelines.

    python benchmarks/gpu_check.py            # prints a table; exits non-zero if a check fails

Not a test (CI has no GPU); run it on a machine with one.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import torch


def ratio_check(pipe, dtype: torch.dtype, cfg: float, device: str) -> float:
    from flowrl import FlowPolicy

    pipe = copy.deepcopy(pipe).to(device)
    pipe.transformer.to(dtype)
    policy = FlowPolicy.from_pipeline(pipe, num_steps=6, guidance_scale=cfg, height=32, width=32)
    traj = policy.rollout(["a cat", "a dog"], group_size=4, generator=torch.Generator(device).manual_seed(0))
    return float((policy.log_prob(traj).cpu() - traj.log_probs).abs().max())


def main() -> int:
    from flowrl.pipelines.tiny import save_and_reload, tiny_flux_pipeline, tiny_sd3_pipeline

    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"  # "cpu" for a dry run of the script itself
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    print(f"# gpu_check — {torch.cuda.get_device_name() if device == 'cuda' else device}, torch {torch.__version__}")
    failures = 0
    with tempfile.TemporaryDirectory() as d:
        pipes = {"sd3": save_and_reload(tiny_sd3_pipeline(), Path(d) / "sd3"), "flux": save_and_reload(tiny_flux_pipeline(), Path(d) / "flux")}
        print("| model | weights | CFG | max |Δ log-prob| recompute vs rollout |")
        print("|---|---|---|---|")
        for name, pipe in pipes.items():
            for dtype in (torch.float32, torch.bfloat16):
                for cfg in (1.0, 4.5):
                    diff = ratio_check(pipe, dtype, cfg, device)
                    ok = diff < (1e-5 if dtype == torch.float32 else 1e-3)
                    failures += not ok
                    print(f"| {name} | {str(dtype).split('.')[-1]} | {cfg} | {diff:.2e}{'' if ok else '  FAIL'} |")

        from flowrl import TrainConfig
        from flowrl.trainer import Trainer

        print("\n| run | iteration | reward | ratio/mean | kl/ref | rollout s | update s |")
        print("|---|---|---|---|---|---|---|")
        for mp in ("no", "bf16"):
            cfg = TrainConfig().override([
                f"train.output_dir={Path(d) / ('run_' + mp)}", "train.iterations=6", "sampler.num_steps=6",
                "sampler.height=32", "sampler.width=32", "train.lora_rank=8", "train.lora_alpha=16",
                "train.learning_rate=3e-2", "train.num_generations=8", "train.prompts_per_iteration=2",
                "train.train_batch_size=16", "train.progress=false", f"train.mixed_precision={mp}", f"model.device={device}",
                "model.pipeline=tiny-sd3",
            ])
            result = Trainer(cfg).train()
            for h in result.history:
                print(f"| tiny-sd3 {mp} | {h['iteration']} | {h['reward/mean']:.4f} | {h.get('ratio/mean', float('nan')):.6f} | "
                      f"{h.get('kl/ref', 0.0):.2e} | {h['time/rollout']:.3f} | {h['time/update']:.3f} |")
            if abs(result.history[0].get("ratio/mean", 1.0) - 1.0) > 1e-3:
                failures += 1
                print("FAIL: first on-policy update ratio is not 1")
            lora = result.run_dir / "lora" / "pytorch_lora_weights.safetensors"
            if not lora.is_file():
                failures += 1
                print("FAIL: no LoRA export")
    print(f"\n{'all checks passed' if not failures else f'{failures} check(s) failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
