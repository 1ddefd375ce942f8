"""Quiet by default: third-party notices a user of this project cannot act on stay off the
console; `aploss -v` (APLOSS_VERBOSE=1, which Ray workers started by the run inherit) shows them."""
import logging
import os
import warnings

VERBOSE_VARIABLE = "APLOSS_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_VARIABLE, "") not in ("", "0")


def quiet_third_party() -> None:
    """Silence, in this process, what repeats every run without telling the user anything."""
    if verbose():
        return
    # MLflow on logging a pyfunc from code: advice on type hints and input examples for models
    # whose signature this project sets itself.
    warnings.filterwarnings("ignore", message=r".*(type hints to the `predict` method|input example was not "
                                              r"provided)", category=UserWarning)
    try:
        # Ray Train prints each ray.train.report() call in full ("Reporting training result N:
        # TrainingReport(...)"); the run's own step and validation lines say it better.
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
