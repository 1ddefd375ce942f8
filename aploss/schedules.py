"""Schedules of the step half-width delta over training progress in [0, 1].

A wide delta ("training wheels") gives every near-miss pair a share of the update early on;
narrowing it makes the loss approach the true, hard-step AP as training matures. Each
schedule is a small frozen dataclass that round-trips through a plain dict, which is what
configs, checkpoints and Ray Tune search spaces carry.
"""
import math
from dataclasses import asdict, dataclass, fields


def _check_delta(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
        raise ValueError(f"delta schedule: {name} must be a finite number >= 0, got {value!r}")


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 <= value <= 1):
        raise ValueError(f"delta schedule: {name} must be a training fraction in [0, 1], got {value!r}")


def _check_progress(progress: float) -> None:
    if not 0 <= progress <= 1:
        raise ValueError(f"delta schedule: progress must be in [0, 1], got {progress!r}")


@dataclass(frozen=True)
class ConstantDelta:
    """delta = value throughout (the released implementation: value = 1)."""

    value: float = 1.0

    def __post_init__(self) -> None:
        _check_delta("value", self.value)

    def __call__(self, progress: float) -> float:
        _check_progress(progress)
        return float(self.value)

    def __str__(self) -> str:  # as MLflow shows it: constant(1)
        return f"constant({self.value:g})"


@dataclass(frozen=True)
class _Narrowing:
    """start until `narrow_from`, end from `narrow_until`, a shape-defined path between."""

    start: float = 1.0
    end: float = 0.1
    narrow_from: float = 0.0
    narrow_until: float = 1.0

    def __post_init__(self) -> None:
        _check_delta("start", self.start)
        _check_delta("end", self.end)
        _check_fraction("narrow_from", self.narrow_from)
        _check_fraction("narrow_until", self.narrow_until)
        if self.narrow_from > self.narrow_until:
            raise ValueError(f"delta schedule: narrow_from ({self.narrow_from}) is after "
                             f"narrow_until ({self.narrow_until})")

    def __str__(self) -> str:  # linear(1→0.1), or linear(1→0.1 from 0.2 to 0.8 of training)
        shape = type(self).__name__.removesuffix("Delta").lower()
        window = ("" if (self.narrow_from, self.narrow_until) == (0.0, 1.0)
                  else f" from {self.narrow_from:g} to {self.narrow_until:g} of training")
        return f"{shape}({self.start:g}→{self.end:g}{window})"

    def _fraction_narrowed(self, progress: float) -> float:
        _check_progress(progress)
        if progress <= self.narrow_from:
            return 0.0
        if progress >= self.narrow_until:
            return 1.0
        return (progress - self.narrow_from) / (self.narrow_until - self.narrow_from)


@dataclass(frozen=True)
class LinearDelta(_Narrowing):
    """Straight line from start to end."""

    def __call__(self, progress: float) -> float:
        return self.start + (self.end - self.start) * self._fraction_narrowed(progress)


@dataclass(frozen=True)
class CosineDelta(_Narrowing):
    """Half cosine from start to end: slow at both ends of the narrowing."""

    def __call__(self, progress: float) -> float:
        done = self._fraction_narrowed(progress)
        return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * done))


@dataclass(frozen=True)
class StepDelta:
    """Drops from start to end in equal steps, one at each milestone (training fractions)."""

    start: float = 1.0
    end: float = 0.1
    milestones: tuple[float, ...] = (0.5, 0.75)

    def __post_init__(self) -> None:
        _check_delta("start", self.start)
        _check_delta("end", self.end)
        object.__setattr__(self, "milestones", tuple(self.milestones))
        if not self.milestones:
            raise ValueError("delta schedule: step needs at least one milestone")
        for milestone in self.milestones:
            _check_fraction("milestones", milestone)
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"delta schedule: milestones must be increasing, got {self.milestones}")

    def __str__(self) -> str:  # step(1→0.1 at 0.5, 0.75 of training)
        return f"step({self.start:g}→{self.end:g} at {', '.join(f'{m:g}' for m in self.milestones)} of training)"

    def __call__(self, progress: float) -> float:
        _check_progress(progress)
        passed = sum(progress >= milestone for milestone in self.milestones)
        return self.start + (self.end - self.start) * passed / len(self.milestones)


DeltaSchedule = ConstantDelta | LinearDelta | CosineDelta | StepDelta
_KINDS: dict[str, type] = {"constant": ConstantDelta, "linear": LinearDelta,
                           "cosine": CosineDelta, "step": StepDelta}


def changed_value(progress: float, value: float, changes: tuple[tuple[float, float], ...]) -> float:
    """`value`, or from each change's training fraction on, that change's value: the values
    Population Based Training set as a run went (`changes` ordered by fraction)."""
    for fraction, changed in changes:
        if progress < fraction:
            break
        value = changed
    return value


def check_changes(changes: tuple[tuple[float, float], ...]) -> None:
    """ValueError unless `changes` are [training fraction, finite value >= 0] pairs in increasing fractions."""
    fractions = []
    for change in changes:
        number = all(isinstance(part, (int, float)) and not isinstance(part, bool) for part in change)
        if len(change) != 2 or not number or not 0 <= change[0] <= 1 or not 0 <= change[1] < math.inf:
            raise ValueError(f"each change is [training fraction in [0, 1], finite value >= 0], got {list(change)}")
        fractions.append(change[0])
    if fractions != sorted(set(fractions)):
        raise ValueError(f"the changes' fractions must increase, got {fractions}")


@dataclass(frozen=True)
class ChangedDelta:
    """A schedule until its first change, then each change's delta from its training fraction on."""

    schedule: "DeltaSchedule"
    changes: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "changes", tuple(tuple(change) for change in self.changes))
        check_changes(self.changes)

    def __call__(self, progress: float) -> float:
        return float(changed_value(progress, self.schedule(progress), self.changes))

    def __str__(self) -> str:  # constant(1), then 0.8 from 0.25 of training
        return f"{self.schedule}" + "".join(f", then {value:g} from {fraction:g}" for fraction, value in self.changes)


def schedule_to_dict(schedule: DeltaSchedule) -> dict:
    kind = next(name for name, cls in _KINDS.items() if type(schedule) is cls)
    values = asdict(schedule)
    if "milestones" in values:
        values["milestones"] = list(values["milestones"])
    return {"kind": kind, **values}


def schedule_fields(kind: str) -> set[str]:
    """The keys a schedule of `kind` takes besides "kind"."""
    if kind not in _KINDS:
        raise ValueError(f"delta schedule: unknown kind {kind!r}; expected one of {sorted(_KINDS)}")
    return {field.name for field in fields(_KINDS[kind])}


def schedule_from_dict(spec: dict) -> DeltaSchedule:
    """The schedule a dict such as {"kind": "cosine", "start": 1.0, "end": 0.1} describes."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"delta schedule: expected a dict with a 'kind' key, got {spec!r}")
    kind = spec["kind"]
    allowed = schedule_fields(kind)
    unknown = set(spec) - allowed - {"kind"}
    if unknown:
        raise ValueError(f"delta schedule: unknown key(s) {sorted(unknown)} for kind {kind!r}; "
                         f"allowed: {sorted(allowed)}")
    return _KINDS[kind](**{key: value for key, value in spec.items() if key != "kind"})
