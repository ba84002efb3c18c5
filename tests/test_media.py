"""flowrl/media.py: videos written as animated WebP (Pillow) or MP4 (PyAV, optional) with a poster
frame, read back frame for frame; ``flowrl sample`` writes one video per sample for video models."""

from __future__ import annotations

import pytest
import torch

from flowrl import media


def _ramp(frames=5, h=18, w=22):
    # frame k is flat grey k/(F−1), with a red square so channels differ
    v = torch.linspace(0, 1, frames)[:, None, None, None].expand(frames, 3, h, w).clone()
    v[:, 0, 2:6, 2:6] = 1.0
    return v


def test_webp_round_trip_and_poster(tmp_path):
    v = _ramp()
    out = media.save_video(v, tmp_path / "clip.mp4", format="webp", fps=8)
    assert out["video"].name == "clip.webp" and out["poster"].name == "clip.poster.png"
    back = media.read_video(out["video"])
    assert back.shape == v.shape
    # lossy WebP at quality 90 on flat frames: measured max error 0.006
    assert (back - v).abs().mean() < 0.01
    from PIL import Image

    poster = torch.from_numpy(__import__("numpy").array(Image.open(out["poster"]))).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(poster, v[0], rtol=0, atol=1 / 255)  # PNG is exact up to quantisation


def test_mp4_round_trip_when_pyav_is_installed(tmp_path):
    pytest.importorskip("av")
    if not media.has_mp4_writer():
        pytest.skip("PyAV without an H.264 encoder")
    v = _ramp(h=17, w=21)  # odd sizes: padded to even for yuv420p
    out = media.save_video(v, tmp_path / "clip", format="mp4")
    back = media.read_video(out["video"])
    assert back.shape == (5, 3, 18, 22)
    means = back[:, :, 8:, 8:].mean(dim=(1, 2, 3))  # grey part: one level per frame
    torch.testing.assert_close(means, v[:, :, 8:, 8:].mean(dim=(1, 2, 3)), rtol=0, atol=0.02)


def test_auto_format_and_errors(tmp_path):
    out = media.save_video(_ramp(), tmp_path / "a", poster=False)
    assert out["video"].suffix == (".mp4" if media.has_mp4_writer() else ".webp") and "poster" not in out
    img = media.save_sample(torch.rand(3, 8, 8), tmp_path / "img")
    assert img["image"].suffix == ".png"
    with pytest.raises(ValueError, match="video format"):
        media.save_video(_ramp(), tmp_path / "b", format="gif")
    with pytest.raises(ValueError, match=r"\[F, C, H, W\]"):
        media.to_uint8_frames(torch.rand(2, 2, 3, 4, 4))


def test_cli_sample_writes_videos(tmp_path, capsys):
    from flowrl.cli import main

    out = tmp_path / "s.png"
    rc = main(["sample", "--set", "model.pipeline=tiny-wan", "--set", "model.device=cpu", "--set", "sampler.eval_num_steps=2",
               "--set", f"train.output_dir={tmp_path / 'run'}", "--prompt", "a cat", "--prompt", "a dog", "--out", str(out), "--video-format", "webp"])
    assert rc == 0 and out.is_file()
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert files == ["0000.poster.png", "0000.webp", "0001.poster.png", "0001.webp"]
    assert media.read_video(tmp_path / "s" / "0000.webp").shape == (5, 3, 32, 32)
    assert "wrote 2 videos" in capsys.readouterr().out
