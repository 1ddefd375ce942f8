"""The tracking server that infra/ deploys, run for real on loopback: MLflow's basic-auth app with
the auth config of infra/mlflow/mlflow.yaml (only its database swapped for sqlite), started with
the environment its Deployment declares and test values for the Secrets of
infra/mlflow/secrets.example.yaml. Anonymous requests are refused, the admin from the environment
can track, a wrong password cannot, and the shipped Job creates the account whose credentials the
Ray pods get, an account that cannot write anyone else's runs.
"""
import configparser
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.exceptions import MlflowException

pytest.importorskip("flask_wtf", reason="the basic-auth app needs mlflow[auth] (the dev extra)")

INFRA = Path(__file__).resolve().parents[1] / "infra"


def _objects(path: Path) -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc
            for doc in yaml.safe_load_all(path.read_text()) if doc}


MLFLOW = _objects(INFRA / "mlflow" / "mlflow.yaml")
SERVER = MLFLOW["Deployment", "mlflow"]["spec"]["template"]["spec"]["containers"][0]
ACCOUNT_JOB_SPEC = MLFLOW["Job", "mlflow-jobs-account"]["spec"]["template"]["spec"]
ACCOUNT_JOB = ACCOUNT_JOB_SPEC["containers"][0]
RAY_HEAD_SPEC = _objects(INFRA / "kuberay" / "raycluster.yaml")["RayCluster", "aploss"]["spec"][
    "headGroupSpec"]["template"]["spec"]
RAY_HEAD = RAY_HEAD_SPEC["containers"][0]
MLFLOW_CREDENTIALS = "/home/ray/.mlflow/credentials"  # the Ray pods' ~/.mlflow/credentials


def _example_secrets() -> dict[tuple[str, str], str]:
    """The example Secrets, each placeholder replaced by a fresh value: what an operator fills in."""
    return {(name, key): re.sub(r"CHANGE-ME[\w-]*", lambda _: f"test-{secrets.token_urlsafe(12)}", value)
            for (_, name), doc in _objects(INFRA / "mlflow" / "secrets.example.yaml").items()
            for key, value in doc["stringData"].items()}


def _secret_volumes(spec: dict) -> dict[str, dict]:
    return {volume["name"]: volume["secret"] for volume in spec.get("volumes", []) if "secret" in volume}


def _mounted_secret(spec: dict, container: dict, path: str) -> tuple[str, str]:
    """(Secret, key) of the file a container reads at `path`."""
    volumes = _secret_volumes(spec)
    (mount,) = [m for m in container["volumeMounts"]
                if m["name"] in volumes and path.startswith(m["mountPath"].rstrip("/") + "/")]
    source, name = volumes[mount["name"]], path[len(mount["mountPath"].rstrip("/")) + 1:]
    return source["secretName"], {i["path"]: i["key"] for i in source.get("items", [])}.get(name, name)


def _ray_account(values) -> tuple[str, str]:
    """The MLflow user and password a Ray head reads from its credentials file."""
    parser = configparser.ConfigParser()
    parser.read_string(values[_mounted_secret(RAY_HEAD_SPEC, RAY_HEAD, MLFLOW_CREDENTIALS)])
    return parser["mlflow"]["mlflow_tracking_username"], parser["mlflow"]["mlflow_tracking_password"]


def _secret_ref(container: dict, variable: str) -> tuple[str, str]:
    (entry,) = [entry for entry in container["env"] if entry["name"] == variable]
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def _environment(container: dict, values: dict[tuple[str, str], str]) -> dict[str, str]:
    """A container's `env` as Kubernetes would set it, Secrets resolved from `values`."""
    env = {}
    for entry in container["env"]:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        env[entry["name"]] = values[ref["name"], ref["key"]] if ref else entry["value"]
    return env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def values():
    return _example_secrets()


