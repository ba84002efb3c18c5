"""What a run reports: metrics to ``metrics.jsonl`` and the trackers, evaluation images, the
summary lines, the reward curve and before/after plots, and the progress bars. Functions of the
:class:`~flowrl.trainer.Trainer`; the plotting helpers are also the gallery's.

Metrics (``metrics.jsonl`` and TensorBoard, one record per iteration):
``reward/mean`` (combined reward, mean over samples whose reward did not fail), ``reward/std``,
``reward/<column>`` (each component, NaN-safe mean), ``reward/failures/<name>`` (failed samples so
far), ``adv/abs_mean`` (mean |A|), ``samples/generated`` (output rows this iteration),
``samples/trained`` (rows with non-zero advantage), ``loss/policy`` (aggregated surrogate),
``loss/kl`` (β·KL), ``kl/ref`` (masked mean per-step KL to the reference), ``ratio/mean``
(masked mean of π_θ/π_old), ``ratio/clipfrac`` (fraction of steps on the clipped branch),
``grad_norm`` (before clipping), ``update/steps`` (optimizer steps), ``update/skipped_nonfinite``
(optimizer steps skipped because a log-prob, the loss or a gradient was NaN/inf; past
``train.max_nonfinite_updates`` in a run the loop stops with :class:`NonFiniteUpdateError`), ``cost/model_evals_per_sample``
and ``cost/trained_steps_per_sample`` (transformer evaluations and trained steps per output),
``select/*`` (prompt selection rounds, drawn, kept), ``time/rollout``, ``time/rewards``,
``time/update`` (seconds; ``time/rewards`` is what the loop waited for rewards beyond the
rollout, so it shrinks when scoring overlaps later rollout calls: ``train.rollout_batch_size``), ``eval/<column>`` (held-out means, deterministic samples).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from flowrl import tracking
from flowrl.atomic import written_aside
from flowrl.errors import NonFiniteUpdateError
from flowrl.estimation import reward_metrics
from flowrl.secrets import redact


# ------------------------------------------------------------------------------- the run's record
def start_trackers(trainer: Any) -> list[Any]:
    """accelerate trackers of ``train.report_to``, attached to the accelerator (main process)."""
    if not trainer.accelerator.is_main_process:
        return []
    trackers = tracking.start_trackers(trainer.config.train.report_to, trainer.run_dir, config=redact(trainer.config.to_dict()))  # no secrets
    trainer.accelerator.trackers = list(getattr(trainer.accelerator, "trackers", None) or []) + trackers
    trainer._trackers = trackers
    return trackers


def log_eval_images(trainer: Any, tag: str, outputs: Any, prompts: list[str]) -> None:
    """A few evaluation images (one per prompt) to the trackers, at the evaluation's iteration."""
    trackers = getattr(trainer, "_trackers", None)
    t = trainer.config.train
    if not trackers or t.eval_images <= 0:
        return
    step = 0 if tag == "base" else t.iterations if tag == "tuned" else int(tag[4:]) if tag.startswith("iter") and tag[4:].isdigit() else None
    every = t.eval_samples_per_prompt  # the first sample of each prompt
    images = tracking.preview_images(outputs[::every] if isinstance(outputs, Tensor) else outputs, count=t.eval_images)
    if images is not None:
        tracking.log_images(trackers, images, prompts[::every][: len(images)], step)


def log(trainer: Any, record: dict[str, float], writer: Any) -> None:
    if "reward/mean" in record:
        trainer.history.append(record)
    if not trainer.accelerator.is_main_process:
        return
    path = trainer.run_dir / "metrics.jsonl"
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as exc:  # a full disk or a denied write: one line (an appended record is cut at worst)
        from flowrl.atomic import disk_error
        from flowrl.safeload import WriteError

        raise WriteError(disk_error(exc, path, len(json.dumps(record)) + 1)) from None
    tracking.log_metrics(writer or [], record, int(record["iteration"]))


def report_column(trainer: Any, result: dict[str, float]) -> str | None:
    cols = [k for k in result if k != "num_prompts"]
    if trainer.config.train.report:
        return trainer.config.train.report
    return cols[0] if cols else None


def check_report_column(trainer: Any, evaluated: dict[str, float]) -> None:
    """After the base evaluation: ``train.report`` is one of the evaluated columns (the rules before
    the run check the reward names and declared components; a reward's undeclared components are
    known only once it has scored), else a ConfigError listing them — before any training, rather
    than a final summary line that silently goes missing."""
    report = trainer.config.train.report
    if not report or not evaluated or report in evaluated:
        return
    from flowrl.errors import ConfigError

    columns = [k for k in evaluated if not k.startswith("num_") and k.count("/") <= 1]
    raise ConfigError(f"train.report '{report}' is not an evaluated column; the rewards log {', '.join(columns)}. Set train.report to one of them.")


