"""Pref-GRPO: win rates from scalar and pairwise judges, monotone invariance, position bias and
presentation order, the batched VLM pairwise client against a local HTTP server, the preset."""

from __future__ import annotations

import http.server
import json
import math
import threading
import time

import pytest
import torch

from flowrl.advantages import group_advantages
from flowrl.rewards import pairwise_win_rates, win_rates
from flowrl.rewards.base import RewardSet, group_zscore
from flowrl.rewards.pairwise import PointwiseJudge, ModelPairwiseJudge, pairwise_win_rates_batched, win_rate_transform


def _adv(scores, gids):
    table, _ = win_rate_transform(scores[:, None], ["judge"], gids)
    return group_advantages(table[:, 0], gids, std="none")


def test_scalar_judge_win_rates_are_ranks_with_mean_half():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(9, generator=g)
    wr = win_rates(s)
    # distinct scores: win rate = rank / (N − 1), ranks 0..8
    torch.testing.assert_close(wr, s.argsort().argsort().float() / 8)
    assert wr.mean().item() == pytest.approx(0.5)
    # ties count ½: [1, 1, 3] → (0 + ½)/2, (0 + ½)/2, 2/2
    torch.testing.assert_close(win_rates(torch.tensor([1.0, 1.0, 3.0])), torch.tensor([0.25, 0.25, 1.0]))
    # the same numbers from a pairwise judge that compares a pointwise score, over all 36 pairs
    images = s.view(9, 1, 1, 1).expand(9, 3, 2, 2).contiguous()
    judge = PointwiseJudge(lambda x, p: x.mean(dim=(1, 2, 3)))
    for order in ("random", "both", "fixed"):
        torch.testing.assert_close(pairwise_win_rates(judge, images, "p", order=order, generator=torch.Generator().manual_seed(1)), wr)
        torch.testing.assert_close(pairwise_win_rates_batched(judge, images, "p", order=order, generator=torch.Generator().manual_seed(1)), wr)
    # a small local pairwise model (logit = brightness difference) gives the same ranks when hard
    model = ModelPairwiseJudge(lambda a, b: (a - b).mean(dim=(1, 2, 3)) * 100, hard=True)
    torch.testing.assert_close(pairwise_win_rates_batched(model, images, "p", order="random"), wr)


def test_advantages_invariant_to_monotone_transform_pointwise_zscores_are_not():
    g = torch.Generator().manual_seed(2)
    gids = torch.arange(4).repeat_interleave(6)
    s = torch.randn(24, generator=g)
    t = torch.exp(3 * s) + 7.0  # strictly increasing
    # exact: the advantages read the rewards' ranks only, which are equal (the same arithmetic on them)
    torch.testing.assert_close(_adv(s, gids), _adv(t, gids), rtol=0, atol=0)
    z_s, z_t = group_advantages(s, gids), group_advantages(t, gids)
    assert (z_s - z_t).abs().max() > 0.1


def test_several_rewards_zscored_separately_then_weighted_and_gdpo():
    gids = torch.arange(2).repeat_interleave(4)
    table = torch.tensor([[1.0, 10], [2, 30], [3, 20], [4, 40], [5, 1], [6, 2], [7, 4], [8, 3]])
    out, names = win_rate_transform(table, ["a", "b"], gids)
    for k in range(2):  # each column: win rates, then a group z-score
        torch.testing.assert_close(out[:, k], group_zscore(torch.cat([win_rates(table[:4, k]), win_rates(table[4:, k])]), gids))
    rs = RewardSet({"a": None, "b": None}, {"a": 1.0, "b": 0.5})
    torch.testing.assert_close(rs.combine(out, names, gids), out[:, 0] + 0.5 * out[:, 1])
    rs_gdpo = RewardSet({"a": None, "b": None}, {"a": 1.0, "b": 0.5}, combine="gdpo")
    comb = rs_gdpo.combine(out, names, gids)
    assert comb.mean().abs() < 1e-5 and comb.std(unbiased=False) == pytest.approx(1.0, abs=1e-3)
    # a pairwise judge's column is kept: it already is a win rate
    kept, _ = win_rate_transform(torch.tensor([[0.0], [1.0], [0.5], [0.5]]), ["pairwise_judge/win_rate"], torch.zeros(4), zscore=False)
    torch.testing.assert_close(kept[:, 0], torch.tensor([0.0, 1.0, 0.5, 0.5]))


def test_always_first_judge_is_index_correlated_unless_order_randomised():
    first = lambda a, b, p: 1.0  # position bias only
    N, groups = 8, 300
    idx = torch.arange(N).float()

    def corr(order):
        g = torch.Generator().manual_seed(3)
        rates = torch.stack([pairwise_win_rates(first, list(range(N)), "p", order=order, generator=g) for _ in range(groups)])
        adv = _adv(rates.flatten(), torch.arange(groups).repeat_interleave(N))
        x = idx.repeat(groups) - idx.mean()
        return float((adv * x).sum() / (adv.norm() * x.norm() + 1e-12)), rates

    c_fixed, r_fixed = corr("fixed")
    assert c_fixed < -0.99  # index 0 always wins: win rate (N−1−i)/(N−1)
    torch.testing.assert_close(r_fixed[0], (N - 1 - idx) / (N - 1))
    c_rand, _ = corr("random")
    assert abs(c_rand) < 0.05
    _, r_both = corr("both")
    assert torch.all(r_both == 0.5)  # both orders cancel the bias exactly


