"""A sweep's own state, as JSON beside Tune's: the trials it plans and what each reported. A
rerun of the sweep resumes from it, never from Tune's state (tuner.pkl and the experiment state
hold pickles, and the run folder is shared storage anyone on the cluster may write).

With `tune.search=random` every trial is planned up front: each grid combination `tune.samples`
times, the other domains drawn from train.seed, so a trial is its index in the plan and a
rerun runs exactly the planned trials that did not end. With `optuna` the searcher chooses as
it goes; a rerun hands it the ended trials' results and asks for the rest."""
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import check_bounded
from pipeline.errors import ConfigError
from pipeline.io import write_json_atomic
from pipeline.search_space import Domain, parse_domain
from pipeline.storage import InputRefused, Location

JOURNAL = "aploss-sweep.json"
VERSION = 1
MAX_JOURNAL_BYTES = 64 << 20
ENDED = ("FINISHED", "STOPPED", "FAILED")


def plan_trials(space: dict[str, str], samples: int, seed: int) -> list[dict[str, Any]]:
    """Every trial's values of the searched keys: each grid combination `samples` times, the other
    domains drawn at random (Tune's distributions, from `seed`)."""
    domains = {key: parse_domain(spec) for key, spec in space.items()}
    grid = [key for key, domain in domains.items() if domain.kind == "grid"]
    draw = random.Random(seed)
    plan = []
    for _ in range(samples):
        for combination in itertools.product(*(domains[key].values for key in grid)):
            values = dict(zip(grid, combination))
            plan.append({key: values[key] if key in values else _draw(domain, draw) for key, domain in domains.items()})
    return plan


def _draw(domain: Domain, draw: random.Random) -> Any:
    low, high = domain.values[:2]
    if domain.kind == "choice":
        return draw.choice(domain.values)
    if domain.kind == "uniform":
        return draw.uniform(low, high)
    if domain.kind == "loguniform":
        return math.exp(draw.uniform(math.log(low), math.log(high)))
    return draw.randrange(low, high)  # randint: high excluded, as in Tune


@dataclass
class TrialRecord:
    params: dict[str, Any]
    run_name: str
    status: str = "RUNNING"  # RUNNING, then FINISHED, STOPPED (by ASHA) or FAILED
    val_ap: list[float] = field(default_factory=list)
    ended: float | None = None  # seconds since the epoch
    pbt: dict | None = None  # PBT: where the trial's last segment ended (`population.SegmentEnd.record`)


@dataclass
class SweepJournal:
    location: Location
    space: dict[str, str]
    total: int  # trials the sweep runs in all
    plan: list[dict[str, Any]] | None  # random search: every trial's values, in order
    attempts: int = 0
    trials: dict[str, TrialRecord] = field(default_factory=dict)  # by run name

    def ended(self) -> dict[str, TrialRecord]:
        return {name: trial for name, trial in self.trials.items() if trial.status in ENDED}

    def save(self) -> None:
        write_json_atomic({"version": VERSION, "space": self.space, "total": self.total, "plan": self.plan,
                           "attempts": self.attempts,
                           "trials": {name: vars(trial) for name, trial in self.trials.items()}}, self.location)


def open_journal(location: Location, space: dict[str, str], total: int, plan: list[dict] | None) -> SweepJournal:
    """The sweep's journal at `location`, or a new one; ConfigError naming the file when it is not
    one this project wrote for the same search space."""
    if not location.exists():
        return SweepJournal(location, dict(space), total, plan)
    try:
        saved = json.loads(location.read_bounded(MAX_JOURNAL_BYTES, 300, ("the limit for sweep journals",) * 2))
        check_bounded(saved, str(location), max_values=10_000_000)
        if saved["space"] != space:
            raise ConfigError(f"{location}: this sweep searched {saved['space']!r:.500}, not {space}; choose another "
                              "run.name for another search")
        return _journal(location, saved)
    except (InputRefused, ValueError, KeyError, TypeError, RecursionError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{location}: not a sweep journal of this project ({error}); choose another "
                          "run.name to start afresh") from None


def _journal(location: Location, saved: dict) -> SweepJournal:
    if saved["version"] != VERSION:
        raise ValueError(f"version {saved['version']!r}")
    space, plan, trials = saved["space"], saved["plan"], saved["trials"]
    if not (isinstance(space, dict) and all(isinstance(v, str) for v in space.values())):
        raise ValueError("space")
    domains = {key: parse_domain(spec) for key, spec in space.items()}
    if plan is not None and not (isinstance(plan, list) and all(
            isinstance(point, dict) and set(point) == set(space)
            and all(domains[key].contains(value) for key, value in point.items()) for point in plan)):
        raise ValueError("plan: values outside the search space")
    records = {}
    for name, trial in trials.items():
        record = TrialRecord(**trial)
        if record.status not in ("RUNNING", *ENDED) or set(record.params) != set(space) or not all(
                isinstance(ap, (int, float)) for ap in record.val_ap):
            raise ValueError(f"trial {name!r}")
        records[str(name)] = record
    total, attempts = saved["total"], saved["attempts"]
    if not (isinstance(total, int) and isinstance(attempts, int)) or (plan is not None and total != len(plan)):
        raise ValueError("total")
    return SweepJournal(location, space, total, plan, attempts, records)
