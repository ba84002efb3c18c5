"""Image rewards on video frames (``frames``/``frame_every``/``frame_aggregate``/``frame_batch_size``
on any reward spec): frame choice, aggregation, chunking, components, images unchanged."""

from __future__ import annotations

import pytest
import torch

from flowrl.rewards import build_rewards, get
from flowrl.rewards.frames import FrameReward, aggregate_frames, select_frames
from tests._tolerance import float32_sum_tol


class FrameMean:
    """Mean pixel of each image; records the batch sizes and prompts it was called with."""

    name = "frame_mean"
    batch_size = None

    def __init__(self):
        self.calls = []

    def __call__(self, images, prompts, meta=None):
        assert images.dim() == 4, "the wrapped reward sees images"
        self.calls.append((images.shape[0], list(prompts), meta))
        return images.mean(dim=(1, 2, 3))


class TwoParts(FrameMean):
    def __call__(self, images, prompts, meta=None):
        m = images.mean(dim=(1, 2, 3))
        return {"mean": m, "neg": -m}


def _video():
    # 2 videos × 5 frames; frame k of video b has constant value (b + 1) · k / 10
    v = torch.zeros(2, 5, 3, 4, 4)
    for b in range(2):
        for k in range(5):
            v[b, k] = (b + 1) * k / 10
    return v


def test_select_frames():
    assert select_frames(5, "first").tolist() == [0]
    assert select_frames(5, "last").tolist() == [4]
    assert select_frames(5, "middle").tolist() == [2]
    assert select_frames(5, "all").tolist() == [0, 1, 2, 3, 4]
    assert select_frames(9, "every_k", every=4).tolist() == [0, 4, 8]
    assert select_frames(5, [0, -1]).tolist() == [0, 4]
    with pytest.raises(ValueError, match="out of range"):
        select_frames(5, [7])
    with pytest.raises(ValueError, match="frames must be one of"):
        select_frames(5, "odd")


def test_aggregate_mean_min_and_nan():
    s = torch.tensor([[1.0, 3.0], [2.0, float("nan")]])
    assert aggregate_frames(s[:1], "mean").tolist() == [2.0]
    assert aggregate_frames(s[:1], "min").tolist() == [1.0]
    assert torch.isnan(aggregate_frames(s, "min")[1])  # a failed frame fails the sample, never hidden by min
    with pytest.raises(ValueError, match="frame_aggregate"):
        aggregate_frames(s, "max")


@pytest.mark.parametrize("frames,how,expected", [
    ("first", "mean", [0.0, 0.0]),
    ("last", "mean", [0.4, 0.8]),                    # (b+1)·4/10
    ("all", "mean", [0.2, 0.4]),                     # (b+1)·mean(0..4)/10
    ("every_k", "mean", [0.2, 0.4]),                 # k = 2: frames 0, 2, 4 → (b+1)·2/10
    ([1, 3], "min", [0.1, 0.2]),
])
def test_frame_reward_values(frames, how, expected):
    inner = FrameMean()
    r = FrameReward(inner, frames=frames, frame_every=2, frame_aggregate=how)
    out = r(_video(), ["a", "b"])
    # means over ≤ 5 frames × 48 pixels of values ≤ 0.8 (not exact in float32: (b+1)·k/10)
    torch.testing.assert_close(out, torch.tensor(expected), rtol=0, atol=float32_sum_tol(0.8, 5 * 48))


def test_prompts_meta_repeated_and_frames_chunked():
    inner = FrameMean()
    r = FrameReward(inner, frames="all", frame_batch_size=3)
    out = r(_video(), ["a", "b"], {"group_ids": torch.tensor([7, 8]), "eval": True})
    assert [c[0] for c in inner.calls] == [3, 3, 3, 1]  # 10 frames in chunks of 3
    prompts = [p for c in inner.calls for p in c[1]]
    assert prompts == ["a"] * 5 + ["b"] * 5
    gids = torch.cat([c[2]["group_ids"] for c in inner.calls])
    assert gids.tolist() == [7] * 5 + [8] * 5 and inner.calls[0][2]["eval"] is True
    torch.testing.assert_close(out, FrameReward(FrameMean(), frames="all")(_video(), ["a", "b"]))  # chunking changes nothing


def test_components_images_and_config_path():
    r = FrameReward(TwoParts(), frames="last")
    out = r(_video(), ["a", "b"])
    torch.testing.assert_close(out["neg"], -out["mean"])
    img = torch.rand(3, 3, 4, 4)
    torch.testing.assert_close(FrameReward(FrameMean(), frames="first")(img, ["a"] * 3), img.mean(dim=(1, 2, 3)))  # images unchanged
    # from a reward config: the frame keys wrap any reward; the column keeps the reward's name
    rs = build_rewards({"jpeg_compressibility": {"weight": 1.0, "frames": "every_k", "frame_every": 2, "frame_aggregate": "min"}})
    video = torch.rand(2, 5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    table, names = rs.score(video, ["a", "b"])
    assert names == ["jpeg_compressibility"]
    per_frame = get("jpeg_compressibility")(video[:, [0, 2, 4]].flatten(0, 1), ["a"] * 6).view(2, 3)
    torch.testing.assert_close(table[:, 0], per_frame.min(1).values)
    with pytest.raises(ValueError, match="frame_aggregate"):
        get("jpeg_compressibility", frames="first", frame_aggregate="median")


def test_vlm_pairwise_judge_shows_a_few_frames_of_each_video():
    from flowrl.rewards.vlm_judge import VLMPairwiseJudge

    judge = VLMPairwiseJudge(max_frames=3)
    a, b = torch.rand(9, 3, 8, 8), torch.rand(9, 3, 8, 8)
    content = judge._content(a, b)
    kinds = [c["type"] for c in content]
    assert kinds == ["text"] + ["image_url"] * 3 + ["text"] + ["image_url"] * 3
    assert content[0]["text"].startswith("Image 1") and content[4]["text"].startswith("Image 2")
    assert [c["type"] for c in judge._content(a[0], b[0])] == ["image_url", "image_url"]  # images: as before
