"""MLflow records of the pipeline: one parent run per pipeline run name, a child run per stage.

A stage whose child run finished (and whose outputs exist) is skipped on rerun; an unfinished
one is reopened, so a rerun resumes the same runs rather than scattering new ones.
"""
import json
import math
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric, Run
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pipeline.config import Config, flatten
from pipeline.evaluate import Evaluation

RUN_NAME_TAG = "aploss.run_name"
_URI_VARIABLE = "MLFLOW_TRACKING_URI"
STAGE_TAG = "aploss.stage"
_AP_LOSS_CODE = str(Path(__file__).resolve().parents[1] / "aploss")


def configure(config: Config) -> str:
    """Point MLflow at the config's store and experiment; returns the experiment id."""
    exported = os.environ.get(_URI_VARIABLE)
    mlflow.set_tracking_uri(config.tracking_uri())
    # set_tracking_uri also exports the URI as $MLFLOW_TRACKING_URI, which Config.tracking_uri()
    # reads as the user's choice: left there, it would redirect every later config of this process.
    if exported is None:
        os.environ.pop(_URI_VARIABLE, None)
    else:
        os.environ[_URI_VARIABLE] = exported
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    # With the local default store, keep artifacts beside it rather than in the working directory.
    location = None
    if not config.tracking.uri:
        location = (Path(config.run.output_dir).expanduser().resolve() / "mlartifacts").as_uri()
    return mlflow.create_experiment(config.tracking.experiment, artifact_location=location)


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
    run = client.create_run(experiment_id, run_name=f"{config.run.name}-{stage}" if stage != "pipeline" else config.run.name,
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


def param_safe(config: Config) -> dict[str, str]:
    return {key: str(value) for key, value in flatten(config).items()}


def log_prep(manifest: dict, prepared_dir: Path) -> None:
    """The manifest, and each split's shards as a dataset input (name, source, digest)."""
    mlflow.log_dict(manifest, "manifest.json")
    mlflow.log_params({"dataset": manifest["dataset"], "classes": ",".join(manifest["classes"]),
                       "input_hash": manifest["input_hash"]})
    for split, summary in manifest["splits"].items():
        shards = pd.DataFrame(summary["shards"])
        dataset = mlflow.data.from_pandas(shards, source=str(prepared_dir / split),
                                          name=f"{manifest['dataset']}-{split}", digest=manifest["content_hash"][:36])
        mlflow.log_input(dataset, context=split)
        mlflow.log_metrics({f"{split}_images": summary["images"], f"{split}_boxes": summary["boxes"],
                            f"{split}_dropped": len(summary["dropped"]), f"{split}_skipped": len(summary["skipped"])})


def log_train_params(config: Config) -> None:
    mlflow.log_params(param_safe(config))


def log_training_curves(metrics_path: Path, keys: tuple[str, ...]) -> None:
    """The per-step `keys` (and validation AP) of an in-process training's metrics.jsonl, as the
    Ray workers' rank 0 logs them while training."""
    history = []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        history += [Metric(key, record[key], 0, record["step"]) for key in (*keys, "val_ap") if key in record]
    client, run_id = mlflow.MlflowClient(), mlflow.active_run().info.run_id
    for start in range(0, len(history), 1000):  # MLflow's cap on metrics per batch
        client.log_batch(run_id, metrics=history[start:start + 1000])


def log_model(model, config: Config) -> None:
    """The trained detector, pickled with the aploss code, registered in the model registry."""
    # Inputs are lists of images of any size and outputs per-image dicts, which torch.export
    # (MLflow's default pt2 format) cannot trace: the signature documents one image.
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (3, -1, -1), "image")]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 4), "boxes"),
                                               TensorSpec(np.dtype(np.float32), (-1,), "scores"),
                                               TensorSpec(np.dtype(np.int64), (-1,), "labels")]))
    mlflow.pytorch.log_model(model.cpu(), name="model", serialization_format="pickle", code_paths=[_AP_LOSS_CODE],
                             signature=signature, registered_model_name=config.tracking.registered_model)


def log_evaluation(evaluation: Evaluation) -> None:
    result = evaluation.result
    metrics = {name: value for name, value in result.metrics.items() if not math.isnan(value)}
    metrics |= {f"AP_{name}": value for name, value in result.per_class_ap.items() if not math.isnan(value)}
    metrics |= {f"AP50_{name}": value for name, value in result.per_class_ap50.items() if not math.isnan(value)}
    mlflow.log_metrics(metrics)
    mlflow.log_artifact(str(evaluation.detections_path))
    mlflow.log_artifact(str(evaluation.metrics_path))
    for path in evaluation.pr_curves:
        mlflow.log_artifact(str(path), artifact_path="pr_curves")
    for path in evaluation.samples:
        mlflow.log_artifact(str(path), artifact_path="samples")


def log_robustness(result, paths: list[Path]) -> None:
    """The robustness table (an MLflow table), P / mPC / rPC as metrics, the files as artifacts."""
    mlflow.log_table({"setting": list(result.ap), "AP": list(result.ap.values())}, "robustness_table.json")
    summary = {"P": result.clean_ap, "mPC": result.mpc, "rPC": result.rpc}
    mlflow.log_metrics({key: value for key, value in summary.items() if value is not None})
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path="robustness")
