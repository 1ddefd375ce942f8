"""Trust boundaries: loading a checkpoint or a registered model runs no code from the file, and
credentials in a URI are stored and printed nowhere."""
import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import ray
import torch

from jobs import runtime_env as runtime_env_module
from jobs import submit as submit_module
from pipeline import checkpoints
from pipeline.config import config_record, load_config
from pipeline.data.synthetic import coco_settings, write_synthetic_coco
from pipeline.errors import DataError
from pipeline.model import build_model, load_model
from pipeline.orchestration.cli import main
from pipeline.orchestration.tracking import connection, registry
from pipeline.redaction import credentials, redact
from tests.conftest import DATA_ROOT
from tests.mlflow_server import Server, free_port

SECRET = "s3cr3t-t0ken-4f9a"
# A password with the characters a pattern for URIs would stop at, the secret on both sides.
PASSWORD = f"{SECRET};{SECRET},'{SECRET}"


class _RunsCode:
    """Unpickling this object creates `marker`: what a crafted checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def _crafted(path: Path, marker: Path) -> Path:
    torch.save({"model": {}, "config": {}, "classes": [], "payload": _RunsCode(marker)}, path)
    return path


def test_a_crafted_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = _crafted(tmp_path / "model.pt", marker)
    torch.load(path, weights_only=False)  # what unpickling it would do
    assert marker.is_dir()
    marker.rmdir()
    with pytest.raises(DataError, match=r"model\.pt: refused: .*GLOBAL os\.makedirs.* without running code"):
        checkpoints.load(path)
    with pytest.raises(DataError, match="refused"):
        load_model(path, torch.device("cpu"))
    assert not marker.exists()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    write_synthetic_coco(root / "data", {"train": 4, "val": 2})
    overrides = [
        *coco_settings(root / 'data'), "model.arch=retinanet_r18",
        "model.min_size=96", "model.max_size=96", "train.batch_size=2", "train.max_steps=2", "train.epochs=100",
        "train.eval_every=2", "ray.workers=1", f"run.output_dir={root / 'runs'}"]
    assert main(["prep", *overrides]) == 0
    return root, overrides


def test_resume_and_eval_refuse_crafted_files_with_one_line(prepared, tmp_path, capsys):
    root, overrides = prepared
    marker = tmp_path / "code-ran"
    run = root / "runs" / "crafted"
    (run / "checkpoints").mkdir(parents=True)
    _crafted(run / "checkpoints" / "step-0000002.pt", marker)
    (run / "checkpoints" / "index.json").write_text(json.dumps({"step-0000002.pt": None}))
    _crafted(run / "model.pt", marker)
    capsys.readouterr()
    for command in ("train", "eval"):
        assert main([command, *overrides, "run.name=crafted"]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert f"aploss {command}: error: {run}" in line and "refused" in line
    assert not marker.exists()


def test_training_state_loads_weights_only_and_resumes(prepared, capsys):
    root, overrides = prepared
    assert main(["train", *overrides, "run.name=resumed", "train.max_steps=1"]) == 0
    assert main(["train", *overrides, "run.name=resumed", "train.max_steps=2"]) == 0
    state = torch.load(root / "runs" / "resumed" / "model.pt", weights_only=True)
    assert set(state) == {"model", "config", "classes", "category_ids"}
    saved = sorted((root / "runs" / "resumed" / "checkpoints").glob("step-*.pt"))
    assert torch.load(saved[-1], weights_only=True)["step"] == 2


def test_the_registered_model_loads_and_serves_from_weights(tmp_path, capsys):
    """Registered as code plus weights, no pickle; the champion version served by `mlflow models
    serve` answers a POST of a BCCD image (base64 in JSON) with what `aploss predict` finds."""
    config = load_config(None, ["model.arch=retinanet_r18", "model.min_size=96", "model.max_size=96",
                                "model.score_thresh=0.0", f"run.output_dir={tmp_path}"])
    torch.manual_seed(0)
    model_path = tmp_path / "model.pt"
    checkpoints.export_model({"model": build_model(config, 3).state_dict(), "config": config_record(config),
                              "classes": ["RBC", "WBC", "Platelets"]}, [1, 2, 3], model_path)
    with mlflow.start_run(experiment_id=connection.configure(config)) as run:
        registry.log_model(model_path, config)
    registry.promote(config, run.info.run_id, 0.5)
    logged = [path.name for path in (tmp_path / "mlartifacts").rglob("*") if path.is_file()]
    assert "model.pt" in logged and not [name for name in logged if name.endswith((".pkl", ".pickle"))]
    client = mlflow.MlflowClient(config.tracking_uri())
    assert int(client.get_model_version_by_alias("aploss-bccd", "champion").version) == 1
    assert mlflow.pyfunc.load_model("models:/aploss-bccd/latest").metadata.run_id == run.info.run_id

    image = DATA_ROOT / "bccd" / "BCCD" / "JPEGImages" / "BloodImage_00000.jpg"
    assert main(["predict", "--model", "models:/aploss-bccd@champion", str(image), "--out",
                 str(tmp_path / "predicted.json"), f"run.output_dir={tmp_path}", "eval.batch_size=1"]) == 0
    predicted = json.loads((tmp_path / "predicted.json").read_text())["annotations"]
    assert predicted and capsys.readouterr()
    loaded = mlflow.pyfunc.load_model("models:/aploss-bccd@champion").predict(
        pd.DataFrame({"image": [image.read_bytes()]}))
    assert loaded["scores"][0] == [a["score"] for a in predicted]

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", "models:/aploss-bccd@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, "MLFLOW_TRACKING_URI": config.tracking_uri(),
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image.read_bytes()).decode()]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        while True:
            try:
                (answer,) = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow models serve did not start"
                time.sleep(0.5)
    finally:
        os.killpg(server.pid, 9)
        server.wait()
    assert answer["scores"] == [a["score"] for a in predicted]
    assert answer["names"] == [["RBC", "WBC", "Platelets"][label] for label in answer["labels"]]
    boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in predicted)]
    assert torch.allclose(torch.tensor(answer["boxes"]), torch.tensor(boxes), atol=1e-4)
    assert [a["category_id"] for a in predicted] == [label + 1 for label in answer["labels"]]


@pytest.mark.parametrize(("text", "expected"), [
    ("http://alice:s3cr3t@127.0.0.1:5000", "http://REDACTED@127.0.0.1:5000"),
    ("https://token@host/path", "https://REDACTED@host/path"),
    ("postgresql://mlflow:pw@postgres:5432/mlflow", "postgresql://REDACTED@postgres:5432/mlflow"),
    ("see s3://bucket/a.json?X-Amz-Credential=AK%2F1&X-Amz-Signature=ab12&v=1#x, then",
     "see s3://bucket/a.json?X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED&v=1#x, then"),
    ("https://acct.blob.core.windows.net/c/f?sv=2022&sig=xyz", "https://acct.blob.core.windows.net/c/f?sv=2022&sig=REDACTED"),
    ("sqlite:////tmp/runs/mlflow.db", "sqlite:////tmp/runs/mlflow.db"),
    ("http://h:99999x/", "http://h:99999x/"),
    ("/data/a@b/c.json and user@example.com", "/data/a@b/c.json and user@example.com"),
    # Passwords hold what RFC 3986 lets them (; , ') and what it does not (# ? unencoded).
    ("tracking.uri=http://alice:pa;ss@host", "tracking.uri=http://REDACTED@host"),
    ("{'uri': \"http://al:p,a'ss@h:5/p\"}", "{'uri': \"http://REDACTED@h:5/p\"}"),
    ("http://u:p#w?d@h/x?token=1#f", "http://REDACTED@h/x?token=REDACTED#f"),
    ("http://h?token=abc", "http://h?token=REDACTED"),
    ("http://a/login?next=https://b:pw@c/", "http://a/login?next=https://REDACTED@c/"),
    ("a https://u@h b https://v:w@k", "a https://REDACTED@h b https://REDACTED@k"),
])
def test_redact(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize(("uri", "bare", "user", "password"), [
    ("http://alice:pa;ss@host:5000/x", "http://host:5000/x", "alice", "pa;ss"),
    ("https://u:p%40w#?@h", "https://h", "u", "p@w#?"),
    ("https://token@h/p?q=1", "https://h/p?q=1", "token", None),
    ("/local/mlruns", "/local/mlruns", None, None),
])
def test_credentials_are_split_where_redaction_finds_them(uri, bare, user, password):
    assert credentials(uri) == (bare, user, password)
    assert redact(uri) == (uri if user is None else bare.replace("://", "://REDACTED@", 1))


def test_credentials_never_travel_in_a_job(monkeypatch, capsys, tmp_path):
    for name in runtime_env_module.PASSED_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert SECRET not in json.dumps(runtime_env_module.runtime_env())

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{PASSWORD}@mlflow:5000")
    assert runtime_env_module.main([]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "$MLFLOW_TRACKING_URI carries credentials" in line and SECRET not in line

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    config = tmp_path / "job.yaml"
    config.write_text(f"tracking:\n  uri: https://alice:{PASSWORD}@mlflow\n")
    for entrypoint, problem in [
            (["python", "-m", "jobs.pipeline", f"tracking.uri=https://alice:{PASSWORD}@mlflow"],
             "the entrypoint carries credentials"),
            (["env", f"AWS_SECRET_ACCESS_KEY={SECRET}", "python", "-m", "jobs.pipeline"],
             "the entrypoint sets AWS_SECRET_ACCESS_KEY"),
            (["python", "-m", "jobs.pipeline", "--config", str(config)], f"--config {config} carries credentials"),
            (["python", "-m", "jobs.pipeline", f"--config={config}"], f"--config {config} carries credentials")]:
        assert submit_module.main(["--address", f"http://127.0.0.1:{free_port()}", "--", *entrypoint]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert problem in line and SECRET not in line


def _files_holding(directory: Path, secret: bytes) -> list[str]:
    return [str(path) for path in directory.rglob("*") if path.is_file() and secret in path.read_bytes()]


def test_credentials_in_the_tracking_uri_are_stored_and_printed_nowhere(prepared, tmp_path, monkeypatch, capfd):
    root, overrides = prepared
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, "")  # undone after the test, whatever the run sets
        monkeypatch.delenv(name)
    server = Server(tmp_path / "server")
    server.start()
    try:
        uri = server.uri.replace("http://", f"http://alice:{PASSWORD}@")
        assert main(["pipeline", "run", *overrides, "run.name=secret", f"tracking.uri={uri}"]) == 0
        session_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        ray.shutdown()
    finally:
        server.stop()
    printed = capfd.readouterr()
    assert "| AP50 |" in printed.out
    assert SECRET not in printed.out + printed.err
    leaks = [*_files_holding(root / "runs", SECRET.encode()), *_files_holding(tmp_path / "server", SECRET.encode()),
             *_files_holding(session_logs, SECRET.encode())]
    assert leaks == []

    server.start()
    try:
        client = mlflow.MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("aploss").experiment_id
        stages = {run.data.tags["aploss.stage"]: run for run in client.search_runs([experiment])}
        assert {stage: run.info.status for stage, run in stages.items()} == {
            stage: "FINISHED" for stage in ("pipeline", "data-prep", "train", "evaluate")}
        assert stages["train"].data.params["tracking.uri"] == server.uri.replace("http://", "http://REDACTED@")
    finally:
        server.stop()
