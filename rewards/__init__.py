"""Reward models behind one protocol (``flowrl.rewards``), a registry, and plug-in loading.

Importing this package is cheap: the built-in model rewards import open_clip / transformers only
when constructed. See ``base.py`` for the protocol and docs/rewards.md for user docs.
"""

from __future__ import annotations

from .base import (
    COMBINE_MODES,
    ENTRY_POINT_GROUP,
    REWARDS,
    FunctionReward,
    Reward,
    RewardError,
    RewardSet,
    build_rewards,
    gdpo,
    get,
    group_zscore,
    register,
    resolve,
    weighted_sum,
)
from .pairwise import pairwise_win_rates, win_rates
from . import aesthetic, clip, compressibility, edit, geneval, hps, ocr, pickscore, serving, videoalign, vlm_judge  # noqa: F401,E402  (register built-ins; heavy deps load on construction)

__all__ = [
    "Reward",
    "register",
    "get",
    "resolve",
    "build_rewards",
    "RewardSet",
    "RewardError",
    "REWARDS",
    "FunctionReward",
    "win_rates",
    "pairwise_win_rates",
    "weighted_sum",
    "gdpo",
    "group_zscore",
    "COMBINE_MODES",
    "ENTRY_POINT_GROUP",
]
