"""Search-space specs: one short string per dotted config key, e.g.

    optim.lr: loguniform(1e-4, 1e-1)        loss.delta.kind: choice(constant, linear, cosine, step)
    optim.warmup_steps: randint(0, 200)     optim.schedule: grid(multistep, cosine)

Kept as strings so a sweep is written in the same YAML as every other config, logs cleanly as
MLflow params, and is validated before any trial starts.
"""
import re
from dataclasses import dataclass
from typing import Any

from pipeline import yaml_values
from pipeline.errors import ConfigError

# The delta-interpolation and learning-rate schedules, the sweep's default subject.
DEFAULT_SPACE = {
    "loss.delta.kind": "choice(constant, linear, cosine, step)",
    "loss.delta.start": "uniform(0.5, 2.0)",
    "loss.delta.end": "loguniform(0.05, 0.5)",
    "loss.delta.narrow_from": "uniform(0.0, 0.5)",
    "optim.lr": "loguniform(0.001, 0.03)",
    "optim.warmup_steps": "randint(0, 100)",
    "optim.schedule": "choice(multistep, cosine)",
}


_SPEC = re.compile(r"^\s*(choice|grid|uniform|loguniform|randint)\s*\((.*)\)\s*$")


@dataclass(frozen=True)
class Domain:
    kind: str  # choice | grid | uniform | loguniform | randint
    values: tuple[Any, ...]

    def candidates(self) -> tuple[Any, ...]:
        """Values that stand for the domain when validating it against the config schema."""
        if self.kind in ("choice", "grid"):
            return self.values
        return (self.values[0], self.values[1] - 1 if self.kind == "randint" else self.values[1])

    def contains(self, value: Any) -> bool:
        """Whether `value` is one this domain can give."""
        if self.kind in ("choice", "grid"):
            return value in self.values
        low, high = self.values
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and (low <= value < high if self.kind == "randint" else low <= value <= high) and (
            self.kind != "randint" or isinstance(value, int))

    def to_tune(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        return getattr(tune, self.kind)(*self.values)


def parse_domain(spec: str) -> Domain:
    """`spec` as a Domain; ConfigError explaining the expected forms otherwise."""
    match = _SPEC.match(spec)
    if not match:
        raise ConfigError(f"{spec!r} is not a search domain; expected choice(a, b, ...), grid(a, b, ...), "
                         "uniform(low, high), loguniform(low, high) or randint(low, high)")
    kind, body = match.groups()
    values = tuple(yaml_values.load(part.strip()) for part in body.split(",") if part.strip())
    if kind in ("choice", "grid"):
        if not values:
            raise ConfigError(f"{spec!r}: {kind} needs at least one value")
        return Domain(kind, values)
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{spec!r}: {kind} needs two numbers, low and high")
    low, high = values
    if not low < high:
        raise ConfigError(f"{spec!r}: low must be below high")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{spec!r}: loguniform needs low > 0")
    if kind == "randint" and not all(isinstance(v, int) for v in values):
        raise ConfigError(f"{spec!r}: randint needs integer bounds")
    return Domain(kind, values)
