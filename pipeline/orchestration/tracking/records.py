"""What each stage logs to its MLflow run: params (a run keeps those it was started with),
metrics and artifacts (copied locally first from an object store)."""
import contextlib
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param

from pipeline.config import Config, flatten
from pipeline.errors import ConfigError
from pipeline.redaction import redact, redact_tree
from pipeline.storage import Location, Where

if TYPE_CHECKING:  # torch's: a finished run's rerun loads neither
    from pipeline.evaluation.evaluate import Evaluation

# What one log_batch call may carry, as MLflow's REST API documents it.
MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH = 1000, 100


def param_safe(config: Config) -> dict[str, str]:
    params = {key: redact(str(value)) for key, value in flatten(config).items()}
    # The root the data came from, where APLOSS_DATA_ROOT (or the default) chose it.
    params["data.root"] = redact(config.data.root_location())
    return params


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


def log_train_params(config: Config) -> None:
    _log_params(mlflow.active_run().info.run_id, param_safe(config), config.run.name)


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


def log_anchor_recall(recall: dict) -> None:
    """The anchor recall per class (pipeline.data.anchors) as metrics of the active run."""
    mlflow.log_metrics({f"anchor_recall_{name}": value.recall for name, value in recall.items()})


def log_checkpoints(checkpoints: list[tuple[int, float | None, str]]) -> None:
    """Where a finished training's checkpoints (step, validation AP, path) are, as the active
    run's checkpoints.json: a reference, not a second copy (the best weights are the registered
    model's artifact)."""
    mlflow.log_dict({"checkpoints": [{"step": step, "val_ap": score, "path": redact(path)}
                                     for step, score, path in checkpoints]}, "checkpoints.json")


@contextlib.contextmanager
def _local_copy(path: Where) -> Iterator[str]:
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


def _log_artifact(path: Where, artifact_path: str | None = None, run_id: str | None = None) -> None:
    with _local_copy(path) as local:
        if run_id is None:
            mlflow.log_artifact(local, artifact_path=artifact_path)
        else:
            mlflow.MlflowClient().log_artifact(run_id, local, artifact_path)


def log_sweep_result(sweep_run_id: str, best_config_path: Where, best_params: dict, metric: str,
                     value: float) -> None:
    client = mlflow.MlflowClient()
    _log_artifact(best_config_path, run_id=sweep_run_id)
    client.log_batch(sweep_run_id, metrics=[Metric(f"best_{metric}", value, int(time.time() * 1000), 0)],
                     params=[Param(f"best.{key}", str(value)) for key, value in best_params.items()])


def _evaluation_metrics(evaluation: "Evaluation") -> dict[str, float]:
    result = evaluation.result
    metrics = {name: value for name, value in result.metrics.items() if not math.isnan(value)}
    metrics |= {f"AP_{name}": value for name, value in result.per_class_ap.items() if not math.isnan(value)}
    metrics |= {f"AP50_{name}": value for name, value in result.per_class_ap50.items() if not math.isnan(value)}
    return metrics


def log_test_metrics(parent_id: str, evaluation: "Evaluation") -> None:
    """The test metrics on the parent run too, beside its headline params."""
    mlflow.MlflowClient().log_batch(parent_id, metrics=[
        Metric(key, value, int(time.time() * 1000), 0) for key, value in _evaluation_metrics(evaluation).items()])


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
