"""Reliability: every bad input is one clear ``flowrl: error: ...`` line (exit code 2), random and
malformed configs fail only with ConfigError naming a field, one bad sample does not spoil a
batch, NaN/inf updates are skipped and counted, checkpoints load safely, progress output is honest."""

import copy
import json
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowrl import FlowPolicy, TrainConfig
from flowrl.cli import final_line, main
from flowrl.config import ConfigError, _SECTIONS
from flowrl.rewards import RewardError, RewardSet, build_rewards

REPO = Path(__file__).resolve().parents[1]


def _tiny(tmp_path, *extra):
    return TrainConfig().override([
        f"train.output_dir={tmp_path / 'run'}", "train.iterations=2", "sampler.num_steps=2", "sampler.height=16",
        "sampler.width=16", "train.lora_rank=4", "train.lora_alpha=8", "train.num_generations=4",
        "train.prompts_per_iteration=2", "train.train_batch_size=4", "train.progress=false", "sampler.eval_num_steps=2", *extra,
    ])


def _policy(pipe, cfg):
    r = cfg.resolved()
    return FlowPolicy.from_pipeline(copy.deepcopy(pipe), sampler=r.preset.kernel, noise_level=r.preset.noise_level,
                                    num_steps=cfg.sampler.num_steps, height=cfg.sampler.height, width=cfg.sampler.width)