# ------------------------------------------------------------------------- VLM judge over HTTP
class Handler(http.server.BaseHTTPRequestHandler):
    """Pairwise answers: the brighter image wins. Caption 'slow': the first attempt of every pair
    sleeps past the client timeout; 'garbage': an answer naming no winner."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        import base64
        import io

        from PIL import Image

        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        text = next(p["text"] for p in content if p["type"] == "text")
        imgs = [p["image_url"]["url"] for p in content if p["type"] == "image_url"]
        bright = [sum(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("L").getdata()) for u in imgs]
        key = text.split('"')[1]
        srv = self.server
        with srv.lock:
            k = (key, tuple(bright))
            srv.attempts[k] = srv.attempts.get(k, 0) + 1
            n = srv.attempts[k]
            srv.active += 1
            srv.max_active = max(srv.max_active, srv.active)
        try:
            if key == "slow" and n == 1:
                time.sleep(2.5)  # well past the client timeout, even on a loaded machine
            time.sleep(0.02)
            answer = "Image 1 is better" if bright[0] > bright[1] else "Image 2 is better"
            if key == "garbage":
                answer = "Both images have merits; I refuse to choose."
            out = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
        finally:
            with srv.lock:
                srv.active -= 1


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.lock, srv.attempts, srv.active, srv.max_active = threading.Lock(), {}, 0, 0
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_vlm_pairwise_client_survives_timeout_and_garbage(server):
    from flowrl.rewards import get

    srv, url = server
    levels = torch.tensor([0.2, 0.8, 0.5, 0.35])
    images = levels.view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()
    # through the reward: two groups, one whose every first request times out, one with garbage answers
    reward = get("pairwise_judge", judge="vlm", base_url=url, timeout=1.0, max_retries=2, backoff=0.0, max_concurrency=4)
    out = reward(torch.cat([images, images]), ["slow"] * 4 + ["garbage"] * 4, {"group_ids": torch.tensor([0] * 4 + [1] * 4)})
    torch.testing.assert_close(out["win_rate"][:4], win_rates(levels))  # retried after the timeout: correct ranks
    assert torch.isnan(out["win_rate"][4:]).all()  # unparseable = failed (NaN, counted), never a silent tie
    m = reward.metrics()
    assert m["parse_failure_rate"] == pytest.approx(0.5) and m["request_failure_rate"] == 0.0
    assert all(n == 2 for (k, _), n in srv.attempts.items() if k == "slow")  # one timeout, one retry each
    assert srv.max_active > 1  # the 6 pairs of a group went out concurrently
    # the trainer-facing metric name
    rs = RewardSet({"pairwise_judge": reward}, {"pairwise_judge": 1.0}, max_failures=100)
    rs.score(images, ["garbage"] * 4, {"group_ids": torch.zeros(4, dtype=torch.long)})
    assert "reward/pairwise_judge/parse_failure_rate" in rs.metrics() and rs.failures["pairwise_judge"] == 4
    # opt-in: a constant for failed comparisons (the old tie)
    tie = get("pairwise_judge", judge="vlm", base_url=url, timeout=1.0, max_retries=0, backoff=0.0, failed_value=0.5)
    torch.testing.assert_close(tie(images, ["garbage"] * 4)["win_rate"], torch.full((4,), 0.5))


@pytest.mark.parametrize("pipeline", ["tiny-sd3", "tiny-flux"])
def test_pref_grpo_preset_runs_on_tiny_pipelines(tmp_path, pipeline):
    from flowrl import TrainConfig
    from flowrl.trainer import Trainer

    cfg = TrainConfig().override([
        "algorithm=pref_grpo", f"model.pipeline={pipeline}", f"train.output_dir={tmp_path / 'run'}", "train.iterations=2",
        "sampler.num_steps=4", "sampler.height=16", "sampler.width=16", "train.lora_rank=4", "train.lora_alpha=8",
        "train.num_generations=4", "train.prompts_per_iteration=2", "train.progress=false", "model.device=cpu",
        "reward.rewards={pairwise_judge: {weight: 1.0, judge: jpeg_compressibility}}", "train.learning_rate=1e-3",
    ])
    result = Trainer(cfg).train()
    for h in result.history:
        assert h["reward/pairwise_judge/win_rate"] == pytest.approx(0.5)  # group mean of win rates
        assert math.isfinite(h["reward/pairwise_judge/score"])  # the pointwise score is logged too
        assert h["adv/abs_mean"] > 0 and h["ratio/mean"] == pytest.approx(1.0, abs=1e-5)
