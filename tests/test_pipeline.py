"""The main job end to end on a synthetic set: MLflow run tree, registered model, rerun skips."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import ray
import torch

from pipeline import checkpoints
from pipeline.checkpoints import CheckpointStore
from pipeline.data.synthetic import coco_settings, write_synthetic_coco
from pipeline.orchestration.cli import main


@pytest.fixture(scope="module")
def pipeline_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    write_synthetic_coco(root / "data", {"train": 8, "val": 2})
    overrides = [
        *coco_settings(root / 'data'), "model.min_size=96", "model.max_size=96",
        "train.batch_size=4", "train.max_steps=4", "train.epochs=100", "train.eval_every=1", "train.log_every=1",
        "train.keep_checkpoints=2", "eval.sample_images=1",
        "ray.workers=2", "ray.local_cpus=4", f"run.output_dir={root / 'runs'}", "run.name=pipeline-test"]
    yield root, overrides
    ray.shutdown()


# The registered model of the synthetic set's classes (square, disc by category id).
REGISTERED = "aploss-coco-" + hashlib.sha256(b"square\ndisc").hexdigest()[:8]


def _children(client, experiment_id, parent_id):
    runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {run.data.tags["aploss.stage"]: run for run in runs}


def _artifacts(client, run_id, path=None):
    found = []
    for item in client.list_artifacts(run_id, path):
        found.extend(_artifacts(client, run_id, item.path) if item.is_dir else [item.path])
    return found


def test_pipeline_run_tree_and_rerun(pipeline_config, capsys, monkeypatch):
    root, overrides = pipeline_config
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["pipeline", "run", *overrides]) == 0
    assert "MLFLOW_TRACKING_URI" not in os.environ  # a later config in this process picks its own store
    printed = capsys.readouterr().out
    assert "| AP50 |" in printed and "mlflow ui --backend-store-uri sqlite:///" in printed
    assert f"the best detector on this dataset: models:/{REGISTERED}@champion" in printed

    client = mlflow.MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("aploss")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`aploss.stage` = 'pipeline'")
    children = _children(client, experiment.experiment_id, parent.info.run_id)
    assert set(children) == {"data-prep", "train", "evaluate"}
    assert all(run.info.status == "FINISHED" for run in children.values())

    prep = children["data-prep"]
    assert "manifest.json" in _artifacts(client, prep.info.run_id)
    assert {i.dataset.name for i in prep.inputs.dataset_inputs} == {"coco-train", "coco-val"}
    assert printed.count("anchor recall (IoU >= 0.5, P3-P7, auto): square ") == 1  # computed once, in train

    train = children["train"]
    assert train.data.params["optim.lr"] == "0.02" and train.data.params["ray.workers"] == "2"
    assert {"anchor_recall_square", "anchor_recall_disc"} <= set(train.data.metrics)
    history = client.get_metric_history(train.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(train.info.run_id, 'val_ap')] == [1, 2, 3, 4]
    assert train.data.params["data.root"] == str(root / "data")
    # Checkpoints are stored once, in Ray's storage; MLflow holds where they are, and the best
    # weights as the registered model. keep_checkpoints=2 keeps at most two of the four: the
    # latest, and the best if that is another.
    train_artifacts = _artifacts(client, train.info.run_id)
    assert not any(p.startswith("checkpoints/") for p in train_artifacts) and "checkpoints.json" in train_artifacts
    kept = json.loads(Path(client.download_artifacts(train.info.run_id, "checkpoints.json")).read_text())["checkpoints"]
    assert 1 <= len(kept) <= 2 and 4 in [c["step"] for c in kept] and all(os.path.isdir(c["path"]) for c in kept)
    stored = [p for p in (root / "runs" / "ray" / "pipeline-test").rglob("checkpoint_*") if p.is_dir()]
    assert sorted(map(str, stored)) == sorted(c["path"] for c in kept)
    (version,) = client.search_model_versions(f"name = '{REGISTERED}'")
    assert version.run_id == train.info.run_id

    evaluation = children["evaluate"]
    assert "AP" in evaluation.data.metrics and any(k.startswith("AP50_") for k in evaluation.data.metrics)
    assert evaluation.data.params["eval.split"] == "val" and evaluation.data.params["model.score_thresh"] == "0.05"
    # The parent run compares at a glance: headline params and the test metrics.
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["loss.classification"] == "ap" and parent.data.params["train.steps"] == "4"
    assert parent.data.params["loss.delta"] == "constant(1)"
    assert parent.data.params["data.root"] == str(root / "data") and parent.data.params["model.arch"] == "retinanet_r18"
    assert parent.data.metrics["AP"] == evaluation.data.metrics["AP"]
    champion = client.get_model_version_by_alias(REGISTERED, "champion")  # the best test AP
    assert champion.version == version.version and float(champion.tags["test_AP"]) == parent.data.metrics["AP"]
    artifacts = _artifacts(client, evaluation.info.run_id)
    assert "detections.json" in artifacts and "metrics.json" in artifacts
    assert any(p.startswith("pr_curves/") for p in artifacts) and any(p.startswith("samples/") for p in artifacts)

    # The rerun, in a process of its own as a user's: it recomputes nothing, and needs neither torch
    # nor Ray (they took most of its 11 s, with the anchors it refitted).
    script = ("import sys\nfrom pipeline.orchestration.cli import main\ncode = main(sys.argv[1:])\n"
              "print(code, sorted(m for m in ('torch', 'torchvision', 'ray') if m in sys.modules))")
    rerun = subprocess.run([sys.executable, "-c", script, "pipeline", "run", *overrides], capture_output=True,
                           text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
                           env={key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"})
    assert rerun.stdout.strip().splitlines()[-1] == "0 []", rerun.stdout + rerun.stderr
    assert "skipped (already done): data-prep, train, evaluate" in rerun.stdout
    assert "anchor recall" not in rerun.stdout
    assert _children(client, experiment.experiment_id, parent.info.run_id).keys() == children.keys()
    assert client.get_run(parent.info.run_id).info.end_time == parent.info.end_time  # a skipped rerun leaves it
    assert len(client.search_model_versions(f"name = '{REGISTERED}'")) == 1


def test_a_failed_pipeline_ends_its_runs_failed(pipeline_config, capsys):
    root, overrides = pipeline_config
    assert main(["pipeline", "run", *overrides, "run.name=broken", "train.batch_size=64"]) == 2
    assert "train.batch_size (64) is larger than the training split" in capsys.readouterr().err
    client = mlflow.MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("aploss").experiment_id
    (parent,) = client.search_runs([experiment],
                                   "tags.`aploss.run_name` = 'broken' and tags.`aploss.stage` = 'pipeline'")
    children = _children(client, experiment, parent.info.run_id)
    assert parent.info.status == "FAILED" and children["train"].info.status == "FAILED"
    assert children["data-prep"].info.status == "FINISHED"


def test_pipeline_trains_in_this_process_when_not_distributed(pipeline_config):
    from pipeline.config import load_config
    from pipeline.orchestration.run import run_pipeline
    from pipeline.training.journal import CURVES

    root, overrides = pipeline_config
    config = load_config(None, [*overrides, "run.name=in-process", f"run.output_dir={root / 'runs-local'}"])
    result = run_pipeline(config, distributed=False)
    assert result.skipped == [] and result.metrics["AP"] is not None
    client = mlflow.MlflowClient(f"sqlite:///{root / 'runs-local' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("aploss").experiment_id
    children = _children(client, experiment, result.parent_run_id)
    assert all(run.info.status == "FINISHED" for run in children.values())
    train = children["train"]
    # The curves Ray's rank 0 logs while training, here from the run's metrics.jsonl.
    assert [m.step for m in client.get_metric_history(train.info.run_id, "loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(train.info.run_id, "val_ap")] == [1, 2, 3, 4]
    assert set(CURVES) <= set(client.get_run(train.info.run_id).data.metrics)
    assert train.data.params["ray.workers"] == "2"  # the config as given, though one process trained
    (version,) = client.search_model_versions(f"name = '{REGISTERED}'")
    assert version.run_id == train.info.run_id
    assert (config.run.folder().root / "train" / "metrics.jsonl").exists()
    assert run_pipeline(config, distributed=False).skipped == ["data-prep", "train", "evaluate"]

    # Another dataset registers a model of its own, with its own champion: a detector of the
    # first's classes never answers for it (every run used to share one registered model).
    other = root / "other-data"
    write_synthetic_coco(other, {"train": 8, "val": 2})
    for split in ("train", "val"):
        annotations = json.loads((other / f"{split}.json").read_text())
        for category, name in zip(annotations["categories"], ("red cell", "white cell")):
            category["name"] = name
        (other / f"{split}.json").write_text(json.dumps(annotations))
    second = load_config(None, [*overrides, "run.name=other", f"data.root={other}", "train.ema_decay=0.9",
                                f"run.output_dir={root / 'runs-local'}"])
    name = "aploss-coco-" + hashlib.sha256(b"red cell\nwhite cell").hexdigest()[:8]
    assert run_pipeline(second, distributed=False).registered_model == name
    # With an EMA of the weights, the model.pt is the best checkpoint's average, not its own weights.
    best = checkpoints.load(CheckpointStore(second.run.folder().checkpoints, 2).best())
    exported = checkpoints.load(second.run.folder().model)["model"]
    assert best["average"]["updates"] > 0
    assert all(torch.equal(exported[key], value) for key, value in best["average"]["weights"].items())
    assert any(not torch.equal(exported[key], best["model"][key]) for key in best["average"]["weights"])
    assert {model.name for model in client.search_registered_models()} == {REGISTERED, name}
    for registered, run_name in ((REGISTERED, "in-process"), (name, "other")):
        champion = client.get_model_version_by_alias(registered, "champion")
        parent = client.get_run(champion.run_id).data.tags["mlflow.parentRunId"]
        assert client.get_run(parent).data.tags["aploss.run_name"] == run_name


def test_report_gathers_the_runs_of_a_comparison(pipeline_config, capsys):
    root, overrides = pipeline_config
    robustness = ["robustness.occlusion=[0.5]", "robustness.noise=[0.2]", "robustness.corruptions=[contrast]",
                  "robustness.severities=[3]"]
    assert main(["robustness", *overrides, *robustness]) == 0
    capsys.readouterr()
    assert main(["report", "--run", "pipeline-test", *overrides]) == 0
    printed = capsys.readouterr().out
    client = mlflow.MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("aploss").experiment_id
    (evaluation,) = client.search_runs([experiment], "tags.`aploss.stage` = 'evaluate'")
    (robust,) = client.search_runs([experiment], "tags.`aploss.stage` = 'robustness'")
    row = next(line for line in printed.splitlines() if line.startswith("| pipeline-test |"))
    assert f"| {evaluation.data.metrics['AP']:.3f} |" in row and "| ap | constant | 0 |" in row
    assert f"| {robust.data.metrics['mPC']:.3f} |" in row
    report = root / "runs" / "report"
    assert (report / "report.md").exists() and (report / "ap.png").exists() and (report / "robustness.png").exists()
    assert main(["report", "--run", "no-such-run", *overrides]) == 2
    assert "no pipeline run named ['no-such-run']" in capsys.readouterr().err


def test_an_interrupted_stage_and_its_parent_end_killed(tmp_path, monkeypatch):
    from pipeline.orchestration.tracking import pipeline_runs
    # set_tracking_uri exports the URI too: monkeypatch takes the variable back afterwards.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("statuses")
    parent = client.create_run(experiment).info.run_id
    stage, _ = pipeline_runs.stage_run(experiment, parent, "train")
    with pytest.raises(KeyboardInterrupt), pipeline_runs.parent_run(parent), pipeline_runs.active(stage):
        raise KeyboardInterrupt
    assert client.get_run(stage).info.status == "KILLED" and client.get_run(parent).info.status == "KILLED"
    other, _ = pipeline_runs.stage_run(experiment, parent, "evaluate")
    with pytest.raises(ValueError), pipeline_runs.parent_run(parent), pipeline_runs.active(other):
        raise ValueError("a bug")
    assert client.get_run(other).info.status == "FAILED" and client.get_run(parent).info.status == "FAILED"
