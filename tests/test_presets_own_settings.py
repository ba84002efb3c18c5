"""Presets own their settings, and every compatibility rule is checked before anything loads
(issue 24, items 1, 2, 3, 7, 9): a config states what differs from its preset, the run records and
prints those overrides, a noise level follows its kernel, and each mismatch is one clear error
from validation alone — every preset on every shipped config."""

import glob
import json
from pathlib import Path

import pytest
import yaml

from flowrl.algorithms import PRESETS, format_overrides, preset_overrides
from flowrl.cli import main
from flowrl.config import ConfigError, TrainConfig
from flowrl.rules import check_compatibility

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(glob.glob(str(ROOT / "assets" / "configs" / "*.yaml")))
DIGITS = ROOT / "assets" / "configs" / "digits.yaml"


def _validate(cfg: TrainConfig) -> None:
    check_compatibility(cfg.resolved())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: Path(p).stem)
def test_every_preset_on_every_shipped_config_validates_or_gives_one_clear_error(path):
    base = TrainConfig.from_yaml(path)
    _validate(base)  # the shipped config itself starts
    started = []
    for name in PRESETS.names():
        cfg = base.override([f"algorithm={name}"])
        try:
            _validate(cfg)
        except ConfigError as exc:  # one line that names a field and the fix, never a traceback
            msg = str(exc)
            assert "\n" not in msg and any(f in msg for f in ("train.", "sampler.", "loss.", "model.", "algorithm")), msg
            continue
        started.append(name)
        # a switched method is the method as its preset defines it, except the job's reported overrides
        preset = PRESETS.get(name)
        r = cfg.resolved()
        owned = preset_overrides(cfg)["overrides"]
        if "loss.clip_range" not in owned:
            assert r.preset.loss.clip_params.get("clip_range") == preset.loss.clip_params.get("clip_range"), name
        if "sampler.noise_level" not in owned:
            assert r.preset.noise_level == preset.noise_level, name
    # the methods made for this kind of model start (others give their one-line reason: a tree that
    # needs another group size, a job's β > 0 with a preset that has no KL term, an LM method...)
    assert {base.algorithm, "grpo_guard", "diffusion_nft", "flow_grpo_fast"} <= set(started)


def test_switching_the_digits_method_gives_the_papers_values_and_reports_the_jobs():
    cfg = TrainConfig.from_yaml(DIGITS)
    default = cfg.resolved()  # the default job's numbers are unchanged by the trimmed config
    assert (default.preset.noise_level, default.preset.loss.clip_params["clip_range"], default.learning_rate, default.preset.loss.beta) == (0.7, 1e-4, 1e-3, 0.0)
    guard = cfg.override(["algorithm=grpo_guard"]).resolved()
    assert guard.preset.loss.clip_params["clip_range"] == 2e-6  # the paper's, not the config's 1e-4
    for name, level in (("dance_grpo", 0.3), ("sage_grpo", 0.5), ("branch_grpo", 0.3)):
        switched = cfg.override([f"algorithm={name}", "sampler.num_steps=20", "train.num_generations=16"])
        assert switched.resolved().preset.noise_level == level, name  # the flow kernel's a stays with the flow kernel
    record = preset_overrides(cfg.override(["algorithm=grpo_guard"]))
    assert record["overrides"]["train.learning_rate"] == {"value": 1e-3, "preset": 1e-4}
    assert set(record["overrides"]) == {"train.learning_rate", "loss.beta"}
    table = format_overrides(record)
    assert "train.learning_rate" in table and "preset: 0.0001" in table
    flux = TrainConfig.from_yaml(ROOT / "assets" / "configs" / "flux_flow_grpo.yaml")  # sets the flow kernel's a = 0.9
    dance = preset_overrides(flux.override(["algorithm=dance_grpo"]))
    assert flux.override(["algorithm=dance_grpo"]).resolved().preset.noise_level == 0.3
    assert "sampler.noise_level" in dance["unused"] and "kernel 'dance'" in dance["unused"]["sampler.noise_level"]


