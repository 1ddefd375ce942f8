"""The main job: data-prep -> distributed train -> evaluate, tracked as one MLflow pipeline run.

Each stage is a child run. Rerunning with the same run name skips the stages that finished
(their outputs exist) and resumes the one that did not: data-prep reuses its shards by content
hash, training resumes from its latest Ray Train checkpoint.
"""
import json
import os
from dataclasses import dataclass

import mlflow
import ray

from pipeline import tracking
from pipeline.config import Config
from pipeline.prep import prepare
from pipeline.ray_train import LOGGED, train_distributed
from pipeline.shards import read_manifest
from pipeline.stages import evaluate_stage, load_model, robustness_stage, train_stage


@dataclass
class PipelineResult:
    parent_run_id: str
    metrics: dict[str, float | None]
    per_class_ap: dict[str, float | None]
    skipped: list[str]


def start_ray(config: Config, extra_cpus: int = 0) -> None:
    """Connect to `ray.address`, or to the cluster of the Ray job this runs in, or start a
    local instance sized for the workers."""
    if ray.is_initialized():
        return
    # The job supervisor gives an entrypoint RAY_ADDRESS: a second, local Ray would not start.
    address = config.ray.address or ("auto" if os.environ.get("RAY_ADDRESS") else "")
    if address:
        ray.init(address=address)
        return
    # The Train controller and each Tune trial driver need CPUs beside the workers, or a
    # 2-core machine deadlocks waiting for them.
    cpus = config.ray.local_cpus or int(config.ray.workers * config.ray.cpus_per_worker) + 2 + extra_cpus
    ray.init(num_cpus=cpus, configure_logging=False)


def _stage(name: str, run_id: str):
    print(f"== {name}", flush=True)
    return mlflow.start_run(run_id=run_id)


def run_pipeline(config: Config, distributed: bool = True) -> PipelineResult:
    """data-prep -> train (Ray Train DDP, or in this process when not `distributed`) -> evaluate."""
    experiment = tracking.configure(config)
    parent = tracking.pipeline_run(config, experiment)
    run_dir = config.run.directory()
    prepared = config.run.prepared_data(config.data.dataset)
    model_path = run_dir / "model.pt"
    metrics_path = run_dir / "eval" / "metrics.json"
    skipped = []

    run_id, finished = tracking.stage_run(experiment, parent, "data-prep")
    if finished and (prepared / "manifest.json").exists():
        skipped.append("data-prep")
    else:
        with _stage("data-prep", run_id):
            result = prepare(config)
            tracking.log_prep(result.manifest, prepared)
    classes = read_manifest(prepared)["classes"]

    run_id, finished = tracking.stage_run(experiment, parent, "train")
    if finished and model_path.exists():
        skipped.append("train")
    else:
        with _stage("train", run_id):
            tracking.log_train_params(config)
            if distributed:
                start_ray(config)
                result, model_path = train_distributed(config, classes, mlflow_run_id=run_id)
                for checkpoint, metrics in result.best_checkpoints:
                    mlflow.log_artifacts(checkpoint.path, artifact_path=f"checkpoints/step-{metrics['step']:07d}")
            else:
                model_path = train_stage(config, progress=False).model_path
                tracking.log_training_curves(run_dir / "train" / "metrics.jsonl", LOGGED)
            model, _, _ = load_model(model_path, "cpu")
            tracking.log_model(model, config)

    run_id, finished = tracking.stage_run(experiment, parent, "evaluate")
    if finished and metrics_path.exists():
        skipped.append("evaluate")
    else:
        with _stage("evaluate", run_id):
            tracking.log_evaluation(evaluate_stage(config))
    with mlflow.start_run(run_id=parent):
        pass  # marks the parent run finished
    saved = json.loads(metrics_path.read_text())
    return PipelineResult(parent, saved["metrics"], saved["per_class_ap"], skipped)


def run_robustness(config: Config, names: list[str], progress: bool = True) -> dict[str, tuple]:
    """The robustness stage of the pipeline runs `names`, evaluated together (each perturbed
    image made once), each logged as the robustness child run of its own pipeline run."""
    experiment = tracking.configure(config)
    run_ids = {name: tracking.stage_run(experiment, tracking.pipeline_run(config.for_run(name), experiment),
                                        "robustness")[0] for name in names}
    outputs = robustness_stage(config, names, progress)
    for name, (result, paths) in outputs.items():
        with mlflow.start_run(run_id=run_ids[name]):
            tracking.log_robustness(result, paths)
    return outputs


def summary(config: Config, result: PipelineResult) -> str:
    rows = [f"| {name} | {'n/a' if value is None else f'{value:.3f}'} |" for name, value in result.metrics.items()]
    rows += [f"| AP[{name}] | {'n/a' if value is None else f'{value:.3f}'} |"
             for name, value in result.per_class_ap.items()]
    uri = config.tracking_uri()
    browse = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"open {uri}"
    skipped = f"skipped (already done): {', '.join(result.skipped)}\n" if result.skipped else ""
    return "\n".join(["| metric | value |", "|---|---|", *rows, "", skipped +
                      f"MLflow run {result.parent_run_id} in experiment '{config.tracking.experiment}'; "
                      f"browse with:\n  {browse}"])
