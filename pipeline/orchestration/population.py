"""Population Based Training over the learning rate and δ (`tune.scheduler: pbt`).

Ray Tune's PBT exploits a trial by restarting it from a better trial's Tune checkpoint, and a
Ray Train V2 run inside a Tune trial reports no Tune checkpoint (its checkpoints are Train's;
ray-mlflow-notes.md: "PBT degrades to random search"). So a trial here trains in segments of
`tune.perturbation_interval` steps, each a Ray Train run of its own that starts from a training
state and stops at the segment's end. The trial then reports the segment's validation AP to Tune
with a Tune checkpoint that holds a pointer alone (`pbt.json`: the trial, the segment's run, its
step and the schedule it followed), never the state: that stays in Ray Train's checkpoint in the
run's storage (local or s3://), where the next segment, or a trial taking it as donor, loads it
(weights, optimiser, the loss's state, the step, the RNG).

A trial that takes a donor's state goes on with the donor's schedule and its own perturbed values
appended as changes from that step (`optim.lr_changes`, `loss.delta.changes`): the schedule a
trial carries is the one its weights followed, and a plain run of the config it gives replays
the trial. PBT runs synchronously (every trial perturbs at the same steps), so that a trial's
curves in MLflow go on step after step.
"""
import asyncio
import contextlib
import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

from aploss.schedules import changed_value
from pipeline.config import Config, apply_override, config_from_dict, config_to_dict, flatten
from pipeline.errors import ConfigError
from pipeline.io import write_json_atomic
from pipeline.orchestration.tracking import forwarding, pipeline_runs
from pipeline.orchestration.trials import METRIC, TRIAL, trial_config, trial_name
from pipeline.search_space import Domain, parse_domain
from pipeline.storage import InputRefused, Location
from pipeline.training.preparation import prepare_training
from pipeline.training.ray_train import build_trainer, fit_run, state_at

POINTER = "pbt.json"
MAX_POINTER_BYTES = 1 << 20
# A searched key, and where the values it takes during a run are kept.
CHANGES = {"optim.lr": "optim.lr_changes", "loss.delta.start": "loss.delta.changes"}
SCHEDULE_KEYS = (*CHANGES, *CHANGES.values())
STEP = "step"  # reported beside the metric: PBT's time
# A trial's Tune resources are its driver's, which starts its segments' Ray Train runs and waits
# on them; the workers ask the cluster for their own. Its share of a CPU is what it uses.
DRIVER_RESOURCES = {"CPU": 0.05}


@ray.remote(num_cpus=0)
class TrainingSlots:
    """How many of a population's trials train at once (`tune.max_concurrent`). Tune starts the
    whole population, since PBT ranks it whole; left to the cluster, every trial's worker group
    would start and wait for CPUs the others hold, until Ray Train gives up on it. A trial Tune
    restarts under its name takes back the slot it held."""

    def __init__(self, count: int) -> None:
        self._count, self._holders = count, set()
        self._changed = asyncio.Condition()

    async def acquire(self, holder: str) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: holder in self._holders or len(self._holders) < self._count)
            self._holders.add(holder)

    async def release(self, holder: str) -> None:
        async with self._changed:
            self._holders.discard(holder)
            self._changed.notify_all()


@contextlib.contextmanager
def training_slot(slots, holder: str) -> Iterator[None]:
    ray.get(slots.acquire.remote(holder))
    try:
        yield
    finally:
        ray.get(slots.release.remote(holder))


@dataclass(frozen=True)
class SegmentEnd:
    """Where a trial's segment ended: its Ray Train run, the step, and the schedule it followed."""

    trial: str
    run: str
    step: int
    schedule: dict[str, Any]  # SCHEDULE_KEYS' values

    def record(self) -> dict:
        return {"trial": self.trial, "run": self.run, "step": self.step, "schedule": self.schedule}


