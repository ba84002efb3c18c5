"""A finished run loads back and evaluates exactly as it evaluated itself (issue 12, item 3):
its saved config (with `resolved:`) is a valid input, `flowrl eval --run` reproduces the run's
final evaluation number bit for bit, `--base` / `--checkpoint` / `--lora` pick other weights, and
eval.json holds per-prompt, per-category and aggregate statistics."""

import json
import math
from pathlib import Path

import pytest
import torch

from flowrl import TrainConfig, runs
from flowrl.trainer import Trainer

CONFIG = Path(__file__).resolve().parents[1] / "assets" / "configs" / "digits.yaml"
EVAL_PROMPTS = ["a 3 left of a 7", "two 5s", "a 1 above a 4", "a 9", "a 0 left of a 2", "two 8s"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A short LoRA + EMA run of the README's digits job (3 iterations, 6 evaluation prompts; an
    evaluation and a checkpoint at iteration 2)."""
    out = tmp_path_factory.mktemp("digits") / "run"
    cfg = TrainConfig.from_yaml(CONFIG).override([
        f"train.output_dir={out}", "train.iterations=3", "train.prompts_per_iteration=2", "train.num_generations=4",
        "train.train_batch_size=8", "train.eval_every=2", "train.save_every=2", "train.progress=false",
        "train.eval_samples_per_prompt=2", f"train.eval_prompts={json.dumps(EVAL_PROMPTS)}",
        # rank = alpha: the exported LoRA (scale folded into B) is then bit-identical to the trained one
        "train.lora_rank=4", "train.lora_alpha=4", "train.learning_rate=3e-3", "train.seed=3",
    ])
    result = Trainer(cfg).train()
    return out, result


def _final_eval(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if "eval/digits/prob" in r][-1]


def test_saved_config_with_resolved_section_is_a_valid_input(digits_run):
    out, result = digits_run
    text = (out / "config.yaml").read_text()
    assert "\nresolved:" in text
    cfg = TrainConfig.from_yaml(out / "config.yaml")
    assert cfg.to_dict() == TrainConfig.from_dict({k: v for k, v in __import__("yaml").safe_load(text).items() if k != "resolved"}).to_dict()
    assert cfg.train.eval_prompts == EVAL_PROMPTS and cfg.train.seed == 3
    run = runs.load_run(out)
    assert run.resolved["learning_rate"] == pytest.approx(3e-3)
    assert run.eval_settings == {"eval_prompts": EVAL_PROMPTS, "samples_per_prompt": 2, "seed": 3, "num_steps": 8}


def test_flowrl_eval_run_reproduces_the_runs_final_number_exactly(digits_run, tmp_path, capsys):
    from flowrl.cli import main

    out, result = digits_run
    final = _final_eval(out)
    assert main(["eval", "--run", str(out), "--out", str(tmp_path / "eval.json")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "eval.json").read_text())
    for col in ("digits/correct", "digits/prob"):
        # bit-identical: the same weights (EMA), prompts, seed derivation and steps as the run's own evaluation
        assert report["aggregate"][col]["mean"] == final[f"eval/{col}"] == result.eval_after[col]
        assert report["run_reported"][col] == final[f"eval/{col}"]
    assert report["weights"]["ema"] is True and report["weights"]["iteration"] == 3
    assert report["settings"]["samples_per_prompt"] == 2 and report["settings"]["seed"] == 3
    assert [p["prompt"] for p in report["prompts"]] == EVAL_PROMPTS
    assert all(len(p["samples"]["digits/prob"]) == 2 for p in report["prompts"])
    # the per-prompt means average back to the aggregate (every prompt has 2 samples)
    pm = [p["mean"]["digits/prob"] for p in report["prompts"]]
    assert sum(pm) / len(pm) == pytest.approx(report["aggregate"]["digits/prob"]["mean"], abs=1e-6)
    assert report["aggregate"]["digits/prob"]["n_prompts"] == 6 and report["aggregate"]["digits/prob"]["n_samples"] == 12
    assert "| digits/prob |" in printed and "run reported" in printed


def test_base_and_checkpoint_weights_reproduce_their_evaluations(digits_run, tmp_path):
    out, result = digits_run
    run = runs.load_run(out)
    base = runs.evaluate(run, run.base_weights())
    assert base.summary["digits/prob"] == result.eval_before["digits/prob"]
    assert run.reported(run.base_weights())["digits/prob"] == result.eval_before["digits/prob"]
    ckpt = runs.evaluate(run, run.checkpoint_weights(out / "checkpoints" / "iter_000003"))
    assert ckpt.summary["digits/prob"] == result.eval_after["digits/prob"]  # the checkpoint's EMA
    assert base.summary["digits/prob"] != result.eval_after["digits/prob"]  # training changed the samples
    # an intermediate checkpoint reproduces the evaluation logged at its iteration (train.eval_every)
    mid = run.checkpoint_weights(out / "checkpoints" / "iter_000002")
    logged = run.reported(mid)
    assert logged is not None and runs.evaluate(run, mid).summary["digits/prob"] == logged["digits/prob"]


def test_lora_flag_loads_the_exported_adapter_into_the_digits_pipeline(digits_run, tmp_path, capsys):
    from flowrl.cli import main

    out, _ = digits_run
    # a run's lora/ names its run: no --run or --config needed
    assert main(["eval", "--lora", str(out / "lora"), "--out", str(tmp_path / "lora.json")]) == 0
    assert main(["eval", "--run", str(out), "--base", "--out", str(tmp_path / "base.json")]) == 0
    lora = json.loads((tmp_path / "lora.json").read_text())
    base = json.loads((tmp_path / "base.json").read_text())
    assert lora["weights"]["kind"] == "lora" and base["weights"]["kind"] == "base"
    assert lora["aggregate"]["digits/prob"]["mean"] != base["aggregate"]["digits/prob"]["mean"]
    assert main(["sample", "--lora", str(out / "lora"), "--prompt", "a 3 left of a 7", "--out", str(tmp_path / "s.png")]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "s.png").size[1] > 64  # image row + caption + title


def test_digits_lora_round_trips_bit_identically_through_load_lora_weights(tmp_path):
    from flowrl.builders import add_lora
    from flowrl.pipelines.digits import load_default_digits_pipeline
    from flowrl.pipelines.flow_policy import FlowPolicy

    policy = FlowPolicy.from_pipeline(load_default_digits_pipeline(), num_steps=4)
    add_lora(policy.model, rank=4, alpha=4, targets=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"], seed=0)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    prompts = ["a 3 left of a 7", "two 5s"]
    trained = policy.generate(prompts, generator=torch.Generator().manual_seed(0))
    policy.save_lora(tmp_path / "lora")
    pipe = load_default_digits_pipeline()
    pipe.load_lora_weights(tmp_path / "lora")
    loaded = FlowPolicy.from_pipeline(pipe, num_steps=4).generate(prompts, generator=torch.Generator().manual_seed(0))
    plain = FlowPolicy.from_pipeline(load_default_digits_pipeline(), num_steps=4).generate(prompts, generator=torch.Generator().manual_seed(0))
    assert torch.equal(trained, loaded)
    assert not torch.equal(trained, plain)


def test_eval_report_statistics_per_prompt_category_and_aggregate():
    # 3 prompts × 2 samples, one reward column with a NaN (a failed sample)
    table = torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.5], [float("nan")]])
    result = runs.EvalResult(
        weights=runs.Weights("base"), summary={}, table=table, names=["r"], prompts=["p0", "p1", "p2"],
        metadata=[{"category": "a"}, {"category": "b"}, {"category": "a"}], samples_per_prompt=2,
    )
    report = runs.eval_report(result)
    agg = report["aggregate"]["r"]
    assert agg["mean"] == pytest.approx(3.5 / 5)  # mean over the 5 finite samples
    means = [0.5, 1.0, 0.5]  # per prompt
    sd = torch.tensor(means, dtype=torch.float64).std().item()
    from scipy.stats import t

    assert agg["ci95"] == pytest.approx(t.ppf(0.975, 2) * sd / math.sqrt(3))
    assert agg["n_prompts"] == 3 and agg["n_samples"] == 5
    assert report["category_column"] == "category"
    assert report["categories"]["a"]["r"]["mean"] == pytest.approx(1.5 / 3) and report["categories"]["a"]["r"]["n_prompts"] == 2
    assert report["categories"]["b"]["r"]["mean"] == 1.0 and report["categories"]["b"]["r"]["n_prompts"] == 1
    assert report["prompts"][2]["samples"]["r"] == [0.5, None]
    text = runs.format_report(report)
    assert "| r | 0.7000 |" in text and "| a | 0.5000 | 2 |" in text


def test_eval_of_a_directory_that_is_not_a_run_says_so(tmp_path, capsys):
    from flowrl.cli import main

    assert main(["eval", "--run", str(tmp_path)]) == 2
    assert "not a flowrl run directory" in capsys.readouterr().err
