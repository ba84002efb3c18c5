"""TrainConfig: YAML round trip, overrides, preset resolution, and errors that name the field."""

import pytest

from flowrl import TrainConfig
from flowrl.config import ConfigError


def test_yaml_round_trip_is_exact(tmp_path):
    cfg = TrainConfig().override(["algorithm=dance_grpo", "train.adam_betas=[0.8, 0.99]", "reward.rewards={a.b:C: {weight: 2.0, k: 1}}"])
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    assert TrainConfig.from_yaml(path) == cfg


def test_overrides_parse_numbers_like_people_write_them():
    cfg = TrainConfig().override(["train.learning_rate=3e-4", "loss.clip_params={clip_range: 2e-6}", "train.mixed_precision=no"])
    assert cfg.train.learning_rate == 3e-4 and cfg.loss.clip_params == {"clip_range": 2e-6}
    assert cfg.train.mixed_precision == "no"  # YAML 1.1 reads `no` as False; mapped back


def test_reward_shorthand_and_sections():
    cfg = TrainConfig.from_dict({"reward": {"pickscore": {"weight": 1.0, "path": "/m"}, "clipscore": 0.5, "combine": "gdpo"}})
    assert cfg.reward.rewards == {"pickscore": {"weight": 1.0, "path": "/m"}, "clipscore": 0.5}
    assert cfg.reward.combine == "gdpo"


def test_preset_defaults_fill_only_unset_fields():
    r = TrainConfig().resolved()
    assert r.preset.loss.clip_params["clip_range"] == 1e-4 and r.learning_rate == 3e-4 and r.timestep_fraction == 0.99
    r = TrainConfig().override(["loss.clip_range=2e-4", "train.learning_rate=1e-5", "sampler.noise_level=0.9", "loss.beta=0"]).resolved()
    assert r.preset.loss.clip_params["clip_range"] == 2e-4 and r.learning_rate == 1e-5 and r.preset.noise_level == 0.9
    assert r.preset.loss.beta == 0
    d = TrainConfig().override(["algorithm=dance_grpo"]).resolved()
    assert d.preset.kernel == "dance" and d.preset.share_initial_noise and d.timestep_selection == "random"


@pytest.mark.parametrize(
    "assignment,message",
    [
        ("train.num_generations=1", "num_generations"),
        ("algorithm=nope", "Known presets"),
        ("sampler.kernel=euler", "sampler.kernel 'euler' is unknown"),
        ("loss.timestep_fraction=1.5", "timestep_fraction"),
        ("train.mixed_precision=fp8", "train.mixed_precision must be one of"),
        ("sampler.num_steps=ten", "sampler.num_steps must be an integer"),
        ("reward.rewards={}", "reward.rewards is empty"),
        ("reward.rewards={clip: fast}", "weight must be a number"),
    ],
)
def test_bad_values_name_the_field(assignment, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig().override([assignment]).validate()


def test_unknown_keys_and_sections():
    with pytest.raises(ConfigError, match="did you mean 'num_steps'"):
        TrainConfig.from_dict({"sampler": {"num_step": 3}})
    with pytest.raises(ConfigError, match="is not a config section"):
        TrainConfig().override(["nosection.x=1"])
    with pytest.raises(ConfigError, match="key=value"):
        TrainConfig().override(["train.seed"])
