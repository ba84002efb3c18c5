"""VLM judge client against a local OpenAI-compatible server on 127.0.0.1 (started here)."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
import time

import pytest
import torch

torch.set_num_threads(1)

from flowrl.rewards import build_rewards, get, pairwise_win_rates  # noqa: E402
from flowrl.rewards.vlm_judge import VLMPairwiseJudge, parse_score  # noqa: E402


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers by the caption: 'good' → 4.5, 'bad' → 2, 'junk' → unparseable, 'flaky' → HTTP 503
    on its first attempt, 'slow' → sleeps past the client timeout on its first attempt, 'down' →
    always 500. Pairwise: the brighter image wins."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        with srv.lock:
            srv.bodies.append(body)
        content = body["messages"][0]["content"]
        text = next(p["text"] for p in content if p["type"] == "text")
        images = [p["image_url"]["url"] for p in content if p["type"] == "image_url"]
        key = text.split('"')[1] if '"' in text else text
        with srv.lock:
            srv.attempts[key] = srv.attempts.get(key, 0) + 1
            n = srv.attempts[key]
        if key == "down" or (key == "flaky" and n == 1):
            self.send_response(500 if key == "down" else 503)
            self.end_headers()
            return
        if key == "slow" and n == 1:
            time.sleep(2.5)  # well past the client timeout, even on a loaded machine
        if len(images) == 2 and "Which image" in text:
            b = [_brightness(u) for u in images]
            answer = "Image 1 is better" if b[0] > b[1] else "Image 2 is better" if b[1] > b[0] else "Tie"
        else:
            answer = {"good": "Looks great.\nFinal Score: 4.5", "bad": "Final Score: **2**", "junk": "I cannot judge this."}.get(key, f"Final Score: {len(images)}")
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


def _brightness(url: str) -> float:
    from PIL import Image

    assert url.startswith("data:image/jpeg;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.format == "JPEG"
    return float(torch.tensor(list(img.convert("L").getdata()), dtype=torch.float32).mean())


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.lock, srv.attempts, srv.bodies = threading.Lock(), {}, []
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def _judge(url, **kw):
    return get("vlm_judge", base_url=url, model="tiny-judge", timeout=1.0, max_retries=2, backoff=0.01, **kw)


def test_pointwise_scores_parse_and_failures(server):
    srv, url = server
    judge = _judge(url, failed_value=0.0)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    s = judge(x, ["good", "bad", "junk", "good"])
    assert s.tolist() == [4.5, 2.0, 0.0, 4.5]  # junk → failed_value
    assert judge.metrics()["failure_rate"] == pytest.approx(1 / 4)
    assert srv.bodies[0]["model"] == "tiny-judge" and srv.bodies[0]["temperature"] == 0.0
    assert len(srv.bodies) == 4  # one request per sample, no retries for a 200 answer
    assert get("vlm_judge", base_url=url, normalize=True)(x[:1], ["good"]).item() == pytest.approx((4.5 - 1) / 4)


def test_retries_with_backoff_on_5xx_and_timeout(server):
    srv, url = server
    judge = _judge(url, max_concurrency=1)  # one at a time: the timed-out request must not stop the others
    x = torch.rand(2, 3, 8, 8)
    s = judge(x, ["flaky", "slow"])
    assert s.tolist() == [0.0 + 1, 0.0 + 1]  # second attempts answer 'Final Score: <#images>' = 1
    assert srv.attempts == {"flaky": 2, "slow": 2}
    assert judge.metrics()["failure_rate"] == 0.0


def test_gives_up_after_max_retries_and_reports(server):
    srv, url = server
    judge = _judge(url)  # failed → NaN by default
    s = judge(torch.rand(1, 3, 8, 8), ["down"])
    assert torch.isnan(s).all()
    assert srv.attempts["down"] == 3  # 1 try + max_retries=2, then stop (bounded)
    assert judge.metrics()["failure_rate"] == 1.0 and "HTTPError" in judge.last_errors[-1]
    # through a RewardSet, NaN counts as a failure and is reported under reward/<name>/...
    from flowrl.rewards import RewardError

    rs = build_rewards({"vlm_judge": {"weight": 1.0, "base_url": url, "timeout": 1.0, "max_retries": 0, "backoff": 0.0}}, max_failures=1)
    table, names = rs.score(torch.rand(2, 3, 8, 8), ["good", "down"])
    assert table[0, 0] == 4.5 and torch.isnan(table[1, 0])
    m = rs.metrics()
    assert m["reward/failures/vlm_judge"] == 1 and m["reward/vlm_judge/failure_rate"] == 0.5
    with pytest.raises(RewardError, match="vlm_judge"):
        rs.score(torch.rand(1, 3, 8, 8), ["down"])


def test_video_sends_evenly_spaced_frames(server):
    srv, url = server
    judge = _judge(url, max_frames=3)
    s = judge(torch.rand(1, 5, 3, 8, 8), ["count"])
    assert s.item() == 3.0  # the server answers with the number of images it got


def test_pairwise_judge_win_rates(server):
    _, url = server
    judge = VLMPairwiseJudge(url, timeout=2.0, backoff=0.0)
    levels = torch.tensor([0.2, 0.8, 0.5])
    images = levels.view(3, 1, 1, 1).expand(3, 3, 8, 8).contiguous()
    wr = pairwise_win_rates(judge, images, "caption", order="random", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(wr, torch.tensor([0.0, 1.0, 0.5]))  # brightest wins both comparisons
    assert judge.metrics()["failure_rate"] == 0.0


def test_parse_score():
    pat = r"Final Score:\s*\**\s*([-+]?\d+(?:\.\d+)?)"
    assert parse_score("a\nFinal Score: 3\nFinal Score: 4.25", pat, 1, 5) == 4.25  # last match wins
    assert parse_score("Final Score: 9", pat, 1, 5) is None  # out of range is a failure
    assert parse_score("no score", pat, 1, 5) is None


def test_with_source_shows_each_samples_source_first(server, tmp_path):
    """Editing: the request holds the sample's own source image (meta["image"]), then the sample."""
    from PIL import Image

    srv, url = server
    paths = []
    for i, v in enumerate((250, 5)):
        Image.new("RGB", (8, 8), (v, v, v)).save(tmp_path / f"s{i}.png")
        paths.append(str(tmp_path / f"s{i}.png"))
    judge = _judge(url, with_source=True)
    x = torch.full((2, 3, 8, 8), 0.5)
    s = judge(x, ["make it red", "make it blue"], {"image": [paths[0], [paths[1], paths[0]]]})
    assert s.tolist() == [2.0, 3.0]  # the test server answers the number of images it was shown
    by_prompt = {next(p["text"] for p in b["messages"][0]["content"] if p["type"] == "text").split('"')[1]: b for b in srv.bodies}
    first = [p["image_url"]["url"] for p in by_prompt["make it red"]["messages"][0]["content"] if p["type"] == "image_url"]
    assert _brightness(first[0]) > 230 and abs(_brightness(first[1]) - 127.5) < 10  # the source (250), then the sample (0.5)
    assert "edited version" in next(p["text"] for p in by_prompt["make it red"]["messages"][0]["content"] if p["type"] == "text")
    with pytest.raises(ValueError, match="needs each sample's source image"):
        judge(x, ["a", "b"], {})
