"""Ray Tune sweeps over any config keys (by default the delta and learning-rate schedules).

Each trial is a Ray Train run (`build_trainer`) driven from a Tune function, reporting the
validation AP of every checkpoint to Tune, where ASHA stops the trials that trail. The sweep is
one MLflow run with a child run per trial (its params and curves); the best trial's config is
written as a runnable YAML and logged. Rerunning a sweep with the same run name resumes it from
its own JSON journal (`sweep_journal`): the trials that ended are not run again, the others are
(each Ray Train run from its latest checkpoint). Tune's own state is never read: it holds
pickles, in a run folder others can write.
"""
import math
import time
from dataclasses import dataclass
from pathlib import Path

from ray import tune
from ray.tune.execution import class_cache
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from pipeline.config import Config, apply_override, config_from_dict, config_record, config_to_dict, save_config
from pipeline.data.prep import prepare
from pipeline.errors import UserError
from pipeline.orchestration.sweep_journal import JOURNAL, SweepJournal, TrialRecord, open_journal, plan_trials
from pipeline.orchestration.tracking import connection, forwarding, pipeline_runs, records
from pipeline.search_space import parse_domain
from pipeline.training.loop import StepSchedule
from pipeline.training.preparation import prepare_training
from pipeline.training.ray_train import build_trainer, fit_run, storage_path

METRIC = "val_ap"
# A random-search trial's index in the sweep's plan, beside the searched keys.
TRIAL = "trial"
# Tune copies these from the driver's environment into every trial actor's runtime env, which
# Ray writes to runtime_env_agent.log and shows on the dashboard. Every Ray process inherits
# them from its node already (the raylet's environment, where Ray has secrets kept), so they
# are not copied.
_CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"}
class_cache.ENV_VARS_TO_PROPAGATE.difference_update(_CREDENTIALS)


def trial_name(base_name: str, params: dict, trial_id: str) -> str:
    """A trial's run name: by its index in a random search's plan (so a rerun resumes its
    checkpoints), by Tune's trial id in an optuna search."""
    return f"{base_name}-{TRIAL}{params[TRIAL]}" if TRIAL in params else f"{base_name}-{trial_id}"


def trial_config(base: dict, params: dict) -> Config:
    """The base config with a trial's sampled values, validating every report for ASHA."""
    data = config_to_dict(config_from_dict(base))
    for key, value in params.items():
        if key != TRIAL:
            apply_override(data, key, value)
    data["run"]["name"] = trial_name(data["run"]["name"], params, tune.get_context().get_trial_id())
    data["train"]["checkpoint_every"] = data["train"]["eval_every"]  # every report carries val_ap
    data["tune"]["space"] = {}
    return config_from_dict(data)


class _ReportValidationAP(TuneReportCallback):
    """Forwards rank 0's validation AP alone: Tune's progress table shows every numeric key a
    trial reports, and the searched keys with the metric are what a sweep is read by."""

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        super().after_report(run_context, [{METRIC: metrics[0][METRIC]}], None)


def _run_trial(params: dict, sweep: dict) -> None:
    # Prepared per trial: a trial may search model.min_size or the anchors themselves.
    config, _ = prepare_training(trial_config(sweep["base"], params))
    run_id = pipeline_runs.trial_run(sweep["tracking_uri"], sweep["experiment_id"], sweep["sweep_run_id"], config)
    trainer = build_trainer(config, sweep["classes"], callbacks=[_ReportValidationAP()])
    with forwarding.MetricsForwarder(config.run.folder().journal, run_id, sweep["tracking_uri"]):
        fit_run(config, trainer)
    # A trial that ASHA stops, or that raises (its training failed, diverged or filled the disk),
    # never gets here: the sweep driver ends its run (`_trial_outcomes`). Ending it on the way out
    # as well raced with the driver, and a stopped trial's interrupted fit could overwrite the
    # driver's KILLED with FAILED.
    pipeline_runs.finish(run_id, False, sweep["tracking_uri"])


