"""The error types every layer may raise (the bottom of the package: imports nothing of flowrl)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the fix."""


class NonFiniteUpdateError(FloatingPointError):
    """More optimizer steps than ``train.max_nonfinite_updates`` had NaN/inf log-probs, loss or gradients."""


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT arrived: the run saved a checkpoint after the iteration in progress and
    stopped (:mod:`flowrl.preemption`). The CLI prints the message and exits with 128 + the signal
    number."""

    def __init__(self, signal_name: str, iteration: int, checkpoint: object):
        self.signal_name, self.iteration, self.checkpoint = signal_name, iteration, checkpoint
        super().__init__(
            f"stopped by {signal_name} after iteration {iteration}; checkpoint saved to {checkpoint}. "
            "Resume exactly with the same command plus --set train.resume_from=latest."
        )

    @property
    def exit_code(self) -> int:
        import signal

        sig = getattr(signal, self.signal_name, None) if self.signal_name.startswith("SIG") else None
        return 128 + int(sig if sig is not None else signal.SIGTERM)