@pytest.fixture(scope="module")
def uri(tmp_path_factory, values):
    directory = tmp_path_factory.mktemp("mlflow-auth")
    # The shipped auth config with the database swapped for the tracking store's own, as in the
    # deployment: the auth tables have to live beside the tracking schema there too.
    database = f"sqlite:///{directory / 'mlflow.db'}"
    config = configparser.ConfigParser()
    config.read_string(MLFLOW["ConfigMap", "mlflow-auth"]["data"]["basic_auth.ini"])
    config["mlflow"]["database_uri"] = database
    with open(directory / "basic_auth.ini", "w") as handle:
        config.write(handle)

    env = {name: value for name, value in os.environ.items() if not name.startswith("MLFLOW_TRACKING_")}
    env |= _environment(SERVER, values)
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(directory / "basic_auth.ini")
    port = _free_port()
    log_path = directory / "server.log"
    with open(log_path, "w") as log:
        # The Deployment's --app-name; its stores, address and worker count are the cluster's.
        app = [arg for arg in SERVER["args"] if arg.startswith("--app-name")]
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", *app, "--host", "127.0.0.1",
             "--port", str(port), "--backend-store-uri", database,
             "--default-artifact-root", str(directory / "artifacts"), "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{address}/health", timeout=1)  # probes need no login
                break
            except OSError as error:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start:\n{log_path.read_text()}") from error
                time.sleep(0.3)
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already when it failed to start
            os.killpg(process.pid, signal.SIGKILL)  # the server and its workers, which hold the port
        process.wait()


def _login(monkeypatch, container: dict, user: str, password: str, values) -> tuple[str, str]:
    """Set MLflow's client variables to the credentials `container` gets from its Secrets."""
    credentials = values[_secret_ref(container, user)], values[_secret_ref(container, password)]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", credentials[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", credentials[1])
    return credentials


def _login_as_admin(monkeypatch, values) -> tuple[str, str]:
    return _login(monkeypatch, SERVER, "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", values)


def _run_account_job(monkeypatch, uri: str, values, directory: Path) -> None:
    """The Job's script in this process (mlflow is imported already), with the Job's environment
    and its Secret files, laid out under `directory` instead of /."""
    assert ACCOUNT_JOB["command"] == ["python", "-c"]
    volumes = _secret_volumes(ACCOUNT_JOB_SPEC)
    for mount in ACCOUNT_JOB["volumeMounts"]:
        if mount["name"] in volumes:
            source = volumes[mount["name"]]
            files = {i["path"]: i["key"] for i in source.get("items", [])} or \
                {key: key for name, key in values if name == source["secretName"]}
            for path, key in files.items():
                target = directory / mount["mountPath"].lstrip("/") / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(values[source["secretName"], key])
    with monkeypatch.context() as job:
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # the script sets the admin's
            job.setenv(name, os.environ.get(name, ""))
        for name, value in _environment(ACCOUNT_JOB, values).items():
            job.setenv(name, str(directory / value.lstrip("/")) if value.startswith("/etc/") else value)
        job.setenv("MLFLOW_TRACKING_URI", uri)  # the Service's in-cluster address, here loopback
        exec(compile(ACCOUNT_JOB["args"][0], "mlflow-jobs-account", "exec"), {})


def test_requests_without_a_login_are_refused(uri):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert refused.value.code == 401


def test_the_admin_from_the_environment_can_track(uri, values, monkeypatch):
    _login_as_admin(monkeypatch, values)
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("admin-tracks")).info.run_id
    client.log_metric(run_id, "loss", 0.5, step=1)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [0.5]


def test_a_wrong_password_is_refused(uri, values, monkeypatch):
    _login_as_admin(monkeypatch, values)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-admin-password")
    with pytest.raises(MlflowException, match="401"):
        mlflow.MlflowClient(uri).search_experiments()


def _login_as_ray_head(monkeypatch, values) -> None:
    name, password = _ray_account(values)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


def test_the_shipped_job_creates_the_account_of_the_ray_pods(uri, values, monkeypatch, tmp_path):
    _login_as_admin(monkeypatch, values)
    admin = mlflow.MlflowClient(uri)
    admin_run = admin.create_run(admin.create_experiment("admin-only")).info.run_id

    _run_account_job(monkeypatch, uri, values, tmp_path / "first")
    _login_as_ray_head(monkeypatch, values)
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("jobs-track")).info.run_id
    client.log_metric(run_id, "loss", 0.25, step=1)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [0.25]
    # The shipped default_permission gives an account no write access to what others created.
    with pytest.raises(MlflowException, match="403"):
        client.log_metric(admin_run, "loss", 1.0)

    # The Secret changes and the Job runs again: the new password works, the old one no longer.
    rotated = dict(values)
    credentials = _mounted_secret(RAY_HEAD_SPEC, RAY_HEAD, MLFLOW_CREDENTIALS)
    rotated[credentials] = values[credentials].replace(_ray_account(values)[1], f"test-{secrets.token_urlsafe(12)}")
    _run_account_job(monkeypatch, uri, rotated, tmp_path / "rotated")
    with pytest.raises(MlflowException, match="401"):
        client.search_experiments()
    _login_as_ray_head(monkeypatch, rotated)
    client.log_metric(run_id, "loss", 0.125, step=2)
