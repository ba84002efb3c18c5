"""Cost of scoring through `flowrl serve-rewards` instead of in the trainer's process: the same
reward (JPEG compressibility, cheap, so the table shows the transport) on B images of S×S pixels,
local vs remote (safetensors and PNG bodies) on 127.0.0.1. Prints a table; no assertions.

    python benchmarks/remote_rewards.py [--batch 32] [--size 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from flowrl.rewards import build_rewards
from flowrl.rewards.serving import RewardServer


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    images = torch.rand(a.batch, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    prompts = [f"prompt {i}" for i in range(a.batch)]
    local = build_rewards({"jpeg_compressibility": 1.0})
    server = RewardServer(build_rewards({"jpeg_compressibility": 1.0}), "127.0.0.1", 0).start()
    try:
        rows = [("local", best_of(lambda: local.score(images, prompts), a.repeats))]
        for enc in ("safetensors", "png"):
            remote = build_rewards({"remote": {"weight": 1.0, "url": server.url, "encoding": enc}})
            rows.append((f"remote ({enc})", best_of(lambda: remote.score(images, prompts), a.repeats)))
    finally:
        server.stop()
    print(f"| scoring {a.batch} images {a.size}x{a.size} | seconds (best of {a.repeats}) | ms per image | vs local |")
    print("|---|---|---|---|")
    for name, sec in rows:
        print(f"| {name} | {sec:.3f} | {1000 * sec / a.batch:.1f} | {sec / rows[0][1]:.2f}x |")


if __name__ == "__main__":
    main()