def segment_end(saved: Any, base_name: str) -> SegmentEnd:
    """A pointer as `SegmentEnd.record` writes it, checked: it comes from the run folder, shared
    storage anyone on the cluster may write. Its names are this sweep's, its schedule numbers a
    config accepts; the state it names is found from them, in this sweep's storage alone."""
    trial_pattern = rf"{re.escape(base_name)}-{TRIAL}\d+"
    if not (isinstance(saved, dict) and set(saved) == {"trial", "run", "step", "schedule"}):
        raise ValueError("expected the keys trial, run, step and schedule")
    trial, run, step, schedule = saved["trial"], saved["run"], saved["step"], saved["schedule"]
    if not (isinstance(trial, str) and re.fullmatch(trial_pattern, trial)):
        raise ValueError(f"trial {trial!r:.100} is not one of this sweep's")
    if not (isinstance(run, str) and re.fullmatch(rf"{re.escape(trial)}-at\d+(-from-{TRIAL}\d+)?", run)):
        raise ValueError(f"run {run!r:.100} is not one of trial {trial}'s segments")
    if not (isinstance(step, int) and not isinstance(step, bool) and step > 0):
        raise ValueError(f"step {step!r:.100}")
    if not (isinstance(schedule, dict) and set(schedule) == set(SCHEDULE_KEYS)):
        raise ValueError(f"schedule: expected the keys {list(SCHEDULE_KEYS)}")
    with_schedule(Config(), schedule)  # numbers a config takes, or ConfigError (a ValueError)
    return SegmentEnd(trial, run, step, schedule)


def read_pointer(directory: Path, base_name: str) -> SegmentEnd:
    """The pointer in a Tune checkpoint's directory; ValueError naming the file if it is not one."""
    path = Location(directory / POINTER)
    try:
        return segment_end(json.loads(path.read_bounded(MAX_POINTER_BYTES, 60, ("the limit for PBT pointers",) * 2)),
                           base_name)
    except (InputRefused, ValueError, RecursionError) as error:
        raise ValueError(f"{path}: not a PBT pointer of this sweep ({error})") from None


def schedule_of(config: Config) -> dict[str, Any]:
    flat = flatten(config)
    return {key: flat[key] for key in SCHEDULE_KEYS}


def with_schedule(config: Config, schedule: dict[str, Any]) -> Config:
    data = config_to_dict(config)
    for key, value in schedule.items():
        apply_override(data, key, value)
    return config_from_dict(data)


def continued(config: Config, params: dict[str, Any], step: int, total_steps: int) -> Config:
    """`config` going on from `step` with the searched values in `params`: each that differs from
    the value `config` has there is appended as a change from that training fraction (replacing
    its changes from there on)."""
    fraction = step / total_steps
    schedule = schedule_of(config)
    for key, changes_key in CHANGES.items():
        if key not in params:
            continue
        changes = [list(change) for change in schedule[changes_key] if change[0] < fraction]
        if params[key] != changed_value(fraction, schedule[key], tuple(map(tuple, changes))):
            changes.append([fraction, params[key]])
        schedule[changes_key] = changes
    return with_schedule(config, schedule)


def segment_name(trial: str, step: int, donor: str | None) -> str:
    """The Ray Train run of a trial's segment from `step`: its own, or from a donor's state."""
    own = f"{trial}-at{step}"
    return own if donor is None or donor == trial else f"{own}-from-{donor.rsplit('-', 1)[1]}"


def _report(val_ap: float, end: SegmentEnd) -> None:
    with tempfile.TemporaryDirectory() as directory:
        write_json_atomic(end.record(), Path(directory) / POINTER)
        tune.report({METRIC: val_ap, STEP: end.step}, checkpoint=tune.Checkpoint.from_directory(directory))


