"""delta schedules: values along training, dict round trips, validation."""
import math

import pytest

from aploss.schedules import ConstantDelta, CosineDelta, LinearDelta, StepDelta, schedule_from_dict, schedule_to_dict


def test_constant():
    assert [ConstantDelta(0.7)(p) for p in (0, 0.5, 1)] == [0.7, 0.7, 0.7]


def test_linear_narrows_inside_its_window():
    schedule = LinearDelta(start=1.0, end=0.2, narrow_from=0.2, narrow_until=0.6)
    assert schedule(0.0) == 1.0 and schedule(0.2) == 1.0
    assert schedule(0.4) == pytest.approx(0.6)
    assert schedule(0.6) == pytest.approx(0.2) and schedule(1.0) == pytest.approx(0.2)


def test_cosine_is_half_a_cosine():
    schedule = CosineDelta(start=2.0, end=0.0)
    assert schedule(0.0) == 2.0 and schedule(1.0) == pytest.approx(0.0, abs=1e-15)
    assert schedule(0.5) == pytest.approx(1.0)
    assert schedule(0.25) == pytest.approx(1 + math.cos(math.pi / 4))


def test_step_drops_at_milestones():
    schedule = StepDelta(start=1.0, end=0.0, milestones=(0.5, 0.75))
    assert [schedule(p) for p in (0.0, 0.49, 0.5, 0.74, 0.75, 1.0)] == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0]


@pytest.mark.parametrize("schedule", [
    ConstantDelta(0.3), LinearDelta(1.0, 0.1, 0.1, 0.9), CosineDelta(2.0, 0.5),
    StepDelta(1.0, 0.25, (0.3, 0.6, 0.9)),
])
def test_dict_round_trip(schedule):
    spec = schedule_to_dict(schedule)
    assert spec["kind"] in {"constant", "linear", "cosine", "step"}
    rebuilt = schedule_from_dict(spec)
    assert rebuilt == schedule
    assert [rebuilt(p / 10) for p in range(11)] == [schedule(p / 10) for p in range(11)]


@pytest.mark.parametrize("spec, message", [
    ({"kind": "exponential"}, "unknown kind"),
    ({"start": 1.0}, "'kind'"),
    ({"kind": "linear", "begin": 0.1}, "unknown key"),
    ({"kind": "constant", "value": -1}, "value must be"),
    ({"kind": "cosine", "start": float("inf")}, "start must be"),
    ({"kind": "linear", "narrow_from": 0.8, "narrow_until": 0.2}, "after"),
    ({"kind": "step", "milestones": [0.8, 0.2]}, "increasing"),
    ({"kind": "step", "milestones": [1.5]}, r"\[0, 1\]"),
    ({"kind": "step", "milestones": []}, "at least one"),
])
def test_bad_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        schedule_from_dict(spec)


def test_progress_outside_training_is_an_error():
    with pytest.raises(ValueError, match="progress"):
        LinearDelta()(1.5)


@pytest.mark.parametrize(("schedule", "shown"), [
    (ConstantDelta(), "constant(1)"),
    (LinearDelta(1.0, 0.25), "linear(1→0.25)"),
    (CosineDelta(0.5, 0.1, 0.2, 0.8), "cosine(0.5→0.1 from 0.2 to 0.8 of training)"),
    (StepDelta(1.0, 0.1, (0.5, 0.75)), "step(1→0.1 at 0.5, 0.75 of training)"),
])
def test_a_schedule_reads_as_its_shape_and_values(schedule, shown):
    # MLflow's params showed the dataclass's repr: ConstantDelta(value=1.0).
    assert str(schedule) == shown