def summary(trainer: Any, before: dict[str, float], after: dict[str, float]) -> str:
    if not before or not after:
        return ""
    col = report_column(trainer, after)
    if col is None or col not in before:
        return ""
    label = f"{col.split('/')[0]} correctness" if col.endswith("/correct") else col
    return f"{label}: base {before[col]:.2f} -> tuned {after[col]:.2f} (held-out, {len(trainer.eval_prompts)} prompts)"


def breakdown(trainer: Any, before: dict[str, float], after: dict[str, float]) -> str:
    """``<column> by category: a base B -> tuned T (P prompts, S samples); ...`` from the
    per-category evaluation (:meth:`~flowrl.trainer.Trainer.evaluate`), or "" without categories."""
    col = report_column(trainer, after) if after else None
    if not before or col is None:
        return ""
    parts = []
    for k, n in after.items():
        if not k.startswith("num_prompts/"):
            continue
        label = k.split("/", 1)[1]
        if f"{col}/{label}" in after and f"{col}/{label}" in before:
            p, s = int(n), int(n) * trainer.config.train.eval_samples_per_prompt
            parts.append(f"{label} base {before[f'{col}/{label}']:.2f} -> tuned {after[f'{col}/{label}']:.2f} ({p} prompt{'s' * (p != 1)}, {s} samples)")
    if not parts:
        return ""
    return f"{col} by category: " + "; ".join(parts) + f"; all: {len(trainer.eval_prompts)} prompts, {int(after.get('num_samples', 0))} samples"


def write_artifacts(trainer: Any) -> None:
    if not trainer.accelerator.is_main_process:
        return
    trainer._evals = getattr(trainer, "_evals", {})

    try:
        evals: dict[str, list[tuple[float, float]]] = {}
        for it, result in ((0, trainer._evals.get("base")), (trainer.config.train.iterations, trainer._evals.get("tuned"))):
            for k, v in (result or {}).items():
                if not k.startswith("num_"):
                    evals.setdefault(k, []).append((it, v))
        with written_aside(trainer.run_dir / "reward_curve.png") as tmp:
            plot_reward_curve(trainer.history, tmp, evals=evals)
        outs = getattr(trainer, "_eval_outputs", {})
        if "base" in outs and "tuned" in outs and isinstance(outs["base"][0], Tensor):
            k, n = trainer.config.train.eval_samples_per_prompt, trainer.config.train.iterations
            tuned = f"tuned{' (EMA)' if trainer.ema is not None else ''}, iteration {n}"
            with written_aside(trainer.run_dir / "before_after.png") as tmp:
                before_after_grid(  # the first sample of each prompt: same prompt, same noise
                    outs["base"][0][::k], outs["tuned"][0][::k], tmp, max_items=16,
                    prompts=outs["base"][1][::k], labels=("base", tuned), title=f"{trainer.run_dir.name}: base vs {tuned} (same noise)",
                )
    except Exception as exc:  # plots are a convenience; never lose a run for them
        print(f"[flowrl] could not write plots: {exc}")


# ------------------------------------------------------------------------------- metrics
def iteration_record(trainer: Any, it: int, lr: float, traj: Trajectories, keep: Tensor, g: dict[str, Any], adv_all: Tensor, update_metrics: dict[str, float]) -> dict[str, float]:
    """The iteration's metrics over all processes (the names are listed in the module docstring)."""
    all_rewards, all_raw, raw_names = g["rewards"], g["raw"], g["raw_names"]
    ok = torch.isfinite(all_rewards)
    record: dict[str, float] = {"iteration": it, "reward/mean": float(all_rewards[ok].mean()), "reward/std": float(all_rewards[ok].std(unbiased=False))}
    for i, n in enumerate(raw_names):
        record[f"reward/{n}"] = float(all_raw[:, i].nanmean())
    record["lr"] = lr
    record["samples/generated"] = float(len(all_rewards))
    record["adv/abs_mean"] = float(adv_all.abs().mean())
    trained_steps = trainer.dist.sum(torch.tensor([float(keep.sum()), float(traj.mask[keep].sum()) if len(traj) else 0.0]))
    record["samples/trained"] = float(trained_steps[0])
    for k in ("model_evals",):
        if k in traj.meta and isinstance(traj.meta[k], (int, float)):
            record[f"cost/{k}_per_sample"] = float(traj.meta[k])
    if isinstance(traj.meta.get("transformer_calls"), (int, float)):
        record["cost/transformer_calls"] = float(traj.meta["transformer_calls"])
    record["cost/trained_steps_per_sample"] = float(trained_steps[1] / max(float(trained_steps[0]), 1.0))
    record.update(update_metrics)
    hook = getattr(trainer.objective, "on_iteration_end", None)
    if hook is not None:
        record.update(hook(trainer, it) or {})
    record.update(reward_metrics(trainer, all_raw, raw_names))
    return record


