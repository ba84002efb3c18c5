"""FSDP (accelerate's plugin, fsdp_version 2 = torch's fully_shard) on the CPU with gloo: the shipped
assets/accelerate/fsdp.yaml trains the one-process model with sharded LoRA weights, gradients and
optimizer state; evaluation, EMA export and checkpoints see the whole weights; DeepSpeed and FSDP1
are refused with a message that says what to launch instead."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flowrl.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
FSDP_YAML = ROOT / "assets" / "accelerate" / "fsdp.yaml"
DIGITS = ROOT / "assets" / "configs" / "digits.yaml"
# 2 prompts × 4 samples, one prompt per process; the reward is flat on "two 4s", so with
# skip_zero_advantage the process holding it keeps nothing and runs zero-weight passes (FSDP
# gathers every layer in each forward/backward: a missing pass would hang). 3 evaluation samples
# split 2/1 over the processes; EMA on, so the export swaps in the EMA weights on every shard.
SETS = [
    "train.progress=false", "train.prompts_per_iteration=2", "train.num_generations=4", "train.train_batch_size=2",
    "sampler.num_steps=4", "sampler.eval_num_steps=4", "train.lr_schedule=constant", "train.save_every=1",
    "train.eval_prompts=[a 3 left of a 7, two 4s, a 0 left of a 5]", "train.eval_samples_per_prompt=1", "train.ema_decay=0.5",
    "loss.skip_zero_advantage=true", "reward.rewards={tests._dist_worker:FlatForPairs: 1.0}", "train.report=null", "train.prompts=[two 4s, a 0 left of a 5]",
]

needs_launcher = pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate launcher not installed")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for k in [k for k in env if k.startswith(("ACCELERATE_", "FSDP_"))]:  # only the launcher decides
        env.pop(k)
    return env


def _train(out: Path, *extra: str, fsdp: bool) -> None:
    sets = [a for s in [*SETS, f"train.output_dir={out}", *extra] for a in ("--set", s)]
    cli = ["-m", "flowrl", "train", "--config", str(DIGITS), *sets]
    if fsdp:  # the shipped config, on the CPU
        port = str(29600 + os.getpid() % 300)
        cmd = ["accelerate", "launch", "--config_file", str(FSDP_YAML), "--num_processes", "2", "--mixed_precision", "no",
               "--main_process_port", port, *cli]
    else:
        cmd = [sys.executable, *cli]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _flat(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    w = load_file(str(path))
    return torch.cat([w[n].flatten() for n in sorted(w)])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@needs_launcher
def test_fsdp_two_processes_train_the_one_process_model(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _train(one, "train.iterations=2", fsdp=False)
    _train(two, "train.iterations=2", fsdp=True)
    # the run really was sharded: the checkpoint holds the optimizer state gathered by name
    state = json.loads((two / "checkpoints" / "iter_000002" / "state.json").read_text())
    assert state.get("optimizer_format") == "full_by_name"
    assert "optimizer_format" not in json.loads((one / "checkpoints" / "iter_000002" / "state.json").read_text())
    m1, m2 = _metrics(one), _metrics(two)
    assert [r["iteration"] for r in m2] == [r["iteration"] for r in m1] == [0, 1, 2, 2]
    for a, b in zip(m1, m2):
        if "reward/mean" in a:  # same samples and rewards up to float reassociation (measured ≤ 2e-7)
            assert b["reward/mean"] == pytest.approx(a["reward/mean"], rel=1e-5, abs=1e-6)
            assert b["samples/trained"] == a["samples/trained"] == 4  # one process keeps nothing
            assert b["update/steps"] == a["update/steps"] == 2
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)  # norm of the sharded gradients
        else:  # evaluation (base, tuned EMA): 3 samples split 2/1 over the processes and gathered
            assert b["eval/num_samples"] == a["eval/num_samples"] == 3
            assert b["eval/flat_pairs"] == pytest.approx(a["eval/flat_pairs"], rel=1e-4)
    # the live weights of the last checkpoint (gathered from the shards) against the one-process
    # run's, relative to how far the last update moved them. Measured: ‖Δw‖ = 5.2e-4 against a last
    # update of 0.54 (0.1 %); 22 of 272,896 weights differ by more than 1e-5.
    w1, w1_prev = _flat(one / "checkpoints" / "iter_000002" / "trainable.safetensors"), _flat(one / "checkpoints" / "iter_000001" / "trainable.safetensors")
    w2 = _flat(two / "checkpoints" / "iter_000002" / "trainable.safetensors")
    moved = float((w1 - w1_prev).norm())
    assert moved > 0.1
    assert float((w2 - w1).norm()) <= 0.01 * moved
    assert int(((w2 - w1).abs() > 1e-5).sum()) <= 0.001 * w1.numel()
    # the exported (EMA) LoRA, gathered: same layout, same values to float tolerance (measured ‖Δ‖ = 3.5e-4 of 11.5)
    l1, l2 = _flat(one / "lora" / "pytorch_lora_weights.safetensors"), _flat(two / "lora" / "pytorch_lora_weights.safetensors")
    assert l1.shape == l2.shape
    assert float((l2 - l1).norm()) <= 1e-3 * float(l1.norm())


@pytest.mark.slow  # three 2-process launches: ~90 s of CPU (run with -m slow)
@needs_launcher
def test_fsdp_run_resumes_to_the_uninterrupted_result(tmp_path):
    """A sharded run stopped after iteration 1 and resumed (resume_from=latest: weights, optimizer,
    EMA restored into the shards) ends with the uninterrupted run's LoRA, bitwise on the CPU."""
    full, part = tmp_path / "full", tmp_path / "part"
    _train(full, "train.iterations=2", fsdp=True)
    _train(part, "train.iterations=1", fsdp=True)
    _train(part, "train.iterations=2", "train.resume_from=latest", fsdp=True)
    a, b = _flat(full / "lora" / "pytorch_lora_weights.safetensors"), _flat(part / "lora" / "pytorch_lora_weights.safetensors")
    assert torch.equal(a, b)
    keys = ["iteration", "reward/mean", "grad_norm"]
    rows = lambda run: [[r[k] for k in keys] for r in _metrics(run) if "reward/mean" in r]  # noqa: E731
    assert rows(part) == rows(full)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_fsdp_language_model_with_dapo_refill_matches_one_process(tmp_path):
    """DAPO on the tiny Llama, FSDP over 2 processes (torchrun with the variables `accelerate launch`
    exports for fsdp.yaml): iteration 1 drops a group and refills one prompt, which only one process
    rolls out (different model-call counts: the rollout runs inside one gather of the weights, so
    nothing waits). Same rewards and LoRA as one process (measured with completions of unequal lengths:
    ‖Δw‖ 4.2e-5 against a change of 0.81 — one weight whose near-zero gradient AdamW's sign-like
    first steps amplify; bound 1e-3 of the change)."""
    from safetensors.torch import load_file

    worker = ROOT / "tests" / "_dist_worker.py"
    one = subprocess.run([sys.executable, str(worker), str(tmp_path / "one"), "--llm=dapo"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    env = _env()
    env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP")
    port = str(29800 + os.getpid() % 90)
    two = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", port, str(worker), str(tmp_path / "two"), "--llm=dapo"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / "two" / "dapo" / f"rank{rank}_info.json").read_text())["sharded"] is True
    records = lambda d: [json.loads(l) for l in (d / "dapo" / "records.jsonl").read_text().splitlines()]  # noqa: E731
    r1, r2 = records(tmp_path / "one"), records(tmp_path / "two")
    assert r2[0]["select/rounds"] == r1[0]["select/rounds"] >= 2  # a refill round with one prompt for two processes
    for a, b in zip(r1, r2):
        assert b["reward/mean"] == pytest.approx(a["reward/mean"], rel=1e-5, abs=1e-6)
        assert b["update/steps"] == a["update/steps"]
    flat = lambda p: torch.cat([v.flatten() for _, v in sorted(load_file(str(p)).items())])  # noqa: E731
    init = flat(tmp_path / "one" / "dapo" / "rank0_it0.safetensors")
    for it in (1, 2):
        ref = flat(tmp_path / "one" / "dapo" / f"rank0_it{it}.safetensors")
        got0, got1 = flat(tmp_path / "two" / "dapo" / f"rank0_it{it}.safetensors"), flat(tmp_path / "two" / "dapo" / f"rank1_it{it}.safetensors")
        assert torch.equal(got0, got1)
        change = float((ref - init).norm())
        assert change > 0.1
        assert float((got0 - ref).norm()) <= 1e-3 * change


def _fake_accelerator(kind: str, version: int = 2) -> SimpleNamespace:
    from accelerate.utils import DistributedType

    return SimpleNamespace(distributed_type=DistributedType[kind], num_processes=2, state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))


def test_deepspeed_fsdp1_and_unwrappable_policies_are_refused_with_the_way_out():
    from flowrl.builders import prepare_training as _prepare

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ConfigError, match=r"DEEPSPEED.*assets/accelerate/fsdp\.yaml"):
        _prepare(_fake_accelerator("DEEPSPEED"), model, opt, wrap=True)
    with pytest.raises(ConfigError, match=r"fsdp_version 1.*fsdp_version: 2"):
        _prepare(_fake_accelerator("FSDP", version=1), model, opt, wrap=True)
    with pytest.raises(ConfigError, match=r"forward_calls_model = False.*ddp\.yaml"):
        _prepare(_fake_accelerator("FSDP"), model, opt, wrap=False)


