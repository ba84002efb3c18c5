"""Prompt datasets with metadata: every format loads with its columns, and a reward receives the
metadata of its own sample through group expansion, prompt selection (refill rounds) and evaluation."""

import copy
import csv
import json

import pytest
import torch

from flowrl import FlowPolicy, TrainConfig
from flowrl.config import ConfigError
from flowrl.prompts import category_means, load_prompt_set, load_prompts, reward_meta

# Flow-GRPO's GenEval metadata rows (dataset/geneval/test_metadata.jsonl), verbatim in form
GENEVAL_ROWS = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "two_object", "include": [{"class": "toaster", "count": 1}, {"class": "car", "count": 1}], "prompt": "a photo of a toaster and a car"},
    {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}], "prompt": "a photo of two clocks"},
]

ROWS = [
    {"prompt": "What is 2 + 3 ?", "answer": 5, "source": "a"},
    {"prompt": "What is 4 * 4 ?", "answer": 16, "source": "b"},
    {"prompt": "What is 9 - 7 ?", "answer": 2, "source": "c"},
]


def _expect_rows(ps, rows=ROWS, column="prompt"):
    assert ps.prompts == [r[column] for r in rows]
    assert ps.metadata == [{k: v for k, v in r.items() if k != column} for r in rows]


def test_txt_one_prompt_per_line(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    ps = load_prompt_set(str(tmp_path / "p.txt"))
    assert ps.prompts == ["a cat", "a dog"] and ps.metadata == [{}, {}]


def test_flow_grpo_geneval_metadata_jsonl_loads_as_is(tmp_path):
    path = tmp_path / "test_metadata.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in GENEVAL_ROWS) + "\n")
    ps = load_prompt_set(str(path))
    _expect_rows(ps, GENEVAL_ROWS)
    assert ps.metadata[2]["exclude"] == [{"class": "clock", "count": 3}] and "exclude" not in ps.metadata[0]
    meta = reward_meta(ps.metadata)
    assert meta["tag"] == ["single_object", "two_object", "counting"]
    assert meta["exclude"] == [None, None, [{"class": "clock", "count": 3}]]


def test_json_csv_list_and_custom_column(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(ROWS))
    _expect_rows(load_prompt_set(str(tmp_path / "p.json")))
    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["question", "answer"])
        w.writeheader()
        w.writerows({"question": r["prompt"], "answer": r["answer"]} for r in ROWS)
    ps = load_prompt_set(str(tmp_path / "p.csv"), column="question")
    assert ps.prompts == [r["prompt"] for r in ROWS]
    assert [m["answer"] for m in ps.metadata] == ["5", "16", "2"]  # csv values are text
    _expect_rows(load_prompt_set(ROWS))  # a YAML list of mappings
    assert load_prompts(["a", "b"]) == ["a", "b"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), str(tmp_path / "p.parquet"))
    _expect_rows(load_prompt_set(str(tmp_path / "p.parquet")))


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"text": r["prompt"], "answer": r["answer"]} for r in ROWS])
    ds.save_to_disk(str(tmp_path / "ds"))
    ps = load_prompt_set(str(tmp_path / "ds"), column="text")
    assert ps.prompts == [r["prompt"] for r in ROWS] and [m["answer"] for m in ps.metadata] == [5, 16, 2]
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="DatasetDict with splits train, test; point at one split's folder"):
        load_prompt_set(str(tmp_path / "dd"))
    _expect_rows(load_prompt_set(str(tmp_path / "dd" / "train"), column="text"),
                 [{"text": r["prompt"], "answer": r["answer"]} for r in ROWS], column="text")


