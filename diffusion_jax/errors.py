"""The exceptions a run ends with, by whose move it is (the CLI maps them to exit codes):

  * a user's mistake -- a bad setting, input or file -- is a `UsageError` (or FileNotFoundError,
    PermissionError for a path) whose message names the problem and the fix: exit code 2; any
    other ValueError is a bug and keeps its traceback;
  * `RunStopped`: the run stopped for a reason it states (a non-finite loss, divergence, a
    pre-emption, a workdir in use, no checkpoint it can use): exit code 1.
"""
from __future__ import annotations


class UsageError(ValueError):
    """A user's mistake: a setting, argument or input file that cannot be used, with the fix."""


class RunStopped(RuntimeError):
    """A run stopped for the reason its message states; nothing was lost."""


class NonFiniteLoss(RunStopped):
    """The loss became NaN or infinite, or the run diverged; the last good checkpoint is kept."""


class Preempted(RunStopped):
    """SIGTERM or SIGINT arrived; the state was saved and the same command resumes it."""


class WorkdirLocked(RunStopped):
    """Another trainer holds the workdir."""


class NoUsableCheckpoint(RunStopped):
    """The workdir had checkpoints and none of them could be restored."""


class CheckpointMismatch(UsageError):
    """The checkpoint in a workdir was written by a different model, config or optimizer."""
