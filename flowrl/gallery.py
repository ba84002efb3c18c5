"""Evaluation artefacts: image grids, before/after comparisons, reward curves, an HTML gallery."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor


def image_grid(images: Tensor, *, nrow: int = 8, pad: int = 1, upscale: int = 1) -> Tensor:
    """Tile ``[B, C, H, W]`` images in [0, 1] into one ``[C, H', W']`` grid (white padding)."""
    if images.dim() != 4:
        raise ValueError(f"image_grid expects [B, C, H, W], got {tuple(images.shape)}")
    if upscale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=upscale, mode="nearest")
    b, c, h, w = images.shape
    ncol = min(nrow, b)
    nrows = (b + ncol - 1) // ncol
    grid = torch.ones(c, nrows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(b):
        r, col = divmod(i, ncol)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = images[i]
    return grid


def save_image(image: Tensor, path: str | Path) -> None:
    """Save a ``[C, H, W]`` tensor in [0, 1] as PNG."""
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    Image.fromarray(arr).save(path)


def before_after_grid(before: Tensor, after: Tensor, path: str | Path, *, max_items: int = 16) -> None:
    """Two rows per block: base samples on top, tuned samples (same prompts and noise) below."""
    if before.dim() == 5:  # video [B, F, C, H, W]: the first frame (the poster) of each
        before, after = before[:, 0], after[:, 0]
    n = min(max_items, len(before), len(after))
    up = max(1, 64 // max(before.shape[-1], 1))
    rows = []
    per_row = 8
    for start in range(0, n, per_row):
        rows.append(before[start : start + per_row])
        rows.append(after[start : start + per_row])
    grid = image_grid(torch.cat(rows).float(), nrow=per_row, upscale=up)
    save_image(grid, path)


def plot_reward_curve(history: Sequence[dict], path: str | Path, *, evals: dict[str, Sequence[tuple[float, float]]] | None = None) -> None:
    """Train reward (mean combined reward per iteration) and held-out evaluation points, as PNG.

    ``evals``: ``{column: [(iteration, value), ...]}``; ``eval/<column>`` entries found in the
    history are added to it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in history if "reward/mean" in r]
    points: dict[str, list[tuple[float, float]]] = {k: list(v) for k, v in (evals or {}).items()}
    for r in history:
        for k, v in r.items():
            if k.startswith("eval/") and k != "eval/num_prompts":
                points.setdefault(k[5:], []).append((r["iteration"], v))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(its, [r["reward/mean"] for r in history if "reward/mean" in r], label="train reward (mean)", alpha=0.7)
    for name, pts in points.items():
        pts = sorted(set(pts))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"held-out {name}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def html_gallery(images: Tensor, prompts: Sequence[str], path: str | Path, *, scores: Sequence[float] | None = None, title: str = "flowrl gallery") -> Path:
    """Write an HTML page with one PNG per sample, its prompt and score."""
    path = Path(path)
    img_dir = path.parent / (path.stem + "_images")
    img_dir.mkdir(parents=True, exist_ok=True)
    cells = []
    for i, (img, prompt) in enumerate(zip(images, prompts)):
        name = f"{i:04d}.png"
        save_image(img, img_dir / name)
        score = f"<br><small>{scores[i]:.3f}</small>" if scores is not None else ""
        cells.append(f'<figure><img src="{img_dir.name}/{name}" width="128"><figcaption>{html.escape(prompt)}{score}</figcaption></figure>')
    path.write_text(f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1>"
                    "<style>figure{display:inline-block;margin:4px;text-align:center;width:140px}</style>" + "".join(cells))
    return path
