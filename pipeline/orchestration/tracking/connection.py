"""Where MLflow is: a tracking URI's credentials handed to MLflow's own variables (MLflow prints
and keeps the URIs it is given), the server's health checked within seconds, the experiment."""
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from pipeline.config import Config
from pipeline.errors import TrackingUnavailable
from pipeline.redaction import credentials, redact

_URI_VARIABLE = "MLFLOW_TRACKING_URI"
# A local store's URI: SQLAlchemy's, whose path follows (absolute with a fourth slash).
SQLITE = "sqlite:///"


def connect(uri: str) -> str:
    """`uri` as MLflow's client is given it: user info (https://user:token@host) moves into
    MLflow's own credential variables, since MLflow prints and keeps the URIs it is handed."""
    bare, user, password = credentials(uri)
    if user is not None and password is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = user, password
    elif user is not None:
        os.environ["MLFLOW_TRACKING_TOKEN"] = user
    return bare


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """TrackingUnavailable within `timeout` seconds if an http(s) tracking server does not
    answer its health check: MLflow's own client would retry for minutes before failing."""
    if not uri.startswith(("http://", "https://")):
        return
    uri = credentials(uri)[0]
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError as error:
        if error.code < 500:  # answering, if not with a health page (a proxy, an older server)
            return
        reason = f"HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        reason = str(getattr(error, "reason", error))
    raise TrackingUnavailable(f"MLflow tracking server {redact(uri)} is unreachable ({reason}); start it, or set "
                              "tracking.uri (or MLFLOW_TRACKING_URI) to one that runs")


def configure(config: Config) -> str:
    """Point MLflow at the config's store and experiment; returns the experiment id."""
    check_reachable(config.tracking_uri())
    exported = os.environ.get(_URI_VARIABLE)
    mlflow.set_tracking_uri(connect(config.tracking_uri()))
    # set_tracking_uri also exports the URI as $MLFLOW_TRACKING_URI, which Config.tracking_uri()
    # reads as the user's choice: left there, it would redirect every later config of this process.
    if exported is None:
        os.environ.pop(_URI_VARIABLE, None)
    else:
        os.environ[_URI_VARIABLE] = exported
    experiment = _experiment(config)
    if experiment is not None:
        return experiment.experiment_id
    # With a local store, keep artifacts beside it rather than in the working directory (the
    # default store is run.output_dir's, a store of one's own may sit beside outputs in an object
    # store); a tracking server keeps them in its own artifact store.
    location = None
    if config.tracking_uri().startswith(SQLITE):
        store = Path(config.tracking_uri().removeprefix(SQLITE)).resolve()
        location = (store.parent / config.run.outputs().mlflow_artifacts.name).as_uri()
    return mlflow.create_experiment(config.tracking.experiment, artifact_location=location)


def _experiment(config: Config) -> mlflow.entities.Experiment | None:
    """The config's experiment, or None; TrackingUnavailable naming the URI when what answers
    there is not an MLflow tracking server (a web server's 404 page for MLflow's REST API)."""
    try:
        return mlflow.get_experiment_by_name(config.tracking.experiment)
    except MlflowException as error:
        status = re.search(r"failed with error code (\d+) != 200", str(error))
        if status is None or status.group(1) != "404":
            raise
        raise TrackingUnavailable(f"{redact(config.tracking_uri())} answers, but not as an MLflow tracking server "
                                  "(HTTP 404 for its REST API): set tracking.uri (or MLFLOW_TRACKING_URI) to the "
                                  "server's address, with its path if it is served under one") from None