def update_metrics(trainer: Any, sums: dict[str, float], wsums: dict[str, float], grad_norms: list[float], n_updates: int, skipped: int) -> dict[str, float]:
    sums, wsums = trainer.dist.sum_dicts(sums), trainer.dist.sum_dicts(wsums)
    out = {k: v / max(n_updates, 1) for k, v in sums.items()}
    for k, w in wsums.items():
        if w > 0 and abs(w - n_updates) > 1e-6:  # reported by some chunks only (e.g. ratio_step/<k>/*)
            out[k] = sums[k] / w
    if grad_norms:
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)
    out["update/steps"] = float(n_updates)
    out["update/skipped_nonfinite"] = float(skipped)
    return out


def skip_nonfinite(trainer: Any, it: int, minibatch: int, where: str, skipped_now: int) -> None:
    """Count a skipped optimizer step, say where it happened, and stop past
    ``train.max_nonfinite_updates`` (counted over the whole run, resumes included)."""
    limit = trainer.config.train.max_nonfinite_updates
    total = skipped_now + int(sum(h.get("update/skipped_nonfinite", 0.0) for h in trainer.history))
    msg = f"iteration {it}, minibatch {minibatch}: {where}"
    if total > limit:
        raise NonFiniteUpdateError(
            f"{total} optimizer steps had NaN/inf values (more than train.max_nonfinite_updates={limit}); the last at {msg}. "
            "Lower train.learning_rate, use model.dtype=float32, check the rewards, or raise train.max_nonfinite_updates."
        )
    if trainer.accelerator.is_main_process:
        import sys

        from tqdm.auto import tqdm

        tqdm.write(f"[flowrl] skipped an optimizer step ({total}/{limit} allowed): NaN/inf at {msg}", file=sys.stderr)


# ------------------------------------------------------------------------------- progress
def progress_bar(it, *, enabled: bool, total: int, initial: int = 0, desc: str = "flowrl", **kwargs: Any):
    """A tqdm bar over ``it`` (or a manual one when ``it`` is None); ``it`` itself (None) when disabled."""
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, initial=initial, desc=desc, dynamic_ncols=True, **kwargs)


@contextlib.contextmanager
def phase(desc: str, *, enabled: bool):
    """A one-step bar around a long silent phase (model loading): shows what runs and how long."""
    bar = progress_bar(None, enabled=enabled, total=1, desc=desc, leave=False, bar_format="{desc}: {elapsed}")
    try:
        yield
    finally:
        if bar is not None:
            bar.update(1)
            bar.close()


def progress_postfix(record: dict[str, float]) -> dict[str, str]:
    """What the progress bar shows: the mean reward, and the KL to the reference only when it was
    measured (β > 0); a run without a KL term shows no ``kl`` rather than a made-up 0."""
    out = {"reward": f"{record['reward/mean']:.3f}"}
    if "kl/ref" in record and math.isfinite(record["kl/ref"]):
        out["kl"] = f"{record['kl/ref']:.2e}"
    if record.get("update/skipped_nonfinite"):
        out["skipped"] = f"{int(record['update/skipped_nonfinite'])}"
    return out


# ------------------------------------------------------------------------------- plots
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


