"""Reward protocol, registry, plug-ins, RewardSet (combine, batching, failures), JPEG, win rates."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pytest
import torch

torch.set_num_threads(1)

import flowrl.rewards as R  # noqa: E402
from flowrl.rewards import Reward, RewardError, build_rewards, get, register  # noqa: E402
from tests._tolerance import float32_sum_tol  # noqa: E402


class Const(Reward):
    """Score = meta-free deterministic function of the image: mean pixel · factor."""

    def __init__(self, factor: float = 1.0, batch_size=None, device="cpu"):
        self.factor = factor
        self.batch_size = batch_size
        self.device = device
        self.calls: list[int] = []

    def __call__(self, outputs, prompts, meta=None):
        self.calls.append(outputs.shape[0])
        assert len(prompts) == outputs.shape[0]
        return outputs.mean(dim=(1, 2, 3)) * self.factor


class Components(Reward):
    name = "comp"

    def __call__(self, outputs, prompts, meta=None):
        m = outputs.mean(dim=(1, 2, 3))
        return {"a": m, "b": 2 * m}


class Flaky(Reward):
    """NaN for samples whose prompt is 'bad'; raises for prompt 'boom'."""

    batch_size = 2

    def __call__(self, outputs, prompts, meta=None):
        if "boom" in prompts:
            raise RuntimeError("model exploded")
        s = torch.ones(len(prompts))
        s[[i for i, p in enumerate(prompts) if p == "bad"]] = float("nan")
        return s


def brightness(outputs, prompts, meta=None, gain=1.0):
    return outputs.mean(dim=(1, 2, 3)) * gain


def test_import_is_cheap():
    code = "import sys, flowrl.rewards; print('open_clip' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_registry_builtins_and_unknown_lists_known():
    assert {"jpeg_compressibility", "jpeg_incompressibility"} <= set(R.REWARDS.names())
    with pytest.raises(ValueError, match="Known: .*jpeg_compressibility"):
        get("no_such_reward")


def test_register_sets_name_and_get_builds_with_kwargs():
    @register("test_const_x3")
    class C3(Const):
        pass

    r = get("test_const_x3", factor=3.0)
    assert r.name == "test_const_x3"
    x = torch.full((2, 3, 4, 4), 0.5)
    assert torch.allclose(r(x, ["p", "q"]), torch.tensor([1.5, 1.5]))
    with pytest.raises(ValueError, match="already registered"):
        register("test_const_x3")(Const)


def test_dotted_path_class_and_function():
    r = get(f"{__name__}:Const", factor=2.0)
    assert isinstance(r, Const) and r.factor == 2.0
    f = get(f"{__name__}:brightness", gain=4.0)
    x = torch.full((3, 1, 2, 2), 0.25)
    assert torch.allclose(f(x, ["a"] * 3), torch.ones(3))


def test_entry_point_plugin_found(tmp_path, monkeypatch):
    pkg = tmp_path / "flowrl_test_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        import torch
        class Darkness:
            name = "darkness"
            batch_size = None
            def __init__(self, offset=0.0):
                self.offset = offset
            def __call__(self, outputs, prompts, meta=None):
                return 1.0 - outputs.mean(dim=(1, 2, 3)) + self.offset
    """))
    dist = tmp_path / "flowrl_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: flowrl-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[flowrl.rewards]\ndarkness_test = flowrl_test_plugin:Darkness\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "darkness_test" in R.base.entry_point_rewards()
    r = get("darkness_test", offset=1.0)
    x = torch.full((2, 3, 2, 2), 0.25)
    assert torch.allclose(r(x, ["a", "b"]), torch.tensor([1.75, 1.75]))
    rs = build_rewards({"darkness_test": 2.0})
    table, names = rs.score(x, ["a", "b"])
    assert names == ["darkness_test"] and torch.allclose(rs.combine(table, names), torch.tensor([1.5, 1.5]))


