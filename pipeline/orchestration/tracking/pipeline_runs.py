"""MLflow's runs of the pipeline: one parent run per pipeline run name, a child run per stage,
one per sweep trial under its sweep's.

A stage whose child run finished (and whose outputs exist) is skipped on rerun; an unfinished
one is reopened, so a rerun resumes the same runs rather than scattering new ones.
"""
import contextlib
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Param, Run

from pipeline.config import Config, config_record
from pipeline.errors import UserError
from pipeline.orchestration.tracking.connection import connect
from pipeline.orchestration.tracking.forwarding import MetricsForwarder
from pipeline.orchestration.tracking.records import param_safe
from pipeline.storage import Location

RUN_NAME_TAG = "aploss.run_name"


STAGE_TAG = "aploss.stage"
# A PBT trial run's artifact: its config with the schedule it followed, for --config to replay.
SCHEDULE = "schedule.yaml"


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


def sweep_run(experiment_id: str, name: str) -> str:
    """The id of the sweep run named `name` (its `run.name`); UserError if there is none."""
    # Matched here, not in the filter string, which a name with a quote would break.
    sweeps = {run.data.tags[RUN_NAME_TAG]: run.info.run_id
              for run in mlflow.MlflowClient().search_runs([experiment_id], f"tags.`{STAGE_TAG}` = 'sweep'")}
    if name not in sweeps:
        raise UserError(f"no sweep named {name!r} in the experiment (the run.name `aploss tune` ran with); "
                        f"found: {sorted(sweeps)}")
    return sweeps[name]


def trial_runs(experiment_id: str, sweep_run_id: str) -> list[Run]:
    return mlflow.MlflowClient().search_runs(
        [experiment_id], f"tags.`mlflow.parentRunId` = '{sweep_run_id}' and tags.`{STAGE_TAG}` = 'trial'")


def log_trial_schedule(tracking_uri: str, run_id: str, config: Config) -> None:
    """A PBT trial's config as it now trains, the schedule it followed included, as the trial
    run's schedule.yaml: `aploss pipeline run --config schedule.yaml` replays the trial."""
    mlflow.MlflowClient(connect(tracking_uri)).log_dict(run_id, config_record(config), SCHEDULE)


def end_trials(sweep_run_id: str, outcomes: dict[str, tuple[str, float | None]],
               metrics_of: Callable[[str], Location]) -> None:
    """Set each trial run of the sweep (by run name) to its (status, end time in seconds), after
    sending what its metrics journal (`metrics_of(name)`) holds beyond MLflow: a trial Tune
    stopped was ended with its forwarder, which may not have sent its last validations."""
    client = mlflow.MlflowClient()
    for run in trial_runs(client.get_run(sweep_run_id).info.experiment_id, sweep_run_id):
        if run.info.run_name in outcomes:
            journal = metrics_of(run.info.run_name)
            if journal.exists():
                MetricsForwarder(journal, run.info.run_id, mlflow.get_tracking_uri()).send()
            status, ended = outcomes[run.info.run_name]
            client.set_terminated(run.info.run_id, status, end_time=int(ended * 1000) if ended else None)


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
