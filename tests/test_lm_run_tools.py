"""Language-model runs work with the run tools (issue 24, item 5): ``flowrl eval --run``,
``flowrl sample --run`` and ``flowrl gallery`` load the run's peft LoRA folder into the token
policy and reproduce the run's own evaluation; samples are text (Markdown, gallery text cells)."""

import json
from pathlib import Path

import pytest
import torch

from flowrl import runs
from flowrl.cli import main


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    rows = [{"prompt": "1+1=?", "answer": "2"}, {"prompt": "2+3=?", "answer": "5"}, {"prompt": "4-1=?", "answer": "3"}]
    (root / "arith.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "lm.yaml").write_text(
        "algorithm: grpo\nmodel: {pipeline: tiny-llama, kind: causal_lm, device: cpu}\nsampler: {max_new_tokens: 4}\n"
        "reward: {exact_match: 1.0, length_penalty: {weight: 0.1, max_length: 4, cache_length: 2}}\n"
        "train: {prompts: arith.jsonl, eval_prompts: arith.jsonl, num_generations: 2, prompts_per_iteration: 2,\n"
        "        train_batch_size: 4, iterations: 2, lora_rank: 4, lora_alpha: 8, learning_rate: 0.05, output_dir: "
        f"{root / 'run'}, report_to: none, progress: false}}\n"
    )
    assert main(["train", "--config", str(root / "lm.yaml")]) == 0
    return root, root / "run"


def test_eval_run_loads_the_lm_lora_and_reproduces_the_run(lm_run, capsys):
    root, run_dir = lm_run
    capsys.readouterr()
    assert main(["eval", "--run", str(run_dir)]) == 0
    report = json.loads((run_dir / "eval.json").read_text())  # into the run, not the working directory
    final = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()][-1]
    for col in report["aggregate"]:
        assert report["aggregate"][col]["mean"] == final[f"eval/{col}"]
    assert report["weights"]["kind"] == "lora"
    # the folder's weights are in the policy: its trained B matrices are not the zeros of a fresh adapter
    run = runs.load_run(run_dir)
    with runs.trainer_for(run.config, run.evaluated_weights(), rewards=False) as trainer:
        from peft import load_peft_weights

        saved = load_peft_weights(str(run_dir / "lora"))
        live = {n: p for n, p in trainer.policy.model.named_parameters() if "lora_B" in n}
        assert live and all(float(p.detach().abs().sum()) > 0 for p in live.values())
        some = next(k for k in saved if "lora_B" in k)
        match = [p for n, p in live.items() if n.replace(".default", "").endswith(some.split("base_model.model.")[-1])]
        assert match and torch.equal(match[0].detach().cpu(), saved[some])


def test_sample_and_gallery_show_text(lm_run, tmp_path):
    root, run_dir = lm_run
    assert main(["sample", "--run", str(run_dir), "--out", str(tmp_path / "samples.png")]) == 0
    text = (tmp_path / "samples.md").read_text()
    assert text.count("### ") == 3 and "### 1+1=?" in text
    assert main(["gallery", str(run_dir), "--out", str(tmp_path / "gallery")]) == 0
    page = (tmp_path / "gallery" / "index.html").read_text()
    assert "2+3=?" in page and "exact_match" in page


def test_lm_export_adapter_and_merged(lm_run, tmp_path):
    """``flowrl export`` on a language-model run: the peft adapter, and the adapter merged into the
    base model; stock transformers/peft loading gives the run's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, run_dir = lm_run
    assert main(["export", str(run_dir), "--out", str(tmp_path / "adapter")]) == 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    base_dir = run_dir / "base_model"  # tiny-llama writes the base model into the run
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    with torch.no_grad():
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()(ids).logits
    assert not torch.allclose(plain, adapted)  # the adapter changes the model
    assert torch.allclose(adapted, merged, atol=1e-5)  # W + BA·s merged vs applied: float32 rounding
    assert "exact_match" in (tmp_path / "adapter" / "README.md").read_text()