def run_pbt_trial(params: dict, sweep: dict) -> None:
    """One member of the population, segment after segment, from where Tune restarts it: its own
    or a donor's pointer (Tune's checkpoint), or where an earlier attempt of the sweep left it."""
    base_name = sweep["base"]["run"]["name"]
    name = trial_name(base_name, params, tune.get_context().get_trial_id())
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            start = read_pointer(Path(directory), base_name)
    else:
        saved = sweep["resume"].get(name)
        start = None if saved is None else segment_end(saved, base_name)
    config, step, total = trial_config(sweep["base"], params), 0, sweep["total_steps"]
    if start is not None:
        config, step = continued(with_schedule(config, start.schedule), params, start.step, total), start.step
    run_name = segment_name(name, step, None if start is None else start.trial)
    seed = None if start is None else state_at(config, start.run, start.step)
    run_id = pipeline_runs.trial_run(sweep["tracking_uri"], sweep["experiment_id"], sweep["sweep_run_id"], config)
    interval = sweep["interval"]
    while step < total:  # Tune restarts a trial paused after its last report: it has ended
        until = min((step // interval + 1) * interval, total)
        segment, _ = prepare_training(config.for_run(run_name))
        with training_slot(sweep["slots"], name):
            trainer = build_trainer(segment, sweep["classes"], seed=seed, until=until)
            with forwarding.MetricsForwarder(segment.run.folder().journal, run_id, sweep["tracking_uri"]):
                result = fit_run(segment, trainer)
        pipeline_runs.log_trial_schedule(sweep["tracking_uri"], run_id, config)
        _report(result.metrics[METRIC], SegmentEnd(name, run_name, until, schedule_of(config)))
        seed, step, run_name = state_at(segment, run_name, until), until, segment_name(name, until, None)
    pipeline_runs.finish(run_id, False, sweep["tracking_uri"])


class _PopulationBasedTraining(PopulationBasedTraining):
    """Ray's PBT, but a trial that takes a donor's config keeps its own name (its index in the
    plan, which Ray would copy from the donor), a perturbed value stays in its search space (Ray
    multiplies it by a factor, out of a uniform or loguniform domain's bounds), and a trial's last
    report, with nothing left to train, is not perturbed."""

    def __init__(self, domains: dict[str, Domain], total_steps: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.domains, self.total_steps = domains, total_steps

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(STEP, 0) >= self.total_steps:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def _get_new_config(self, trial, trial_to_clone) -> tuple[dict, dict]:
        config, operations = super()._get_new_config(trial, trial_to_clone)
        for key, domain in self.domains.items():
            if domain.kind in ("uniform", "loguniform"):
                config[key] = min(max(config[key], domain.values[0]), domain.values[1])
        return {**config, TRIAL: trial.config[TRIAL]}, operations


def pbt_scheduler(config: Config, interval: int, total_steps: int) -> PopulationBasedTraining:
    """Perturbs at every report of a trial (the end of a segment of `interval` steps), by steps,
    so that a trial a resumed sweep goes on with is ranked where it is."""
    domains = {key: parse_domain(spec) for key, spec in config.tune.space.items()}
    mutations = {key: list(domain.values) if domain.kind in ("choice", "grid") else domain.to_tune()
                 for key, domain in domains.items()}
    return _PopulationBasedTraining(
        domains, total_steps, time_attr=STEP, metric=METRIC, mode="max", perturbation_interval=interval,
        hyperparam_mutations=mutations, quantile_fraction=config.tune.quantile_fraction,
        resample_probability=config.tune.resample_probability,
        perturbation_factors=tuple(config.tune.perturbation_factors), synch=True)


def perturbation_interval(config: Config, eval_every: int) -> int:
    """`tune.perturbation_interval`, or validation's interval for 0; ConfigError unless every
    segment ends at a validation (its report carries one)."""
    interval = config.tune.perturbation_interval or eval_every
    if interval % eval_every:
        raise ConfigError(f"tune.perturbation_interval: {interval} steps is not a multiple of the validation interval "
                          f"({eval_every} steps, train.eval_every): a segment reports the validation at its end")
    return interval
