"""Ray Tune sweeps over any config keys (by default the delta and learning-rate schedules).

Each trial is a Ray Train run (`build_trainer`) driven from a Tune function, reporting the
validation AP of every checkpoint to Tune, where ASHA stops the trials that trail. The sweep is
one MLflow run with a child run per trial (its params and curves); the best trial's config is
written as a runnable YAML and logged. Rerunning a sweep with the same run name restores it.
"""
import math
from dataclasses import dataclass
from pathlib import Path

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from pipeline.config import Config, apply_override, config_from_dict, config_record, config_to_dict, save_config
from pipeline.data.anchors import fit_anchors
from pipeline.data.prep import prepare
from pipeline.errors import UserError
from pipeline.model import bind_init
from pipeline.orchestration import tracking
from pipeline.search_space import parse_domain
from pipeline.training.journal import METRICS_FILE
from pipeline.training.loop import StepSchedule
from pipeline.training.ray_train import build_trainer, storage_path

METRIC = "val_ap"


def trial_config(base: dict, params: dict) -> Config:
    """The base config with a trial's sampled values, validating every report for ASHA."""
    data = config_to_dict(config_from_dict(base))
    for key, value in params.items():
        apply_override(data, key, value)
    trial_id = tune.get_context().get_trial_id()
    data["run"]["name"] = f"{data['run']['name']}-{trial_id}"
    data["train"]["checkpoint_every"] = data["train"]["eval_every"]  # every report carries val_ap
    data["tune"]["space"] = {}
    return config_from_dict(data)


class _ReportValidationAP(TuneReportCallback):
    """Forwards rank 0's validation AP alone: Tune's progress table shows every numeric key a
    trial reports, and the searched keys with the metric are what a sweep is read by."""

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        super().after_report(run_context, [{METRIC: metrics[0][METRIC]}], None)


def _run_trial(params: dict, sweep: dict) -> None:
    # Fitted per trial: a trial may search model.min_size or the anchors themselves.
    config = bind_init(fit_anchors(trial_config(sweep["base"], params)))
    run_id = tracking.trial_run(sweep["tracking_uri"], sweep["experiment_id"], sweep["sweep_run_id"], config)
    trainer = build_trainer(config, sweep["classes"], callbacks=[_ReportValidationAP()])
    with tracking.MetricsForwarder(config.run.directory() / "train" / METRICS_FILE, run_id, sweep["tracking_uri"]):
        result = trainer.fit()
    # A trial that ASHA stops, or that raises, never gets here: the sweep driver ends its run
    # (`_trial_outcomes`). Ending it on the way out as well raced with the driver, and a stopped
    # trial's interrupted fit could overwrite the driver's KILLED with FAILED.
    tracking.finish(run_id, result.error is not None, sweep["tracking_uri"])


def _search_algorithm(config: Config):
    if config.tune.search == "random":
        return None
    try:
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as error:
        raise UserError(f"tune.search: 'optuna' needs the optuna package ({error}); "
                         "pip install 'aploss[tune]' or use tune.search=random") from None
    return ConcurrencyLimiter(OptunaSearch(), max_concurrent=config.tune.max_concurrent)


def _trial_outcomes(config: Config, results, validations: int) -> dict[str, tuple[str, float | None]]:
    """Each trial's MLflow run name with its status and end time (seconds): FINISHED after every
    validation, KILLED when ASHA stopped it, FAILED when it raised. Tune ends a trial's actor
    as soon as it stops it, before the trial could close its own run."""
    outcomes = {}
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id")
        if trial_id is None:
            continue
        done = result.metrics.get("training_iteration", 0) >= validations
        status = "FAILED" if result.error else "FINISHED" if done else "KILLED"
        outcomes[f"{config.run.name}-{trial_id}"] = (status, result.metrics.get("timestamp"))
    return outcomes


@dataclass
class SweepResult:
    best_config: Config
    best_val_ap: float
    best_config_path: Path
    trials: int
    stopped_early: int


def run_sweep(config: Config) -> SweepResult:
    """Run (or restore and finish) the sweep named `run.name`; ray must be initialised."""
    if not config.tune.space:
        raise UserError("tune.space: a sweep needs at least one key to search")
    experiment = tracking.configure(config)
    sweep_run = tracking.pipeline_run(config, experiment, stage="sweep")
    with tracking.parent_run(sweep_run) as outcome:
        outcome.ran = True
        result = _sweep(config, experiment, sweep_run)
    return result


def _sweep(config: Config, experiment: str, sweep_run: str) -> SweepResult:
    prepared = prepare(config, progress=False)
    config, manifest = config.with_prepared(prepared.directory), prepared.manifest
    train_images = manifest["splits"][config.data.train_split]["images"]
    name = f"{config.run.name}-sweep"
    path = storage_path(config) / "tune" / name
    # What every trial shares travels through Ray's object store, not the search space, which Tune
    # prints in its tables and keeps in its experiment state: the tracking URI may carry a token.
    sweep = {"base": config_record(config.with_absolute_paths()), "classes": manifest["classes"],
             "tracking_uri": config.tracking_uri(), "experiment_id": experiment, "sweep_run_id": sweep_run}
    trainable = tune.with_resources(tune.with_parameters(_run_trial, sweep=sweep), {"CPU": 1})
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        space = {key: parse_domain(spec).to_tune() for key, spec in config.tune.space.items()}
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=StepSchedule.of(config.train, train_images).validations,
                                  grace_period=config.tune.grace_period,
                                  reduction_factor=config.tune.reduction_factor)
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=config.tune.samples,
                                        search_alg=_search_algorithm(config), scheduler=scheduler,
                                        max_concurrent_trials=config.tune.max_concurrent),
            run_config=tune.RunConfig(name=name, storage_path=str(path.parent)))
    results = tuner.fit()
    best = results.get_best_result(METRIC, "max", scope="all")
    best_params = dict(best.config)
    data = config_to_dict(config)
    for key, value in best_params.items():
        apply_override(data, key, value)
    best_config = config_from_dict(data)
    best_path = config.run.directory().parent / f"{name}-best.yaml"
    save_config(best_config, best_path)
    validations = StepSchedule.of(config.train, train_images).validations
    stopped = sum(1 for r in results if r.metrics and r.metrics.get("training_iteration", 0) < validations)
    best_ap = max(v for v in best.metrics_dataframe[METRIC] if not math.isnan(v))
    tracking.log_sweep_result(sweep_run, best_path, best_params, METRIC, best_ap)
    tracking.end_trials(sweep_run, _trial_outcomes(config, results, validations))
    return SweepResult(best_config, best_ap, best_path, len(results), stopped)
