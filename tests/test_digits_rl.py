"""The embedded default learns: a short Flow-GRPO run on the shipped digits model raises held-out
correctness by a clear, seed-fixed margin (issue 3). The README's job uses LoRA and runs longer;
this test fine-tunes every weight, which moves faster per iteration and keeps the test short."""

from pathlib import Path

import pytest

from flowrl import TrainConfig
from flowrl.trainer import Trainer

CONFIG = Path(__file__).resolve().parents[1] / "assets" / "configs" / "digits.yaml"


@pytest.mark.slow
def test_short_grpo_run_raises_heldout_correctness(tmp_path):
    # slow (deselected by default, run with -m slow): its margin is measured for one seed and thread
    # count only (below), and one run costs several CPU-minutes (> 5 min of CPU on a shared 2-core
    # machine), too long to measure over ≥ 3 seeds × 1/2 threads or to run in every suite.
    cfg = TrainConfig.from_yaml(CONFIG).override([
        f"train.output_dir={tmp_path / 'run'}", "train.iterations=25", "train.eval_every=0",
        "train.eval_samples_per_prompt=4", "train.lora_rank=0", "train.learning_rate=3e-4", "train.progress=false",
        "train.lr_schedule=constant", "train.ema_decay=0", "train.report_to=none",
    ])
    result = Trainer(cfg).train()
    base, tuned = result.eval_before["digits/correct"], result.eval_after["digits/correct"]
    # RL trains on digits:rl and is evaluated on digits:eval (prompts neither RL nor pretraining saw).
    # measured (seed 0, 1 thread, before rollouts drew per-sample noise streams): base 0.51 -> tuned
    # 0.64 after 25 iterations (1,600 samples); it passes with the per-sample streams too;
    # base and tuned share the evaluation noise, so the paired difference is far less noisy
    assert tuned >= base + 0.06, (base, tuned)
    assert result.summary.startswith("digits correctness: base ") and result.summary.endswith("(held-out, 25 prompts)")
    assert result.breakdown.startswith("digits/correct by category: count base ") and "position base" in result.breakdown
    assert result.eval_after["num_prompts/position"] == 24 and result.eval_after["num_samples"] == 100
    assert (tmp_path / "run" / "reward_curve.png").is_file() and (tmp_path / "run" / "before_after.png").is_file()
