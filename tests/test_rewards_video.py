"""VideoAlign / VideoReward: tiny Qwen2-VL reward model saved and loaded back, its frame sampling,
resizing and processor inputs against the reference path, and the reward head pooling."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)

from fixtures_rewards import tiny_qwen2vl_reward  # noqa: E402

from flowrl.rewards import build_rewards, get  # noqa: E402
from flowrl.rewards.videoalign import SPECIAL_TOKENS, VideoAlign, chat_text, frame_indices, pool_reward_logits, smart_resize  # noqa: E402

NORM = {"VQ_mean": 1.0, "VQ_std": 2.0, "MQ_mean": -0.5, "MQ_std": 0.5, "TA_mean": 0.0, "TA_std": 4.0}
PROMPTS = ["a cat", "a dog running on the beach"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, processor = tiny_qwen2vl_reward()
    path = str(tmp_path_factory.mktemp("videoalign"))
    VideoAlign.save(path, model, processor, max_frame_pixels=56 * 84, min_pixels=28 * 28, norm=NORM)
    return model, processor, path


def test_smart_resize_hand_values():
    # fits: round(60/28)=2 → 56, round(90/28)=3 → 84; 56·84 = 4704 ≤ max
    assert smart_resize(60, 90, min_pixels=784, max_pixels=4704) == (56, 84)
    # too big: β = √(480·832/230400) = 1.3166 → floor(364.6/28)=13 → 364, floor(632.0/28)=22 → 616
    assert smart_resize(480, 832, min_pixels=784, max_pixels=230400) == (364, 616)
    # too small: β = √(100352/1200) = 9.145 → ceil(274.3/28)=10 → 280, ceil(365.8/28)=14 → 392
    assert smart_resize(30, 40, min_pixels=100352, max_pixels=230400) == (280, 392)


def test_frame_indices():
    assert frame_indices(9, num_frames=4).tolist() == [0, 3, 5, 8]  # round(linspace(0, 8, 4))
    assert frame_indices(48, fps=2, video_fps=24).tolist() == [0, 16, 31, 47]  # 48/24·2 = 4 frames
    assert frame_indices(5).tolist() == [0, 1, 3, 4]  # all frames, rounded down to even


def test_pool_special_tokens_and_diagonal():
    ids = torch.tensor([[5, 7, 1, 8, 9, 0]])  # special tokens 7, 8, 9 at positions 1, 3, 4
    logits = torch.arange(18, dtype=torch.float32).view(1, 6, 3)
    # N = 3: diagonal → [logits[1,0], logits[3,1], logits[4,2]] = [3, 10, 14]
    assert pool_reward_logits(logits, ids, None, reward_token="special", special_token_ids=[7, 8, 9]).tolist() == [[3.0, 10.0, 14.0]]
    # N = 1: one value per special token
    assert pool_reward_logits(logits[..., :1], ids, None, reward_token="special", special_token_ids=[7, 8, 9]).tolist() == [[3.0, 9.0, 12.0]]
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    assert pool_reward_logits(logits, ids, mask, reward_token="last", special_token_ids=None).tolist() == [[9.0, 10.0, 11.0]]
    with pytest.raises(ValueError, match="reward tokens once"):
        pool_reward_logits(logits, torch.tensor([[5, 7, 1, 8, 2, 0]]), None, reward_token="special", special_token_ids=[7, 8, 9])


def test_inputs_match_reference_path(tiny):
    """Reference = VideoAlign's fetch_video resize (torchvision, bicubic, antialias, on 0–255 floats)
    then the Qwen2-VL processor; also equal to letting the processor's own smart_resize do it."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    _, processor, path = tiny
    r = get("videoalign", path=path, num_frames=4)
    video = torch.rand(2, 9, 3, 60, 100, generator=torch.Generator().manual_seed(0))
    ours = r.prepare(video, PROMPTS)
    idx = [0, 3, 5, 8]
    h, w = smart_resize(60, 100, min_pixels=28 * 28, max_pixels=56 * 84)
    ref_videos = [resize(v[idx] * 255, [h, w], interpolation=InterpolationMode.BICUBIC, antialias=True) for v in video]
    texts = [chat_text(r.template.format(text_prompt=p)) for p in PROMPTS]
    ref = processor(text=texts, videos=ref_videos, padding=True, return_tensors="pt", do_resize=False, do_rescale=True)
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["video_grid_thw"], torch.tensor([[2, h // 14, w // 14]] * 2))
    assert torch.allclose(ours["pixel_values_videos"], ref["pixel_values_videos"], atol=1e-4)
    for t in SPECIAL_TOKENS:  # every prompt carries each reward token exactly once
        tid = processor.tokenizer.convert_tokens_to_ids(t)
        assert ((ours["input_ids"] == tid).sum(1) == 1).all()
    own = processor(text=texts, videos=[v[idx] * 255 for v in video], padding=True, return_tensors="pt", do_rescale=True, size={"shortest_edge": 28 * 28, "longest_edge": 56 * 84})
    assert torch.equal(own["video_grid_thw"], ours["video_grid_thw"])
    assert torch.allclose(own["pixel_values_videos"], ours["pixel_values_videos"], atol=1e-3)


def test_scores_equal_head_on_special_tokens_and_roundtrip(tiny):
    model, _, path = tiny
    r = get("videoalign", path=path)
    video = torch.rand(2, 4, 3, 56, 84, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = r(video, PROMPTS)
        batch = r.prepare(video, PROMPTS)
        hidden = model.model(**batch, use_cache=False).last_hidden_state  # the in-memory (unsaved) model
        special = torch.stack([batch["input_ids"] == i for i in model.config.reward_special_token_ids], 1)  # [B, 3, L]
        raw = torch.einsum("bkl,bld->bkd", special.float(), hidden) @ model.rm_head.weight[0]  # [B, 3]
        single = r(video[1:], PROMPTS[1:])  # no padding: same as in the padded batch
    for k, d in enumerate(("VQ", "MQ", "TA")):
        assert torch.allclose(out[d], (raw[:, k] - NORM[f"{d}_mean"]) / NORM[f"{d}_std"], atol=1e-4)
        assert torch.allclose(single[d], out[d][1:], atol=1e-4)
    raw_out = get("videoalign", path=path, use_norm=False)(video, PROMPTS)
    assert torch.allclose(raw_out["TA"], raw[:, 2], atol=1e-4)


def test_rewardset_logs_components_and_sums_overall(tiny):
    _, _, path = tiny
    rs = build_rewards({"videoalign": {"weight": 2.0, "path": path, "batch_size": 1}})
    video = torch.rand(2, 2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    table, names = rs.score(video, PROMPTS)
    assert names == ["videoalign/VQ", "videoalign/MQ", "videoalign/TA"]
    assert torch.allclose(rs.combine(table, names), 2.0 * table.sum(1))  # weight × Overall (VQ+MQ+TA)
    still = rs.rewards["videoalign"](video[:, 0], PROMPTS)  # an image = a 2-frame still video
    assert torch.allclose(still["VQ"], rs.rewards["videoalign"](video[:, :1].expand(-1, 2, -1, -1, -1), PROMPTS)["VQ"], atol=1e-5)
