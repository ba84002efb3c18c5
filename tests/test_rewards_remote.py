"""Rewards from another process: ``flowrl serve-rewards``'s server and the ``remote`` client, and the
client of Flow-GRPO's pickle protocol, against real HTTP servers on 127.0.0.1 (threads, bounded
timeouts): healthy, down, slow, garbage, a malicious pickle, a server that dies mid-run."""

from __future__ import annotations

import http.server
import io
import json
import os
import pickle
import socket
import threading
import time

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from flowrl.rewards import RewardError, build_rewards  # noqa: E402
from flowrl.rewards.serving import RestrictedUnpickler, RewardServer, safe_loads  # noqa: E402


def brightness(outputs, prompts, meta=None):
    """Mean pixel; raises on the prompt 'boom' (a per-sample failure on the server)."""
    if "boom" in prompts:
        raise ValueError("boom")
    return outputs.float().mean(dim=tuple(range(1, outputs.dim())))


def _images(n=3, h=8, w=8):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255  # exact in uint8: no quantisation error


@pytest.fixture
def server():
    rs = build_rewards({"jpeg_compressibility": 1.0, "test_rewards_remote:brightness": 0.5})
    srv = RewardServer(rs, "127.0.0.1", 0).start()
    yield srv
    srv.stop()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_remote_equals_local_scores_and_weights(server):
    local = build_rewards({"jpeg_compressibility": 1.0, "test_rewards_remote:brightness": 0.5})
    images, prompts = _images(), ["a", "b", "c"]
    want, names = local.score(images, prompts)
    for encoding in ("safetensors", "png"):
        rs = build_rewards({"remote": {"weight": 2.0, "url": server.url, "encoding": encoding, "timeout": 10}})
        table, cols = rs.score(images, prompts)
        assert cols == [f"remote/{n}" for n in names]
        torch.testing.assert_close(table, want, rtol=0, atol=0)
        # the server's weights are the components' weights: trained reward = 2 × (jpeg + 0.5 brightness)
        torch.testing.assert_close(rs.combine(table, cols), 2 * local.combine(want, names))
    assert server.health()["requests"] == 2


def test_remote_isolates_a_failing_sample(server):
    rs = build_rewards({"remote": {"weight": 1.0, "url": server.url, "timeout": 10}}, max_failures=1)
    table, cols = rs.score(_images(), ["a", "boom", "c"])
    b = cols.index("remote/brightness")
    assert torch.isnan(table[1, b]) and torch.isfinite(table[[0, 2], b]).all() and torch.isfinite(table[:, 1 - b]).all()
    assert rs.failures["remote"] == 1
    assert "boom" in rs.rewards["remote"].server_errors["brightness"]
    with pytest.raises(RewardError, match="more than max_failures=1"):
        rs.score(_images(), ["boom", "b", "c"])


def test_remote_text_outputs(server):
    rs = build_rewards({"remote": {"weight": 1.0, "url": server.url, "timeout": 10}})
    with pytest.raises(RewardError):  # jpeg/brightness cannot score strings: every sample fails on the server
        rs.score(["x", "y"], ["a", "b"])


def test_remote_down_fails_fast_with_the_fix():
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(RewardError, match="not answering /health.*flowrl serve-rewards"):
        build_rewards({"remote": {"weight": 1.0, "url": url, "max_retries": 1, "backoff": 0.01, "timeout": 2}})
    rs = build_rewards({"remote": {"weight": 1.0, "url": url, "max_retries": 2, "backoff": 0.01, "timeout": 2, "health_check": False}}, max_failures=10)
    table, _ = rs.score(_images(2), ["a", "b"])  # counted failures (NaN), not a crash, under max_failures
    assert torch.isnan(table).all() and rs.failures["remote"] == 2
    assert rs.rewards["remote"].client.attempts == 3  # 1 + 2 retries, once for the batch (not per sample)
    assert "no answer" in rs.last_errors["remote"] and "after 3 attempts" in rs.last_errors["remote"]


