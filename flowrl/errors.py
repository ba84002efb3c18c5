"""The error types every layer may raise (the bottom of the package: imports nothing of flowrl)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the fix."""


class NonFiniteUpdateError(FloatingPointError):
    """More optimizer steps than ``train.max_nonfinite_updates`` had NaN/inf log-probs, loss or gradients."""