def test_weighted_sum_batches_and_components():
    rs = build_rewards({f"{__name__}:Const": {"weight": 2.0, "batch_size": 3}, f"{__name__}:Components": 0.5})
    x = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 2, 2) / 10  # means 0,.1,.2,.3,.4
    table, names = rs.score(x, ["p"] * 5)
    assert names == ["const", "comp/a", "comp/b"]
    assert rs.rewards["const"].calls == [3, 2]  # batches of batch_size
    m = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4])
    assert torch.allclose(table, torch.stack([m, m, 2 * m], 1))
    # r = 2·m + 0.5·(m + 2m) = 3.5·m
    assert torch.allclose(rs.combine(table, names), 3.5 * m, atol=float32_sum_tol(1.4, 3))  # Σ of 3 weighted columns ≤ 1.4
    met = rs.metrics()
    assert met["reward/comp/b"] == pytest.approx(0.4) and met["reward/failures/const"] == 0


def test_component_weights_override():
    rs = build_rewards({f"{__name__}:Components": {"weight": 1.0, "component_weights": {"b": 0.0}}})
    x = torch.full((2, 1, 1, 1), 0.5)
    table, names = rs.score(x, ["p", "q"])
    assert torch.allclose(rs.combine(table, names), torch.tensor([0.5, 0.5]))  # only a


def test_gdpo_matches_hand_computation():
    rs = build_rewards({f"{__name__}:Components": 1.0}, combine="gdpo", eps=0.0)
    # two columns, two groups of two
    table = torch.tensor([[1.0, 10.0], [3.0, 10.0], [0.0, 5.0], [0.0, 7.0]])
    names = ["comp/a", "comp/b"]
    # group z (population std, eps=1e-4): col a -> [-1, 1, 0, 0]/(1+eps); col b -> [0, 0, -1, 1]/(1+eps)
    # (a zero-std group gives 0 / eps = 0)
    rs.eps = 1e-4
    out = rs.combine(table, names, group_ids=torch.tensor([0, 0, 1, 1]))
    s = torch.tensor([-1.0, 1.0, -1.0, 1.0]) * (1 / (1 + 1e-4))  # z_a + z_b per sample
    expected = (s - s.mean()) / (s.std(unbiased=False) + 1e-4)
    assert torch.allclose(out, expected, atol=1e-5)
    assert out.mean().abs() < 1e-6
    with pytest.raises(ValueError, match="group_ids"):
        rs.combine(table, names)


def test_gdpo_differs_from_weighted_sum_when_scales_differ():
    # A large-scale reward dominates the plain sum; GDPO gives each reward equal say.
    table = torch.tensor([[0.0, 100.0], [1.0, 0.0], [2.0, 0.0]])
    names = ["comp/a", "comp/b"]
    ws = build_rewards({f"{__name__}:Components": 1.0}).combine(table, names)
    gd = build_rewards({f"{__name__}:Components": 1.0}, combine="gdpo").combine(table, names, [0, 0, 0])
    # sums: [100, 1, 2] -> sample 0 wins; z_a = [-1.22, 0, 1.22], z_b = [1.41, -0.71, -0.71]
    # -> z_a + z_b = [0.19, -0.71, 0.52] -> sample 2 wins under GDPO
    assert ws.argmax() == 0 and gd.argmax() == 2
    assert gd.mean().abs() < 1e-5 and gd.std(unbiased=False) == pytest.approx(1.0, abs=1e-3)


def test_nan_counted_and_raises_past_threshold():
    rs = build_rewards({f"{__name__}:Flaky": 1.0}, max_failures=2)
    x = torch.zeros(4, 1, 1, 1)
    table, names = rs.score(x, ["ok", "bad", "ok", "ok"])
    assert torch.isnan(table[1, 0]) and torch.all(table[[0, 2, 3], 0] == 1)  # NaN, never 0
    assert torch.isnan(rs.combine(table, names)[1])
    assert rs.metrics()["reward/failures/flaky"] == 1
    # 'boom' raises for its batch of 2; retried one by one, only 'boom' fails -> total 2, tolerated
    table, _ = rs.score(x, ["ok", "ok", "boom", "ok"])
    assert torch.isnan(table[2, 0]) and torch.all(table[[0, 1, 3], 0] == 1) and rs.failures["flaky"] == 2
    # one more failure -> 3 > 2: the error names the reward, the threshold, the cause and the prompt
    with pytest.raises(RewardError, match=r"'flaky' failed on 1 of 4 .*max_failures=2.*model exploded \(prompt 'boom'\)"):
        rs.score(x, ["boom", "ok", "ok", "ok"])
    assert rs.failures["flaky"] == 3


