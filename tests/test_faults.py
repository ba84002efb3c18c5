"""Fault injection: what a run does when the world misbehaves. Real processes and real signals
where the fault needs them (SIGTERM, kill during a checkpoint write), a patched writer for a full
disk, and reward servers on 127.0.0.1 (http.server in a thread, bounded waits) that are down,
hung, or answer garbage. Every case ends in one clear line and an intact run folder."""

from __future__ import annotations

import copy
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from flowrl import FlowPolicy, TrainConfig
from flowrl.cli import main
from flowrl.rewards import RewardError, build_rewards

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _tiny(tmp_path, *extra):
    return TrainConfig().override([
        f"train.output_dir={tmp_path / 'run'}", "train.iterations=2", "sampler.num_steps=2", "sampler.height=16",
        "sampler.width=16", "train.lora_rank=4", "train.lora_alpha=8", "train.num_generations=4",
        "train.prompts_per_iteration=2", "train.train_batch_size=4", "train.progress=false", "sampler.eval_num_steps=2",
        "train.report_to=none", *extra,
    ])


def _policy(pipe, cfg):
    r = cfg.resolved()
    return FlowPolicy.from_pipeline(copy.deepcopy(pipe), sampler=r.preset.kernel, noise_level=r.preset.noise_level,
                                    num_steps=cfg.sampler.num_steps, height=cfg.sampler.height, width=cfg.sampler.width)


def _one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("flowrl: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ================================================================== 1. a remote reward that fails
class _Judge(http.server.BaseHTTPRequestHandler):
    """A misbehaving OpenAI-compatible server; ``server.mode``: ``html`` (a web page for every
    request), ``noscore`` (JSON, but the answer holds no score / no winner), ``nochoices`` (JSON
    without ``choices``), ``hang`` (never answers within the client's timeout; bounded by
    ``server.release``)."""

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, kind: str):
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout): nothing to do
            pass

    def _answer(self, chat: bool):
        srv = self.server
        with srv.lock:
            srv.hits += chat
            srv.auth.append(self.headers.get("Authorization"))
        if srv.mode == "hang":
            srv.release.wait(5.0)  # bounded: the test never waits on a thread forever
            return
        if srv.mode == "html":
            return self._send(b"<html><body>It works!</body></html>", "text/html")
        if not chat:
            return self._send(json.dumps({"data": [{"id": "judge"}]}).encode(), "application/json")
        answer = {"noscore": "A lovely picture.", "ok": "Image 1 is better.\nFinal Score: 3"}
        body = {"choices": [{"message": {"content": answer[srv.mode]}}]} if srv.mode in answer else {"error": "nope"}
        self._send(json.dumps(body).encode(), "application/json")

    def do_GET(self):
        self._answer(chat=False)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer(chat=True)


@pytest.fixture
def judge_server():
    started = []

    def start(mode: str) -> str:
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
        srv.mode, srv.lock, srv.hits, srv.release, srv.daemon_threads = mode, threading.Lock(), 0, threading.Event(), True
        srv.auth = []
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        started.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/v1"

    start.servers = started
    yield start
    for srv in started:
        srv.release.set()
        srv.shutdown()
        srv.server_close()


def _closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}/v1"


_FAST = "timeout: 0.5, max_retries: 1, backoff: 0.0"


@pytest.mark.parametrize("reward", ["vlm_judge", "pairwise_judge"])
@pytest.mark.parametrize("mode", ["down", "html", "hang"])
def test_health_check_stops_before_any_model_loads(tmp_path, capsys, judge_server, mode, reward):
    url = _closed_port_url() if mode == "down" else judge_server(mode)
    line = _one_error_line(capsys, ["train", "--set", f"train.output_dir={tmp_path / 'run'}", "--set", "model.pipeline=tiny-sd3",
                                    "--set", f"reward.rewards={{{reward}: {{weight: 1.0, base_url: '{url}', {_FAST}}}}}"])
    assert f"reward '{reward}'" in line and f"{url}/models" in line and "health check" in line, line
    assert {"down": "Connection refused", "html": "text/html", "hang": "timed out"}[mode] in line, line
    assert not (tmp_path / "run").exists()  # nothing written, no model loaded