def _to_pil(image: Tensor, scale: int):
    """A ``[C, H, W]`` tensor in [0, 1] as an RGB PIL image, upscaled ``scale``× (nearest)."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    im = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr[:, :, :3]).convert("RGB")
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im


def _wrap(draw: Any, text: str, font: Any, width: int, max_lines: int = 3) -> list[str]:
    """Greedy word wrap to ``width`` pixels; the last line ends in "…" if text is left over."""
    lines: list[str] = []
    words = text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        if draw.textlength(line, font=font) > width:  # one word wider than the cell: cut it
            cut = len(line) - 1
            while cut > 1 and draw.textlength(line[:cut], font=font) > width:
                cut -= 1
            line, rest = line[:cut], line[cut:]
            words.insert(0, rest)
            lines.append(line)
            continue
        while words and draw.textlength(line + " " + words[0], font=font) <= width:
            line += " " + words.pop(0)
        lines.append(line)
    if words and lines:
        last = lines[-1]
        while last and draw.textlength(last + "…", font=font) > width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines


def labeled_table(rows: Sequence[Sequence[Any]], *, row_labels: Sequence[str] | None = None, title: str = "", min_width: int = 96) -> Any:
    """Compose a PNG-ready PIL image from a table whose cells are images (``[C, H, W]`` tensors in
    [0, 1]), text (wrapped to the column width) or None. Small images are upscaled by an integer
    factor (nearest) to at least 64 px; ``row_labels`` go in a left margin, ``title`` on top."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(probe.textbbox((0, 0), "Ag", font=font)[3]) + 2
    ncol = max((len(r) for r in rows), default=0)
    images = [c for r in rows for c in r if isinstance(c, Tensor)]
    h0 = max((int(c.shape[-2]) for c in images), default=16)
    scale = max(1, -(-64 // h0)) if h0 < 64 else 1
    col_w = [min_width] * ncol
    for r in rows:
        for j, c in enumerate(r):
            if isinstance(c, Tensor):
                col_w[j] = max(col_w[j], int(c.shape[-1]) * scale)
    pad = 4
    label_w = int(max((probe.textlength(s, font=font) for s in row_labels or []), default=0)) + (2 * pad if row_labels else 0)
    label_w = min(label_w, 160)
    heights = []
    cells: list[list[Any]] = []
    for r in rows:
        out_row, h = [], 0
        for j, c in enumerate(r):
            if isinstance(c, Tensor):
                im = _to_pil(c, scale)
                out_row.append(im)
                h = max(h, im.height)
            elif c is None:
                out_row.append(None)
            else:
                lines = _wrap(probe, str(c), font, col_w[j] - 2)
                out_row.append(lines)
                h = max(h, len(lines) * line_h)
        cells.append(out_row)
        heights.append(h + pad)
    title_lines = _wrap(probe, title, font, max(label_w + sum(col_w) + pad * ncol, 200), max_lines=2) if title else []
    top = len(title_lines) * line_h + (pad if title else 0)
    width = label_w + sum(col_w) + pad * (ncol + 1)
    height = top + sum(heights) + pad
    canvas = Image.new("RGB", (max(width, 1), max(height, 1)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(title_lines):
        draw.text((pad, pad // 2 + k * line_h), line, fill="black", font=font)
    y = top
    for i, r in enumerate(cells):
        if row_labels and i < len(row_labels) and row_labels[i]:
            for k, line in enumerate(_wrap(probe, row_labels[i], font, label_w - pad, max_lines=3)):
                draw.text((pad, y + 2 + k * line_h), line, fill="black", font=font)
        x = label_w + pad
        for j, c in enumerate(r):
            if isinstance(c, list):
                for k, line in enumerate(c):
                    draw.text((x + 1, y + k * line_h), line, fill=(60, 60, 60), font=font)
            elif c is not None:
                canvas.paste(c, (x, y))
            x += col_w[j] + pad
        y += heights[i]
    return canvas


def save_labeled_grid(images: Tensor, path: str | Path, *, captions: Sequence[str], title: str = "", nrow: int = 8) -> None:
    """A grid of ``[B, C, H, W]`` images with each one's caption (its prompt) under it and a title
    (which weights made them) on top, as PNG."""
    rows: list[list[Any]] = []
    for start in range(0, len(images), nrow):
        rows.append([img for img in images[start : start + nrow]])
        rows.append(list(captions[start : start + nrow]))
    labeled_table(rows, title=title).save(path)


def before_after_grid(before: Tensor, after: Tensor, path: str | Path, *, max_items: int = 16, prompts: Sequence[str] | None = None,
                      labels: tuple[str, str] = ("base", "tuned"), title: str = "") -> None:
    """Blocks of three rows: the prompts, base samples, tuned samples (same prompts and noise),
    each image row labelled with the weights that made it."""
    if before.dim() == 5:  # video [B, F, C, H, W]: the first frame (the poster) of each
        before, after = before[:, 0], after[:, 0]
    n = min(max_items, len(before), len(after))
    per_row = 8
    rows: list[list[Any]] = []
    row_labels: list[str] = []
    for start in range(0, n, per_row):
        stop = min(start + per_row, n)
        if prompts is not None:
            rows.append(list(prompts[start:stop]))
            row_labels.append("")
        rows.append([x.float() for x in before[start:stop]])
        row_labels.append(labels[0])
        rows.append([x.float() for x in after[start:stop]])
        row_labels.append(labels[1])
    labeled_table(rows, row_labels=row_labels, title=title).save(path)


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
            if k.startswith("eval/") and not k.startswith("eval/num_"):
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
