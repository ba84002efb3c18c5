"""Compare every flow algorithm on the digits miniature (a GenEval in 16×16 pixels).

For each available preset, train the shipped digits model from the same seed for a fixed budget of
generated samples and print one table: held-out correctness against samples consumed and wall
seconds, the final KL to the base model, and the samples needed to reach 80% and 90%.

    python benchmarks/digits.py                         # every available flow preset
    python benchmarks/digits.py --algorithms flow_grpo diffusion_nft --budget 3000
    python benchmarks/digits.py --quick                 # a short smoke run of the table

Not a test: it prints numbers, it asserts nothing. Results depend on the machine only through time.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

FLOW_ALGORITHMS = [
    "flow_grpo", "dance_grpo", "flow_grpo_fast", "mix_grpo", "sage_grpo", "g2rpo", "branch_grpo",
    "branch_grpo_mix", "grpo_guard", "pref_grpo", "diffusion_nft",
]


#: what a preset needs on this task besides the shared config (8 sampling steps, G = 8): tree
#: rollouts need G = branch^#splits and split steps inside the 8-step grid.
OVERRIDES = {
    "branch_grpo": ["train.num_generations=16", "train.prompts_per_iteration=4", "sampler.rollout_params={split_steps: [0, 2, 4, 6]}"],
    "branch_grpo_mix": ["train.num_generations=16", "train.prompts_per_iteration=4", "sampler.rollout_params={split_steps: [0, 2, 4, 6]}"],
}


def base_config(run_dir: Path, algorithm: str, budget: int, eval_every: int, seed: int):
    """The README job's config (same model, prompts, reward, LoRA and learning rate for every
    algorithm — the papers' learning rates are for billion-parameter models) with the preset
    swapped in and the number of iterations set by the sample budget."""
    from flowrl import TrainConfig

    cfg = TrainConfig.from_yaml(Path(__file__).resolve().parents[1] / "assets" / "configs" / "digits.yaml")
    cfg = cfg.override([f"algorithm={algorithm}", *OVERRIDES.get(algorithm, [])])
    per_iter = cfg.train.prompts_per_iteration * cfg.train.num_generations
    iters = max(1, budget // per_iter)
    return cfg.override([
        f"algorithm={algorithm}", f"train.output_dir={run_dir}", f"train.iterations={iters}",
        f"train.eval_every={eval_every}", f"train.seed={seed}", "train.progress=false", "train.save_every=0",
    ])


@torch.no_grad()
def kl_to_base(policy, prompts: list[str], seed: int) -> float:
    """Mean exact per-step Gaussian KL(π_θ ‖ π_base) of flow-kernel (a = 0.7) steps on fresh rollouts of
    ``prompts`` — one measuring stick for every preset, whatever sampler it trained with."""
    from flowrl.losses import LossInputs, gaussian_kl

    if not hasattr(policy, "sigma_grid"):
        return float("nan")
    # the same measuring stick for every preset: flow-kernel SDE rollouts at every step
    saved = policy.sampler, policy.rollout_name, policy.rollout_params, policy.noise_level
    policy.sampler, policy.rollout_name, policy.rollout_params, policy.noise_level = "flow", "full", {}, 0.7
    try:
        traj = policy.rollout(prompts, group_size=1, generator=torch.Generator().manual_seed(seed))
        cur = policy.evaluate(traj)
        with policy.reference():
            ref = policy.evaluate(traj)
    finally:
        policy.sampler, policy.rollout_name, policy.rollout_params, policy.noise_level = saved
    kl = gaussian_kl(LossInputs(cur.log_prob, cur.log_prob, cur.log_prob, cur.log_prob, current=cur, reference=ref))
    return float(kl.mean())


def run_one(algorithm: str, args) -> dict:
    from flowrl.trainer import Trainer

    with tempfile.TemporaryDirectory() as d:
        cfg = base_config(Path(d) / algorithm, algorithm, args.budget, args.eval_every, args.seed)
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        result = trainer.train()
        wall = time.perf_counter() - t0
        col = cfg.train.report or "digits/correct"
        curve = [(0, 0.0, result.eval_before.get(col, float("nan")))]
        samples, elapsed = 0, 0.0
        for h in result.history:
            samples += h.get("samples/generated", 0)
            elapsed += h.get("time/rollout", 0) + h.get("time/rewards", 0) + h.get("time/update", 0)
            if f"eval/{col}" in h:
                curve.append((samples, elapsed, h[f"eval/{col}"]))
        curve.append((samples, elapsed, result.eval_after.get(col, float("nan"))))
        kl = kl_to_base(trainer.policy, trainer.eval_prompts, args.seed)

    def reach(th):
        for s, _, c in curve:
            if c >= th:
                return s
        return None

    evals = [h.get("cost/model_evals_per_sample") for h in result.history if "cost/model_evals_per_sample" in h]
    return {"algorithm": algorithm, "base": curve[0][2], "final": curve[-1][2], "samples": samples, "wall": wall,
            "kl": kl, "to80": reach(0.8), "to90": reach(0.9), "curve": curve, "evals_per_sample": (sum(evals) / len(evals)) if evals else float("nan")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="*", default=None)
    parser.add_argument("--budget", type=int, default=4096, help="generated samples per algorithm")
    parser.add_argument("--eval-every", type=int, default=4, help="iterations between held-out evaluations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)))
    parser.add_argument("--quick", action="store_true", help="tiny budget, to check the table prints")
    args = parser.parse_args(argv)
    if args.quick:
        args.budget, args.eval_every = 256, 2
    torch.set_num_threads(args.threads)
    from flowrl.algorithms import PRESETS

    names = args.algorithms or [a for a in FLOW_ALGORITHMS if a in PRESETS]
    import diffusers
    import transformers

    print(f"# digits benchmark — {platform.node()} {platform.machine()} {platform.processor() or ''}, {args.threads} threads, "
          f"python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"transformers {transformers.__version__}, seed {args.seed}, budget {args.budget} samples")
    rows = []
    for name in names:
        try:
            rows.append(run_one(name, args))
        except Exception as exc:  # one broken preset must not hide the others' numbers
            rows.append({"algorithm": name, "error": f"{type(exc).__name__}: {exc}"})
        r = rows[-1]
        print(f"  done {name}: " + (r.get("error") or f"{r['base']:.3f} -> {r['final']:.3f} in {r['wall']:.0f}s"), flush=True)
    header = f"| algorithm | base | final | samples | wall s | evals/sample | KL to base | samples to 80% | samples to 90% |"
    print("\n" + header + "\n|" + "---|" * 9)
    for r in rows:
        if "error" in r:
            print(f"| {r['algorithm']} | error: {r['error'][:80]} |" + " |" * 7)
            continue
        f = lambda v: "—" if v is None else str(int(v))
        print(f"| {r['algorithm']} | {r['base']:.3f} | {r['final']:.3f} | {int(r['samples'])} | {r['wall']:.0f} | "
              f"{r['evals_per_sample']:.1f} | {r['kl']:.2e} | {f(r['to80'])} | {f(r['to90'])} |")
    print("\ncorrectness vs (samples, seconds):")
    for r in rows:
        if "curve" in r:
            print(f"  {r['algorithm']}: " + ", ".join(f"({int(s)}, {t:.0f}s) {c:.2f}" for s, t, c in r["curve"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
