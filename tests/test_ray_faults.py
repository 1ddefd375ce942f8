"""The distributed pipeline under the faults of real use: its driver killed at random steps, a
Ray cluster already running on the machine."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline.data.synthetic import coco_settings, write_synthetic_coco
from tests.process_environment import kill_session

PROJECT = Path(__file__).resolve().parents[1]


def _overrides(data_root: Path, output: Path) -> list[str]:
    # Checkpoints every 2 steps, validation every 6: a kill finds unvalidated checkpoints behind
    # it, which Ray once saved with a null score that no resume could compare.
    return [*coco_settings(data_root), "model.min_size=96",
            "model.max_size=96", "train.batch_size=4", "train.epochs=100", "train.max_steps=12",
            "train.checkpoint_every=2", "train.eval_every=6", "train.log_every=1", "optim.warmup_steps=2",
            "eval.sample_images=0", "ray.workers=2", "ray.local_cpus=4", f"run.output_dir={output}",
            "run.name=faulty"]


def _pipeline(overrides: list[str]) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(PROJECT)}
    environment.pop("RAY_ADDRESS", None)
    environment.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "pipeline.orchestration.cli", "pipeline", "run", *overrides],
                            cwd=PROJECT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _journal_steps(output: Path) -> list[int]:
    path = output / "faulty" / "train" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines(keepends=True)
            if line.endswith("\n") and "loss" in line]


def _finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out
    return out


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=False)["model"]


@pytest.mark.slow  # four runs of the pipeline: about 4 minutes on 2 cores (bash .ci/run -m slow)
def test_killing_the_driver_three_times_ends_with_the_uninterrupted_weights(tmp_path):
    data = tmp_path / "data"
    write_synthetic_coco(data, {"train": 8, "val": 2})
    seed = random.randrange(1 << 30)
    chooser = random.Random(seed)
    output = tmp_path / "interrupted"
    killed_at = []
    for _ in range(3):
        done = max(_journal_steps(output), default=0)
        target = chooser.randint(done + 1, min(done + 4, 11))
        process = _pipeline(_overrides(data, output))
        deadline = time.monotonic() + 300
        while max(_journal_steps(output), default=0) < target:
            assert process.poll() is None, f"seed {seed}: finished before step {target}: {process.stdout.read()}"
            assert time.monotonic() < deadline, f"seed {seed}: step {target} not reached"
            time.sleep(0.05)
        kill_session(process)
        killed_at.append(max(_journal_steps(output)))
    out = _finish(_pipeline(_overrides(data, output)))
    assert "resumed at step" in out

    clean = tmp_path / "clean"
    _finish(_pipeline(_overrides(data, clean)))
    interrupted_weights = _weights(output / "faulty" / "model.pt")
    clean_weights = _weights(clean / "faulty" / "model.pt")
    for key in clean_weights:
        torch.testing.assert_close(interrupted_weights[key], clean_weights[key], rtol=1e-4, atol=2e-6,
                                   msg=lambda m, key=key: f"seed {seed}, killed at {killed_at}: {key}: {m}")

    # Each step recorded once, in the journal and in MLflow, whatever was replayed.
    assert _journal_steps(output) == list(range(1, 13))
    client = mlflow.MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    (train,) = client.search_runs([client.get_experiment_by_name("aploss").experiment_id],
                                  "tags.`aploss.stage` = 'train'")
    assert sorted(m.step for m in client.get_metric_history(train.info.run_id, "loss")) == list(range(1, 13))
    assert sorted(m.step for m in client.get_metric_history(train.info.run_id, "val_ap")) == [6, 12]


@pytest.mark.slow  # two pipeline runs, ~1 min on 2 cores (bash .ci/run -m slow)
def test_ctrl_c_during_ray_train_ends_the_runs_killed_in_one_line_and_resumes(tmp_path):
    # Ray Train's own SIGINT handler used to exit 1 without a word, the runs left FAILED.
    data, output = tmp_path / "data", tmp_path / "runs"
    write_synthetic_coco(data, {"train": 8, "val": 2})
    overrides = [*_overrides(data, output), "train.max_steps=40"]
    process = _pipeline(overrides)
    deadline = time.monotonic() + 300
    while max(_journal_steps(output), default=0) < 5:  # past step 4's checkpoint, a barrier of every worker
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends: the terminal's whole process group
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 130, out
    assert out.strip().splitlines()[-1] == "aploss pipeline run: interrupted; rerunning the same command resumes"
    client = mlflow.MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("aploss").experiment_id
    states = {run.data.tags["aploss.stage"]: run.info.status for run in client.search_runs([experiment])}
    assert states == {"pipeline": "KILLED", "data-prep": "FINISHED", "train": "KILLED"}
    interrupted_at = max(_journal_steps(output))
    assert interrupted_at < 40

    out = _finish(_pipeline(overrides))
    assert "resumed at step" in out
    assert _journal_steps(output) == list(range(1, 41))


def _session_processes(session: int, name: str) -> list[int]:
    listing = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    return [int(pid) for pid, sid, args in (line.split(None, 2) for line in listing.splitlines())
            if int(sid) == session and args.startswith(name)]


@pytest.mark.slow  # ~1 min; test_ray_train's killed worker covers the resume itself
def test_a_worker_killed_during_ray_train_is_one_line_and_the_run_goes_on(tmp_path):
    # Ray printed the failure's tracebacks into the run's output as Train restarted the workers.
    data, output = tmp_path / "data", tmp_path / "runs"
    write_synthetic_coco(data, {"train": 8, "val": 2})
    process = _pipeline([*_overrides(data, output), "train.max_steps=16"])
    deadline = time.monotonic() + 300
    while max(_journal_steps(output), default=0) < 5:
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.1)
    workers = _session_processes(process.pid, "ray::RayTrainWorker")
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    out = _finish(process)
    assert "Traceback" not in out and "Graceful shutdown" not in out
    assert re.search(r"^resumed at step \d+$", out, re.MULTILINE), out
    assert _journal_steps(output) == list(range(1, 17))


def _ray(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "ray"), *arguments], capture_output=True, text=True,
                          timeout=120)


def test_a_running_ray_cluster_is_joined_only_when_asked(tmp_path):
    data = tmp_path / "data"
    write_synthetic_coco(data, {"train": 8, "val": 2})
    started = _ray("start", "--head", "--num-cpus=3", "--include-dashboard=false", "--disable-usage-stats")
    assert started.returncode == 0, started.stderr
    try:
        script = ("import sys; from pipeline.config import load_config; "
                  "from pipeline.orchestration.run import start_ray; import ray; "
                  "start_ray(load_config(None, sys.argv[1:])); "
                  "print('cpus', ray.cluster_resources()['CPU'])")
        environment = {**os.environ, "PYTHONPATH": str(PROJECT)}
        environment.pop("RAY_ADDRESS", None)
        own = subprocess.run([sys.executable, "-c", script, "ray.local_cpus=5"], capture_output=True, text=True,
                             env=environment, timeout=180)
        assert own.returncode == 0, own.stderr
        assert "started a local Ray instance with 5 CPUs" in own.stdout and "cpus 5.0" in own.stdout
        joined = subprocess.run([sys.executable, "-c", script, "ray.address=auto"], capture_output=True, text=True,
                                env=environment, timeout=180)
        assert joined.returncode == 0, joined.stderr
        assert "joined the Ray cluster at auto: 3 CPUs" in joined.stdout and "cpus 3.0" in joined.stdout
    finally:
        _ray("stop", "--force")


@pytest.mark.slow  # two pipeline runs on a tmpfs, ~1 min; test_training covers a full disk in one process
def test_a_full_disk_during_ray_train_fails_in_one_line_leaves_no_partial_and_the_rerun_works(tmp_path, small_disk):
    # Ray's upload used to leave truncated checkpoints, restart the group three times and end with
    # MLflow's store blaming its autoflush, the runs left RUNNING.
    data = tmp_path / "data"
    write_synthetic_coco(data, {"train": 8, "val": 2})
    ray_run = small_disk / "ray" / "faulty"
    cut_short = ray_run / "checkpoint_2026-12-06_00-00-00.000000"  # as Ray's in-place upload left one
    cut_short.mkdir(parents=True)
    (cut_short / "state.pt").write_bytes(b"PK\x03\x04" + bytes(4096))
    torn = ray_run / "checkpoint_0000008"  # a write that a kill cut short
    torn.mkdir()
    (torn / ".state.pt.0f0f.tmp").write_bytes(bytes(4096))
    overrides = [*_overrides(data, small_disk), "train.max_steps=6"]

    out, _ = (process := _pipeline(overrides)).communicate(timeout=600)
    assert process.returncode == 2, out
    assert out.strip().splitlines()[-1] == (
        f"aploss pipeline run: error: no space left on {ray_run}/checkpoint_0000002/state.pt: free some space "
        "there, or set run.output_dir to a larger disk, then rerun the same command to resume")
    assert "Traceback" not in out and "Error in training function" not in out
    client = mlflow.MlflowClient(f"sqlite:///{small_disk / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("aploss").experiment_id
    states = {run.data.tags["aploss.stage"]: run.info.status for run in client.search_runs([experiment])}
    assert states == {"pipeline": "FAILED", "data-prep": "FINISHED", "train": "FAILED"}
    assert sorted(path.name for path in ray_run.rglob("*") if "checkpoint" in str(path)) == []

    subprocess.run(["mount", "-o", "remount,size=400m", str(small_disk)], check=True)
    _finish(_pipeline(overrides))
    assert _journal_steps(small_disk) == list(range(1, 7))
    assert (small_disk / "faulty" / "model.pt").is_file()
