"""Every error fastlm raises on purpose, under one base class.

The command lines (:mod:`fastlm.cli`) turn them into one ``error: ...`` line and an exit code
without importing the code that raises them. Errors about bad input are also ``ValueError``s, so
callers may catch either.

==================================  ===========================================================
:class:`FastLMError`                the base of everything below
:class:`InputError`                 bad input of any kind (exit code 2); base of the next eight
:class:`ConfigError`                an invalid model configuration (:class:`~fastlm.model.GPTConfig`)
:class:`ConfigFileError`            a bad ``--config`` file or flag value
:class:`TrainError`                 a bad training setting
:class:`DataError`                  a bad corpus, split or cache file
:class:`TokenizerError`             bad tokenizer input, file or spec
:class:`DeviceError`                a device or dtype that cannot be used here
:class:`CheckpointError`            a missing, corrupted, unsafe or incompatible checkpoint
:class:`HFError`                    a Hugging Face model that cannot be converted exactly, or a
                                    missing extra (a CheckpointError)
:class:`RunInUse`                   another process holds the run directory's lock
:class:`BackendUnavailableError`    an ops backend asked for by name cannot run here / this call
:class:`NonFiniteLoss`              the training loss became NaN or infinite (exit code 3)
:class:`TrainingInterrupted`        a signal stopped training after a checkpoint (exit 128 + N)
:class:`RankFailed`                 another rank of a distributed job failed
==================================  ===========================================================
"""

from __future__ import annotations

import signal
from pathlib import Path

__all__ = [
    "FastLMError",
    "InputError",
    "ConfigError",
    "ConfigFileError",
    "TrainError",
    "DataError",
    "TokenizerError",
    "DeviceError",
    "CheckpointError",
    "HFError",
    "RunInUse",
    "BackendUnavailableError",
    "NonFiniteLoss",
    "TrainingInterrupted",
    "RankFailed",
]


class FastLMError(Exception):
    """Base class of fastlm's errors."""


class InputError(FastLMError, ValueError):
    """Bad input: a setting, a file, a model directory (one line naming the problem)."""


class ConfigError(InputError):
    """An invalid model configuration (one line naming the field)."""


class ConfigFileError(InputError):
    """A bad config file or config value (one line)."""


class TrainError(InputError):
    """A bad training setting (one line)."""


class DataError(InputError):
    """A bad corpus, split or cache file (one line naming the file and the problem)."""


class TokenizerError(InputError):
    """Bad tokenizer input, file or spec."""


class DeviceError(InputError):
    """A device or dtype that cannot be used here (one line)."""


class CheckpointError(InputError):
    """A missing, truncated, corrupted, unsafe or incompatible checkpoint (one line)."""


class HFError(CheckpointError):
    """A model that cannot be converted exactly, a missing extra, a bad model directory (one line)."""


class RunInUse(InputError):
    """Another process trains (or exports) this run directory: "RUN is in use by pid N"."""


class BackendUnavailableError(FastLMError, RuntimeError):
    """A backend was requested explicitly but cannot run here (or cannot run this call)."""


class NonFiniteLoss(FastLMError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(FastLMError):
    """A signal (or a stop request with one) ended the run after saving a checkpoint."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        super().__init__(
            f"interrupted ({signal.Signals(signum).name}) at step {step}; continue with --resume {run_dir}"
        )
        self.signum, self.step, self.run_dir = signum, step, run_dir


class RankFailed(FastLMError):
    """Another rank of a distributed job failed (its error is printed by that rank)."""