class _Scripted(http.server.BaseHTTPRequestHandler):
    """Answers per server.script: 'slow' sleeps past the client's timeout on the first POST,
    'garbage' sends bytes that are neither JSON nor pickle, 'evil' a pickle that would run code,
    'pickle' Flow-GRPO's GenEval server answer."""

    def log_message(self, *args):
        pass

    def _reply(self, code, data: bytes):
        try:
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the 'slow' case)
            pass

    def do_GET(self):
        self._reply(200, json.dumps({"status": "ok", "weights": {"r": 1.0}, "scale": {}}).encode())

    def do_POST(self):
        srv = self.server
        body = self.rfile.read(int(self.headers["Content-Length"]))
        srv.posts += 1
        mode = srv.script
        if mode == "slow":
            if srv.posts == 1:
                time.sleep(1.5)
            self._reply(200, json.dumps({"columns": ["r"], "scores": [[0.25], [0.75]]}).encode())
        elif mode == "gate":
            srv.gate.wait(timeout=20)
            self._reply(200, json.dumps({"columns": ["r"], "scores": [[0.25], [0.75]]}).encode())
        elif mode == "garbage":
            self._reply(200, b"\x00\xffnot json at all")
        elif mode == "evil":
            self._reply(200, pickle.dumps({"outputs": _Evil(srv.marker)}))
        elif mode == "pickle":
            req = pickle.loads(body)  # the test's own request: trusted here
            srv.request = req
            n = len(req["images"])
            self._reply(200, pickle.dumps({"scores": np.linspace(0, 1, n), "strict_rewards": [1.0] * n, "group_rewards": {"x": [1]}}))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def scripted(tmp_path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    httpd.daemon_threads = True
    httpd.posts, httpd.script, httpd.marker = 0, "", str(tmp_path / "pwned")
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _url(httpd):
    return f"http://127.0.0.1:{httpd.server_address[1]}"


def test_slow_server_times_out_then_retries(scripted):
    scripted.script = "slow"
    rs = build_rewards({"remote": {"weight": 1.0, "url": _url(scripted), "timeout": 0.5, "max_retries": 2, "backoff": 0.01}})
    table, cols = rs.score(_images(2), ["a", "b"])
    assert cols == ["remote/r"] and table[:, 0].tolist() == [0.25, 0.75]
    assert rs.rewards["remote"].client.attempts == 3  # health + timed-out POST + retried POST


def test_garbage_answer_is_a_clear_failure(scripted):
    scripted.script = "garbage"
    rs = build_rewards({"remote": {"weight": 1.0, "url": _url(scripted), "timeout": 5}})
    with pytest.raises(RewardError, match="unreadable answer"):
        rs.score(_images(2), ["a", "b"])
    rp = build_rewards({"remote_pickle": {"weight": 1.0, "url": _url(scripted), "timeout": 5}})
    with pytest.raises(RewardError, match="unreadable answer"):
        rp.score(_images(2), ["a", "b"])


def test_malicious_pickle_is_refused_and_never_runs(scripted):
    scripted.script = "evil"
    rp = build_rewards({"remote_pickle": {"weight": 1.0, "url": _url(scripted), "timeout": 5}})
    with pytest.raises(RewardError, match=r"refused to unpickle (posix|nt|os)\.system"):
        rp.score(_images(2), ["a", "b"])
    assert not os.path.exists(scripted.marker)


def test_restricted_unpickler_reads_plain_data_and_numpy():
    data = {"a": [1, 2.5, "x", None, True], "b": (b"raw", {3}), "c": np.arange(4, dtype=np.float32), "d": np.float64(0.5), "e": np.array(["s"], dtype=object)}
    for proto in (2, 4, 5):
        out = safe_loads(pickle.dumps(data, protocol=proto))
        assert out["a"] == data["a"] and out["b"] == data["b"] and out["d"] == 0.5
        np.testing.assert_array_equal(out["c"], data["c"])
    with pytest.raises(pickle.UnpicklingError, match="collections.OrderedDict"):
        RestrictedUnpickler(io.BytesIO(pickle.dumps(__import__("collections").OrderedDict(a=1)))).load()


def test_flow_grpo_pickle_protocol(scripted):
    scripted.script = "pickle"
    rp = build_rewards({"remote_pickle": {"weight": 1.0, "url": _url(scripted), "keys": ["scores", "strict_rewards"], "send": ["metadata"], "extra": {"only_strict": False}}})
    rows = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}]}, {"tag": "counting"}, {"tag": "colors"}]
    table, cols = rp.score(_images(3), ["a", "b", "c"], {"metadata": rows})
    assert cols == ["remote_pickle/scores", "remote_pickle/strict_rewards"]
    assert table[:, 0].tolist() == [0.0, 0.5, 1.0] and table[:, 1].tolist() == [1.0, 1.0, 1.0]
    req = scripted.request
    assert req["meta_datas"] == rows and req["only_strict"] is False and "prompts" not in req
    assert all(isinstance(b, bytes) and b[:2] == b"\xff\xd8" for b in req["images"])  # JPEG


