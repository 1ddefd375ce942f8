"""A 2-trial sweep on CPU: ASHA stops the trailing trial, the best config is written and loads;
a rerun resumes from the sweep's own journal, never unpickling what the run folder holds, and
no credential reaches Ray's logs."""
import json
import os
import pickle
import tempfile
from pathlib import Path

import mlflow
import pytest
import ray

from pipeline.config import ConfigError, load_config
from pipeline.data.synthetic import coco_settings, write_synthetic_coco
from pipeline.orchestration.cli import main
from pipeline.orchestration.sweep_journal import JOURNAL, SweepJournal, TrialRecord, open_journal, plan_trials
from pipeline.search_space import parse_domain
from pipeline.storage import Location


def test_search_domains_parse_and_reject_bad_specs():
    assert parse_domain("loguniform(1e-4, 0.1)").values == (1e-4, 0.1)
    assert parse_domain("choice(constant, cosine)").values == ("constant", "cosine")
    assert parse_domain("randint(0, 100)").candidates() == (0, 99)
    for bad, message in [("normal(0, 1)", "not a search domain"), ("uniform(1, 0)", "low must be below high"),
                         ("loguniform(0, 1)", "low > 0"), ("randint(0.5, 2)", "integer bounds"),
                         ("choice()", "at least one value")]:
        with pytest.raises(ValueError, match=message):
            parse_domain(bad)


def test_search_space_is_validated_against_the_schema():
    with pytest.raises(ConfigError, match="tune.space.optim.foo: not a config key"):
        load_config(None, ['tune.space={optim.foo: "choice(1, 2)"}'])
    with pytest.raises(ConfigError, match="tune.space.loss.delta.kind: value 'bogus' gives an invalid config"):
        load_config(None, ['tune.space={loss.delta.kind: "choice(constant, bogus)"}'])
    losses = load_config(None, ['tune.space={loss.classification: "grid(ap, focal, alrp, rs)"}'])
    assert losses.tune.space == {"loss.classification": "grid(ap, focal, alrp, rs)"}
    with pytest.raises(ConfigError, match="tune.space.loss.classification: value 'softmax' gives an invalid config"):
        load_config(None, ['tune.space={loss.classification: "grid(ap, softmax)"}'])
    with pytest.raises(ConfigError, match="value 6 gives an invalid config: train.batch_size"):
        load_config(None, ['tune.space={train.batch_size: "grid(8, 6)"}', "ray.workers=4"])


SECRET = "aws-s3cr3t-9d2f"