@pytest.mark.parametrize("reward", ["vlm_judge", "pairwise_judge"])
@pytest.mark.parametrize("mode", ["noscore", "nochoices"])
def test_a_reward_that_fails_on_every_sample_stops_the_run(tmp_path, tiny_sd3, judge_server, mode, reward):
    """The server is up (the health check passes) but no answer holds a score: before, every sample
    got 0.0 (vlm_judge) or a 0.5 tie (pairwise_judge), the run trained on constants and exited 0."""
    from flowrl.trainer import Trainer

    url = judge_server(mode)
    # a generous timeout: the server answers at once; on a loaded machine 0.5 s could time out instead
    cfg = _tiny(tmp_path, f"reward.rewards={{{reward}: {{weight: 1.0, base_url: '{url}', timeout: 30, max_retries: 1, backoff: 0.0}}}}", "reward.max_failures=1000")
    with pytest.raises(RewardError) as info:
        Trainer(cfg, policy=_policy(tiny_sd3, cfg)).train()
    msg = str(info.value)
    assert "\n" not in msg and f"reward '{reward}' at {url}/chat/completions" in msg and "failed on all 8 samples" in msg, msg
    assert ("no score in the answer" if reward == "vlm_judge" else "no winner in the answer") in msg if mode == "noscore" else "KeyError" in msg, msg
    assert not list((tmp_path / "run" / "checkpoints").glob("iter_*"))  # nothing trained, nothing saved


def test_failed_judge_calls_are_nan_and_count_as_failures(judge_server):
    url = judge_server("noscore")
    rs = build_rewards({"vlm_judge": {"weight": 1.0, "base_url": url, "timeout": 0.5, "max_retries": 0}}, max_failures=10)
    table, _ = rs.score(torch.rand(3, 3, 8, 8), ["a", "b", "c"])
    assert torch.isnan(table).all() and rs.metrics()["reward/failures/vlm_judge"] == 3.0
    opt_in = build_rewards({"vlm_judge": {"weight": 1.0, "base_url": url, "timeout": 0.5, "max_retries": 0, "failed_value": 0.0}})
    assert opt_in.score(torch.rand(2, 3, 8, 8), ["a", "b"])[0].eq(0).all()  # a constant only when asked for


def test_a_hung_server_costs_one_request_worst_case_per_batch(judge_server):
    """Once a request finds the server unreachable, the rest of the batch fails at once: 6 samples,
    2 at a time, 0.3 s timeout, 1 retry: 2 requests × 2 attempts are sent, the other 4 never wait."""
    from flowrl.rewards import get

    url = judge_server("hang")
    judge = get("vlm_judge", base_url=url, timeout=0.3, max_retries=1, backoff=0.0, max_concurrency=2, health_check=False)
    scores = judge(torch.rand(6, 3, 8, 8), list("abcdef"))
    assert torch.isnan(scores).all() and judge.client.requests == 4
    assert "timed out" in judge.last_errors[0] and any("not sent" in e for e in judge.last_errors)


def test_retry_worst_case_is_stated(tmp_path):
    from flowrl.rewards.remote import RetryPolicy

    p = RetryPolicy()  # the judges' defaults: 60 s timeout, 3 retries, back-off 1, 2, 4 s
    assert p.worst_case_seconds() == 4 * 60 + 1 + 2 + 4
    assert "at most 247 s per request" in p.describe()
    assert RetryPolicy(timeout=10, max_retries=6, backoff=8, max_backoff=30).worst_case_seconds() == 70 + 8 + 16 + 30 * 4
    rs = build_rewards({"vlm_judge": {"weight": 1.0, "base_url": "http://127.0.0.1:9/v1"}})
    assert rs.describe_limits() == ["reward 'vlm_judge': http://127.0.0.1:9/v1/chat/completions: timeout 60 s × 4 attempts + back-off 7 s "
                                    "= at most 247 s per request, 8 concurrent; once the server is unreachable the rest of a batch fails at once"]


# ================================================================== 2. pre-emption (real signals)
_ITERATIONS = 4


