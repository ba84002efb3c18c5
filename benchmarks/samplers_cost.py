"""Cost of the structured samplers against flat GRPO at the same number of final samples.

    python benchmarks/samplers_cost.py [--size 32] [--iters 3] [--out benchmarks/samplers_cost.json]

Runs the real trainer on the tiny SD3 pipeline (CPU, one thread unless --threads) and reports, per
configuration, the logged ``cost/model_evals_per_sample`` (transformer evaluations per final
image, CFG counted twice), ``cost/transformer_calls`` and ``cost/trained_steps_per_sample``, and the
median wall time of an iteration (rollout + reward + update) after one warm-up iteration.

- BranchGRPO vs flat DanceGRPO: 20 steps, 16 final images per prompt (tree: splits 0, 3, 6, 9,
  branch 2; flat: G = 16), plus width pruning, depth pruning and the Mix variant.
- G²RPO vs DanceGRPO: 16 steps, G = 12, k = 0…7, g ∈ {1, 2} (G²RPO makes 12·8·2 = 192 images per
  prompt; DanceGRPO 12).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def run(name: str, overrides: list[str], pipe, *, size: int, iters: int) -> dict:
    import copy

    from flowrl import FlowPolicy, TrainConfig
    from flowrl.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig().override([
            f"train.output_dir={tmp}", f"train.iterations={iters + 1}", f"sampler.height={size}", f"sampler.width={size}",
            "train.lora_rank=4", "train.lora_alpha=8", "train.prompts_per_iteration=1", "train.progress=false",
            "reward.rewards={jpeg_compressibility: 1.0}", *overrides,
        ])
        r = cfg.resolved()
        p, s = r.preset, cfg.sampler
        policy = FlowPolicy.from_pipeline(copy.deepcopy(pipe), sampler=p.kernel, noise_level=p.noise_level, num_steps=s.num_steps,
                                          height=s.height, width=s.width, rollout=p.rollout, rollout_params=p.rollout_params,
                                          share_initial_noise=p.share_initial_noise, steps_per_backward=s.steps_per_backward)
        trainer = Trainer(cfg, policy=policy)
        trainer._prepare_run_dir()
        times, recs = [], []
        for it in range(1, iters + 2):
            t0 = time.perf_counter()
            rec = trainer.iteration(it)
            times.append(time.perf_counter() - t0)
            recs.append(rec)
        last = recs[-1]
        return {
            "name": name,
            "images_per_prompt": len(trainer._last_traj),
            "model_evals_per_image": last.get("cost/model_evals_per_sample"),
            "model_evals_per_prompt": last.get("cost/model_evals_per_sample") * len(trainer._last_traj),
            "transformer_calls": last.get("cost/transformer_calls"),
            "trained_steps_per_image": last.get("cost/trained_steps_per_sample"),
            "s_per_iter": statistics.median(times[1:]),
            "s_rollout": statistics.median(r["time/rollout"] for r in recs[1:]),
            "s_update": statistics.median(r["time/update"] for r in recs[1:]),
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/samplers_cost.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from flowrl.pipelines.tiny import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    tree = ["sampler.num_steps=20", "train.num_generations=16", "train.train_batch_size=16"]
    configs = [
        ("dance_grpo G=16 (flat)", ["algorithm=dance_grpo", "sampler.num_steps=20", "train.num_generations=16", "train.train_batch_size=16", "loss.timestep_fraction=1.0"]),
        ("dance_grpo G=16 (flat, its default random 60% of steps)", ["algorithm=dance_grpo", "sampler.num_steps=20", "train.num_generations=16", "train.train_batch_size=16"]),
        ("branch_grpo", ["algorithm=branch_grpo", *tree]),
        ("branch_grpo + width pruning (top)", ["algorithm=branch_grpo", *tree, "loss.options={width_prune: top}"]),
        ("branch_grpo + depth pruning (steps 10-19)", ["algorithm=branch_grpo", *tree, "sampler.rollout_params={depth_prune: [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]}"]),
        ("branch_grpo_mix (window 4)", ["algorithm=branch_grpo_mix", *tree]),
        ("dance_grpo G=12, 16 steps", ["algorithm=dance_grpo", "sampler.num_steps=16", "train.num_generations=12", "train.train_batch_size=12", "loss.timestep_fraction=1.0"]),
        ("g2rpo G=12, 16 steps, k 0-7, g 1,2", ["algorithm=g2rpo", "sampler.num_steps=16", "train.num_generations=12", "train.train_batch_size=12"]),
    ]
    results = []
    for name, ov in configs:
        res = run(name, ov, pipe, size=args.size, iters=args.iters)
        results.append(res)
        print(json.dumps(res))
    Path(args.out).write_text(json.dumps({"size": args.size, "threads": args.threads, "device": "cpu", "results": results}, indent=1))


if __name__ == "__main__":
    main()