class _RunsCode:
    """Unpickling this creates `marker`: what a crafted tuner.pkl in the shared run folder could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def _rerun_finds_two_trials(overrides, capsys, client, experiment: str, sweep_run_id: str) -> None:
    """The same sweep run again: the same two trials, in their own MLflow runs."""
    try:
        assert main(["tune", "--samples", "1", *overrides]) == 0
    finally:
        ray.shutdown()
    assert "2 trials, 1 stopped early by ASHA" in capsys.readouterr().out
    assert len(client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{sweep_run_id}'")) == 2


def test_sweep_stops_the_trailing_trial_and_writes_the_best_config(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # Tune would copy it into each trial's runtime env
    write_synthetic_coco(tmp_path / "data", {"train": 8, "val": 4})
    overrides = [
        *coco_settings(tmp_path / 'data'), "model.min_size=96", "model.max_size=96",
        "train.batch_size=4", "train.max_steps=24", "train.epochs=100", "train.eval_every=6", "ray.workers=1",
        "ray.local_cpus=4", "optim.warmup_steps=2", 'tune.space={optim.lr: "grid(0.02, 0.000001)"}',
        "tune.grace_period=2", f"run.output_dir={tmp_path / 'runs'}", "run.name=sweep-test"]
    try:
        assert main(["tune", "--samples", "1", *overrides]) == 0
    finally:
        ray.shutdown()
    # The sweep's Ray session (aploss tune ends it): the runtime env agent's log and every other.
    session_logs = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray" / "session_latest" / "logs"
    assert (session_logs / "runtime_env_agent.log").is_file()
    assert [str(path) for path in session_logs.rglob("*") if path.is_file() and SECRET.encode() in path.read_bytes()
            ] == []
    printed = capsys.readouterr().out
    assert "2 trials, 1 stopped early by ASHA" in printed
    # Tune's last progress table: the searched key and the metric, not every key a trial reports.
    header = [line for line in printed.splitlines() if "Trial name" in line][-1].split()
    assert "optim.lr" in header and "val_ap" in header and not {"score", "step"} & set(header)
    best = load_config(tmp_path / "runs" / "sweep-test-sweep-best.yaml")
    assert best.optim.lr == 0.02 and best.train.max_steps == 24

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("aploss").experiment_id
    (sweep,) = client.search_runs([experiment], "tags.`aploss.stage` = 'sweep'")
    assert "sweep-test-sweep-best.yaml" in [a.path for a in client.list_artifacts(sweep.info.run_id)]
    trials = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{sweep.info.run_id}'")
    assert sorted(t.data.params["optim.lr"] for t in trials) == ["0.02", "1e-06"]
    reports = sorted(len(client.get_metric_history(t.info.run_id, "val_ap")) for t in trials)
    # The stopped trial validated at least twice (grace period), and not to the end: Ray Train's
    # worker goes on while Tune decides, so one more validation may land before the stop.
    assert 2 <= reports[0] < 4 and reports[1] == 4
    statuses = {t.data.params["optim.lr"]: t.info.status for t in trials}
    assert statuses == {"0.02": "FINISHED", "1e-06": "KILLED"} and sweep.info.status == "FINISHED"

    # Rerunning the same sweep resumes it from its journal: no trial runs again, and nothing of
    # Tune's state is read, a tuner.pkl planted in the shared run folder included.
    tune_dir = tmp_path / "runs" / "ray" / "tune"
    marker = tmp_path / "code-ran"
    for state in tune_dir.rglob("tuner.pkl"):
        state.write_bytes(pickle.dumps(_RunsCode(marker)))
    _rerun_finds_two_trials(overrides, capsys, client, experiment, sweep.info.run_id)
    assert not marker.exists() and sorted(path.name for path in tune_dir.iterdir()) == [
        "sweep-test-sweep", "sweep-test-sweep-1"]

    # A sweep cut off while a trial ran: the rerun runs that trial alone, in its own MLflow run.
    journal_path = tune_dir / "sweep-test-sweep" / "aploss-sweep.json"
    journal = json.loads(journal_path.read_text())
    stopped = next(name for name, trial in journal["trials"].items() if trial["status"] == "STOPPED")
    journal["trials"][stopped].update(status="RUNNING", ended=None)
    journal_path.write_text(json.dumps(journal))
    _rerun_finds_two_trials(overrides, capsys, client, experiment, sweep.info.run_id)
    resumed = json.loads(journal_path.read_text())
    assert resumed["attempts"] == 2 and resumed["trials"][stopped]["status"] == "STOPPED"
    assert {name: trial["val_ap"] for name, trial in resumed["trials"].items() if name != stopped} == {
        name: trial["val_ap"] for name, trial in journal["trials"].items() if name != stopped}


def test_optuna_search_is_limited_to_the_concurrency_and_told_the_ended_trials(tmp_path):
    pytest.importorskip("optuna")
    from ray.tune.search import ConcurrencyLimiter

    from pipeline.orchestration.tune import _search_algorithm

    config = load_config(None, ["tune.search=optuna", "tune.max_concurrent=3", "tune.samples=5"])
    journal = SweepJournal(Location(tmp_path / JOURNAL), config.tune.space, 5, None)
    params = {key: parse_domain(spec).candidates()[0] for key, spec in config.tune.space.items()}
    journal.trials = {"a": TrialRecord(params, "a", "STOPPED", [0.1, 0.2]), "b": TrialRecord(params, "b")}
    searcher, remaining = _search_algorithm(config, journal)
    assert isinstance(searcher, ConcurrencyLimiter) and searcher.max_concurrent == 3 and remaining == 4
    assert searcher.searcher._points_to_evaluate == [params] and searcher.searcher._evaluated_rewards == [0.2]


def test_a_random_sweep_is_planned_up_front_and_resumes_the_trials_that_did_not_end(tmp_path):
    from pipeline.orchestration.tune import _search_algorithm

    config = load_config(None, ['tune.space={optim.lr: "loguniform(0.001, 0.1)", optim.schedule: "grid(multistep, '
                                'cosine)"}', "tune.samples=3", "run.name=s"])
    plan = plan_trials(config.tune.space, config.tune.samples, seed=0)
    assert plan == plan_trials(config.tune.space, config.tune.samples, seed=0) != plan_trials(
        config.tune.space, config.tune.samples, seed=1)
    assert [point["optim.schedule"] for point in plan] == ["multistep", "cosine"] * 3
    assert all(0.001 <= point["optim.lr"] <= 0.1 for point in plan) and len({p["optim.lr"] for p in plan}) == 6
    journal = SweepJournal(Location(tmp_path / JOURNAL), config.tune.space, len(plan), plan)
    journal.trials = {"s-trial0": TrialRecord(plan[0], "s-trial0", "FINISHED", [0.3]),
                      "s-trial4": TrialRecord(plan[4], "s-trial4", "FAILED"),
                      "s-trial2": TrialRecord(plan[2], "s-trial2", "RUNNING", [0.1])}
    searcher, remaining = _search_algorithm(config, journal)
    assert remaining == 4
    assert searcher._points_to_evaluate == [{**plan[index], "trial": index} for index in (1, 2, 3, 5)]


@pytest.mark.parametrize(("change", "problem"), [
    (lambda saved: saved["plan"][1].update({"optim.lr": "import os"}), "not a sweep journal of this project"),
    (lambda saved: saved["trials"]["s-trial0"].update(status="PWNED"), "not a sweep journal of this project"),
    (lambda saved: saved.update(space={"optim.lr": "grid(1, 2)"}), "this sweep searched"),
])
def test_a_sweep_journal_from_the_shared_run_folder_is_checked(tmp_path, change, problem):
    space = {"optim.lr": "grid(0.01, 0.02)"}
    plan = plan_trials(space, 1, seed=0)
    journal = SweepJournal(Location(tmp_path / JOURNAL), space, 2, plan)
    journal.trials = {"s-trial0": TrialRecord(plan[0], "s-trial0", "FINISHED", [0.3])}
    journal.save()
    assert open_journal(journal.location, space, 2, plan).trials == journal.trials
    saved = json.loads((tmp_path / JOURNAL).read_text())
    change(saved)
    (tmp_path / JOURNAL).write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=f"{tmp_path / JOURNAL}: {problem}"):
        open_journal(journal.location, space, 2, plan)
