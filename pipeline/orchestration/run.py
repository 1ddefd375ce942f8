"""The main job: data-prep -> distributed train -> evaluate, tracked as one MLflow pipeline run.

Each stage is a child run. Rerunning with the same run name skips the stages that finished
(their outputs exist) and resumes the one that did not: data-prep reuses its shards by content
hash, training resumes from its latest Ray Train checkpoint.
"""
import json
import os
from dataclasses import dataclass

from pipeline.config import Config
from pipeline.data.prep import locate_prepared, prepare, summary_lines
from pipeline.data.shards import read_manifest
from pipeline.errors import MissingInput, UserError
from pipeline.evaluation.metrics_table import metrics_table
from pipeline.orchestration.tracking import connection, forwarding, pipeline_runs, records, registry
from pipeline.quiet import ray_log_level
from pipeline.redaction import redact
from pipeline.training.preparation import prepare_training

# Torch and Ray are imported where a stage runs: a finished run's rerun loads neither.


@dataclass
class PipelineResult:
    parent_run_id: str
    metrics: dict[str, float | None]
    per_class_ap: dict[str, float | None]
    per_class_ap50: dict[str, float | None]
    skipped: list[str]
    registered_model: str  # the registry's name for the run's detector


def start_ray(config: Config, extra_cpus: int = 0) -> None:
    """Join the cluster of `ray.address` (or of the Ray job this runs in), or start a local
    instance sized for the workers, and say which."""
    import ray

    if ray.is_initialized():
        return
    # The job supervisor gives an entrypoint RAY_ADDRESS: its cluster is the one to join.
    address = config.ray.address or ("auto" if os.environ.get("RAY_ADDRESS") else "")
    if address:
        try:
            ray.init(address=address, configure_logging=False,
                     logging_config=ray.LoggingConfig(log_level=ray_log_level()))
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise UserError(f"ray.address={address}: cannot join a Ray cluster ({str(error).splitlines()[0]}); "
                            "start one (ray start --head), or leave ray.address empty for a local instance") from None
        resources = ray.cluster_resources()
        print(f"joined the Ray cluster at {address}: {resources.get('CPU', 0):g} CPUs, "
              f"{resources.get('GPU', 0):g} GPUs", flush=True)
        return
    # The Train controller and each Tune trial driver need CPUs beside the workers, or a
    # 2-core machine deadlocks waiting for them.
    workers = max(config.ray.workers, config.eval.workers)  # training's, or evaluation's
    # Data-prep's tasks take one CPU each.
    busy = max(int(workers * config.ray.cpus_per_worker), config.data.prep_workers)
    cpus = config.ray.local_cpus or busy + 2 + extra_cpus
    # "local" starts an instance of this run's own even where a cluster already runs on the
    # machine (which a plain ray.init() would join, refusing num_cpus).
    ray.init(address="local", num_cpus=cpus, configure_logging=False,
             logging_config=ray.LoggingConfig(log_level=ray_log_level()))
    # Logical CPUs, Ray's unit of scheduling rather than cores: say why there may be more than cores.
    share = ("ray.local_cpus" if config.ray.local_cpus else
             f"logical: {busy} for the workers, {2 + extra_cpus} for Ray's own actors; ray.local_cpus sets them")
    print(f"started a local Ray instance with {cpus} CPUs ({share}); ray.address=auto joins a running cluster "
          "instead", flush=True)


def training_steps(config: Config) -> int:
    """The number of optimiser steps `config` trains, bound to its prepared data."""
    from pipeline.training.loop import StepSchedule

    images = read_manifest(config.data.prepared)["splits"][config.data.train_split]["images"]
    return StepSchedule.of(config.train, images).total_steps


STAGES = ("data-prep", "train", "evaluate")


def _stage(name: str, run_id: str):
    print(f"== {name}", flush=True)
    return pipeline_runs.active(run_id)


