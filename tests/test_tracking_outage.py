"""The tracking server is not a single point of failure: unreachable at start, it fails in
seconds with its URI named; gone during training, the metrics wait in the run's journal and
reach MLflow once, when it is back."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

from pipeline.orchestration.cli import main
from pipeline.orchestration.tracking import MetricsForwarder
from pipeline.training.journal import MetricsJournal


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`mlflow server` on loopback, stopped and started again on the same port and store."""

    def __init__(self, directory, port):
        self.directory, self.port, self.process = directory, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.directory / 'mlflow.db'}",
             "--default-artifact-root", str(self.directory / "artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not start")

    def stop(self):
        if self.process is not None:  # the server and its web workers, which hold the port
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path, _free_port())
    yield server
    server.stop()


def test_an_unreachable_server_at_start_fails_in_seconds_naming_it(tmp_path, capsys):
    uri = f"http://user:secret@127.0.0.1:{_free_port()}"
    started = time.monotonic()
    assert main(["pipeline", "run", f"tracking.uri={uri}", f"run.output_dir={tmp_path}"]) == 2
    assert time.monotonic() - started < 15
    error = capsys.readouterr().err
    assert "MLflow tracking server http://127.0.0.1:" in error and "is unreachable" in error
    assert "secret" not in error  # credentials in a URI are not printed


def test_metrics_wait_for_the_server_and_arrive_once(tmp_path, server, capsys):
    server.start()
    client = mlflow.MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    journal_path = tmp_path / "metrics.jsonl"
    journal = MetricsJournal(journal_path)
    with MetricsForwarder(journal_path, run_id, server.uri, interval=0.2, flush_seconds=60):
        for step in range(1, 4):
            journal.write(step, {"loss": 1.0 / step})
        time.sleep(2)
        server.stop()  # the server dies mid-training: training goes on writing its journal
        for step in range(4, 9):
            journal.write(step, {"loss": 1.0 / step})
        time.sleep(1)
        server.start()  # back: what waited is sent
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 9))
    assert "warning" not in capsys.readouterr().out

    # A resumed run replays steps after its last checkpoint: the journal keeps each step once,
    # and a new forwarder sends only what MLflow lacks.
    journal = MetricsJournal(journal_path)
    for step in range(6, 11):
        journal.write(step, {"loss": 1.0 / step})
    with MetricsForwarder(journal_path, run_id, server.uri, interval=0.2):
        pass
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 11))
    assert [json.loads(line)["step"] for line in journal_path.read_text().splitlines()] == list(range(1, 11))


def test_a_server_that_stays_away_costs_seconds_and_is_said(tmp_path, server, capsys):
    server.start()
    client = mlflow.MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("gone")).info.run_id
    journal_path = tmp_path / "metrics.jsonl"
    MetricsJournal(journal_path).write(1, {"loss": 0.5})
    server.stop()
    started = time.monotonic()
    with MetricsForwarder(journal_path, run_id, server.uri, interval=0.2, flush_seconds=3):
        pass
    assert time.monotonic() - started < 10
    out = capsys.readouterr().out
    assert f"they are kept in {journal_path}" in out and server.uri in out
