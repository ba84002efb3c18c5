"""A resumed run keeps its story (issue 24, item 4): metrics.jsonl still holds the base evaluation
and every earlier row, the final ``base -> tuned`` line is printed, and extending a run keeps its
cosine schedule's original plan (the extra iterations at the final rate) and says so."""

import json
import math
from pathlib import Path

from flowrl.cli import main

DIGITS = Path(__file__).resolve().parents[1] / "assets" / "configs" / "digits.yaml"


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_extending_a_run_keeps_its_metrics_summary_and_schedule(tmp_path, capsys):
    run = tmp_path / "run"
    common = [
        "--config", str(DIGITS), "--set", f"train.output_dir={run}", "--set", "train.prompts_per_iteration=2",
        "--set", "train.num_generations=2", "--set", "train.train_batch_size=4", "--set", "train.progress=false",
        "--set", "train.eval_prompts=['a 3', 'two 5s']", "--set", "train.eval_every=0", "--set", "train.lora_rank=2",
        "--set", "train.lora_alpha=2", "--set", "sampler.num_steps=2", "--set", "sampler.eval_num_steps=2",
        "--set", "train.report_to=none", "--set", "train.save_every=2",
    ]
    assert main(["train", *common, "--set", "train.iterations=2"]) == 0
    first = capsys.readouterr().out
    assert "digits correctness: base" in first
    # the run starts with what the digits config changes of its preset (and records it)
    assert first.startswith("settings that differ from preset flow_grpo") and "train.learning_rate" in first.splitlines()[1] + first.splitlines()[2]
    before = _rows(run)
    saved = (run / "config.yaml").read_text(encoding="utf-8")
    import yaml

    assert yaml.safe_load(saved)["resolved"]["overrides"]["overrides"]["train.learning_rate"] == {"value": 1e-3, "preset": 3e-4}
    assert "\\u" not in saved and "ε" in saved  # plain UTF-8 (the presets' docs hold ε, σ, ±)
    assert before[0]["iteration"] == 0 and "eval/digits/correct" in before[0]

    assert main(["train", *common, "--set", "train.iterations=4", "--set", "train.resume_from=latest"]) == 0
    out = capsys.readouterr().out
    rows = _rows(run)
    # the story so far stays: base evaluation, iterations 1-2, the evaluation that ended the first leg
    assert rows[: len(before)] == before
    assert [r["iteration"] for r in rows if "reward/mean" in r] == [1, 2, 3, 4]
    assert rows[-1]["iteration"] == 4 and "eval/digits/correct" in rows[-1]
    # the last line scripts read: base (iteration 0, from the first leg) -> tuned (iteration 4)
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("digits correctness: base") and f"base {before[0]['eval/digits/correct']:.2f}" in summary
    # the cosine schedule keeps its plan over 2 iterations: 3 and 4 run at its final rate, said loudly
    lr = {r["iteration"]: r["lr"] for r in rows if "lr" in r}
    assert math.isclose(lr[1], 1e-3) and math.isclose(lr[2], 1e-4)
    assert math.isclose(lr[3], 1e-4) and math.isclose(lr[4], 1e-4)
    assert "train.iterations 2 -> 4" in out and "keeps its original plan over 2 iterations" in out