def test_default_max_failures_zero_raises_on_first_nan():
    rs = build_rewards({f"{__name__}:Flaky": 1.0})
    with pytest.raises(RewardError, match="raise reward max_failures"):
        rs.score(torch.zeros(2, 1, 1, 1), ["ok", "bad"])


def test_missing_weight_and_bad_spec_errors():
    with pytest.raises(ValueError, match="'jpeg_compressibility' has no weight"):
        build_rewards({"jpeg_compressibility": {"quality": 90}})
    with pytest.raises(ValueError, match="'jpeg_compressibility' has no weight"):
        build_rewards({"jpeg_compressibility": None})
    with pytest.raises(ValueError, match="unknown reward combine 'mean'. Known: weighted_sum, gdpo"):
        build_rewards({"jpeg_compressibility": 1.0}, combine="mean")
    with pytest.raises(TypeError, match="map names to weights"):
        build_rewards("pickscore")


def test_wrong_shape_is_an_error():
    rs = build_rewards({f"{__name__}:brightness": 1.0})
    rs.rewards["brightness"].fn = lambda o, p, m: torch.zeros(len(p), 2)
    with pytest.raises(RewardError, match=r"shape \(3, 2\); expected \[3\]"):
        rs.score(torch.zeros(3, 1, 1, 1), ["a"] * 3)


def test_score_async_equals_sync():
    rs = build_rewards({"jpeg_incompressibility": 1.0})
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fut = rs.score_async(x, ["a"] * 3)
    t_async, n_async = fut.result(timeout=30)
    t_sync, n_sync = rs.score(x, ["a"] * 3)
    rs.close()
    assert n_async == n_sync and torch.equal(t_async, t_sync)


def test_jpeg_sizes_match_pil_and_sign():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    x[1] = 0.5  # flat image: far smaller JPEG than noise
    arr = (x[0] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    inc = get("jpeg_incompressibility")(x, ["a", "b"])
    com = get("jpeg_compressibility")(x, ["a", "b"])
    assert inc[0].item() == pytest.approx(buf.tell() / 1000)
    assert inc[0] > 2 * inc[1] and torch.equal(com, -inc)
    video = torch.stack([x, x], dim=1)  # [B, F=2, C, H, W] -> mean over frames
    assert torch.allclose(get("jpeg_incompressibility")(video, ["a", "b"]), inc)


def test_win_rates_formula():
    # scores [1, 2, 2, 3]: #lower = [0, 1, 1, 3], ties = [0, 1, 1, 0]; /(N-1)=3
    wr = R.win_rates(torch.tensor([1.0, 2.0, 2.0, 3.0]))
    assert torch.allclose(wr, torch.tensor([0.0, 1.5, 1.5, 3.0]) / 3)
    assert wr.mean() == pytest.approx(0.5)  # win rates of a group always average 1/2
    assert R.win_rates(torch.tensor([7.0])).item() == 0.5


@pytest.mark.parametrize("order", ["fixed", "random", "both"])
def test_pairwise_win_rates_with_consistent_judge(order):
    # a judge that compares hidden scores: with any order it must reproduce win_rates(scores)
    scores = torch.tensor([0.3, 0.9, 0.1, 0.9])
    calls = []

    def judge(a, b, prompt):
        calls.append((a, b))
        return 1.0 if scores[a] > scores[b] else (0.5 if scores[a] == scores[b] else 0.0)

    wr = R.pairwise_win_rates(judge, [0, 1, 2, 3], "p", order=order, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(wr, R.win_rates(scores))
    assert len(calls) == (12 if order == "both" else 6)


def test_pairwise_random_order_uses_generator_and_position_bias_cancels_in_both():
    first_wins = lambda a, b, p: 1.0  # noqa: E731 - pure position bias
    wr_both = R.pairwise_win_rates(first_wins, [0, 1, 2], "p", order="both")
    assert torch.allclose(wr_both, torch.full((3,), 0.5))
    r1 = R.pairwise_win_rates(first_wins, list(range(6)), "p", generator=torch.Generator().manual_seed(3))
    r2 = R.pairwise_win_rates(first_wins, list(range(6)), "p", generator=torch.Generator().manual_seed(3))
    assert torch.equal(r1, r2) and r1.mean() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="Known: random, both, fixed"):
        R.pairwise_win_rates(first_wins, [0, 1], "p", order="sorted")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        R.pairwise_win_rates(lambda a, b, p: 2.0, [0, 1], "p", order="fixed")
