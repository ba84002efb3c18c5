"""Run by tests/test_distributed.py under ``python`` (one process) or ``torchrun`` (several): a few
iterations of the digits job; every process writes its trainable weights after each iteration
(``rank{r}_it{i}.safetensors``) and the main process the iteration records (``records.jsonl``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


class FlatForPairs:
    """Reward 0 for prompts that start with "two" (the group has zero advantage: with
    skip_zero_advantage the process holding it keeps nothing), mean pixel intensity otherwise."""

    name = "flat_pairs"

    def __call__(self, outputs, prompts, meta=None):
        flat = torch.tensor([p.startswith("two") for p in prompts])
        return torch.where(flat, torch.zeros(len(prompts)), outputs.float().flatten(1).mean(1))


def main(out: str, overrides: list[str]) -> None:
    from safetensors.torch import save_file

    from flowrl.config import TrainConfig
    from flowrl.paths import assets_dir
    from flowrl.trainer import Trainer

    torch.set_num_threads(1)
    cfg = TrainConfig.from_yaml(assets_dir() / "configs" / "digits.yaml").override(overrides)
    trainer = Trainer(cfg)
    trainer._prepare_run_dir()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank = trainer.accelerator.process_index

    def dump(it: int) -> None:
        named = trainer.trainable_state_dict()  # whole tensors (gathered from the shards under FSDP)
        save_file(named, str(out_dir / f"rank{rank}_it{it}.safetensors"))

    dump(0)
    for it in range(1, cfg.train.iterations + 1):
        record = trainer.iteration(it)
        dump(it)
        if trainer.accelerator.is_main_process:
            with open(out_dir / "records.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
