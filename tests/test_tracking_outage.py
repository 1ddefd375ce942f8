"""The tracking server is not a single point of failure: unreachable at start, it fails in
seconds with its URI named; gone during training, the metrics wait in the run's journal and
reach MLflow once, when it is back."""
import http.server
import json
import threading
import time

import mlflow
import pytest

from pipeline.orchestration.cli import main
from pipeline.orchestration.tracking.forwarding import MetricsForwarder
from pipeline.training.journal import MetricsJournal
from tests.mlflow_server import Server, free_port


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path)
    yield server
    server.stop()


def test_an_unreachable_server_at_start_fails_in_seconds_naming_it(tmp_path, capsys):
    uri = f"http://user:secret@127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert main(["pipeline", "run", f"tracking.uri={uri}", f"run.output_dir={tmp_path}"]) == 2
    assert time.monotonic() - started < 15
    error = capsys.readouterr().err
    assert "MLflow tracking server http://127.0.0.1:" in error and "is unreachable" in error
    assert "secret" not in error  # credentials in a URI are not printed


def test_a_web_server_that_is_not_mlflow_is_named(tmp_path, capsys):
    # Its 404 page for MLflow's REST API used to end in an MlflowException that named no URI.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_port}"
    try:
        assert main(["pipeline", "run", f"tracking.uri={uri}", f"run.output_dir={tmp_path}"]) == 2
    finally:
        server.shutdown()
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the web server's request log
    assert line == (f"aploss pipeline run: error: {uri} answers, but not as an MLflow tracking server (HTTP 404 "
                    "for its REST API): set tracking.uri (or MLFLOW_TRACKING_URI) to the server's address, with "
                    "its path if it is served under one")


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
