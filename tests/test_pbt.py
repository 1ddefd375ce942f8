"""Population Based Training (`tune.scheduler: pbt`): the schedule a trial carries, the pointer a
Tune checkpoint holds, and a 2-trial population on CPU in which the trailing trial takes the
leader's state, goes on from it, and replays from the config it gives."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import ray
import torch

from aploss.schedules import ChangedDelta, ConstantDelta
from pipeline.config import ConfigError, load_config
from pipeline.data.synthetic import coco_settings, write_synthetic_coco
from pipeline.orchestration.cli import main
from pipeline.orchestration.population import TrainingSlots, continued, segment_end, training_slot
from pipeline.orchestration.report import sweep_curves
from pipeline.storage import Location
from pipeline.training.journal import read_journal
from pipeline.training.loop import LearningRateFactor
from tests.object_store import TEST_BUCKET
from tests.process_environment import environment, kill_session

PROJECT = Path(__file__).resolve().parents[1]


def test_a_trial_that_changes_its_values_carries_them_as_changes_from_that_step():
    config = load_config(None, ["optim.lr=0.01", "loss.delta.start=1.0"])
    once = continued(config, {"optim.lr": 0.012, "loss.delta.start": 1.0}, 50, 200)
    assert once.optim.lr == 0.01 and once.optim.lr_changes == [[0.25, 0.012]] and once.loss.delta.changes == []
    twice = continued(once, {"optim.lr": 0.012, "loss.delta.start": 0.8}, 100, 200)
    assert twice.optim.lr_changes == [[0.25, 0.012]] and twice.loss.delta.changes == [[0.5, 0.8]]
    # A donor's schedule ahead of the step (a resample at an earlier step) is cut there.
    assert continued(twice, {"optim.lr": 0.02}, 40, 200).optim.lr_changes == [[0.2, 0.02]]

    delta = twice.loss.delta.build()
    assert delta == ChangedDelta(ConstantDelta(1.0), ((0.5, 0.8),))
    assert [delta(p) for p in (0.0, 0.49, 0.5, 1.0)] == [1.0, 1.0, 0.8, 0.8]
    factor = LearningRateFactor.of(twice.optim, 200)
    # warm-up (50 steps from 1/3) and the multistep decay (0.67, 0.89) apply to the changed base lr
    assert factor(0) == pytest.approx(1 / 3) and factor(49) == pytest.approx(1 / 3 + 2 / 3 * 49 / 50)
    assert factor(50) == pytest.approx(1.2) and factor(133) == pytest.approx(1.2)
    assert factor(134) == pytest.approx(0.12) and factor(178) == pytest.approx(0.012)


@pytest.mark.parametrize("changes, problem", [
    ("[[0.5, 0.02], [0.4, 0.01]]", "fractions must increase"), ("[[1.5, 0.02]]", "training fraction in"),
    ("[[0.5]]", "each change is"), ("[[0.5, 0]]", "every lr must be > 0")])
def test_lr_changes_are_checked(changes, problem):
    with pytest.raises(ConfigError, match=f"optim.lr_changes: .*{problem}"):
        load_config(None, [f"optim.lr_changes={changes}"])


def test_pbt_searches_what_it_can_change_during_a_run():
    with pytest.raises(ConfigError, match=r"tune.space.model.min_size: PBT changes values during a run"):
        load_config(None, ["tune.scheduler=pbt", 'tune.space={model.min_size: "choice(256, 320)"}'])
    with pytest.raises(ConfigError, match="loss.delta.kind: PBT sets delta as a constant"):
        load_config(None, ["tune.scheduler=pbt", 'tune.space={loss.delta.start: "uniform(0.5, 2)"}',
                           "loss.delta.kind=linear"])
    with pytest.raises(ConfigError, match="tune.search: PBT starts its population"):
        load_config(None, ["tune.scheduler=pbt", 'tune.space={optim.lr: "uniform(0.01, 0.02)"}', "tune.search=optuna"])


SCHEDULE = {"optim.lr": 0.01, "optim.lr_changes": [[0.5, 0.012]], "loss.delta.start": 1.0, "loss.delta.changes": []}


@pytest.mark.parametrize("change, problem", [
    ({"trial": "other-trial0"}, "not one of this sweep's"),
    ({"run": "pbt-trial1-at6/../../elsewhere"}, "not one of trial pbt-trial1's segments"),
    ({"run": "pbt-trial0-at6"}, "not one of trial pbt-trial1's segments"),
    ({"step": -6}, "step"), ({"step": True}, "step"),
    ({"schedule": {**SCHEDULE, "optim.lr": -1}}, "optim.lr: must be > 0"),
    ({"schedule": {**SCHEDULE, "model.init": "https://elsewhere"}}, "expected the keys"),
    ({"extra": 1}, "expected the keys")])
def test_a_pointer_from_the_shared_run_folder_is_checked(change, problem):
    pointer = {"trial": "pbt-trial1", "run": "pbt-trial1-at6-from-trial0", "step": 12, "schedule": SCHEDULE}
    assert segment_end(pointer, "pbt").run == "pbt-trial1-at6-from-trial0"
    with pytest.raises(ValueError, match=problem):
        segment_end({**pointer, **change}, "pbt")


def test_a_population_trains_as_many_trials_at_once_as_it_has_slots():
    with environment({}):
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
        try:
            slots = TrainingSlots.remote(1)
            with training_slot(slots, "trial0"):
                waiting = slots.acquire.remote("trial1")
                assert ray.wait([waiting], timeout=1.0)[0] == []
                # Tune restarting trial0 under its name: it takes back its own slot
                ray.get(slots.acquire.remote("trial0"), timeout=10)
                assert ray.wait([waiting], timeout=0.5)[0] == []
            ray.get(waiting, timeout=10)
            assert ray.wait([slots.acquire.remote("trial2")], timeout=1.0)[0] == []
        finally:
            ray.shutdown()


def _overrides(data: Path, output: Path) -> list[str]:
    # Two trials, their learning rates drawn from the plan; at step 6, the end of the first of two
    # segments, the trailing one takes the leader's state and its lr times 0.5 (the one factor,
    # never a fresh draw). Two CPUs hold both drivers and one trial's worker at a time: the
    # trials take turns.
    return [*coco_settings(data), "model.min_size=96", "model.max_size=96", "train.batch_size=4",
            "train.max_steps=12", "train.epochs=100", "train.eval_every=6", "train.log_every=1", "ray.workers=1",
            "ray.local_cpus=2", "optim.warmup_steps=2", "eval.sample_images=0", "tune.scheduler=pbt",
            'tune.space={optim.lr: "loguniform(0.001, 0.03)"}', "tune.samples=2", "tune.perturbation_factors=[0.5]",
            "tune.resample_probability=0", "tune.quantile_fraction=0.5", f"run.output_dir={output}", "run.name=pbt"]


def _state(output: Path, run: str, step: int) -> dict:
    return torch.load(output / "ray" / run / f"checkpoint_{step:07d}" / "state.pt", weights_only=True)


def _journal(output: Path) -> dict:
    return json.loads((output / "ray" / "tune" / "pbt-sweep" / "aploss-sweep.json").read_text())


def _curve(output: Path, run: str, key: str) -> dict[int, float]:
    lines = (output / run / "train" / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record[key] for record in map(json.loads, lines) if key in record}


def test_a_population_exploits_its_leader_and_the_trial_replays_from_its_schedule(tmp_path, capsys):
    write_synthetic_coco(tmp_path / "data", {"train": 8, "val": 4})
    output = tmp_path / "runs"
    try:
        assert main(["tune", *_overrides(tmp_path / "data", output)]) == 0
    finally:
        ray.shutdown()
    assert "2 trials of population based training" in capsys.readouterr().out
    journal = _journal(output)
    assert [(trial["status"], len(trial["val_ap"])) for trial in journal["trials"].values()] == [("FINISHED", 2)] * 2

    # The trailing trial's second segment started from the leader's state at step 6: its first step
    # computes the leader's loss to the last digit (the same weights, batch and augmentation), then
    # goes on at half the leader's lr, as its schedule says from half-way on.
    (recipient_run,) = [path.name for path in (output / "ray").iterdir() if "-from-" in path.name]
    recipient, donor = recipient_run.split("-at6-from-")[0], f"pbt-{recipient_run.rsplit('-', 1)[1]}"
    donor_lr = journal["plan"][int(donor[-1])]["optim.lr"]
    assert _curve(output, recipient_run, "loss")[7] == _curve(output, f"{donor}-at6", "loss")[7]
    assert _curve(output, recipient_run, "lr")[7] == pytest.approx(donor_lr * 0.5, rel=1e-12)
    assert _curve(output, f"{donor}-at6", "lr")[7] == pytest.approx(donor_lr, rel=1e-12)
    pointer = journal["trials"][recipient]["pbt"]
    assert pointer["run"] == recipient_run and pointer["schedule"]["optim.lr"] == donor_lr
    assert pointer["schedule"]["optim.lr_changes"] == [[0.5, pytest.approx(donor_lr * 0.5, rel=1e-12)]]

    # MLflow: the trial's lr curve as it went, and its schedule as a config to replay.
    uri = f"sqlite:///{output / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("aploss").experiment_id],
                                f"tags.`mlflow.runName` = '{recipient}'")
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lr")}[7] == pytest.approx(
        donor_lr * 0.5, rel=1e-12)
    schedule = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="schedule.yaml",
                                                        dst_path=str(tmp_path / "schedule"), tracking_uri=uri))

    # `aploss report --sweep` draws the schedule the trial followed: its donor's up to the exploit
    # (the donor's logged lr at every step before it), its own from there, at the logged values.
    capsys.readouterr()
    assert main(["report", "--sweep", "pbt", f"run.output_dir={output}"]) == 0
    printed = capsys.readouterr().out
    assert f"| {recipient} |" in printed and f"lr {donor_lr * 0.5:.3g} at 6" in printed
    (curves,) = [trial for trial in sweep_curves(load_config(None, [f"run.output_dir={output}"]), "pbt")
                 if trial.name == recipient]
    donor_curve, recipient_curve = _curve(output, f"{donor}-at0", "lr"), _curve(output, recipient_run, "lr")
    assert curves.steps == list(range(1, 13))
    assert curves.lr[:6] == pytest.approx([donor_curve[step] for step in range(1, 7)], rel=1e-12)
    assert curves.lr[6:] == pytest.approx([recipient_curve[step] for step in range(7, 13)], rel=1e-12)
    assert (output / "report" / "pbt-schedules.png").stat().st_size > 0

    # The README's main job run on that schedule trains from step 0 to the trial's weights.
    try:
        assert main(["pipeline", "run", "--config", str(schedule), "run.name=replay"]) == 0
    finally:
        ray.shutdown()
    replayed, trained = _state(output, "replay", 12)["model"], _state(output, recipient_run, 12)["model"]
    for key in trained:
        torch.testing.assert_close(replayed[key], trained[key], rtol=1e-4, atol=2e-6,
                                   msg=lambda m, key=key: f"{key}: {m}")
    best = load_config(output / "pbt-sweep-best.yaml")
    assert best.optim.lr_changes in ([], pointer["schedule"]["optim.lr_changes"])


@pytest.mark.slow  # a killed sweep and its rerun: about 3 minutes on 2 cores (bash .ci/run -m slow)
def test_a_population_whose_driver_is_killed_goes_on_from_each_trials_last_report(tmp_path):
    write_synthetic_coco(tmp_path / "data", {"train": 8, "val": 4})
    output = tmp_path / "runs"
    overrides = [*_overrides(tmp_path / "data", output), "train.max_steps=18"]  # three segments
    environment = {**os.environ, "PYTHONPATH": str(PROJECT)}
    environment.pop("RAY_ADDRESS", None)
    environment.pop("MLFLOW_TRACKING_URI", None)
    process = subprocess.Popen([sys.executable, "-m", "pipeline.orchestration.cli", "tune", *overrides], cwd=PROJECT,
                               env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while not any(trial.get("pbt") for trial in _journal_or_none(output).values()):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no trial reported a segment"
        time.sleep(0.2)
    kill_session(process)
    reported = {name: trial["pbt"] for name, trial in _journal(output)["trials"].items() if trial.get("pbt")}

    try:
        assert main(["tune", *overrides]) == 0
    finally:
        ray.shutdown()
    journal = _journal(output)
    assert journal["attempts"] == 2
    assert [(trial["status"], trial["pbt"]["step"]) for trial in journal["trials"].values()] == [("FINISHED", 18)] * 2
    for name, pointer in reported.items():
        # The trial went on from its last report: its next segment started at that step (Ray
        # Train's own checkpoint of it, if the kill came after one), not from step 0 again.
        segment = next(path for path in output.iterdir() if path.name.startswith(f"{name}-at{pointer['step']}"))
        assert min(_curve(output, segment.name, "loss")) == pointer["step"] + 1
        assert len(journal["trials"][name]["val_ap"]) == 3


def _journal_or_none(output: Path) -> dict:
    try:
        return _journal(output)["trials"]
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


@pytest.mark.slow  # the population above with its outputs in an object store: about 3 minutes on 2 cores
def test_a_population_in_an_object_store_exchanges_states_through_it(s3_server, tmp_path, monkeypatch):
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    write_synthetic_coco(tmp_path / "data", {"train": 8, "val": 4})
    output = Location(f"s3://{TEST_BUCKET}/{tmp_path.name}/runs")
    try:
        assert main(["tune", *_overrides(tmp_path / "data", tmp_path / "unused"), f"run.output_dir={output}",
                     f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    finally:
        ray.shutdown()
    journal = json.loads((output / "ray" / "tune" / "pbt-sweep" / "aploss-sweep.json").read_text())
    assert [trial["status"] for trial in journal["trials"].values()] == ["FINISHED"] * 2
    (recipient,) = [trial for trial in journal["trials"].values() if "-from-" in trial["pbt"]["run"]]
    donor = f"pbt-{recipient['pbt']['run'].rsplit('-', 1)[1]}"
    # The recipient started from the donor's state in the store: the same first loss.
    recipient_losses = read_journal(output / recipient["pbt"]["run"] / "train" / "metrics.jsonl")
    donor_losses = read_journal(output / f"{donor}-at6" / "train" / "metrics.jsonl")
    first = [[record["loss"] for record in losses if record["step"] == 7]
             for losses in (recipient_losses, donor_losses)]
    assert first[0] == first[1] and len(first[0]) == 1
    assert not (tmp_path / "unused").exists()