def run_pipeline(config: Config, distributed: bool = True) -> PipelineResult:
    """data-prep -> train (Ray Train DDP, or in this process when not `distributed`) -> evaluate."""
    experiment = connection.configure(config)
    parent = pipeline_runs.pipeline_run(config, experiment)
    folder = config.run.folder()
    model_path = folder.model
    metrics_path = folder.eval_metrics
    skipped = []

    with pipeline_runs.parent_run(parent) as outcome:
        if config.data.prep_workers:
            start_ray(config)
        run_id, finished = pipeline_runs.stage_run(experiment, parent, "data-prep")
        if finished:
            # Locating the prepared data hashes the inputs (their address) but not every shard again.
            try:
                directory = locate_prepared(config)
                skipped.append("data-prep")
            except MissingInput:  # the inputs changed since: the run's record below says whether that may be
                directory = prepare(config).directory
        else:
            with _stage("data-prep", run_id):
                prepared = prepare(config)
                print("\n".join(summary_lines(prepared)))
                records.log_prep(prepared.manifest, prepared.directory)
            directory = prepared.directory
        # Auto anchors fitted to it, or as the run's record has them; a finished run's model is
        # only reused for the same model and data.
        config, _ = prepare_training(config.with_prepared(directory))

        run_id, finished = pipeline_runs.stage_run(experiment, parent, "train")
        train_run_id = run_id
        if finished and model_path.exists():
            skipped.append("train")
        else:
            with _stage("train", run_id):
                from pipeline.data.anchors import report_anchor_recall
                from pipeline.training.local import train_stage
                from pipeline.training.ray_train import ray_checkpoints, train_distributed

                records.log_train_params(config)
                records.log_headline(parent, config, training_steps(config))
                records.log_anchor_recall(report_anchor_recall(config))
                journal = folder.journal
                with forwarding.MetricsForwarder(journal, run_id, config.tracking_uri()):
                    if distributed:
                        start_ray(config)
                        result, model_path = train_distributed(config)
                        kept = ray_checkpoints(result)
                    else:
                        summary = train_stage(config, progress=False)
                        model_path, kept = summary.model_path, summary.checkpoints
                records.log_checkpoints(kept)
                registry.log_model(model_path, config)

        run_id, finished = pipeline_runs.stage_run(experiment, parent, "evaluate")
        if finished and metrics_path.exists():
            skipped.append("evaluate")
        else:
            with _stage("evaluate", run_id):
                from pipeline.evaluation.stages import evaluate_stage

                if config.eval.workers:
                    start_ray(config)
                evaluation = evaluate_stage(config)
                records.log_evaluation(evaluation, config)
            records.log_test_metrics(parent, evaluation)
            registry.promote(config, train_run_id, evaluation.result.metrics["AP"])
        outcome.ran = len(skipped) < len(STAGES)
    saved = json.loads(metrics_path.read_text())
    return PipelineResult(parent, saved["metrics"], saved["per_class_ap"], saved["per_class_ap50"], skipped,
                          registry.registered_name(config))


def run_robustness(config: Config, names: list[str], progress: bool = True) -> dict[str, tuple]:
    """The robustness stage of the pipeline runs `names`, evaluated together (each perturbed
    image made once), each logged as the robustness child run of its own pipeline run."""
    experiment = connection.configure(config)
    run_ids = {name: pipeline_runs.stage_run(experiment, pipeline_runs.pipeline_run(config.for_run(name), experiment),
                                        "robustness")[0] for name in names}
    from pipeline.evaluation.stages import robustness_stage

    if config.eval.workers:
        start_ray(config)
    outputs = robustness_stage(config, names, progress)
    for name, (result, paths) in outputs.items():
        with pipeline_runs.active(run_ids[name]):
            records.log_robustness(result, paths)
    return outputs


def summary(config: Config, result: PipelineResult) -> str:
    uri = redact(config.tracking_uri())
    browse = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"open {uri}"
    skipped = f"skipped (already done): {', '.join(result.skipped)}\n" if result.skipped else ""
    return "\n".join([metrics_table(result.metrics, result.per_class_ap, result.per_class_ap50), "", skipped +
                      f"MLflow run {result.parent_run_id} in experiment '{config.tracking.experiment}'; "
                      f"browse with:\n  {browse}\nthe best detector on this dataset: "
                      f"models:/{result.registered_model}@champion"])
