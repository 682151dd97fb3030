"""Exceptions whose message is shown to the user as one line by the CLI (no traceback)."""


class DiffrlError(Exception):
    """Base class: the message names what is wrong and how to fix it."""


class ConfigError(DiffrlError, ValueError):
    """A config file, key, value or override is invalid."""


class DataError(DiffrlError, ValueError):
    """A data set, prompt file, image or video cannot be used."""


class CheckpointError(DiffrlError):
    """A checkpoint is missing, incomplete or belongs to another run."""


class RewardError(DiffrlError):
    """A reward cannot be loaded or returned unusable scores."""


class TrainingError(DiffrlError):
    """Training cannot continue (for example, too many consecutive non-finite steps)."""


class RewardFailed(TrainingError):
    """The reward could not score several steps in a row (a reward server that died): the trained weights are
    fine, so the run checkpoints its last good step before it stops."""


class TrainingInterrupted(DiffrlError):
    """The run stopped on SIGTERM (exit status 143) or Ctrl-C (130) after checkpointing its last finished step."""

    def __init__(self, message: str, exit_code: int = 143):
        super().__init__(message)
        self.exit_code = exit_code
