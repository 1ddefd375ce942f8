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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ray import tune
from ray.tune.execution import class_cache
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from pipeline.config import Config, apply_override, config_from_dict, config_record, config_to_dict, save_config
from pipeline.data.prep import prepare
from pipeline.errors import UserError
from pipeline.orchestration import population
from pipeline.orchestration.sweep_journal import JOURNAL, SweepJournal, TrialRecord, open_journal, plan_trials
from pipeline.orchestration.tracking import connection, forwarding, pipeline_runs, records
from pipeline.orchestration.trials import METRIC, TRIAL, trial_config, trial_name
from pipeline.search_space import parse_domain
from pipeline.training.loop import StepSchedule
from pipeline.training.preparation import prepare_training
from pipeline.training.ray_train import build_trainer, fit_run, storage_path

# Tune copies these from the driver's environment into every trial actor's runtime env, which
# Ray writes to runtime_env_agent.log and shows on the dashboard. Every Ray process inherits
# them from its node already (the raylet's environment, where Ray has secrets kept), so they
# are not copied.
_CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"}
class_cache.ENV_VARS_TO_PROPAGATE.difference_update(_CREDENTIALS)


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

    def __init__(self, journal: SweepJournal, base_name: str, reports: int, restarts_go_on: bool) -> None:
        self.journal, self.base_name, self.reports = journal, base_name, reports
        # A PBT trial restarts at every perturbation, from where it reported last.
        self.restarts_go_on = restarts_go_on

    def _record(self, trial) -> TrialRecord:
        name = trial_name(self.base_name, trial.config, trial.trial_id)
        params = {key: value for key, value in trial.config.items() if key != TRIAL}
        return self.journal.trials.setdefault(name, TrialRecord(params, name))

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        record = self._record(trial)
        record.status, record.ended = "RUNNING", None
        if not self.restarts_go_on:
            record.val_ap = []
        self.journal.save()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        record = self._record(trial)
        record.val_ap.append(float(result[METRIC]))
        record.params = {key: value for key, value in trial.config.items() if key != TRIAL}  # PBT changes them
        self.journal.save()

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        """Where a PBT trial's segment ended, for a rerun of the sweep to go on from."""
        with checkpoint.as_directory() as directory:
            self._record(trial).pbt = population.read_pointer(Path(directory), self.base_name).record()
        self.journal.save()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(trial, "FINISHED" if len(self._record(trial).val_ap) >= self.reports else "STOPPED")

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
        names = [trial_name(config.run.name, {TRIAL: index}, "") for index in range(journal.total)]
        # A PBT trial goes on with the values it had last.
        points = [{**(journal.trials[name].params if name in journal.trials else point), TRIAL: index}
                  for index, (name, point) in enumerate(zip(names, journal.plan)) if name not in ended]
        # PBT ranks a population: all of it exists from the start, and takes turns to train
        # (`population.TrainingSlots`).
        concurrent = 0 if config.tune.scheduler == "pbt" else config.tune.max_concurrent
        search = BasicVariantGenerator(points_to_evaluate=points, max_concurrent=concurrent)
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
    stopped_early: int  # by ASHA


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
    steps = StepSchedule.of(config.train, train_images)
    pbt = config.tune.scheduler == "pbt"
    interval = population.perturbation_interval(config, steps.eval_every) if pbt else 0
    name = f"{config.run.name}-sweep"
    path = storage_path(config) / "tune" / name
    plan = plan_trials(config.tune.space, config.tune.samples, config.train.seed) if config.tune.search == "random" \
        else None
    journal = open_journal(path / JOURNAL, config.tune.space, len(plan) if plan else config.tune.samples, plan)
    if pbt:
        _end_finished_segments(journal, config.run.name, steps.total_steps)
    search, remaining = _search_algorithm(config, journal)
    if remaining:
        # A trial reports once a validation (ASHA), or once a segment (PBT).
        reports = math.ceil(steps.total_steps / interval) if pbt else steps.validations
        scheduler = population.pbt_scheduler(config, interval, steps.total_steps) if pbt else _asha(config, reports)
        trainable = _Trainable(population.run_pbt_trial if pbt else _run_trial, scheduler)
        _run_trials(config, experiment, sweep_run, journal, search, remaining, reports, manifest["classes"],
                    trainable, {"total_steps": steps.total_steps, "interval": interval})
    pipeline_runs.end_trials(sweep_run, _trial_outcomes(journal),
                        lambda trial: config.run.outputs().run(trial).journal)
    # ASHA's trials by their best validation; PBT's by their last, where the population ends.
    score = (lambda ap: ap[-1]) if pbt else max
    scored = [(score(valid), trial) for trial in journal.trials.values()
              if (valid := [ap for ap in trial.val_ap if not math.isnan(ap)])]
    if not scored:
        raise UserError(f"sweep {name}: no trial reported a validation AP (see the trials' errors above)")
    best_ap, best = max(scored, key=lambda pair: pair[0])
    if pbt:  # the schedule it followed, donors' steps included: a plain run replays it
        best_config = population.with_schedule(config, population.segment_end(best.pbt, config.run.name).schedule)
    else:
        data = config_to_dict(config)
        for key, value in best.params.items():
            apply_override(data, key, value)
        best_config = config_from_dict(data)
    best_path = config.run.outputs().best_config(name)
    save_config(best_config, best_path)
    records.log_sweep_result(sweep_run, best_path, best.params, METRIC, best_ap)
    stopped = sum(1 for trial in journal.trials.values() if trial.status == "STOPPED")
    return SweepResult(best_config, best_ap, best_path, len(journal.trials), stopped)