def test_sharding_helpers_leave_plain_tensors_alone():
    """Without FSDP the helpers are identities, so the one-process and DDP paths are unchanged."""
    from flowrl.sharding import full_state, gathered_parameters, like, shard_like_params

    model = torch.nn.Linear(3, 2)
    w = torch.randn(2, 3)
    assert like(model.weight, w) is w
    state = {"shadow": [w], "steps": 3}
    assert full_state(state)["shadow"][0] is w and full_state(state)["steps"] == 3
    assert shard_like_params(state, list(model.parameters())) is state
    before = [p.detach().clone() for p in model.parameters()]
    with gathered_parameters(model):
        out = model(torch.ones(1, 3))
    assert out.shape == (1, 2) and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.slow  # two launches: ~30 s of CPU (run with -m slow)
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_fsdp_on_one_process_equals_no_fsdp(tmp_path):
    """fsdp.yaml with --num_processes 1 (accelerate needs the model and optimizer prepared together
    under FSDP2, even alone): the same weights as a plain one-process run, bitwise."""
    from safetensors.torch import load_file

    worker = ROOT / "tests" / "_dist_worker.py"
    sets = ["train.eval_prompts=null", "train.progress=false", "train.prompts_per_iteration=2", "train.num_generations=2",
            "train.train_batch_size=4", "sampler.num_steps=4", "train.ema_decay=0", "train.iterations=1"]
    env = _env()
    plain = subprocess.run([sys.executable, str(worker), str(tmp_path / "plain"), *sets, f"train.output_dir={tmp_path / 'r1'}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    port = str(29900 + os.getpid() % 90)
    sharded = subprocess.run(["torchrun", "--nproc_per_node", "1", "--master_port", port, str(worker), str(tmp_path / "fsdp"), *sets,
                              f"train.output_dir={tmp_path / 'r2'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    a, b = load_file(str(tmp_path / "plain" / "rank0_it1.safetensors")), load_file(str(tmp_path / "fsdp" / "rank0_it1.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = load_file(str(tmp_path / "plain" / "rank0_it0.safetensors"))
    assert any(not torch.equal(a[k], before[k]) for k in a)  # the update moved the weights: not a vacuous comparison