def test_missing_optional_packages_give_install_hints(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_arrow_or_datasets(name, *args, **kwargs):
        if name.split(".")[0] in ("pyarrow", "pandas", "datasets"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    monkeypatch.setattr(builtins, "__import__", no_arrow_or_datasets)
    with pytest.raises(ValueError, match=r"train.prompts: .*needs pyarrow: pip install pyarrow"):
        load_prompt_set(str(tmp_path / "p.parquet"))
    with pytest.raises(ValueError, match=r"needs the datasets package: pip install datasets"):
        load_prompt_set(str(tmp_path / "ds"), field="train.eval_prompts")


def test_bad_inputs_name_the_field_and_the_fix(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"text": "a cat"}) + "\n")
    with pytest.raises(ValueError, match=r"train.prompts: .*row 0 has no 'prompt' column \(columns: text\)\. Set train.prompt_column"):
        load_prompt_set(str(tmp_path / "p.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON line"):
        load_prompt_set(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match=r"train.eval_prompts: 'nope.jsonl': no such file"):
        load_prompt_set("nope.jsonl", field="train.eval_prompts", base_dir=tmp_path)
    with pytest.raises(ValueError, match="neither a file nor a known prompt set. Known sets: .*digits"):
        load_prompt_set("no_such_set:x")
    (tmp_path / "obj.json").write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(ValueError, match="holds a list of rows"):
        load_prompt_set(str(tmp_path / "obj.json"))


def test_relative_prompt_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "job"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "p.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    (folder / "cfg.yaml").write_text("train:\n  prompts: data/p.jsonl\n  eval_prompts: digits:eval\n")
    monkeypatch.chdir(tmp_path)  # not the config's folder: data/p.jsonl does not exist here
    cfg = TrainConfig.from_yaml(folder / "cfg.yaml")
    assert cfg.train.prompts == str((folder / "data" / "p.jsonl").resolve()) and cfg.train.eval_prompts == "digits:eval"
    _expect_rows(load_prompt_set(cfg.train.prompts))
    # the relative spec also resolves when given a base folder directly
    _expect_rows(load_prompt_set("data/p.jsonl", base_dir=folder))


def test_digits_sets_carry_their_category():
    ps = load_prompt_set("digits:eval")
    cats = [m["category"] for m in ps.metadata]
    assert len(ps) == 25 and set(cats) == {"count", "position"}
    assert category_means(torch.tensor([1.0] + [0.0] * 24), cats) == {"count": (1.0, 1), "position": (0.0, 24)}


# ------------------------------------------------------------------------ through the trainer
class MetaEcho:
    """Reward = the sample's own ``meta["target"]``; records what it was given."""

    name = "echo"
    calls: list = []

    def __call__(self, outputs, prompts, meta=None):
        MetaEcho.calls.append((list(prompts), copy.deepcopy(meta.get("metadata")), list(meta.get("target", [])), bool(meta.get("eval"))))
        noise = 0.01 * outputs.float().mean(dim=(1, 2, 3))  # varies within a group ...
        flat = torch.tensor([bool(m.get("flat")) for m in meta["metadata"]])  # ... unless the prompt says flat
        return torch.tensor([float(t) for t in meta["target"]]) + torch.where(flat, torch.zeros_like(noise), noise)


def _trainer(tmp_path, tiny_sd3, prompts, *extra):
    from flowrl.rewards import build_rewards
    from flowrl.trainer import Trainer

    cfg = TrainConfig().override([
        f"train.output_dir={tmp_path / 'run'}", "train.iterations=2", "sampler.num_steps=2", "sampler.eval_num_steps=2",
        "sampler.height=16", "sampler.width=16", "train.lora_rank=2", "train.lora_alpha=2", "train.num_generations=3",
        "train.prompts_per_iteration=2", "train.train_batch_size=12", "train.progress=false", "train.report_to=none",
        "train.eval_samples_per_prompt=2", *extra,
    ])
    cfg.train.prompts = prompts
    cfg.train.eval_prompts = prompts
    r = cfg.resolved()
    policy = FlowPolicy.from_pipeline(copy.deepcopy(tiny_sd3), sampler=r.preset.kernel, noise_level=r.preset.noise_level,
                                      num_steps=2, height=16, width=16)
    return Trainer(cfg, policy=policy, reward_set=build_rewards({"tests.test_prompts:MetaEcho": 1.0}))


def test_each_reward_call_gets_the_metadata_of_its_own_samples(tmp_path, tiny_sd3):
    from flowrl.prompt_selection import make_selector

    # "flat" prompts give every group member the same reward: the DAPO selector drops those groups
    # and refills, so a kept batch can mix several rounds
    rows = [{"prompt": f"p{i}", "id": i, "target": float(i) if i % 2 == 0 else 7.0, "flat": i % 2 == 1,
             "category": "even" if i % 2 == 0 else "odd"} for i in range(6)]
    import importlib

    echo = importlib.import_module("tests.test_prompts").MetaEcho  # the class the reward set built
    echo.calls = []
    trainer = _trainer(tmp_path, tiny_sd3, rows, "train.iterations=3")
    trainer.selector = make_selector("dapo", len(trainer.train_prompts))
    result = trainer.train()
    assert any(h["select/rounds"] > 1 for h in result.history)  # refills happened
    train_calls = [c for c in echo.calls if not c[3]]
    assert len(train_calls) >= 4 and all(len(c[0]) % 3 == 0 for c in train_calls)  # groups of 3
    by_prompt = {r["prompt"]: {k: v for k, v in r.items() if k != "prompt"} for r in rows}
    for prompts, metadata, targets, _ in echo.calls:
        assert metadata == [by_prompt[p] for p in prompts]  # aligned sample by sample
        assert targets == [by_prompt[p]["target"] for p in prompts]
    assert trainer._last_traj.meta["metadata"] == [by_prompt[p] for p in trainer._last_traj.prompts]
    assert [m["id"] for m in trainer._last_traj.meta["metadata"]] == [int(p[1:]) for p in trainer._last_traj.prompts]
    assert all(not m["flat"] for m in trainer._last_traj.meta["metadata"])  # flat groups were dropped
    # evaluation: every sample of every eval prompt, each with its metadata, broken down by category
    eval_calls = [c for c in echo.calls if c[3]]
    assert eval_calls[0][0] == [r["prompt"] for r in rows for _ in range(2)]
    after = result.eval_after
    assert after["num_prompts/even"] == 3 and after["num_prompts/odd"] == 3 and after["num_samples"] == 12
    assert after["echo/even"] == pytest.approx((0 + 2 + 4) / 3, abs=0.02) and after["echo/odd"] == pytest.approx(7.0, abs=0.02)
    assert "echo by category: even base" in result.breakdown


def test_arith_set_rows_carry_answers_that_exact_match_reads():
    from flowrl.rewards.verifiers import ExactMatch

    ps = load_prompt_set("arith:test")
    meta = reward_meta(ps.metadata[:3])
    outputs = [f"The answer is {a}" for a in meta["answer"][:2]] + ["The answer is 999"]
    assert ExactMatch()(outputs, ps.prompts[:3], meta).tolist() == [1.0, 1.0, 0.0]  # no solver, no answers dict
