"""Tracked rewards (``reward.track``): scored at every evaluation, never trained on, and an alarm for
when the trained reward and a tracked one part ways (reward hacking: the policy finds what the
trained reward likes without the quality it stands for).

At each evaluation the tracked rewards score the same samples as the trained ones; their columns
join the evaluation table as ``track/<column>`` (so ``eval/track/<column>`` in the metrics, in
``flowrl eval``'s report and in the gallery). The trained reward of an evaluation is the mean of
the weighted sum of the trained columns (the ``weighted_sum`` rule, also under ``gdpo``).

The alarm (:func:`divergence_alarm`) compares the latest evaluation with the one K =
``reward.track_window`` evaluations earlier: it fires for a tracked column when the trained reward
rose while the tracked mean fell by more than the 95 % confidence interval of that difference,
``√(ci_now² + ci_then²)`` with each ci the half-width over the evaluation prompts' means (Student
t, as ``flowrl eval`` reports it; the two evaluations are treated as independent, an
approximation: they share prompts and noise, which makes the true interval narrower, so the alarm
errs on the quiet side). On firing the run logs a warning (``eval/track_alarm/<column>`` = 1) and,
with ``reward.track_stop``, stops; ``<run>/best_track`` then holds the checkpoint taken at the
evaluation with the best tracked mean (first tracked column) and ``<run>/track.json`` says why.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

PREFIX = "track/"


def divergence_alarm(trained: Sequence[float], tracked: Sequence[float], tracked_ci: Sequence[float], window: int) -> bool:
    """True when ``trained[-1] > trained[-1 − K]`` and ``tracked[-1 − K] − tracked[-1] >
    √(ci[-1]² + ci[-1 − K]²)`` (K = ``window``); False with fewer than K + 1 evaluations. A NaN
    confidence interval (one prompt) counts as 0."""
    k = int(window)
    if k < 1 or len(trained) < k + 1 or len(tracked) < k + 1:
        return False
    ci = [0.0 if not math.isfinite(c) else float(c) for c in (tracked_ci[-1], tracked_ci[-1 - k])]
    rose = trained[-1] > trained[-1 - k]
    fell = tracked[-1 - k] - tracked[-1] > math.hypot(*ci)
    return bool(rose and fell)


def per_prompt_ci(values: Tensor, samples_per_prompt: int) -> tuple[float, float]:
    """Mean over samples and the 95 % CI half-width over per-prompt means (as ``flowrl eval``)."""
    per_prompt = values.reshape(-1, samples_per_prompt).nanmean(1).double()
    v = per_prompt[torch.isfinite(per_prompt)]
    if v.numel() < 2:
        return float(values.nanmean()), math.nan
    from scipy.stats import t as student_t

    return float(values.nanmean()), float(student_t.ppf(0.975, v.numel() - 1) * v.std(unbiased=True) / math.sqrt(v.numel()))


@dataclass
class RewardTracker:
    """Scores ``reward.track`` at evaluations and watches the alarm (module doc)."""

    reward_set: Any
    window: int = 3
    stop: bool = False
    history: list[dict[str, tuple[float, float]]] = field(default_factory=list)
    best: tuple[float, int] | None = None
    fired: list[str] = field(default_factory=list)

    def extend(self, table: Tensor, names: list[str], outputs: Any, prompts: list[str], meta: dict | None) -> tuple[Tensor, list[str]]:
        """The evaluation table with the tracked columns appended as ``track/<column>``."""
        extra, extra_names = self.reward_set.score(outputs, prompts, meta)
        return torch.cat([table.float(), extra.float()], dim=1), list(names) + [PREFIX + n for n in extra_names]

    def observe(self, table: Tensor, names: list[str], weights: Tensor | None, samples_per_prompt: int) -> list[str]:
        """Record one evaluation (the extended table) and return the tracked columns whose alarm fires."""
        trained_idx = [i for i, n in enumerate(names) if not n.startswith(PREFIX)]
        w = weights if weights is not None and len(weights) == len(trained_idx) else torch.ones(len(trained_idx))
        used = w != 0
        trained = (table[:, trained_idx][:, used] * w[used]).sum(1)
        point = {"trained": per_prompt_ci(trained, samples_per_prompt)}
        for i, n in enumerate(names):
            if n.startswith(PREFIX):
                point[n] = per_prompt_ci(table[:, i], samples_per_prompt)
        self.history.append(point)
        series = [h["trained"][0] for h in self.history]
        fired = [n for n in point if n != "trained" and divergence_alarm(series, [h[n][0] for h in self.history], [h[n][1] for h in self.history], self.window)]
        self.fired = fired
        return fired

    def first_tracked(self) -> str | None:
        return next((n for n in (self.history[-1] if self.history else {}) if n != "trained"), None)

    def is_best(self) -> bool:
        """The latest evaluation has the best mean of the first tracked column so far."""
        col = self.first_tracked()
        if col is None:
            return False
        v = self.history[-1][col][0]
        if math.isfinite(v) and (self.best is None or v > self.best[0]):
            self.best = (v, len(self.history) - 1)
            return True
        return False


def build_tracker(config: Any, reward_set: Any = None) -> RewardTracker | None:
    """The tracker of ``config.reward.track`` (None when empty)."""
    r = config.reward
    if not r.track and reward_set is None:
        return None
    if reward_set is None:
        from flowrl.rewards import build_rewards

        spec = {name: {**(opts if isinstance(opts, dict) else {}), "weight": 1.0} for name, opts in r.track.items()}
        reward_set = build_rewards(spec, max_failures=r.max_failures)
        from flowrl.rewards.remote import check_remote_rewards

        check_remote_rewards(reward_set, announce=False)  # a tracked reward's server answers too
    return RewardTracker(reward_set, window=r.track_window, stop=r.track_stop)


def after_evaluation(trainer: Any, it: int, result: dict[str, float], tag: str) -> bool:
    """The trainer's plug point after an evaluation at iteration ``it``: record it, keep the best
    checkpoint (with ``track_stop``), warn when the alarm fires; True = stop the run."""
    tracker: RewardTracker | None = getattr(trainer, "track", None)
    if tracker is None or tag not in getattr(trainer, "_eval_tables", {}):
        return False
    table, names = trainer._eval_tables[tag]
    from flowrl.estimation import reward_weights

    weights = reward_weights(trainer.reward_set, [n for n in names if not n.startswith(PREFIX)])
    fired = tracker.observe(table, names, weights, trainer.config.train.eval_samples_per_prompt)
    for n in fired:
        result[f"track_alarm/{n[len(PREFIX):]}"] = 1.0
    run_dir = Path(trainer.run_dir)
    if tracker.stop and tracker.is_best() and it > 0:
        path = trainer.save_checkpoint(it)
        if trainer.accelerator.is_main_process:
            best = run_dir / "best_track"
            shutil.rmtree(best, ignore_errors=True)
            shutil.copytree(path, best)
    if not fired:
        return False
    h = tracker.history
    k = tracker.window
    detail = "; ".join(f"{n}: {h[-1 - k][n][0]:.4f} -> {h[-1][n][0]:.4f} (95% CI ±{h[-1][n][1]:.4f})" for n in fired)
    msg = (f"reward hacking alarm at iteration {it}: the trained reward rose ({h[-1 - k]['trained'][0]:.4f} -> {h[-1]['trained'][0]:.4f}) "
           f"while tracked rewards fell over the last {k} evaluations: {detail}")
    if trainer.accelerator.is_main_process:
        print(f"[flowrl] warning: {msg}" + ("; stopping (reward.track_stop)" if tracker.stop else ""), flush=True)
    if tracker.stop and trainer.accelerator.is_main_process:
        best = run_dir / "best_track"
        info = {"stopped_at": it, "reason": msg, "best_checkpoint": str(best) if best.is_dir() else None,
                "best_tracked_mean": tracker.best[0] if tracker.best else None, "tracked_column": tracker.first_tracked()}
        (run_dir / "track.json").write_text(json.dumps(info, indent=1) + "\n")
    return tracker.stop


__all__ = ["divergence_alarm", "RewardTracker", "build_tracker", "after_evaluation", "per_prompt_ci"]