def _end_finished_segments(journal: SweepJournal, base_name: str, total_steps: int) -> None:
    """A PBT trial whose last segment reported before the sweep was cut off has ended."""
    for trial in journal.trials.values():
        if trial.status == "RUNNING" and trial.pbt and population.segment_end(trial.pbt, base_name).step >= total_steps:
            trial.status, trial.ended = "FINISHED", time.time()
    journal.save()


@dataclass(frozen=True)
class _Trainable:
    function: Callable[[dict, dict], None]
    scheduler: TrialScheduler


def _asha(config: Config, reports: int) -> ASHAScheduler:
    return ASHAScheduler(metric=METRIC, mode="max", time_attr="training_iteration", max_t=reports,
                         grace_period=config.tune.grace_period, reduction_factor=config.tune.reduction_factor)


def _run_trials(config: Config, experiment: str, sweep_run: str, journal: SweepJournal, search, remaining: int,
                reports: int, classes: list[str], trainable: _Trainable, steps: dict) -> None:
    """The trials the journal has not seen end, as a Tune experiment of its own (name-N for the
    sweep's Nth attempt): an earlier attempt's Tune state is left unread."""
    journal.attempts += 1
    journal.save()
    # What every trial shares travels through Ray's object store, not the search space, which Tune
    # prints in its tables and keeps in its experiment state: the tracking URI may carry a token.
    pbt = config.tune.scheduler == "pbt"
    sweep = {"base": config_record(config.with_absolute_paths()), "classes": classes,
             "tracking_uri": config.tracking_uri(), "experiment_id": experiment, "sweep_run_id": sweep_run,
             "resume": {name: trial.pbt for name, trial in journal.trials.items() if trial.pbt}, **steps}
    if pbt:
        sweep["slots"] = population.TrainingSlots.remote(config.tune.max_concurrent)
    function = tune.with_resources(tune.with_parameters(trainable.function, sweep=sweep),
                                   population.DRIVER_RESOURCES if pbt else {"CPU": 1})
    space = {key: parse_domain(spec).to_tune() for key, spec in config.tune.space.items()}
    if config.tune.search == "random":  # the planned values come as presets; a column names the trial
        space[TRIAL] = tune.randint(0, journal.total)
    name = f"{config.run.name}-sweep-{journal.attempts}"
    tuner = tune.Tuner(
        function, param_space=space,
        tune_config=tune.TuneConfig(num_samples=remaining, search_alg=search, scheduler=trainable.scheduler,
                                    max_concurrent_trials=config.tune.max_concurrent),
        run_config=tune.RunConfig(name=name, storage_path=str(journal.location.parent.parent),
                                  callbacks=[_Journaling(journal, config.run.name, reports,
                                                         restarts_go_on=pbt)]))
    tuner.fit()
