"""MLflow records of the pipeline: one parent run per pipeline run name, a child run per stage.

A stage whose child run finished (and whose outputs exist) is skipped on rerun; an unfinished
one is reopened, so a rerun resumes the same runs rather than scattering new ones.
"""
import contextlib
import hashlib
import importlib.metadata
import io
import math
import os
import re
import tempfile
import threading
import time
import types
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param, Run
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH as MAX_PARAMS_PER_BATCH
from PIL import Image

import aploss
import pipeline
from pipeline.config import Config, flatten
from pipeline.data.shards import read_manifest
from pipeline.errors import ConfigError, DataError, MissingInput, TrackingUnavailable, UserError, one_line
from pipeline.model_source import is_registered
from pipeline.redaction import credentials, redact, redact_tree
from pipeline.storage import Location
from pipeline.training.journal import CURVES, read_journal

if TYPE_CHECKING:  # torch's: a finished run's rerun loads neither
    from pipeline.evaluation.evaluate import Evaluation

RUN_NAME_TAG = "aploss.run_name"
_URI_VARIABLE = "MLFLOW_TRACKING_URI"
STAGE_TAG = "aploss.stage"
# The registered model carries this project's code, to load where aploss is not installed.
_PACKAGE_CODE = [str(Path(package.__file__).resolve().parent) for package in (aploss, pipeline)]
# Not imported here: MLflow runs it when it loads the model.
_REGISTERED_MODEL_CODE = str(Path(__file__).resolve().with_name("registered_model.py"))


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
    # With the local default store, keep artifacts beside it rather than in the working directory;
    # a tracking server keeps them in its own artifact store.
    location = None
    if config.tracking_uri().startswith("sqlite:"):
        location = Path(config.run.outputs().mlflow_artifacts).as_uri()
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


