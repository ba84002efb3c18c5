"""Write samples to disk: images as PNG, videos as MP4 (H.264, when PyAV is installed: the
``video`` extra, ``pip install flowrl[video]``) or else as animated WebP (Pillow only), each video
with a PNG poster frame next to it.

Tensors are float in [0, 1]: an image ``[C, H, W]``, a video ``[F, C, H, W]`` (one sample of the
``[B, F, C, H, W]`` layout rewards and rollouts use). Values are quantised as ``round(x·255)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

VIDEO_FORMATS = ("auto", "mp4", "webp")


def to_uint8_frames(video: Tensor) -> "list":
    """``[F, C, H, W]`` (or ``[C, H, W]``) in [0, 1] → list of ``H×W×3`` uint8 numpy frames (grey
    frames are repeated to RGB)."""
    if video.dim() == 3:
        video = video[None]
    if video.dim() != 4:
        raise ValueError(f"expected a video [F, C, H, W] or an image [C, H, W], got {tuple(video.shape)}.")
    x = (video.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return [f.permute(1, 2, 0).contiguous().numpy() for f in x]


def has_mp4_writer() -> bool:
    """True when PyAV with an H.264 encoder is importable."""
    try:
        import av
    except ImportError:
        return False
    return "libx264" in av.codecs_available or "h264" in av.codecs_available


def poster_frame(video: Tensor) -> Tensor:
    """The frame shown before a video plays: its first frame ``[C, H, W]`` (an image: itself)."""
    return video if video.dim() == 3 else video[0]


def save_image(image: Tensor, path: str | Path) -> Path:
    """``[C, H, W]`` in [0, 1] → PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8_frames(image)[0]).save(path)
    return path


def write_mp4(video: Tensor, path: str | Path, *, fps: float = 16.0, crf: int = 18) -> Path:
    """H.264 MP4 (yuv420p, so odd sizes are padded by one pixel with edge copies) via PyAV."""
    import av
    import numpy as np

    frames = to_uint8_frames(video)
    h, w = frames[0].shape[:2]
    ph, pw = h + h % 2, w + w % 2
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "h264"
        stream = container.add_stream(codec, rate=int(round(fps)))
        stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
        stream.options = {"crf": str(crf)}
        for f in frames:
            if (ph, pw) != (h, w):
                f = np.pad(f, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_webp(video: Tensor, path: str | Path, *, fps: float = 16.0, lossless: bool = False, quality: int = 90) -> Path:
    """Animated WebP (looping) via Pillow."""
    from PIL import Image

    frames = [Image.fromarray(f) for f in to_uint8_frames(video)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, format="WEBP", save_all=True, append_images=frames[1:], duration=int(round(1000 / fps)), loop=0, lossless=lossless, quality=quality)
    return path


def save_video(video: Tensor, path: str | Path, *, fps: float = 16.0, format: str = "auto", poster: bool = True) -> dict[str, Path]:
    """Write one video ``[F, C, H, W]``: ``format`` ``mp4``, ``webp`` or ``auto`` (mp4 when PyAV can
    encode H.264, else animated WebP). ``path``'s suffix is replaced by the format's. With
    ``poster``, the first frame is written next to it as ``<stem>.poster.png``.

    Returns ``{"video": path, "poster": path}`` (no ``poster`` key without one)."""
    if format not in VIDEO_FORMATS:
        raise ValueError(f"video format must be one of {', '.join(VIDEO_FORMATS)}; got {format!r}.")
    if format == "auto":
        format = "mp4" if has_mp4_writer() else "webp"
    if format == "mp4" and not has_mp4_writer():
        raise ImportError("writing MP4 needs PyAV with an H.264 encoder: `pip install av` (or use format='webp').")
    path = Path(path).with_suffix("." + format)
    out = {"video": write_mp4(video, path, fps=fps) if format == "mp4" else write_webp(video, path, fps=fps)}
    if poster:
        out["poster"] = save_image(poster_frame(video), path.with_name(path.stem + ".poster.png"))
    return out


def save_sample(sample: Tensor, path: str | Path, *, fps: float = 16.0, format: str = "auto") -> dict[str, Path]:
    """One sample: an image ``[C, H, W]`` → ``{"image": <path>.png}``; a video ``[F, C, H, W]`` →
    :func:`save_video` (video + poster)."""
    if sample.dim() == 3:
        return {"image": save_image(sample, Path(path).with_suffix(".png"))}
    return save_video(sample, path, fps=fps, format=format)


def read_video(path: str | Path) -> Tensor:
    """Read back a video written here → ``[F, 3, H, W]`` float in [0, 1] (MP4 via PyAV, WebP via
    Pillow). For checks and the gallery."""
    import numpy as np

    path = Path(path)
    if path.suffix == ".webp":
        from PIL import Image, ImageSequence

        with Image.open(path) as im:
            arrs = [np.array(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
    else:
        import av

        with av.open(str(path)) as container:
            arrs = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0
