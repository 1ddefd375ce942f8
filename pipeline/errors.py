"""Errors a user can cause or meet, as opposed to bugs.

The CLI prints a `UserError` as one line naming what is wrong and exits non-zero; anything else
keeps its traceback, because it is this project's fault. Subclasses also derive from the
built-in error a caller would expect (ValueError, FileNotFoundError), so library callers can
catch them as such.
"""
import errno
from collections.abc import Iterator
from contextlib import contextmanager

# How a full disk reads in errors from the OS, pyarrow and SQLite (an MLflow store).
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_MESSAGES = ("No space left on device", "database or disk is full", "Disk quota exceeded")


def one_line(error: BaseException) -> str:
    """An error from outside this project (OS, MLflow, Ray) as one line for a message; a full
    disk's line wherever it is (SQLAlchemy's first line blames its autoflush)."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    full = [line for line in lines if any(message in line for message in _FULL_MESSAGES)]
    return f"{type(error).__name__}: {(full or lines or [''])[0]}"[:500]


def is_disk_full(error: BaseException) -> bool:
    return (isinstance(error, OSError) and error.errno in _FULL_ERRNOS) or any(
        message in str(error) for message in _FULL_MESSAGES)


@contextmanager
def naming_full_disk(where: object) -> Iterator[None]:
    """A full disk while writing `where` as NoSpace naming it (the OS's and pyarrow's errors
    name no file)."""
    try:
        yield
    except OSError as error:
        if is_disk_full(error):
            raise NoSpace(where) from error
        raise


class UserError(Exception):
    """A problem the user can fix: bad input or config, missing data, an unreachable service."""


class ConfigError(UserError, ValueError):
    """A configuration key is unknown, has the wrong type or an invalid value; the message names it."""


class DataError(UserError, ValueError):
    """Input or prepared data is missing, empty, malformed or not the data a run was trained on."""


class MissingInput(UserError, FileNotFoundError):
    """A file or directory a stage needs does not exist (yet): the message says which stage makes it."""


class TrainingDiverged(UserError):
    """A non-finite loss, gradient or weight: training stopped before saving a broken checkpoint.
    The message says how to go on: from the run's best validated checkpoint (`checkpoint`), as
    a new run (the diverged run keeps its records), with a lower learning rate than `lr`."""

    def __init__(self, step: int, term: str, value: float, checkpoint: str | None = None, run_name: str = "",
                 lr: float = 0.0):
        self.step, self.term, self.value, self.checkpoint = step, term, value, checkpoint
        lower = f"a lower optim.lr (e.g. optim.lr={lr / 10:g})" if lr else "a lower optim.lr"
        new_run = f"run.name={run_name}-2" if run_name else "another run.name"
        start = f" model.init={checkpoint}" if checkpoint else ""
        found = (f"its best validated checkpoint is {checkpoint}" if checkpoint
                 else "no checkpoint was validated before it")
        super().__init__(f"training diverged at step {step}: {term} is {value}; {found}. To go on"
                         f"{' from it' if checkpoint else ''}, rerun the same command with {new_run}{start} and "
                         f"{lower} or optim.grad_clip set")


class TrackingUnavailable(UserError):
    """The MLflow tracking server does not answer."""


class TrainingFailed(Exception):
    """A Ray Train run failed after its restarts; the message carries the workers' error in one
    line and `causes` the errors as the workers raised them. Not a UserError: whether it is the
    user's to fix depends on those causes (the CLI keeps a bug's traceback), and a worker's own
    UserError is raised as `WorkerRefused` instead."""

    def __init__(self, message: str, causes: tuple[BaseException, ...] = ()) -> None:
        super().__init__(message)
        self.causes = causes


class WorkerRefused(UserError):
    """A Ray Train worker stopped at a user error (input, config) on every restart."""


class NoSpace(UserError, OSError):
    """A write failed on a full disk (or quota). What was being written is gone, not left
    half-written: the same command resumes from the last whole checkpoint once there is room."""

    def __init__(self, where: object) -> None:
        self.where = str(where)
        super().__init__(f"no space left on {self.where}: free some space there, or set run.output_dir to a "
                         "larger disk, then rerun the same command to resume")