def _find(experiment_id: str, filter_string: str) -> Run | None:
    runs = mlflow.search_runs([experiment_id], filter_string=filter_string, output_format="list",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def pipeline_run(config: Config, experiment_id: str, stage: str = "pipeline") -> str:
    """The id of the parent run (`stage` pipeline or sweep) for `run.name`, created on first use."""
    found = _find(experiment_id, f"tags.`{RUN_NAME_TAG}` = '{config.run.name}' and tags.`{STAGE_TAG}` = '{stage}'")
    if found:
        return found.info.run_id
    client = mlflow.MlflowClient()
    name = f"{config.run.name}-{stage}" if stage != "pipeline" else config.run.name
    run = client.create_run(experiment_id, run_name=name,
                            tags={RUN_NAME_TAG: config.run.name, STAGE_TAG: stage})
    client.log_dict(run.info.run_id, {"config": param_safe(config)}, "config.json")
    return run.info.run_id


def stage_run(experiment_id: str, parent_id: str, stage: str) -> tuple[str, bool]:
    """(run id, finished) of `stage` under the parent: an existing child run, or a new one."""
    found = _find(experiment_id, f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{STAGE_TAG}` = '{stage}'")
    if found:
        return found.info.run_id, found.info.status == "FINISHED"
    run = mlflow.MlflowClient().create_run(experiment_id, run_name=stage,
                                           tags={"mlflow.parentRunId": parent_id, STAGE_TAG: stage})
    return run.info.run_id, False


@contextlib.contextmanager
def active(run_id: str):
    """Log to run `run_id` inside the block (`mlflow.start_run` reopening it); the run ends
    FINISHED with the block, FAILED when it raises, KILLED when interrupted (Ctrl-C)."""
    with mlflow.start_run(run_id=run_id):
        try:
            yield
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")
            raise


def finish(run_id: str, failed: bool = False, tracking_uri: str | None = None) -> None:
    client = mlflow.MlflowClient(tracking_uri and connect(tracking_uri))
    client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


@contextlib.contextmanager
def parent_run(run_id: str):
    """A parent run (pipeline, sweep) around its stages: ended FINISHED when the block ran a
    stage, untouched when every stage was skipped (a rerun leaves a finished run as it was),
    FAILED when it raises and KILLED when interrupted. The block says whether it ran anything
    by setting `.ran` on what it is given."""
    state = types.SimpleNamespace(ran=False)
    client = mlflow.MlflowClient()
    try:
        yield state
    except KeyboardInterrupt:
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    if state.ran or client.get_run(run_id).info.status != "FINISHED":
        client.set_terminated(run_id, "FINISHED")


# What the runs table shows of every pipeline run, to compare them at a glance.
HEADLINE_PARAMS = ("data.dataset", "data.root", "model.arch", "model.init", "loss.classification", "optim.lr",
                   "train.batch_size", "train.seed", "ray.workers")


def log_headline(parent_id: str, config: Config, steps: int) -> None:
    """The headline params of the config that trained (dataset and the data root actually
    used, architecture, loss and its delta schedule, learning rate, steps, seed)."""
    params = param_safe(config)
    headline = {key: params[key] for key in HEADLINE_PARAMS}
    headline |= {"loss.delta": str(config.loss.delta.build()), "train.steps": str(steps)}
    _log_params(parent_id, headline, config.run.name)


def _log_params(run_id: str, params: dict[str, str], run_name: str) -> None:
    """`params` on the run, or ConfigError naming those it holds with other values: MLflow keeps
    a run's params as first logged (a rerun of a run with other settings, as after a divergence)."""
    client = mlflow.MlflowClient()
    logged = client.get_run(run_id).data.params
    changed = [f"{key}: {logged[key]} -> {value}" for key, value in params.items()
               if key in logged and logged[key] != value]
    if changed:
        raise ConfigError(f"run '{run_name}' was started with other settings ({', '.join(changed)}), and a run "
                          "keeps its settings: choose another run.name")
    new = [Param(key, value) for key, value in params.items() if key not in logged]
    for start in range(0, len(new), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=new[start:start + MAX_PARAMS_PER_BATCH])


def log_test_metrics(parent_id: str, evaluation: "Evaluation") -> None:
    """The test metrics on the parent run too, beside its headline params."""
    mlflow.MlflowClient().log_batch(parent_id, metrics=[
        Metric(key, value, int(time.time() * 1000), 0) for key, value in _evaluation_metrics(evaluation).items()])


def trial_run(tracking_uri: str, experiment_id: str, sweep_run_id: str, config: Config) -> str:
    """The child run of a sweep for one trial, its whole config as params in one batch; the
    same run again for a trial a resumed sweep runs on."""
    client = mlflow.MlflowClient(connect(tracking_uri))
    earlier = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{sweep_run_id}' and "
                                                  f"tags.`mlflow.runName` = '{config.run.name}'")
    if earlier:
        client.update_run(earlier[0].info.run_id, status="RUNNING")
        return earlier[0].info.run_id
    run_id = client.create_run(experiment_id, run_name=config.run.name,
                               tags={"mlflow.parentRunId": sweep_run_id, STAGE_TAG: "trial"}).info.run_id
    client.log_batch(run_id, params=[Param(key, value) for key, value in param_safe(config).items()])
    return run_id


def end_trials(sweep_run_id: str, outcomes: dict[str, tuple[str, float | None]],
               metrics_of: Callable[[str], Location]) -> None:
    """Set each trial run of the sweep (by run name) to its (status, end time in seconds), after
    sending what its metrics journal (`metrics_of(name)`) holds beyond MLflow: a trial Tune
    stopped was ended with its forwarder, which may not have sent its last validations."""
    client = mlflow.MlflowClient()
    experiment = client.get_run(sweep_run_id).info.experiment_id
    for run in client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{sweep_run_id}' "
                                                f"and tags.`{STAGE_TAG}` = 'trial'"):
        if run.info.run_name in outcomes:
            journal = metrics_of(run.info.run_name)
            if journal.exists():
                MetricsForwarder(journal, run.info.run_id, mlflow.get_tracking_uri()).send()
            status, ended = outcomes[run.info.run_name]
            client.set_terminated(run.info.run_id, status, end_time=int(ended * 1000) if ended else None)


@contextlib.contextmanager
def _local_copy(path: Path | Location) -> Iterator[str]:
    """`path` as a local file, as MLflow logs artifacts from: itself, or a copy of an object
    store's file under the same name."""
    location = Location(path)
    if not location.remote:
        yield str(location)
        return
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / location.name
        local.write_bytes(location.read_bytes())
        yield str(local)


def _log_artifact(path: Path | Location, artifact_path: str | None = None, run_id: str | None = None) -> None:
    with _local_copy(path) as local:
        if run_id is None:
            mlflow.log_artifact(local, artifact_path=artifact_path)
        else:
            mlflow.MlflowClient().log_artifact(run_id, local, artifact_path)


def log_sweep_result(sweep_run_id: str, best_config_path: Path | Location, best_params: dict, metric: str,
                     value: float) -> None:
    client = mlflow.MlflowClient()
    _log_artifact(best_config_path, run_id=sweep_run_id)
    client.log_batch(sweep_run_id, metrics=[Metric(f"best_{metric}", value, int(time.time() * 1000), 0)],
                     params=[Param(f"best.{key}", str(value)) for key, value in best_params.items()])


def log_checkpoints(checkpoints: list[tuple[int, float | None, str]]) -> None:
    """Where a finished training's checkpoints (step, validation AP, path) are, as the active
    run's checkpoints.json: a reference, not a second copy (the best weights are the registered
    model's artifact)."""
    mlflow.log_dict({"checkpoints": [{"step": step, "val_ap": score, "path": redact(path)}
                                     for step, score, path in checkpoints]}, "checkpoints.json")


@dataclass
class PipelineRecord:
    """What MLflow holds of one pipeline run: its stage runs by stage name."""

    name: str
    stages: dict[str, Run]

    def artifact(self, stage: str, path: str, directory: str) -> Path:
        return Path(mlflow.MlflowClient().download_artifacts(self.stages[stage].info.run_id, path, directory))


def pipeline_records(experiment_id: str, names: list[str]) -> list[PipelineRecord]:
    """The pipeline runs `names` (all of the experiment's if none), with their stage runs;
    UserError naming the runs that are not there."""
    client = mlflow.MlflowClient()
    parents = client.search_runs([experiment_id], f"tags.`{STAGE_TAG}` = 'pipeline'")
    by_name = {run.data.tags[RUN_NAME_TAG]: run for run in parents}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise UserError(f"no pipeline run named {missing} in the experiment; found: {sorted(by_name)}")
    records = []
    for name in names or sorted(by_name):
        children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{by_name[name].info.run_id}'")
        records.append(PipelineRecord(name, {run.data.tags[STAGE_TAG]: run for run in children}))
    return records


def param_safe(config: Config) -> dict[str, str]:
    params = {key: redact(str(value)) for key, value in flatten(config).items()}
    # The root the data came from, where APLOSS_DATA_ROOT (or the default) chose it.
    params["data.root"] = redact(config.data.root_location())
    return params


def log_prep(manifest: dict, prepared_dir: Path) -> None:
    """The manifest, and each split's shards as a dataset input (name, source, digest)."""
    mlflow.log_dict(redact_tree(manifest), "manifest.json")
    mlflow.log_params({"dataset": manifest["dataset"], "classes": ",".join(manifest["classes"]),
                       "input_hash": manifest["input_hash"]})
    for split, summary in manifest["splits"].items():
        shards = pd.DataFrame(summary["shards"])
        dataset = mlflow.data.from_pandas(shards, source=redact(str(prepared_dir / split)),
                                          name=f"{manifest['dataset']}-{split}", digest=manifest["content_hash"][:36])
        mlflow.log_input(dataset, context=split)
        mlflow.log_metrics({f"{split}_images": summary["images"], f"{split}_boxes": summary["boxes"],
                            f"{split}_dropped": len(summary["dropped"]), f"{split}_skipped": len(summary["skipped"])})


def fetch_model(uri: str, tracking_uri: str, target: Path | Location, setting: str) -> None:
    """The model.pt a registered model of this project holds (models:/NAME@ALIAS, runs:/...),
    downloaded to `target`; errors name the `setting` that gave the URI."""
    mlflow.set_tracking_uri(connect(tracking_uri))
    with tempfile.TemporaryDirectory() as scratch:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=scratch))
        except MlflowException as error:
            raise MissingInput(f"{setting}={uri}: {one_line(error)}") from None
        weights = local / "artifacts" / "model.pt"  # the registered model's artifact (log_model)
        if not weights.is_file():
            raise DataError(f"{setting}={uri}: not a model of this project (no artifacts/model.pt)")
        Location(target).write_bytes(weights.read_bytes())


def fetch_source(spec: str, config: Config, setting: str) -> None:
    """When `spec` (what `setting` gave) is an MLflow model URI, download the model.pt it holds
    to where `model_source.model_file` finds it: workers read files, not the registry, and the
    config keeps the URI it was given. Fetched every time: an alias moves."""
    if is_registered(spec):
        fetch_model(spec, config.tracking_uri(), config.run.outputs().fetched_model(spec), setting)


def log_anchor_recall(recall: dict) -> None:
    """The anchor recall per class (pipeline.data.anchors) as metrics of the active run."""
    mlflow.log_metrics({f"anchor_recall_{name}": value.recall for name, value in recall.items()})


def log_train_params(config: Config) -> None:
    _log_params(mlflow.active_run().info.run_id, param_safe(config), config.run.name)


class MetricsForwarder:
    """Sends a training run's metrics journal to its MLflow run from a background thread, so
    that training never waits on the tracking server and never fails because of it.

    What MLflow already holds is asked once per key (the highest step logged), so a resumed or
    rerun stage sends each step once, including what an earlier attempt could not send. While
    the server is away, sending is retried with a growing pause; `close` makes a last attempt
    within `flush_seconds` and says what stayed behind in the journal.
    """

    def __init__(self, journal: Path | Location, run_id: str, tracking_uri: str, interval: float = 2.0,
                 flush_seconds: float = 15.0, keys: tuple[str, ...] = (*CURVES, "val_ap")) -> None:
        self.journal, self.run_id, self.tracking_uri = Location(journal), run_id, connect(tracking_uri)
        self.interval, self.flush_seconds, self.keys = interval, flush_seconds, keys
        self.sent_through: dict[str, int] | None = None  # key -> highest step MLflow holds
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)

    def __enter__(self) -> "MetricsForwarder":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _run(self) -> None:
        pause = self.interval
        while True:
            stopping = self._stop.is_set()
            try:
                self.send()
                self.error, pause = None, self.interval
            except Exception as error:  # noqa: BLE001 -- whatever the server or network does, training goes on
                self.error, pause = error, min(pause * 2, 30.0)
            if stopping:
                return
            self._stop.wait(pause)

    def pending(self) -> list[Metric]:
        """The journal's values MLflow does not hold yet."""
        client = mlflow.MlflowClient(self.tracking_uri)
        if self.sent_through is None:
            self.sent_through = {key: max((m.step for m in client.get_metric_history(self.run_id, key)), default=0)
                                 for key in self.keys}
        return [Metric(key, float(record[key]), int(record.get("time", 0) * 1000), record["step"])
                for record in read_journal(self.journal) for key in self.keys
                if key in record and record["step"] > self.sent_through[key]]

    def send(self) -> None:
        metrics = self.pending()
        client = mlflow.MlflowClient(self.tracking_uri)
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            batch = metrics[start:start + MAX_METRICS_PER_BATCH]
            client.log_batch(self.run_id, metrics=batch)
            for metric in batch:
                self.sent_through[metric.key] = max(self.sent_through[metric.key], metric.step)

    def close(self) -> None:
        """One last attempt, then a note of whatever could not be sent."""
        self._stop.set()
        self._thread.join(self.flush_seconds)
        if self.error is not None or self._thread.is_alive():
            reason = one_line(self.error) if self.error is not None else "no answer"
            print(f"warning: MLflow at {redact(self.tracking_uri)} did not take every training metric ({reason}); "
                  f"they are kept in {self.journal}, and the next run of this stage sends what is missing",
                  flush=True)


# What the registered model takes and gives (registered_model.py): encoded images in, per image
# the boxes (xyxy pixels), scores, 0-based labels and class names out.
MODEL_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.binary, "image")]),
    outputs=Schema([ColSpec(Array(Array(DataType.double)), "boxes"), ColSpec(Array(DataType.double), "scores"),
                    ColSpec(Array(DataType.long), "labels"), ColSpec(Array(DataType.string), "names")]))
# The version with the best test AP; the newest is MLflow's own models:/NAME/latest (an alias
# may not be called `latest`).
CHAMPION = "champion"
TEST_AP_TAG = "test_AP"


def _input_example() -> pd.DataFrame:
    """One small encoded image, as a request carries it."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 96, 160)).save(buffer, format="png")
    return pd.DataFrame({"image": [buffer.getvalue()]})


def registered_name(config: Config) -> str:
    """`tracking.registered_model`, or by default one registered model per dataset, so that a
    dataset's `champion` is always a detector of its classes: aploss-<dataset> for a named one,
    aploss-<coco|voc>-<8 hex of its class names> for data of your own."""
    if config.tracking.registered_model:
        return config.tracking.registered_model
    if config.data.dataset not in ("coco", "voc"):
        return f"aploss-{config.data.dataset}"
    classes = "\n".join(read_manifest(config.data.prepared)["classes"])
    return f"aploss-{config.data.dataset}-{hashlib.sha256(classes.encode()).hexdigest()[:8]}"


def log_model(model_path: Path | Location, config: Config) -> None:
    """The trained detector (a run's model.pt) registered in the model registry as a pyfunc
    model logged from code: its weights load without unpickling code, and the package's source
    travels with it, so it serves where aploss is not installed. `config` is bound to the
    prepared data it trained on."""
    with _local_copy(model_path) as weights:
        mlflow.pyfunc.log_model(name="model", python_model=_REGISTERED_MODEL_CODE, artifacts={"detector": weights},
                                code_paths=_PACKAGE_CODE, pip_requirements=_requirements(),
                                signature=MODEL_SIGNATURE, input_example=_input_example(),
                                registered_model_name=registered_name(config))


def promote(config: Config, train_run_id: str, test_ap: float) -> None:
    """Record the test AP of the versions a training run registered, and point `champion` at
    the version with the best test AP of the registered model."""
    client, name = mlflow.MlflowClient(), registered_name(config)
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{train_run_id}'"):
        client.set_model_version_tag(name, version.version, TEST_AP_TAG, str(test_ap))
    scored = [(float(version.tags[TEST_AP_TAG]), int(version.version))
              for version in client.search_model_versions(f"name = '{name}'") if TEST_AP_TAG in version.tags]
    if scored:
        client.set_registered_model_alias(name, CHAMPION, str(max(scored)[1]))


def _requirements() -> list[str]:
    """What the served model imports, pinned to this environment (stated rather than inferred:
    inference loads the model in a subprocess, seconds of work at every registration)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in ("mlflow", "torch", "torchvision", "pyyaml")]


def _evaluation_metrics(evaluation: "Evaluation") -> dict[str, float]:
    result = evaluation.result
    metrics = {name: value for name, value in result.metrics.items() if not math.isnan(value)}
    metrics |= {f"AP_{name}": value for name, value in result.per_class_ap.items() if not math.isnan(value)}
    metrics |= {f"AP50_{name}": value for name, value in result.per_class_ap50.items() if not math.isnan(value)}
    return metrics


# What an evaluation depends on beside the model: the evaluate run's params.
EVALUATION_PARAMS = ("data.dataset", "data.root", "eval.split", "model.min_size", "model.max_size",
                     "model.score_thresh", "model.nms_thresh", "model.detections_per_image")


def log_evaluation(evaluation: "Evaluation", config: Config) -> None:
    params = param_safe(config)
    mlflow.log_params({key: params[key] for key in EVALUATION_PARAMS}
                      | {"eval.split": config.eval.split or config.data.test_split})
    mlflow.log_metrics(_evaluation_metrics(evaluation))
    _log_artifact(evaluation.detections_path)
    _log_artifact(evaluation.metrics_path)
    for path in evaluation.pr_curves:
        _log_artifact(path, "pr_curves")
    for path in evaluation.samples:
        _log_artifact(path, "samples")


def log_robustness(result, paths: list[Path]) -> None:
    """The robustness table (an MLflow table), P / mPC / rPC as metrics, the files as artifacts."""
    mlflow.log_table({"setting": list(result.ap), "AP": list(result.ap.values())}, "robustness_table.json")
    summary = {"P": result.clean_ap, "mPC": result.mpc, "rPC": result.rpc}
    mlflow.log_metrics({key: value for key, value in summary.items() if value is not None})
    for path in paths:
        _log_artifact(path, "robustness")
