"""prep -> train -> eval from the CLI on a tiny synthetic set, and its failure paths."""
import json

import pytest
import torch
import yaml

from pipeline.cli import main
from tests.synthetic import write_synthetic_coco


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_synthetic_coco(root / "data", {"train": 12, "val": 4})
    config = {
        "data": {"dataset": "coco", "root": str(root / "data"),
                 "annotations": {"train": "train.json", "val": "val.json"},
                 "images": {"train": "train", "val": "val"}, "test_split": "val"},
        "model": {"min_size": 128, "max_size": 128},
        "train": {"batch_size": 4, "max_steps": 36, "epochs": 100, "log_every": 3, "eval_every": 36},
        "optim": {"lr": 0.01, "warmup_steps": 6},
        "eval": {"split": "train", "sample_images": 2},
        "run": {"output_dir": str(root / "runs"), "name": "synthetic"},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, path


def _logged(run_dir, key):
    lines = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    return [(line["step"], line[key]) for line in lines if key in line]


def test_prep_train_eval_learns_the_training_images(workspace, capsys):
    root, config = workspace
    assert main(["prep", "--config", str(config)]) == 0
    assert main(["eval", "--config", str(config)]) == 2  # nothing trained yet
    assert "run the train stage first" in capsys.readouterr().err
    assert main(["train", "--config", str(config)]) == 0
    run_dir = root / "runs" / "synthetic"
    losses = [loss for _, loss in _logged(run_dir, "loss")]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3  # the loss falls
    assert main(["eval", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "| AP50 |" in printed and "AP[square]" in printed
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["metrics"]["AP50"] > 0.5 and metrics["metrics"]["AP"] > 0.2
    assert metrics["metrics"]["APl"] is None  # no large objects: undefined, not a number
    detections = json.loads((run_dir / "eval" / "detections.json").read_text())
    assert {d["category_id"] for d in detections} <= {1, 2}
    assert len(list((run_dir / "eval" / "pr_curves").glob("*.png"))) == 3
    assert len(list((run_dir / "eval" / "samples").glob("*.png"))) == 2


def test_train_resumes_from_the_latest_checkpoint(workspace):
    root, config = workspace
    run_dir = root / "runs" / "synthetic"
    before = _logged(run_dir, "loss")
    assert main(["train", "--config", str(config), "train.max_steps=42"]) == 0
    after = _logged(run_dir, "loss")
    assert after[:len(before)] == before
    assert [step for step, _ in after[len(before):]] == [39, 42]  # continued at step 37, none repeated


def test_resuming_with_another_model_is_refused(workspace, capsys):
    _, config = workspace
    assert main(["train", "--config", str(config), "model.anchor_scales=3"]) == 2
    assert "different model config" in capsys.readouterr().err


def test_bad_config_is_reported_without_a_traceback(workspace, capsys):
    _, config = workspace
    assert main(["train", "--config", str(config), "optim.learning_rate=0.1"]) == 2
    assert "unknown key(s) ['optim.learning_rate']" in capsys.readouterr().err


def test_robustness_stage_on_the_trained_model(workspace, capsys):
    import mlflow

    root, config = workspace
    overrides = ["robustness.occlusion=[1.0]", "robustness.noise=[0.3]",
                 "robustness.corruptions=[gaussian_noise, contrast]", "robustness.severities=[5]"]
    assert main(["robustness", "--config", str(config), *overrides]) == 0
    assert "| summary | value |" in capsys.readouterr().out
    saved = json.loads((root / "runs" / "synthetic" / "robustness" / "robustness.json").read_text())
    ap = saved["ap"]
    assert set(ap) == {"clean", "occlusion@1", "noise@0.3", "gaussian_noise@5", "contrast@5"}
    assert ap["occlusion@1"] < 0.5 * ap["clean"]  # nothing left to see
    assert saved["P"] == ap["clean"]
    assert saved["mPC"] == pytest.approx((ap["gaussian_noise@5"] + ap["contrast@5"]) / 2)
    assert saved["rPC"] == pytest.approx(saved["mPC"] / saved["P"])
    client = mlflow.MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("aploss").experiment_id
    (run,) = client.search_runs([experiment], "tags.`aploss.stage` = 'robustness'")
    assert run.data.metrics["P"] == pytest.approx(saved["P"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "robustness")}
    assert {"robustness/robustness.png", "robustness/robustness.md", "robustness/robustness.json"} <= logged


def test_unknown_corruption_is_an_error(workspace, capsys):
    _, config = workspace
    assert main(["robustness", "--config", str(config), "robustness.corruptions=[fogg]"]) == 2
    assert "unknown COCO-C corruption(s) ['fogg']" in capsys.readouterr().err


def test_evaluation_adds_voc_map_when_asked(workspace, tmp_path):
    from pipeline.config import load_config
    from pipeline.dataset import DetectionDataset
    from pipeline.evaluate import evaluate_split
    from pipeline.shards import ShardReader
    from pipeline.stages import load_model

    root, config_path = workspace
    config = load_config(config_path)
    model, classes = load_model(root / "runs" / "synthetic" / "model.pt", torch.device("cpu"))
    split = config.run.prepared_data("coco") / "train"
    evaluation = evaluate_split(model, DetectionDataset(ShardReader(split)), split / "ground_truth.json", classes,
                                tmp_path, 8, torch.device("cpu"), voc=True)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["voc_area_map"] == pytest.approx(evaluation.voc.map_area)
    assert set(saved["per_class_voc07_11point"]) == {"square", "disc"}
    assert abs(saved["voc_area_map"] - saved["metrics"]["AP50"]) < 0.05  # both AP at IoU 0.5
