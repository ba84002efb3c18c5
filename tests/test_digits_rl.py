"""The embedded default learns: a short Flow-GRPO run on the shipped digits model raises held-out
correctness by a clear, seed-fixed margin (issue 3). The README's job uses LoRA and runs longer;
this test fine-tunes every weight, which moves faster per iteration and keeps the test short."""

from pathlib import Path

from flowrl import TrainConfig
from flowrl.trainer import Trainer

CONFIG = Path(__file__).resolve().parents[1] / "assets" / "configs" / "digits.yaml"


def test_short_grpo_run_raises_heldout_correctness(tmp_path):
    cfg = TrainConfig.from_yaml(CONFIG).override([
        f"train.output_dir={tmp_path / 'run'}", "train.iterations=25", "train.eval_every=0",
        "train.eval_samples_per_prompt=4", "train.lora_rank=0", "train.learning_rate=3e-4", "train.progress=false",
        "train.lr_schedule=constant", "train.ema_decay=0",
    ])
    result = Trainer(cfg).train()
    base, tuned = result.eval_before["digits/correct"], result.eval_after["digits/correct"]
    # measured (1 thread, per-prompt noise streams): seed 0 base 0.485 -> tuned 0.600, seed 1
    # 0.540 -> 0.625, seed 2 0.530 -> 0.655 after 25 iterations (1,600 samples)
    assert tuned >= base + 0.07, (base, tuned)
    assert result.summary.startswith("digits correctness: base ") and result.summary.endswith("(held-out, 50 prompts)")
    assert (tmp_path / "run" / "reward_curve.png").is_file() and (tmp_path / "run" / "before_after.png").is_file()