def test_a_noise_level_for_the_running_kernel_still_applies():
    flux = TrainConfig.from_yaml(ROOT / "assets" / "configs" / "flux_flow_grpo.yaml")
    assert flux.sampler.noise_level == {"flow": 0.9}
    assert flux.resolved().preset.noise_level == 0.9
    assert flux.override(["algorithm=flow_grpo_fast"]).resolved().preset.noise_level == 0.9  # same kernel
    assert flux.override(["sampler.noise_level=0.5", "algorithm=dance_grpo"]).resolved().preset.noise_level == 0.5  # --set: this run's kernel
    with pytest.raises(ConfigError, match="'flw' is not a kernel"):
        TrainConfig().override(["sampler.noise_level={flw: 0.5}"]).resolved()


@pytest.mark.parametrize("sets,needle", [
    (["algorithm=branch_grpo"], "sampler.rollout_params.split_steps=9 is step 9, outside 0…7"),
    (["algorithm=branch_grpo", "sampler.num_steps=20"], "set train.num_generations=16"),
    (["sampler.rollout_params={window_size: 9}", "algorithm=flow_grpo_fast"], "window_size=9 does not fit"),
    (["sampler.rollout_params={window_sise: 2}", "algorithm=flow_grpo_fast"], "window_sise is not an option"),
    (["sampler.kernel=ode"], "draws none"),
    (["algorithm=grpo"], "language-model method"),
    (["model.kind=causal_lm", "algorithm=grpo"], "reward.rewards.digits scores image"),
    (["train.report=digit/correct"], "train.report 'digit/correct' is not a reward column"),
])
def test_each_rule_is_one_error_line_before_any_model_loads(sets, needle, capsys, tmp_path):
    # validation alone: the CLI's `config show` runs every check and loads nothing (digits' model,
    # prompts and judge are never read: a missing output folder is never created either)
    argv = ["config", "show", "--config", str(DIGITS), *sum((["--set", s] for s in sets), [])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flowrl: error:") and needle in err[0], err
    # the trainer checks the same before it reads prompts, rewards or the model
    cfg = TrainConfig.from_yaml(DIGITS).override([*sets, f"train.output_dir={tmp_path / 'run'}"])
    from flowrl.trainer import Trainer

    with pytest.raises(ConfigError, match=needle.split("…")[0][:30].replace("(", r"\(").replace("[", r"\[")):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


def test_config_show_prints_the_resolved_config_and_overrides(capsys):
    assert main(["config", "show", "--config", str(DIGITS), "--set", "algorithm=grpo_guard"]) == 0
    out = capsys.readouterr().out
    data = yaml.safe_load(out)
    assert data["algorithm"] == "grpo_guard" and data["resolved"]["preset"]["loss"]["clip_params"]["clip_range"] == 2e-6
    assert data["resolved"]["overrides"]["overrides"]["train.learning_rate"] == {"value": 1e-3, "preset": 1e-4}
    assert "# settings that differ from preset grpo_guard" in out


def test_saved_yaml_is_plain_utf8():
    cfg = TrainConfig().override(["train.prompts=['a μ → b']"])
    text = cfg.to_yaml()
    assert "μ → b" in text and "\\u" not in text


def test_version_and_help_list_presets_and_docs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("flowrl ")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for name in ("flow_grpo", "grpo_guard", "branch_grpo", "dapo", "configuration.md", "performance.md"):
        assert name in out


def test_shipped_example_configs_are_real_runs():
    """The large-model examples are launchable runs: the paper's length, periodic checkpoints,
    evaluation prompts and cadence, prompt files that ship next to them."""
    for name in ("sd3_flow_grpo", "flux_flow_grpo", "qwen_image", "wan_t2v", "hunyuan_video15_sage"):
        path = ROOT / "assets" / "configs" / f"{name}.yaml"
        cfg = TrainConfig.from_yaml(path)
        t = cfg.train
        assert t.iterations >= 100 and 0 < t.save_every < t.iterations, path
        for spec in (t.prompts, t.eval_prompts):
            assert isinstance(spec, str) and Path(spec).is_file(), (path, spec)  # resolved next to the config
            assert len([ln for ln in Path(spec).read_text().splitlines() if ln.strip()]) >= 8
        assert t.eval_every > 0, path


def test_dotted_path_reward_in_the_working_directory(tmp_path, monkeypatch):
    """``my_rewards:Brightness`` beside the command's working directory imports without
    PYTHONPATH=. (as ``python -m`` would), logs under the documented column name, and
    ``train.report`` must name one of the columns."""
    import sys

    from flowrl.rules import reward_columns

    (tmp_path / "my_rewards_issue24.py").write_text(
        "import torch\nfrom flowrl.rewards import Reward\n\n"
        "class Brightness(Reward):\n    def __call__(self, outputs, prompts, meta=None):\n        return outputs.float().mean(dim=(1, 2, 3))\n\n"
        "class Named(Reward):\n    name = 'glow'\n    def __call__(self, outputs, prompts, meta=None):\n        return outputs.float().mean(dim=(1, 2, 3))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_rewards_issue24", raising=False)
    cfg = TrainConfig().override(["reward.rewards={'my_rewards_issue24:Brightness': 1.0, 'my_rewards_issue24:Named': 0.5}"])
    assert reward_columns(cfg) == ["brightness", "glow"]  # the class name lower-cased, or its own `name`
    _validate(cfg.override(["train.report=glow"]))
    with pytest.raises(ConfigError, match="train.report 'brightnes' is not a reward column .did you mean 'brightness'"):
        _validate(cfg.override(["train.report=brightnes"]))
    from flowrl.builders import _build_reward_set

    rs = _build_reward_set(cfg)
    import torch

    table, names = rs.score(torch.full((2, 3, 4, 4), 0.5), ["a", "b"])
    assert names == ["brightness", "glow"] and torch.allclose(table, torch.full((2, 2), 0.5))


def test_thread_default_for_tiny_jobs(monkeypatch):
    """The CLI runs the embedded tiny models with one torch thread unless OMP_NUM_THREADS or
    train.num_threads says otherwise; other models keep torch's default."""
    import torch

    from flowrl.cli import set_num_threads

    before = torch.get_num_threads()
    try:
        digits = TrainConfig.from_yaml(DIGITS)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        if not torch.cuda.is_available():
            assert set_num_threads(digits) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert set_num_threads(digits) is None  # the environment's choice stands
        assert set_num_threads(digits.override(["train.num_threads=2"])) == 2 and torch.get_num_threads() == 2
        assert set_num_threads(TrainConfig().override(["model.pipeline=/models/sd3"])) is None
        with pytest.raises(ConfigError, match="train.num_threads must be ≥ 1"):
            TrainConfig().override(["train.num_threads=0"]).validate()
    finally:
        torch.set_num_threads(before)


def test_report_of_an_undeclared_component_fails_after_the_base_evaluation(tmp_path, monkeypatch):
    """A reward that returns components without declaring them: ``train.report`` naming a component
    it does not return stops the run right after the base evaluation (before any training), with
    the columns it does log — never a silently missing final line."""
    import sys

    from flowrl.trainer import Trainer

    (tmp_path / "comp_rewards_issue24.py").write_text(
        "from flowrl.rewards import Reward\n\n"
        "class Parts(Reward):\n    def __call__(self, outputs, prompts, meta=None):\n"
        "        m = outputs.float().mean(dim=(1, 2, 3))\n        return {'light': m, 'dark': 1 - m}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "comp_rewards_issue24", raising=False)
    cfg = TrainConfig.from_yaml(DIGITS).override([
        "reward.rewards={'comp_rewards_issue24:Parts': 1.0}", "train.report=parts/lite", f"train.output_dir={tmp_path / 'run'}",
        "train.eval_prompts=['a 3']", "train.eval_samples_per_prompt=1", "sampler.eval_num_steps=1", "train.progress=false",
        "train.report_to=none", "train.iterations=1",
    ])
    _validate(cfg)  # undeclared components: the name is plausible before anything ran
    with pytest.raises(ConfigError, match="train.report 'parts/lite' is not an evaluated column; the rewards log parts/light, parts/dark"):
        Trainer(cfg).train()
    assert not list((tmp_path / "run" / "checkpoints").glob("iter_*"))