def _train_cmd(cfg_path, *sets):
    return [sys.executable, "-m", "flowrl", "train", "--config", str(cfg_path), *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny job's config (no periodic checkpoints) and its uninterrupted run, in a fresh process."""
    tmp = tmp_path_factory.mktemp("job")
    cfg = _tiny(tmp, f"train.iterations={_ITERATIONS}", "train.save_every=0", "train.learning_rate=1e-2", "loss.beta=0.04",
                "train.ema_decay=0.5", "train.lora_rank=2", "train.lora_alpha=4")
    path = tmp / "cfg.yaml"
    cfg.to_yaml(path)
    full = subprocess.run(_train_cmd(path, f"train.output_dir={tmp / 'full'}"), env=ENV, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    return path, tmp / "full"


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_final_state(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    final = f"checkpoints/iter_{_ITERATIONS:06d}"
    wa, wb = load_file(str(a / final / "trainable.safetensors")), load_file(str(b / final / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _records(a) == _records(b)


def _wait_for(predicate, proc, seconds=240.0):
    deadline = time.monotonic() + seconds
    while not predicate() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_then_resume_is_exact(tmp_path, job, sig):
    """Pre-emption (SIGTERM) and Ctrl-C (SIGINT): the run finishes the iteration in progress, saves
    a checkpoint although train.save_every=0, says where, and exits 128 + signal; resuming gives
    bitwise the uninterrupted run."""
    cfg_path, full = job
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(cfg_path, f"train.output_dir={run}"), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    assert _wait_for(lambda: metrics.is_file() and metrics.read_text().strip(), proc), "the run never finished an iteration"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + sig, (proc.returncode, err[-2000:])
    saved = sorted((run / "checkpoints").glob("iter_*[0-9]"))
    assert len(saved) == 1 and saved[0].name != f"iter_{_ITERATIONS:06d}", saved
    k = int(saved[0].name[5:])
    last = err.strip().splitlines()[-1]
    assert last == (f"flowrl: stopped by {sig.name} after iteration {k}; checkpoint saved to {saved[0]}. "
                    "Resume exactly with the same command plus --set train.resume_from=latest."), last
    assert "Traceback" not in err
    if sig == signal.SIGINT:  # the same path; one resume (SIGTERM's) is enough for the suite's time
        return
    resumed = subprocess.run(_train_cmd(cfg_path, f"train.output_dir={run}", "train.resume_from=latest"), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_final_state(full, run)


def test_the_default_job_saves_periodically():
    digits = TrainConfig.from_yaml(REPO / "assets" / "configs" / "digits.yaml")
    assert 0 < digits.train.save_every <= 50 and 0 < TrainConfig().train.save_every <= 50


# ================================================================== 3. the run folder is history
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_sd3):
    """A 1-iteration run (checkpoint iter_000001) made in-process; tests copy it."""
    from flowrl.trainer import Trainer

    tmp = tmp_path_factory.mktemp("finished")
    cfg = _tiny(tmp, "train.iterations=1", "train.ema_decay=0.5")
    Trainer(cfg, policy=_policy(tiny_sd3, cfg)).train()
    return tmp / "run"


def _copy_run(src: Path, dst: Path) -> tuple[Path, dict[str, bytes]]:
    import shutil

    shutil.copytree(src, dst)
    return dst, {p.name: p.read_bytes() for p in dst.iterdir() if p.is_file()}


@pytest.mark.parametrize("case", ["damaged_checkpoint", "lora_rank", "lora_rank_allowed", "lora_targets", "fewer_iterations", "other_prompts"])
def test_a_failed_resume_leaves_the_run_folder_as_it_was(tmp_path, finished_run, tiny_sd3, case):
    from flowrl.config import ConfigError
    from flowrl.safeload import CheckpointError
    from flowrl.trainer import Trainer

    run, before = _copy_run(finished_run, tmp_path / "run")
    sets = {
        "damaged_checkpoint": ["train.eval_prompts=['a cat']", "train.allow_config_change=true"],
        "lora_rank": ["train.lora_rank=8"],
        "lora_rank_allowed": ["train.lora_rank=8", "train.allow_config_change=true"],
        "lora_targets": ["train.lora_targets=[to_q, to_k]"],
        "fewer_iterations": ["train.iterations=0"],
        "other_prompts": ["train.prompts=['a red apple']"],
    }[case]
    if case == "damaged_checkpoint":
        f = run / "checkpoints" / "iter_000001" / "optimizer.pt"
        f.write_bytes(f.read_bytes()[:100])
    cfg = _tiny(tmp_path, "train.iterations=2", "train.ema_decay=0.5", "train.resume_from=latest", *sets)
    expected = {"damaged_checkpoint": (CheckpointError, "optimizer.pt"),
                "lora_rank": (ConfigError, "train.lora_rank: 4 -> 8"),
                "lora_rank_allowed": (ConfigError, "shape"),
                "lora_targets": (ConfigError, "train.lora_targets: None -> ['to_q', 'to_k']"),
                "fewer_iterations": (ConfigError, "train.iterations=0 is below the checkpoint's iteration 1"),
                "other_prompts": (ConfigError, "train.prompts: ")}[case]
    with pytest.raises(expected[0]) as info:
        Trainer(cfg, policy=_policy(tiny_sd3, cfg)).train()
    assert expected[1] in str(info.value) and "\n" not in str(info.value), str(info.value)
    if expected[0] is ConfigError and case != "lora_rank_allowed":
        assert "--allow-config-change" in str(info.value) or case == "fewer_iterations"
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before  # config.yaml, metrics.jsonl, weights.json: untouched


def test_an_allowed_config_change_keeps_the_previous_record(tmp_path, finished_run, tiny_sd3):
    import yaml

    from flowrl.trainer import Trainer

    run, before = _copy_run(finished_run, tmp_path / "run")
    cfg = _tiny(tmp_path, "train.iterations=2", "train.ema_decay=0.5", "train.resume_from=latest", "train.learning_rate=1e-5",
                "train.allow_config_change=true")
    Trainer(cfg, policy=_policy(tiny_sd3, cfg)).train()
    assert (run / "config.iter_000001.yaml").read_bytes() == before["config.yaml"]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["learning_rate"] == 1e-5
    assert [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ================================================================== 4. secrets
@pytest.mark.parametrize("how", ["literal", "braces", "env_option"])
def test_a_judge_api_key_is_used_but_never_written(tmp_path, tiny_sd3, judge_server, monkeypatch, how):
    import yaml

    from flowrl import gallery, tracking
    from flowrl.trainer import Trainer

    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("JUDGE_KEY", secret)
    url = judge_server("ok")
    option = {"literal": f"api_key: {secret}", "braces": "api_key: '${JUDGE_KEY}'", "env_option": "api_key_env: JUDGE_KEY"}[how]
    cfg = _tiny(tmp_path, "train.iterations=1", f"reward.rewards={{vlm_judge: {{weight: 1.0, base_url: '{url}', {option}, timeout: 30}}}}")
    seen = {}
    monkeypatch.setattr(tracking, "start_trackers", lambda names, run_dir, config: seen.setdefault("config", config) and [])
    Trainer(cfg, policy=_policy(tiny_sd3, cfg)).train()
    assert set(judge_server.servers[0].auth) == {f"Bearer {secret}"}  # the health check and every request authenticated
    run = tmp_path / "run"
    for f in run.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    assert secret not in json.dumps(seen["config"])
    written = yaml.safe_load((run / "config.yaml").read_text())["reward"]["rewards"]["vlm_judge"]
    assert written.get("api_key", written.get("api_key_env")) == {"literal": "<redacted>", "braces": "${JUDGE_KEY}", "env_option": "JUDGE_KEY"}[how]
    # the gallery shows a run's config: redacted even for a record written before redaction existed
    old = (run / "config.yaml").read_text().replace("<redacted>", secret)
    assert secret not in gallery._redacted_yaml(old) and "<redacted>" in gallery._redacted_yaml(old) or how != "literal"


def test_a_missing_or_redacted_secret_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    base = ["train", "--set", f"train.output_dir={tmp_path / 'run'}"]
    line = _one_error_line(capsys, base + ["--set", "reward.rewards={vlm_judge: {weight: 1.0, api_key_env: NO_SUCH_KEY_VAR}}"])
    assert "reward.rewards.vlm_judge.api_key_env" in line and "NO_SUCH_KEY_VAR is not set" in line, line
    line = _one_error_line(capsys, base + ["--set", "reward.rewards={vlm_judge: {weight: 1.0, api_key: <redacted>}}"])
    assert "reward.rewards.vlm_judge.api_key was redacted" in line and "api_key_env" in line, line


# ================================================================== 5. checks before any model loads
@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to build a model fails the test: the check under test must come first."""
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the environment check")

    monkeypatch.setattr("flowrl.trainer.build_policy", boom)
    monkeypatch.setattr("flowrl.builders.load_pipeline", boom)


@pytest.mark.parametrize("case", ["output_is_file", "output_not_writable", "no_cuda", "resolution"])
def test_environment_errors_are_one_line_before_the_model_loads(tmp_path, capsys, no_model_loads, case):
    (tmp_path / "afile").write_text("x")
    if case == "no_cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    sets = {
        "output_is_file": [f"train.output_dir={tmp_path / 'afile'}"],
        "output_not_writable": ["train.output_dir=/proc/flowrl-no-such/run"],
        "no_cuda": [f"train.output_dir={tmp_path / 'run'}", "model.device=cuda"],
        "resolution": [f"train.output_dir={tmp_path / 'run'}", "sampler.height=18"],
    }[case]
    argv = ["train", "--config", str(REPO / "assets" / "configs" / "digits.yaml")] + [a for s in sets for a in ("--set", s)]
    line = _one_error_line(capsys, argv)
    want = {"output_is_file": ["train.output_dir=", "is a file"], "output_not_writable": ["train.output_dir=/proc/flowrl-no-such/run", "cannot write in /proc"],
            "no_cuda": ["model.device=cuda", "no CUDA device", "model.device=cpu"],
            "resolution": ["sampler.height=18 is not a multiple of 4", "patch 4", "use 16 or 20"]}[case]
    assert all(w in line for w in want), line
    assert not (tmp_path / "run").exists()


def test_a_resume_with_another_lora_shape_fails_before_the_model_loads(tmp_path, capsys, finished_run, no_model_loads):
    run, before = _copy_run(finished_run, tmp_path / "run")
    line = _one_error_line(capsys, ["train", "--config", str(run / "config.yaml"), "--set", "train.resume_from=latest", "--set", "train.iterations=2",
                                    "--set", "train.lora_rank=8", "--set", "train.lora_targets=[to_q]"])
    assert "train.lora_rank: 4 -> 8" in line and "train.lora_targets: None -> ['to_q']" in line and "--allow-config-change" in line, line
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_a_damaged_lora_folder_is_one_line(tmp_path, capsys, finished_run, no_model_loads, command):
    run, _ = _copy_run(finished_run, tmp_path / "run")
    f = next((run / "lora").glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:64])
    out = ["--out", str(tmp_path / ("x.json" if command == "eval" else "x.png"))]
    line = _one_error_line(capsys, [command, "--run", str(run), *out])
    assert str(f) in line and "cannot read these LoRA weights" in line, line
    line = _one_error_line(capsys, [command, "--lora", str(run / "lora"), *out])
    assert str(f) in line, line


# ================================================================== 6. a full disk
def _full_disk_after(n_ok: int):
    """A ``torch.save`` that writes ``n_ok`` files, then fails as torch does on a full disk: some
    bytes land, then ``RuntimeError: [enforce fail at inline_container.cc] ... unexpected pos``."""
    real = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= n_ok:
            return real(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 3584 vs 3472")

    return save


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, tiny_sd3, monkeypatch):
    from flowrl.cli import _is_user_error
    from flowrl.safeload import WriteError, load_state
    from flowrl.trainer import Trainer

    cfg = _tiny(tmp_path, "train.iterations=2", "train.save_every=1")
    trainer = Trainer(cfg, policy=_policy(tiny_sd3, cfg))
    real, probe = torch.save, []
    monkeypatch.setattr(torch, "save", lambda *a, **k: (probe.append(1), real(*a, **k))[1])
    trainer.save_checkpoint(0)  # a dry run of the writer: how many torch.save calls one checkpoint makes
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "iter_000000")
    monkeypatch.setattr(torch, "save", _full_disk_after(len(probe) + 1))  # the 2nd checkpoint's optimizer write fails
    with pytest.raises(WriteError) as info:
        trainer.train()
    msg, ckpts = str(info.value), tmp_path / "run" / "checkpoints"
    assert "\n" not in msg and _is_user_error(info.value)
    assert msg.startswith(f"no space left on the device writing {ckpts / 'iter_000002'}") and "iB are needed" in msg and "iB free" in msg, msg
    assert "inline_container" not in msg and sorted(p.name for p in ckpts.iterdir()) == ["iter_000001"]  # no .tmp left
    monkeypatch.undo()
    assert load_state(ckpts / "iter_000001" / "optimizer.pt")["state"]  # the previous checkpoint is whole


@pytest.mark.parametrize("error", ["ENOSPC", "EACCES"])
def test_folders_are_written_aside_and_a_failed_write_keeps_the_old_one(tmp_path, error):
    import errno

    from flowrl.checkpointing import atomic_write, written_aside
    from flowrl.safeload import WriteError

    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"old weights")
    with pytest.raises(WriteError) as info:
        with written_aside(lora, folder=True, needed_bytes=3 * 2**20) as tmp:
            (tmp / "pytorch_lora_weights.safetensors").write_bytes(b"new, half")
            raise OSError(getattr(errno, error), os.strerror(getattr(errno, error)))
    want = f"no space left on the device writing {lora}; about 3.0 MiB are needed" if error == "ENOSPC" else f"cannot write {lora}: Permission denied"
    assert str(info.value).startswith(want), str(info.value)
    assert (lora / "pytorch_lora_weights.safetensors").read_bytes() == b"old weights" and sorted(p.name for p in tmp_path.iterdir()) == ["lora"]
    with written_aside(lora, folder=True) as tmp:
        (tmp / "pytorch_lora_weights.safetensors").write_bytes(b"new weights")
    assert (lora / "pytorch_lora_weights.safetensors").read_bytes() == b"new weights" and sorted(p.name for p in tmp_path.iterdir()) == ["lora"]
    atomic_write(tmp_path / "weights.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "weights.json"]


_SLOW_WRITER = """
import sys, time
from pathlib import Path
import torch
marker, real = Path(sys.argv[1]), torch.save
def save(obj, f, *args, **kwargs):  # the 2nd checkpoint's files are written slowly: time to kill -9 mid-write
    real(obj, f, *args, **kwargs)
    if "iter_000002" in str(f):
        marker.touch()
        time.sleep(120)
torch.save = save
from flowrl.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one_and_resume_is_exact(tmp_path, job):
    cfg_path, full = job
    run, marker = tmp_path / "run", tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(marker), *_train_cmd(cfg_path, f"train.output_dir={run}", "train.save_every=1")[3:]],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(marker.exists, proc), "the run never reached the second checkpoint"
    finally:
        proc.kill()  # SIGKILL in the middle of writing iter_000002
        proc.wait()
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_000001", "iter_000002.tmp"]
    resumed = subprocess.run(_train_cmd(cfg_path, f"train.output_dir={run}", "train.resume_from=latest"), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not list(ckpts.glob("*.tmp"))
    _assert_same_final_state(full, run)


# ================================================================== 7. a run folder never runs code
_EVIL = "from pathlib import Path\nPath(__file__).with_name('PWNED').touch()\nraise SystemExit(7)\n"


def _untrusted_run(src: Path, dst: Path) -> Path:
    import yaml

    run, _ = _copy_run(src, dst)
    (run / "evil_reward_x.py").write_text(_EVIL)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["reward"]["rewards"] = {"evil_reward_x:Evil": 1.0}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run


def test_loading_a_run_never_imports_code_from_its_folder(tmp_path, finished_run):
    run = _untrusted_run(finished_run, tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "flowrl", "eval", "--run", "."], cwd=run, env=ENV, capture_output=True, text=True, timeout=300)
    assert not (run / "PWNED").exists(), "the run folder's module was imported"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("flowrl: error: reward.rewards.evil_reward_x:Evil") and str(run / "evil_reward_x.py") in line and "--trust-run-code" in line, line
    trusted = subprocess.run([sys.executable, "-m", "flowrl", "eval", "--run", ".", "--trust-run-code"], cwd=run, env=ENV, capture_output=True, text=True, timeout=300)
    assert trusted.returncode == 7 and (run / "PWNED").exists()  # the user said so: it ran


def test_a_module_importable_elsewhere_is_taken_from_there(tmp_path, finished_run, monkeypatch):
    from flowrl import registry, runs

    run = _untrusted_run(finished_run, tmp_path / "run")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "evil_reward_x.py").write_text("import torch\nclass Evil:\n    name = 'fine'\n    def __call__(self, outputs, prompts, meta=None):\n        return torch.zeros(len(prompts))\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(run))  # the run folder first, as `python -m` puts the working directory
    monkeypatch.delitem(sys.modules, "evil_reward_x", raising=False)
    monkeypatch.setattr(registry, "_UNTRUSTED", [])
    loaded = runs.load_run(run)
    rs = build_rewards(loaded.config.reward.rewards)
    assert list(rs.rewards) == ["fine"] and not (run / "PWNED").exists()
    assert sys.modules["evil_reward_x"].__file__ == str(tmp_path / "site" / "evil_reward_x.py")


def test_a_metrics_record_that_cannot_be_written_is_one_line(tmp_path):
    from types import SimpleNamespace

    from flowrl import reporting
    from flowrl.safeload import WriteError

    (tmp_path / "metrics.jsonl").mkdir()  # not writable as a file
    trainer = SimpleNamespace(history=[], run_dir=tmp_path, accelerator=SimpleNamespace(is_main_process=True))
    with pytest.raises(WriteError, match=rf"^cannot write {tmp_path / 'metrics.jsonl'}: Is a directory"):
        reporting.log(trainer, {"iteration": 1, "reward/mean": 0.5}, [])
