"""Ray job entrypoints, runtime env and submission; end to end on a local `ray start --head`."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from ray._private.runtime_env.packaging import _get_excludes
from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

import jobs
from jobs import prep, report, robustness, train
from jobs import runtime_env as runtime_env_module
from jobs import submit as submit_module
from jobs.runtime_env import PASSED_ENV, runtime_env
from jobs.submit import auth_headers, submit
from pipeline.config import Config, load_config
from pipeline.data.synthetic import coco_settings, write_synthetic_coco
from pipeline.orchestration import cli

PROJECT = Path(__file__).resolve().parents[1]
TOKEN = "aploss-test-" + "0" * 20


@pytest.fixture
def clean_env(monkeypatch):
    for name in [*PASSED_ENV, "APLOSS_SUBMIT_DIR", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                 "RAY_AUTH_TOKEN_PATH"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_runtime_env_ships_the_project_and_only_set_variables(clean_env, capsys):
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    clean_env.setenv("AWS_SESSION_TOKEN", "")
    env = runtime_env()
    assert env["working_dir"] == str(PROJECT)
    # Ray matches the excludes as .gitignore does: every file of the project's code goes with the
    # job, and the local outputs and environment stay behind.
    excluded = _get_excludes(PROJECT, env["excludes"])
    tracked = subprocess.run(["git", "ls-files"], cwd=PROJECT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert tracked and not [name for name in tracked if excluded(PROJECT / name)]
    for local in ("runs/x/model.pt", "data/bccd/x.jpg", ".venv/bin/python", "mlflow.db", "benchmarks/results/x.json"):
        assert excluded(PROJECT / local), local
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "APLOSS_SUBMIT_DIR": os.getcwd()}
    assert "pip" not in env
    assert any(requirement.startswith("torch") for requirement in runtime_env(pip=True)["pip"])

    assert runtime_env_module.main(["--pip"]) == 0
    assert json.loads(capsys.readouterr().out) == runtime_env(pip=True)


def test_a_job_sees_paths_as_the_submitter_gave_them(clean_env, tmp_path, monkeypatch, capsys):
    # APLOSS_DATA_ROOT=../shared/datasets was passed verbatim and resolved in Ray's copy of the
    # project; run.output_dir=runs put every output under /tmp/ray/session_*/working_dir_files.
    monkeypatch.chdir(tmp_path)
    clean_env.setenv("APLOSS_DATA_ROOT", "../shared/datasets")
    env = runtime_env()["env_vars"]
    assert env["APLOSS_DATA_ROOT"] == str(tmp_path.parent / "shared" / "datasets")
    assert env["APLOSS_SUBMIT_DIR"] == str(tmp_path)

    seen = {}
    monkeypatch.setattr(jobs.cli, "main", lambda arguments: seen.update(cwd=os.getcwd(), arguments=arguments) or 0)
    monkeypatch.chdir(PROJECT)  # where Ray runs the entrypoint: its copy of the project
    clean_env.setenv("APLOSS_SUBMIT_DIR", str(tmp_path))
    assert jobs.run_command(["pipeline", "run"], ["run.output_dir=runs"]) == 0
    assert seen == {"cwd": str(tmp_path), "arguments": ["pipeline", "run", "run.output_dir=runs"]}

    # A cluster node that does not see the submitter's folder refuses relative paths.
    clean_env.setenv("APLOSS_SUBMIT_DIR", str(tmp_path / "elsewhere"))
    seen.clear()
    assert jobs.run_command(["pipeline", "run"], ["data.root=/shared/data"]) == 2
    error = capsys.readouterr().err
    assert "APLOSS_DATA_ROOT=../shared/datasets, run.output_dir=runs relative to" in error and not seen
    clean_env.delenv("APLOSS_DATA_ROOT")
    assert jobs.run_command(["pipeline", "run"], ["run.output_dir=s3://bucket/runs", "data.root=/shared/data"]) == 0
    (tmp_path / "job.yaml").write_text("run: {output_dir: outputs}\ndata: {root: /shared/data}\n")
    assert jobs.run_command(["pipeline", "run"], ["--config", str(tmp_path / "job.yaml")]) == 2
    assert "run.output_dir=outputs relative to" in capsys.readouterr().err
    assert jobs.run_command(["pipeline", "run"], ["--config", "configs/job.yaml"]) == 2
    assert "--config=configs/job.yaml relative to" in capsys.readouterr().err


def test_entrypoint_passes_config_and_overrides(clean_env, tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text("optim:\n  lr: 0.02\ntrain:\n  epochs: 3\n")
    seen: list[Config] = []
    monkeypatch.setitem(cli.COMMANDS, "prep", seen.append)
    assert prep.main(["--config", str(path), "train.epochs=5", "run.name=job"]) == 0
    assert (seen[0].optim.lr, seen[0].train.epochs, seen[0].run.name) == (0.02, 5, "job")


def test_comparison_entrypoints_pass_their_runs(clean_env, monkeypatch):
    seen: list[tuple[Config, list[str]]] = []
    for command in ("robustness", "report"):
        monkeypatch.setitem(cli.COMMANDS, command, lambda config, runs, sweep=None: seen.append((config, runs)))
    assert robustness.main(["--run", "a", "--run", "b", "robustness.severities=[3]"]) == 0
    assert report.main(["--run", "a"]) == 0
    assert [runs for _, runs in seen] == [["a", "b"], ["a"]]
    assert seen[0][0].robustness.severities == [3]


def test_tracking_uri_defaults_from_the_environment(clean_env, tmp_path):
    config = load_config(None, [f"run.output_dir={tmp_path}"])
    assert config.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert config.tracking_uri() == "http://mlflow:5000"
    assert load_config(None, ["tracking.uri=sqlite:///x.db"]).tracking_uri() == "sqlite:///x.db"


def test_entrypoint_config_error_exits_2(clean_env, capsys):
    assert prep.main(["no.such=1"]) == 2
    assert "aploss prep: error: unknown key(s) ['no']" in capsys.readouterr().err


def test_train_prepares_first_and_says_in_one_line_what_is_missing(clean_env, tmp_path, capsys):
    # It prepares what it finds unprepared, as its help says; no dataset and no download is one line.
    assert train.main([f"run.output_dir={tmp_path}", f"data.root={tmp_path / 'data'}", "data.download=false"]) == 2
    error = capsys.readouterr().err.strip()
    assert "dataset 'bccd' not found: missing" in error and "Set data.download=true" in error
    assert len(error.splitlines()) == 1


def test_auth_headers(clean_env, tmp_path):
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    assert auth_headers() == {}
    (tmp_path / "token").write_text("from-file\n")
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert auth_headers() == {"Authorization": "Bearer from-file"}
    clean_env.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_headers() == {"Authorization": "Bearer from-env"}
    clean_env.setenv("RAY_AUTH_MODE", "token")  # Ray's client sends it itself
    assert auth_headers() == {}


def test_submit_needs_an_entrypoint(capsys):
    with pytest.raises(SystemExit):
        submit_module.main(["--address", "http://127.0.0.1:8265"])
    assert "give the entrypoint after --" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A head node of its own: its own ports, and a temp dir so that no other local `ray.init()`
    finds it, with token auth on (its own token, which this module's clients send), started
    with the venv first on PATH as the README says. Stopped by SIGTERM to its `ray start
    --block`, which takes down the processes it started; `ray stop` would also kill every other
    Ray on this machine."""
    # Short: Ray's unix sockets live under it (path length limit).
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    dashboard = _free_port()
    ports = ["--port", _free_port(), "--dashboard-port", dashboard, "--ray-client-server-port", _free_port(),
             "--dashboard-agent-listen-port", _free_port()]
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         *map(str, ports), "--num-cpus", "4", "--include-dashboard", "true", "--temp-dir", temp_dir,
         "--disable-usage-stats"], stdout=log, stderr=subprocess.STDOUT,
        # No 30 s drain on SIGTERM: nothing here needs a graceful handover.
        env={**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_AUTH_MODE": "token",
             "RAY_AUTH_TOKEN": TOKEN, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    address = f"http://127.0.0.1:{dashboard}"
    earlier_token = os.environ.get("RAY_AUTH_TOKEN")
    os.environ["RAY_AUTH_TOKEN"] = TOKEN
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                JobSubmissionClient(address, headers=auth_headers())
                break
            except ConnectionError:
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray start --head did not come up:\n{(Path(temp_dir) / 'head.log').read_text()}")
                time.sleep(1)
        yield address
    finally:
        if earlier_token is None:
            os.environ.pop("RAY_AUTH_TOKEN", None)
        else:
            os.environ["RAY_AUTH_TOKEN"] = earlier_token
        head.terminate()
        head.wait(timeout=60)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_the_readme_job_line_runs_as_written_with_token_auth(cluster, tmp_path):
    (line,) = [line.strip() for line in (PROJECT / "README.md").read_text().splitlines()
               if "ray job submit" in line and line.strip().startswith("RAY_AUTH_MODE=token")]
    assert "--address http://127.0.0.1:8265" in line
    with pytest.raises(AuthenticationError):  # the head does require the token
        JobSubmissionClient(cluster, headers={}).list_jobs()
    write_synthetic_coco(tmp_path / "data", {"train": 8, "val": 2})
    output = f"runs/readme-job-{tmp_path.name}"  # relative: it must land in the submitter's ./runs
    overrides = [
        "data.dataset=coco", f"data.root={tmp_path / 'data'}", "'data.annotations={train: train.json, val: val.json}'",
        "'data.images={train: train, val: val}'", "data.test_split=val", "model.min_size=96", "model.max_size=96",
        "train.batch_size=4", "train.max_steps=2", "train.epochs=100", "train.eval_every=2", "ray.workers=2",
        f"run.output_dir={output}", "run.name=readme-job"]
    command = line.replace("http://127.0.0.1:8265", cluster) + " " + " ".join(overrides)
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_ADDRESS", "MLFLOW"))}
    try:
        finished = subprocess.run(["bash", "-c", command], cwd=PROJECT, env=environment, capture_output=True,
                                  text=True, timeout=600)
        assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
        assert "succeeded" in finished.stdout.lower()
        assert (PROJECT / output / "readme-job" / "model.pt").is_file()
        assert (PROJECT / output / "readme-job" / "eval" / "metrics.json").is_file()
    finally:
        shutil.rmtree(PROJECT / output, ignore_errors=True)


def test_submit_failing_entrypoint_returns_1(cluster, capsys):
    assert submit([sys.executable, "-m", "jobs.pipeline", "no.such=1"], cluster) == 1
    out = capsys.readouterr().out
    assert "unknown key(s) ['no']" in out and "FAILED" in out


def test_submit_pipeline_job(cluster, tmp_path, capsys):
    write_synthetic_coco(tmp_path / "data", {"train": 8, "val": 2})
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    overrides = [
        *coco_settings(tmp_path / 'data'), "model.min_size=96", "model.max_size=96",
        "train.batch_size=4", "train.max_steps=2", "train.epochs=100", "train.eval_every=2", "ray.workers=2",
        f"run.output_dir={tmp_path / 'runs'}", "run.name=job-test", f"tracking.uri={uri}"]
    # The venv's python: a bare `python` resolves on the raylet's PATH.
    assert submit([sys.executable, "-m", "jobs.pipeline", *overrides], cluster) == 0
    assert "| AP50 |" in capsys.readouterr().out

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("aploss")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`aploss.stage` = 'pipeline'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {run.data.tags["aploss.stage"]: run.info.status for run in children} == {
        "data-prep": "FINISHED", "train": "FINISHED", "evaluate": "FINISHED"}


def test_start_ray_joins_the_cluster_of_the_job(clean_env, monkeypatch):
    import ray

    from pipeline.orchestration.run import start_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    start_ray(load_config(None, []))
    clean_env.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what the job supervisor gives an entrypoint
    start_ray(load_config(None, []))
    start_ray(load_config(None, ["ray.address=ray://head:10001"]))
    # The run's Ray processes log at WARNING: their INFO notes are not the user's business.
    assert [call.pop("logging_config").log_level for call in calls] == ["WARNING"] * 3
    # "local": an instance of its own even where a cluster runs on the machine (ray.address=auto joins it).
    assert calls == [{"address": "local", "num_cpus": 4, "configure_logging": False},
                     {"address": "auto", "configure_logging": False},
                     {"address": "ray://head:10001", "configure_logging": False}]
