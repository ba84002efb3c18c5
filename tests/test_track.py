"""reward.track: tracked rewards join every evaluation as track/<column>, and the reward-hacking
alarm fires when the trained reward rises while a tracked one falls beyond its confidence interval
(quiet when both rise); with reward.track_stop the run stops and keeps the best checkpoint by the
tracked reward."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flowrl import TrainConfig
from flowrl.track import divergence_alarm

CONFIG = Path(__file__).resolve().parents[1] / "assets" / "configs" / "digits.yaml"
STATE = {"evals": 0, "tracked": []}


def test_alarm_fires_when_trained_rises_and_tracked_falls():
    trained = [0.2, 0.3, 0.5, 0.7]
    tracked = [0.60, 0.58, 0.50, 0.40]
    ci = [0.05, 0.05, 0.05, 0.05]
    # K = 2: 0.58 → 0.40 is a fall of 0.18 > √(0.05² + 0.05²) = 0.0707
    assert divergence_alarm(trained, tracked, ci, window=2)
    # the same fall inside a wider interval (√2·0.15 = 0.21) is noise
    assert not divergence_alarm(trained, tracked, [0.15] * 4, window=2)
    # K = 1: 0.50 → 0.40 = 0.10 > 0.0707
    assert divergence_alarm(trained, tracked, ci, window=1)
    # too few evaluations for K = 3 + 1 = 4? exactly 4: fires (0.60 → 0.40)
    assert divergence_alarm(trained, tracked, ci, window=3)
    assert not divergence_alarm(trained[:3], tracked[:3], ci[:3], window=3)
    # NaN interval (one prompt) counts as 0
    assert divergence_alarm([0.0, 1.0], [1.0, 0.99], [math.nan, math.nan], window=1)


def test_alarm_quiet_when_both_rise_or_trained_falls():
    assert not divergence_alarm([0.2, 0.3, 0.5], [0.5, 0.6, 0.7], [0.01] * 3, window=2)
    assert not divergence_alarm([0.5, 0.4, 0.3], [0.9, 0.5, 0.1], [0.01] * 3, window=2)  # both fall: not hacking


class Planted:
    """Trained reward: at evaluations, the evaluation's number (0, 1, 2, ...: rises); 0 in training."""

    name = "planted"

    def __call__(self, outputs, prompts, meta=None):
        if meta and meta.get("eval"):
            STATE["evals"] += 1
            return torch.full((len(prompts),), float(STATE["evals"] - 1))
        return torch.zeros(len(prompts))


class Tracked:
    """Tracked reward: STATE["tracked"][evaluation number] for every sample (no spread: CI 0)."""

    name = "quality"

    def __call__(self, outputs, prompts, meta=None):
        return torch.full((len(prompts),), float(STATE["tracked"][STATE["evals"] - 1]))


def _run(tmp_path, tracked, *, stop):
    from flowrl.trainer import Trainer

    STATE["evals"], STATE["tracked"] = 0, tracked
    cfg = TrainConfig.from_yaml(CONFIG).override([
        f"train.output_dir={tmp_path / 'run'}", "train.iterations=5", "train.prompts_per_iteration=2", "train.num_generations=2",
        "train.train_batch_size=4", "train.eval_every=1", "train.progress=false", "train.eval_samples_per_prompt=1",
        'train.eval_prompts=["a 9", "two 5s"]', "train.lora_rank=2", "train.lora_alpha=2", "train.report=planted",
        "reward.rewards={test_track:Planted: 1.0}", "reward.track={test_track:Tracked: {}}", "reward.track_window=2", f"reward.track_stop={str(stop).lower()}",
    ])
    return Trainer(cfg).train()


def test_trainer_stops_on_the_alarm_and_keeps_the_best_tracked_checkpoint(tmp_path, capsys):
    # evaluations: base, iter1, iter2, iter3 → tracked 0.1, 0.5, 0.3, 0.1: at iter3 (K = 2) trained 1 → 3, tracked 0.5 → 0.1
    result = _run(tmp_path, [0.1, 0.5, 0.3, 0.1, 0.1, 0.1, 0.1], stop=True)
    run = Path(result.run_dir)
    info = json.loads((run / "track.json").read_text())
    assert info["stopped_at"] == 3 and info["tracked_column"] == "track/quality" and info["best_tracked_mean"] == pytest.approx(0.5)
    state = json.loads((run / "best_track" / "state.json").read_text())
    assert state["iteration"] == 1  # the evaluation with the best tracked mean
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/track/quality" in r]
    assert [r["eval/track/quality"] for r in evals][:4] == pytest.approx([0.1, 0.5, 0.3, 0.1])
    assert [r.get("eval/track_alarm/quality") for r in evals][:4] == [None, None, None, 1.0]
    assert max(r["iteration"] for r in records) == 3  # stopped: no iteration 4 or 5
    assert "reward hacking alarm at iteration 3" in capsys.readouterr().out
    from flowrl.cli import main

    STATE["evals"], STATE["tracked"] = 1, [0.0, 0.5]  # the kept checkpoint evaluates like any other
    assert main(["eval", "--run", str(run), "--checkpoint", str(run / "best_track"), "--out", str(tmp_path / "best.json")]) == 0
    report = json.loads((tmp_path / "best.json").read_text())
    assert set(report["aggregate"]) == {"planted", "track/quality"} and report["aggregate"]["track/quality"]["mean"] == pytest.approx(0.5)


def test_trainer_quiet_when_both_rise(tmp_path):
    result = _run(tmp_path, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], stop=True)
    run = Path(result.run_dir)
    assert not (run / "track.json").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["iteration"] for r in records) == 5 and not any("eval/track_alarm/quality" in r for r in records)
    assert result.eval_after["track/quality"] == pytest.approx(0.6)
    from flowrl.gallery import build_gallery

    STATE["evals"], STATE["tracked"] = 0, [0.1, 0.9]  # the gallery's base and tuned columns
    html = build_gallery([str(run)], tmp_path / "gallery").read_text()
    assert "track/quality" in html  # a column of the gallery, like the trained reward


def test_track_config_round_trips_and_checks_its_window(tmp_path):
    from flowrl.config import ConfigError

    cfg = TrainConfig.from_dict({"reward": {"jpeg_compressibility": 1.0, "track": {"aesthetic": {"head_path": "./head.pth"}}, "track_stop": True}})
    assert cfg.reward.track == {"aesthetic": {"head_path": "./head.pth"}} and cfg.reward.rewards == {"jpeg_compressibility": 1.0}
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml() if hasattr(cfg, "to_yaml") else __import__("yaml").safe_dump(cfg.to_dict()))
    (tmp_path / "head.pth").write_text("")
    back = TrainConfig.from_yaml(path)
    assert back.reward.track_stop and back.reward.track["aesthetic"]["head_path"] == str((tmp_path / "head.pth").resolve())  # relative to the file
    with pytest.raises(ConfigError, match="reward.track_window"):
        TrainConfig.from_dict({"reward": {"jpeg_compressibility": 1.0, "track_window": 0}}).validate()
