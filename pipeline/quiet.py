"""Quiet by default: third-party notices a user of this project cannot act on stay off the
console; `aploss -v` (APLOSS_VERBOSE=1, which Ray workers started by the run inherit) shows them."""
import importlib.util
import logging
import os
import re
import warnings

VERBOSE_VARIABLE = "APLOSS_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_VARIABLE, "") not in ("", "0")


def ray_log_level() -> str:
    """The level of the Python loggers in the Ray processes a run starts (Train's controller and
    workers): their resource and worker-group notes are INFO."""
    return "INFO" if verbose() else "WARNING"


# MLflow on logging a pyfunc from code (advice on type hints and input examples for a model whose
# signature this project sets) and on the prepared shards logged as datasets.
MLFLOW_ADVICE = (r".*(type hints to the `predict` method|input example was not provided|source can be interpreted "
                 r"in multiple ways|Inferred schema contains integer column)")


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


# Ray's loggers are named by its internal modules, which a Ray upgrade may move: they are named
# here alone, and tests/test_cli.py checks that each module is still in the installed Ray.
# Each with the messages dropped from it (filters, since Ray Train's logging.config.dictConfig
# resets the levels of the loggers under its own):
RAY_INTERNAL_LOGGERS = {
    # the note that token authentication is on, as it should be (its warning that it is off stays)
    "ray._private.authentication.authentication_token_setup": r"Token authentication is enabled",
    # where Ray Train restarts the workers, a worker's error and the worker group's shutdown after
    # it, each with a traceback: the run says it in one line (`ray_train.run_worker`)
    "ray.train.v2._internal.util": r"Error in training function",
    "ray.train.v2._internal.callbacks.backend_setup": r"Graceful shutdown of backend failed",
}
# Ray Train prints each ray.train.report() call in full ("Reporting training result N:
# TrainingReport(...)"); the run's own step and validation lines say it better. That module's
# logger is named by its file, found without importing Ray (help and `config show` do not).
RAY_REPORT_MODULE = "ray.train.v2._internal.execution.context"
_RAY_FILTERS = {name: _DropMessages(messages) for name, messages in RAY_INTERNAL_LOGGERS.items()}


def quiet_third_party() -> None:
    """Silence, in this process, what repeats every run without telling the user anything."""
    if verbose():
        return
    warnings.filterwarnings("ignore", message=MLFLOW_ADVICE, category=UserWarning)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial ... tables"
    logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)  # "Validating input example against ..."
    # Ray Train's notes on moving the model, wrapping it in DDP and persisting each checkpoint.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    for name, dropped in _RAY_FILTERS.items():
        logging.getLogger(name).addFilter(dropped)  # once: a logger keeps one of each filter
    ray = importlib.util.find_spec("ray")
    if ray is not None and ray.origin:
        parts = RAY_REPORT_MODULE.split(".")[1:]
        report = os.path.join(os.path.dirname(ray.origin), *parts[:-1], parts[-1] + ".py")
        logging.getLogger(report).setLevel(logging.WARNING)