def _cli_error(capsys, argv):
    """Run the CLI; it must return 2 and print exactly one line ``flowrl: error: ...``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("flowrl: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in "\n".join(err)
    return lines[0]


# --------------------------------------------------------------------------- the table
@pytest.mark.parametrize("assignment,field,fix", [
    ("train.learning_rate=-1e-3", "train.learning_rate", "positive"),
    ("train.learning_rate=0", "train.learning_rate", "positive"),
    ("loss.clip_range=-0.5", "loss.clip_range", "≥ 0"),
    ("train.max_grad_norm=-1", "train.max_grad_norm", "0 disables"),
    ("train.weight_decay=-0.1", "train.weight_decay", "≥ 0"),
    ("train.adam_betas=[0.9, 1.5]", "train.adam_betas[1]", "[0, 1)"),
    ("train.adam_betas=[0.9]", "train.adam_betas", "2 values"),
    ("train.lr_min_ratio=2", "train.lr_min_ratio", "[0, 1]"),
    ("train.lora_alpha=0", "train.lora_alpha", "positive"),
    ("train.max_nonfinite_updates=-1", "train.max_nonfinite_updates", "≥ 0"),
    ("sampler.temperature=0", "sampler.temperature", "positive"),
    ("sampler.eval_num_steps=0", "sampler.eval_num_steps", "≥ 1"),
    ("sampler.guidance_scale=.nan", "sampler.guidance_scale", "finite"),
    ("loss.beta=-0.01", "loss.beta", "0 disables"),
    ("loss.adv_clip_max=0", "loss.adv_clip_max", "positive"),
    ("reward.max_failures=-2", "reward.max_failures", "≥ 0"),
    ("reward.rewards={jpeg_compressibility: .inf}", "reward.rewards.jpeg_compressibility", "finite"),
    ("algorithm=flow_grp", "algorithm", "did you mean 'flow_grpo'"),
])
def test_bad_numbers_are_one_line_errors_naming_field_and_fix(tmp_path, capsys, assignment, field, fix):
    line = _cli_error(capsys, ["train", "--set", f"train.output_dir={tmp_path}", "--set", assignment])
    assert field in line and fix in line, line
    assert not (tmp_path / "checkpoints").exists()  # stopped before anything ran


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  iterations: 2\n  prompts: [a cat\n  seed: 1\n")
    line = _cli_error(capsys, ["train", "--config", str(path)])
    assert str(path) in line and "line 4" in line and "YAML syntax error" in line, line


def test_unknown_reward_suggests_close_names(tmp_path, capsys):
    line = _cli_error(capsys, ["train", "--set", f"train.output_dir={tmp_path}", "--set", "reward.rewards={pickscor: 1.0}"])
    assert "reward.rewards.pickscor" in line and "did you mean 'pickscore'" in line, line


def test_missing_reward_weights_name_reward_and_path(tmp_path, capsys):
    missing = tmp_path / "models" / "PickScore_v1"
    line = _cli_error(capsys, ["train", "--set", f"train.output_dir={tmp_path}", "--set", f"reward.rewards={{pickscore: {{weight: 1.0, path: {missing}}}}}"])
    assert "reward.rewards.pickscore.path" in line and str(missing) in line and "does not exist" in line, line


def test_unimportable_dotted_reward_says_how_to_fix(tmp_path, capsys):
    line = _cli_error(capsys, ["train", "--set", f"train.output_dir={tmp_path}", "--set", "reward.rewards={nosuchpkg_x.rewards:Bright: 1.0}"])
    assert "reward.rewards.nosuchpkg_x.rewards:Bright" in line and "PYTHONPATH" in line and "install" in line, line


def test_empty_prompt_file_names_the_file(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("\n  \n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"train: {{prompts: prompts.txt, output_dir: {tmp_path / 'run'}}}\n")
    line = _cli_error(capsys, ["train", "--config", str(cfg)])
    assert "train.prompts" in line and str(tmp_path / "prompts.txt") in line and "no prompt" in line, line


def test_missing_config_file_and_bad_set_value(tmp_path, capsys):
    assert "does not exist" in _cli_error(capsys, ["train", "--config", str(tmp_path / "nope.yaml")])
    line = _cli_error(capsys, ["train", "--set", "train.prompts=[unclosed"])
    assert "--set train.prompts" in line and "not valid YAML" in line, line


def test_the_real_command_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "flowrl", "train", "--set", "train.learning_rate=-1e-3"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("flowrl: error: train.learning_rate")
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- relative paths
def test_relative_input_paths_are_taken_from_the_config_folder(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    (conf / "data").mkdir(parents=True)
    (conf / "data" / "prompts.txt").write_text("a cat\na dog\n")
    (conf / "weights.pt").write_bytes(b"")
    (conf / "run.yaml").write_text(
        "model: {pipeline: tiny-sd3}\n"
        "reward: {jpeg_compressibility: 1.0, mypkg.x:R: {weight: 1.0, head_path: weights.pt, clip_path: openai/clip-vit}}\n"
        "train: {prompts: data/prompts.txt, eval_prompts: digits:heldout, output_dir: out, resume_from: ./ckpt}\n"
    )
    monkeypatch.chdir(tmp_path)  # anywhere but the config's folder
    cfg = TrainConfig.from_yaml("conf/run.yaml")
    assert cfg.train.prompts == str(conf / "data" / "prompts.txt")
    assert cfg.train.resume_from == str(conf / "ckpt")  # explicit ./ : relative to the config even if missing
    opts = cfg.reward.rewards["mypkg.x:R"]
    assert opts["head_path"] == str(conf / "weights.pt") and opts["clip_path"] == "openai/clip-vit"  # a cache id stays
    assert cfg.model.pipeline == "tiny-sd3" and cfg.train.eval_prompts == "digits:heldout"  # names stay names
    assert cfg.train.output_dir == "out"  # outputs: relative to the working directory
    assert cfg.resolved_paths["relative_to"] == str(conf) and "train.prompts" in cfg.resolved_paths
    # overrides keep the record; the run writes it into config.yaml (resolved.paths)
    cfg = cfg.override(["train.resume_from=null", "train.iterations=0", f"train.output_dir={tmp_path / 'run'}"])
    from flowrl import checkpointing

    class _Acc:
        is_main_process = True

        def wait_for_everyone(self):
            pass

    class _T:  # what prepare_run_dir reads
        config, resolved, run_dir, accelerator = cfg, cfg.resolved(), tmp_path / "run", _Acc()

    checkpointing.prepare_run_dir(_T)
    import yaml

    paths = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["resolved"]["paths"]
    assert paths["train.prompts"] == str(conf / "data" / "prompts.txt") and paths["output_dir"] == str(tmp_path / "run")


# ---------------------------------------------------------------- property tests (hypothesis)
_FIELDS = {sec: [f.name for f in __import__("dataclasses").fields(cls)] for sec, cls in _SECTIONS.items()}
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["flow_grpo", "dance_grpo", "1e-4", "-3", "nan", "cosine", "no", "float32"]),
)
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=6)
_section = st.sampled_from(list(_FIELDS)).flatmap(
    lambda sec: st.tuples(st.just(sec), st.dictionaries(st.one_of(st.sampled_from(_FIELDS[sec]), st.text(max_size=6)), _values, max_size=4))
)
_KNOWN_NAMES = {n for names in _FIELDS.values() for n in names} | set(_FIELDS) | {"algorithm", "config"}


def _names_a_field(message: str, data) -> bool:
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", message))
    keys = {str(k) for k in (data or {})} if isinstance(data, dict) else set()
    for sec in (data or {}).values() if isinstance(data, dict) else []:
        if isinstance(sec, dict):
            keys |= {str(k) for k in sec}
    return bool(words & _KNOWN_NAMES) or any(k and k in message for k in keys)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.lists(_section, max_size=4).map(lambda items: {sec: body for sec, body in items}),
    st.dictionaries(st.one_of(st.sampled_from(list(_FIELDS) + ["algorithm"]), st.text(max_size=6)), _values, max_size=4),
    _values,
))
def test_random_configs_validate_or_fail_with_a_config_error_naming_a_field(data):
    try:
        cfg = TrainConfig.from_dict(data)
        cfg.validate()
        cfg.resolved()
    except ConfigError as exc:
        assert _names_a_field(str(exc), data), str(exc)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.text(max_size=80))
def test_random_yaml_text_fails_only_with_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_text(text)
    try:
        TrainConfig.from_yaml(path).validate()
    except ConfigError as exc:
        assert str(path) in str(exc) or _names_a_field(str(exc), None), str(exc)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.sampled_from([f"{sec}.{name}" for sec, names in _FIELDS.items() for name in names]), _scalars)
def test_any_single_override_validates_or_names_its_field(key, value):
    import yaml

    try:
        TrainConfig().override([f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]).validate()
    except ConfigError as exc:
        assert key.split(".")[-1] in str(exc) or key.split(".")[0] in str(exc), (key, value, str(exc))


# ------------------------------------------------------------- one bad sample, not the batch
class FailsOnBadPrompt:
    """Raises for a whole batch as soon as one of its prompts contains 'bad' (like a model that
    chokes on one input)."""

    name = "picky"
    calls = 0

    def __call__(self, outputs, prompts, meta=None):
        type(self).calls += 1
        if any("bad" in p for p in prompts):
            raise ValueError("cannot score this input")
        return outputs.float().mean(dim=(1, 2, 3))


def test_a_raising_reward_is_retried_per_sample_and_names_the_prompt():
    images = torch.rand(4, 3, 8, 8)
    prompts = ["a cat", "a bad dog", "a cat", "a red apple"]
    rs = RewardSet({"picky": FailsOnBadPrompt()}, {"picky": 1.0}, max_failures=5)
    table, names = rs.score(images, prompts)
    expected = images.mean(dim=(1, 2, 3))
    assert names == ["picky"] and math.isnan(float(table[1, 0]))
    torch.testing.assert_close(table[[0, 2, 3], 0], expected[[0, 2, 3]])  # the others keep their scores
    assert rs.metrics()["reward/failures/picky"] == 1.0
    assert "'a bad dog'" in rs.last_errors["picky"] and "cannot score" in rs.last_errors["picky"]
    strict = RewardSet({"picky": FailsOnBadPrompt()}, {"picky": 1.0}, max_failures=0)
    with pytest.raises(RewardError, match=r"1 of 4 samples.*'a bad dog'"):
        strict.score(images, prompts)


def test_a_reward_that_needs_the_whole_batch_is_not_split():
    class GroupOnly(FailsOnBadPrompt):
        isolate_failures = False

    GroupOnly.calls = 0
    rs = RewardSet({"picky": GroupOnly()}, {"picky": 1.0}, max_failures=10)
    table, _ = rs.score(torch.rand(4, 3, 8, 8), ["a", "bad", "c", "d"])
    assert torch.isnan(table).all() and GroupOnly.calls == 1 and rs.failures["picky"] == 4
    from flowrl.rewards.pairwise import PairwiseJudgeReward

    assert PairwiseJudgeReward.isolate_failures is False  # win rates need the group


def test_failed_samples_are_not_trained_and_the_rest_are(tmp_path, tiny_sd3):
    from flowrl.trainer import Trainer

    cfg = _tiny(tmp_path, "train.iterations=1", "train.prompts=['a cat', 'a bad dog']", "reward.max_failures=8")
    rs = build_rewards({"tests.test_reliability:FailsOnBadPrompt": 1.0}, max_failures=8)
    result = Trainer(cfg, policy=_policy(tiny_sd3, cfg), reward_set=rs).train()
    h = result.history[0]
    assert h["reward/failures/picky"] == 4.0 and h["samples/trained"] == 4.0 and math.isfinite(h["reward/mean"])


# ----------------------------------------------------------------- NaN/inf updates are skipped
def _poisoned(objective, *, at_iteration, kind):
    """Wrap an objective so its loss (or only its gradients) become NaN at one iteration."""
    def wrapped(policy, batch, steps, ctx):
        loss, metrics = objective(policy, batch, steps, ctx)
        if ctx.iteration == at_iteration:
            p = next(p for p in policy.model.parameters() if p.requires_grad)
            if kind == "loss":
                loss = loss * float("nan")
            else:  # finite loss, NaN gradient: d/dx sqrt(x) at 0 is inf, times 0
                loss = loss + torch.sqrt(p * 0).sum()
        return loss, metrics
    return wrapped


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nonfinite_update_is_skipped_counted_and_the_run_goes_on(tmp_path, tiny_sd3, capsys, kind):
    from flowrl.trainer import Trainer

    cfg = _tiny(tmp_path, "train.iterations=3", "train.learning_rate=1e-2", "train.max_nonfinite_updates=2")
    trainer = Trainer(cfg, policy=_policy(tiny_sd3, cfg))
    trainer.objective = _poisoned(trainer.objective, at_iteration=2, kind=kind)
    snapshots = []
    original = trainer.iteration

    def iteration(it):
        snapshots.append({n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if p.requires_grad})
        return original(it)

    trainer.iteration = iteration
    result = trainer.train()
    skipped = [h["update/skipped_nonfinite"] for h in result.history]
    assert skipped == [0.0, 2.0, 0.0]  # both minibatches of iteration 2 (8 samples, batch 4)
    assert [h["update/steps"] for h in result.history] == [2.0, 0.0, 2.0]
    after_2 = {n: p.detach() for n, p in trainer.policy.model.named_parameters() if p.requires_grad}
    for n, p in after_2.items():
        assert torch.isfinite(p).all(), n
    for n in snapshots[1]:  # iteration 2 changed nothing: weights entering iteration 3 == entering 2
        assert torch.equal(snapshots[1][n], snapshots[2][n]), n
    err = capsys.readouterr().err
    assert "skipped an optimizer step" in err and "iteration 2, minibatch 0" in err
    assert ("loss nan" in err) if kind == "loss" else ("gradient norm" in err)


def test_too_many_nonfinite_updates_stop_with_a_clear_message(tmp_path, tiny_sd3):
    from flowrl.trainer import NonFiniteUpdateError, Trainer

    cfg = _tiny(tmp_path, "train.iterations=2", "train.max_nonfinite_updates=0")
    trainer = Trainer(cfg, policy=_policy(tiny_sd3, cfg))
    trainer.objective = _poisoned(trainer.objective, at_iteration=1, kind="loss")
    with pytest.raises(NonFiniteUpdateError, match=r"train.max_nonfinite_updates=0.*iteration 1, minibatch 0: loss nan on prompts"):
        trainer.train()
    from flowrl.cli import _is_user_error

    assert _is_user_error(NonFiniteUpdateError("x"))  # the CLI prints it as one line


# ------------------------------------------------------------------------------- safe loading
def test_nothing_in_the_project_unpickles_arbitrary_objects():
    """Every ``torch.load`` call in the code passes ``weights_only=True``; no ``pickle.load(s)``."""
    import ast

    offenders = []
    for folder in ("flowrl", "pipelines", "rewards", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                    continue
                owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                if owner == "torch" and node.func.attr == "load":
                    safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords)
                    if not safe:
                        offenders.append(where)
                if owner == "pickle" and node.func.attr in ("load", "loads"):
                    offenders.append(where)
    assert not offenders, offenders


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_sd3):
    from flowrl.trainer import Trainer

    tmp = tmp_path_factory.mktemp("saved")
    cfg = _tiny(tmp, "train.iterations=1", "train.ema_decay=0.5")
    Trainer(cfg, policy=_policy(tiny_sd3, cfg)).train()
    return tmp, cfg


@pytest.mark.parametrize("damage", ["truncated_weights", "pickle_as_safetensors", "truncated_optimizer", "malicious_optimizer", "bad_state_json"])
def test_damaged_checkpoint_gives_a_clear_error_naming_the_file(tmp_path, saved_run, tiny_sd3, damage, monkeypatch):
    import shutil

    from flowrl.safeload import CheckpointError
    from flowrl.trainer import Trainer

    src, _ = saved_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src / "run" / "checkpoints" / "iter_000001", ckpt)
    target = {"truncated_weights": "trainable.safetensors", "pickle_as_safetensors": "trainable.safetensors",
              "truncated_optimizer": "optimizer.pt", "malicious_optimizer": "optimizer.pt", "bad_state_json": "state.json"}[damage]
    f = ckpt / target
    if damage.startswith("truncated"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "pickle_as_safetensors":
        f.write_bytes(pickle.dumps({"w": torch.zeros(2)}))
    elif damage == "malicious_optimizer":
        f.write_bytes(pickle.dumps(_Boom()))
    else:
        f.write_text("{not json")
    monkeypatch.chdir(tmp_path)
    cfg = _tiny(tmp_path, "train.iterations=2", "train.ema_decay=0.5", f"train.resume_from={ckpt}")
    with pytest.raises(CheckpointError) as info:
        Trainer(cfg, policy=_policy(tiny_sd3, cfg)).train()
    assert str(f) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "PWNED").exists()  # weights_only=True: no pickled code ran


def test_dotted_plugin_is_imported_only_when_named(tmp_path, monkeypatch):
    (tmp_path / "probe_plugin_mod.py").write_text(
        "import torch\nIMPORTED = True\n"
        "class Probe:\n    name = 'probe'\n    def __call__(self, outputs, prompts, meta=None):\n        return torch.zeros(len(prompts))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "probe_plugin_mod", raising=False)
    named = TrainConfig().override(["reward.rewards={probe_plugin_mod:Probe: 1.0}"])
    named.validate(), named.resolved()
    build_rewards({"jpeg_compressibility": 1.0})
    assert "probe_plugin_mod" not in sys.modules  # validating a config or building other rewards imports nothing
    rs = build_rewards(named.reward.rewards)
    assert "probe_plugin_mod" in sys.modules and list(rs.rewards) == ["probe"]


# ------------------------------------------------------------------------- honest progress
def test_progress_shows_kl_only_when_measured(tmp_path, tiny_sd3, capsys):
    from flowrl.trainer import Trainer, progress_postfix

    assert progress_postfix({"reward/mean": 0.5}) == {"reward": "0.500"}
    assert progress_postfix({"reward/mean": 0.5, "kl/ref": 0.0012})["kl"] == "1.20e-03"
    assert "kl" not in final_line({"reward/mean": 0.5}) and "no KL term" in final_line({"reward/mean": 0.5})
    assert "kl 1.000e-03" in final_line({"reward/mean": 0.5, "kl/ref": 1e-3})
    cfg = _tiny(tmp_path, "train.iterations=1", "loss.beta=0", "train.progress=true", "train.eval_prompts=['a cat']")
    result = Trainer(cfg, policy=_policy(tiny_sd3, cfg)).train()
    err = capsys.readouterr().err
    assert "kl/ref" not in result.history[0] and "reward=" in err and "kl=" not in err
    assert "eval (base)" in err and "eval (tuned)" in err  # the evaluations show progress
    cfg = _tiny(tmp_path, "train.iterations=1", "loss.beta=0.04", "train.progress=true", f"train.output_dir={tmp_path / 'kl'}")
    Trainer(cfg, policy=_policy(tiny_sd3, cfg)).train()
    assert "kl=" in capsys.readouterr().err


# --------------------------------------------------------------------- kill -9, resume, compare
def _train_cmd(cfg_path, *sets):
    return [sys.executable, "-m", "flowrl", "train", "--config", str(cfg_path), *[a for s in sets for a in ("--set", s)]]


def test_kill_9_mid_run_then_resume_matches_an_uninterrupted_run_bitwise(tmp_path):
    import random
    import time

    from safetensors.torch import load_file

    iterations = 4
    kill_after = random.randint(1, iterations - 1)  # pytest-randomly seeds `random`: the seed is in the header
    cfg = _tiny(tmp_path, f"train.iterations={iterations}", "train.save_every=1", "train.learning_rate=1e-2",
                "loss.beta=0.04", "train.ema_decay=0.5", "train.lora_rank=2", "train.lora_alpha=4")
    path = tmp_path / "cfg.yaml"
    cfg.to_yaml(path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # the uninterrupted run in a fresh process too: a test process carries global state (thread
    # counts, RNG, flags) left by earlier tests, which made the in-process run differ in the last bits
    full = subprocess.run(_train_cmd(path, f"train.output_dir={tmp_path / 'full'}"), env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(path, f"train.output_dir={run}"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run / "checkpoints" / f"iter_{kill_after:06d}"
    deadline = time.monotonic() + 240
    while not marker.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()  # SIGKILL: no cleanup, possibly mid-iteration or mid-checkpoint
    proc.wait()
    assert marker.is_dir(), "the run never reached the checkpoint to kill after"
    done = sorted(p.name for p in (run / "checkpoints").glob("iter_*[0-9]"))
    assert done[-1] != f"iter_{iterations:06d}", "the run finished before it was killed"

    resumed = subprocess.run(_train_cmd(path, f"train.output_dir={run}", "train.resume_from=latest"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = f"checkpoints/iter_{iterations:06d}"
    a, b = load_file(str(tmp_path / "full" / final / "trainable.safetensors")), load_file(str(run / final / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda recs: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in recs]  # noqa: E731
    lines = lambda p: [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert strip(lines(run)) == strip(lines(tmp_path / "full"))
    assert [r["iteration"] for r in lines(run)] == list(range(1, iterations + 1))
    opt_a = torch.load(tmp_path / "full" / final / "optimizer.pt", weights_only=True)
    opt_b = torch.load(run / final / "optimizer.pt", weights_only=True)
    for k in opt_a["state"]:
        for name, v in opt_a["state"][k].items():
            assert torch.equal(v, opt_b["state"][k][name]), (k, name)
