"""Seconds per iteration of the digits job on 1 and 2 processes (CPU, gloo), and the share of an
iteration spent all-reducing gradients.

    python benchmarks/scale.py                    # 12 iterations (the first 2 are not timed)
    python benchmarks/scale.py --iterations 30 --threads 1

Each process count runs the README job (digits model, LoRA, 8 prompts × 8 samples per iteration,
evaluation off) through ``torchrun``. The all-reduce share is measured, not modelled: every worker
times ``all_reduce`` of a buffer the size of the trainable gradients, as many times as the
iteration took optimizer steps, and divides by the iteration's seconds. With 2 processes each
process rolls out and trains half the batch, so the ideal is half the 1-process time.

Not a test: it prints a table, it asserts nothing. Numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(out: str, iterations: int, warmup: int) -> None:
    import torch
    import torch.distributed as dist

    from flowrl.config import TrainConfig
    from flowrl.trainer import Trainer

    cfg = TrainConfig.from_yaml(ROOT / "assets" / "configs" / "digits.yaml").override([
        f"train.output_dir={out}/run", f"train.iterations={iterations}", "train.eval_prompts=null", "train.progress=false",
    ])
    trainer = Trainer(cfg)
    trainer._prepare_run_dir()
    acc = trainer.accelerator
    times, steps = [], []
    for it in range(1, iterations + 1):
        acc.wait_for_everyone()
        start = time.perf_counter()
        record = trainer.iteration(it)
        acc.wait_for_everyone()
        if it > warmup:
            times.append(time.perf_counter() - start)
            steps.append(record["update/steps"])
    numel = sum(p.numel() for p in trainer.params)
    allreduce = 0.0
    if acc.num_processes > 1:
        buf = torch.zeros(numel, device=acc.device)
        for _ in range(3):
            dist.all_reduce(buf)
        reps = 20
        acc.wait_for_everyone()
        start = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(buf)
        allreduce = (time.perf_counter() - start) / reps
    if acc.is_main_process:
        per_iter = sum(times) / len(times)
        share = allreduce * (sum(steps) / len(steps)) / per_iter
        Path(out, "result.json").write_text(json.dumps({"processes": acc.num_processes, "s_per_iter": per_iter,
                                                        "allreduce_s": allreduce, "share": share, "params": numel}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    if shutil.which("torchrun") is None:
        sys.exit("torchrun is not installed (it comes with torch).")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    for n in args.processes:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = ["torchrun", "--nproc_per_node", str(n), "--master_port", str(29600 + n), __file__, "--worker", tmp,
                   str(args.iterations), str(args.warmup)]
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows.append(json.loads(Path(tmp, "result.json").read_text()))
    import torch

    print(f"digits job, {args.iterations} iterations ({args.warmup} untimed), {args.threads} thread(s) per process; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"trainable parameters (LoRA): {rows[0]['params']:,}")
    print("| processes | s / iteration | speed-up | all-reduce per step (ms) | all-reduce share |")
    print("|---|---|---|---|---|")
    base = rows[0]["s_per_iter"]
    for r in rows:
        print(f"| {r['processes']} | {r['s_per_iter']:.2f} | {base / r['s_per_iter']:.2f}× | {1000 * r['allreduce_s']:.1f} | {100 * r['share']:.1f} % |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