class _Journaling(tune.Callback):
    """Keeps the sweep's journal as Tune reports: each trial's values, validation APs and end."""

    def __init__(self, journal: SweepJournal, base_name: str, validations: int) -> None:
        self.journal, self.base_name, self.validations = journal, base_name, validations

    def _record(self, trial) -> TrialRecord:
        name = trial_name(self.base_name, trial.config, trial.trial_id)
        params = {key: value for key, value in trial.config.items() if key != TRIAL}
        return self.journal.trials.setdefault(name, TrialRecord(params, name))

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        record = self._record(trial)
        record.status, record.val_ap, record.ended = "RUNNING", [], None
        self.journal.save()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._record(trial).val_ap.append(float(result[METRIC]))
        self.journal.save()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(trial, "FINISHED" if len(self._record(trial).val_ap) >= self.validations else "STOPPED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial, "FAILED")

    def _end(self, trial, status: str) -> None:
        record = self._record(trial)
        record.status, record.ended = status, time.time()
        self.journal.save()


def _search_algorithm(config: Config, journal: SweepJournal):
    """Random search: the planned trials that did not end, each once. Optuna: a searcher told
    the ended trials' results, limited to the concurrency."""
    if config.tune.search == "random":
        ended = journal.ended()
        points = [{**point, TRIAL: index} for index, point in enumerate(journal.plan)
                  if trial_name(config.run.name, {TRIAL: index}, "") not in ended]
        search = BasicVariantGenerator(points_to_evaluate=points, max_concurrent=config.tune.max_concurrent)
        return search, len(points)
    try:
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as error:
        raise UserError(f"tune.search: 'optuna' needs the optuna package ({error}); "
                         "pip install 'aploss[tune]' or use tune.search=random") from None
    told = [trial for trial in journal.ended().values() if trial.val_ap]
    searcher = OptunaSearch(metric=METRIC, mode="max", points_to_evaluate=[trial.params for trial in told] or None,
                            evaluated_rewards=[max(trial.val_ap) for trial in told] or None)
    return ConcurrencyLimiter(searcher, max_concurrent=config.tune.max_concurrent), journal.total - len(told)


def _trial_outcomes(journal: SweepJournal) -> dict[str, tuple[str, float | None]]:
    """Each ended trial's MLflow run name with its status and end time (seconds): FINISHED after
    every validation, KILLED when ASHA stopped it, FAILED when it raised. Tune ends a trial's
    actor as soon as it stops it, before the trial could close its own run."""
    statuses = {"FINISHED": "FINISHED", "STOPPED": "KILLED", "FAILED": "FAILED"}
    return {name: (statuses[trial.status], trial.ended) for name, trial in journal.ended().items()}


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
    experiment = connection.configure(config)
    sweep_run = pipeline_runs.pipeline_run(config, experiment, stage="sweep")
    with pipeline_runs.parent_run(sweep_run) as outcome:
        outcome.ran = True
        result = _sweep(config, experiment, sweep_run)
    return result


def _sweep(config: Config, experiment: str, sweep_run: str) -> SweepResult:
    prepared = prepare(config, progress=False)
    config, manifest = config.with_prepared(prepared.directory), prepared.manifest
    train_images = manifest["splits"][config.data.train_split]["images"]
    validations = StepSchedule.of(config.train, train_images).validations
    name = f"{config.run.name}-sweep"
    path = storage_path(config) / "tune" / name
    plan = plan_trials(config.tune.space, config.tune.samples, config.train.seed) if config.tune.search == "random" \
        else None
    journal = open_journal(path / JOURNAL, config.tune.space, len(plan) if plan else config.tune.samples, plan)
    search, remaining = _search_algorithm(config, journal)
    if remaining:
        _run_trials(config, experiment, sweep_run, journal, search, remaining, validations, manifest["classes"])
    pipeline_runs.end_trials(sweep_run, _trial_outcomes(journal),
                        lambda trial: config.run.outputs().run(trial).journal)
    best = max((trial for trial in journal.trials.values() if any(not math.isnan(ap) for ap in trial.val_ap)),
               key=lambda trial: max(ap for ap in trial.val_ap if not math.isnan(ap)), default=None)
    if best is None:
        raise UserError(f"sweep {name}: no trial reported a validation AP (see the trials' errors above)")
    data = config_to_dict(config)
    for key, value in best.params.items():
        apply_override(data, key, value)
    best_config = config_from_dict(data)
    best_path = config.run.outputs().best_config(name)
    save_config(best_config, best_path)
    best_ap = max(ap for ap in best.val_ap if not math.isnan(ap))
    records.log_sweep_result(sweep_run, best_path, best.params, METRIC, best_ap)
    stopped = sum(1 for trial in journal.trials.values() if trial.status == "STOPPED")
    return SweepResult(best_config, best_ap, best_path, len(journal.trials), stopped)


def _run_trials(config: Config, experiment: str, sweep_run: str, journal: SweepJournal, search, remaining: int,
                validations: int, classes: list[str]) -> None:
    """The trials the journal has not seen end, as a Tune experiment of its own (name-N for the
    sweep's Nth attempt): an earlier attempt's Tune state is left unread."""
    journal.attempts += 1
    journal.save()
    # What every trial shares travels through Ray's object store, not the search space, which Tune
    # prints in its tables and keeps in its experiment state: the tracking URI may carry a token.
    sweep = {"base": config_record(config.with_absolute_paths()), "classes": classes,
             "tracking_uri": config.tracking_uri(), "experiment_id": experiment, "sweep_run_id": sweep_run}
    trainable = tune.with_resources(tune.with_parameters(_run_trial, sweep=sweep), {"CPU": 1})
    space = {key: parse_domain(spec).to_tune() for key, spec in config.tune.space.items()}
    if config.tune.search == "random":  # the planned values come as presets; a column names the trial
        space[TRIAL] = tune.randint(0, journal.total)
    scheduler = ASHAScheduler(metric=METRIC, mode="max", time_attr="training_iteration", max_t=validations,
                              grace_period=config.tune.grace_period, reduction_factor=config.tune.reduction_factor)
    name = f"{config.run.name}-sweep-{journal.attempts}"
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(num_samples=remaining, search_alg=search, scheduler=scheduler,
                                    max_concurrent_trials=config.tune.max_concurrent),
        run_config=tune.RunConfig(name=name, storage_path=str(journal.location.parent.parent),
                                  callbacks=[_Journaling(journal, config.run.name, validations)]))
    tuner.fit()