def test_server_dies_mid_run():
    rs_server = build_rewards({"jpeg_compressibility": 1.0})
    srv = RewardServer(rs_server, "127.0.0.1", 0).start()
    rs = build_rewards({"remote": {"weight": 1.0, "url": srv.url, "timeout": 2, "max_retries": 1, "backoff": 0.01}}, max_failures=0)
    table, _ = rs.score(_images(2), ["a", "b"])
    assert torch.isfinite(table).all()
    remote = rs.rewards["remote"]
    assert remote.endpoint == srv.url and "at most 4.01 s per request" in remote.describe_limits()  # 2 × 2 s + 0.01 s back-off
    srv.stop()
    with pytest.raises(RewardError, match="reward 'remote' failed on 2 of 2 samples.*no answer"):
        rs.score(_images(2), ["a", "b"])
    assert "no answer" in remote.last_error()
    with pytest.raises(RewardError, match="not answering /health"):  # the check the trainer runs before a rollout
        remote.health_check()


def test_serve_rewards_config_and_cli_errors(tmp_path):
    from flowrl.cli import main
    from flowrl.cli import build_server

    cfg = tmp_path / "rewards.yaml"
    cfg.write_text("reward:\n  jpeg_compressibility: 1.0\n  device: cpu\n")
    srv = build_server(str(cfg), port=0)
    try:
        assert srv.health()["rewards"] == ["jpeg_compressibility"] and srv.url.startswith("http://127.0.0.1:")
    finally:
        srv.httpd.server_close()
    bad = tmp_path / "bad.yaml"
    bad.write_text("rewards: {no_such_reward: 1.0}\n")
    assert main(["serve-rewards", "--config", str(bad), "--port", "0"]) == 2


def test_remote_scores_in_the_background_while_the_caller_goes_on(scripted):
    """RewardSet.score_async (what train.overlap_rewards uses): the request is in flight while the
    caller (the next rollout) runs; the server answers only once the caller says so."""
    scripted.script = "gate"
    gate = threading.Event()
    scripted.gate = gate
    rs = build_rewards({"remote": {"weight": 1.0, "url": _url(scripted), "timeout": 20}})
    try:
        future = rs.score_async(_images(2), ["a", "b"])
        deadline = time.monotonic() + 20
        while scripted.posts == 0 and time.monotonic() < deadline:  # the request reached the server...
            time.sleep(0.01)
        assert scripted.posts == 1 and not future.done()  # ...and the caller is free meanwhile
        gate.set()
        table, cols = future.result(timeout=20)
        assert cols == ["remote/r"] and table[:, 0].tolist() == [0.25, 0.75]
    finally:
        gate.set()
        rs.close()


def test_serve_rewards_in_its_own_process(tmp_path):
    """`python -m flowrl serve-rewards` in a subprocess; a trainer-side reward set scores through it."""
    import subprocess
    import sys

    cfg = tmp_path / "rewards.yaml"
    cfg.write_text("rewards:\n  jpeg_compressibility: 1.0\n")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flowrl", "serve-rewards", "--config", str(cfg), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        rs = None
        deadline = time.monotonic() + 60
        while rs is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                rs = build_rewards({"remote": {"weight": 1.0, "url": url, "max_retries": 0, "timeout": 5}})
            except RewardError:
                time.sleep(0.2)
        assert rs is not None, proc.stdout.read() if proc.poll() is not None else "server did not come up in 60 s"
        table, cols = rs.score(_images(2), ["a", "b"])
        want, _ = build_rewards({"jpeg_compressibility": 1.0}).score(_images(2), ["a", "b"])
        assert cols == ["remote/jpeg_compressibility"] and torch.equal(table, want)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert "serving rewards jpeg_compressibility at http://127.0.0.1:" in proc.stdout.read()
