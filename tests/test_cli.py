"""prep -> train -> eval from the CLI on a tiny synthetic set, and its failure paths."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import load_config
from pipeline.data.synthetic import coco_settings, write_synthetic_coco
from pipeline.orchestration.cli import main


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


def test_train_prepares_the_data_it_finds_unprepared_as_its_help_says(tmp_path, capsys):
    write_synthetic_coco(tmp_path / "data", {"train": 4, "val": 2})
    settings = [*coco_settings(tmp_path / 'data'),
                "model.min_size=96", "model.max_size=96", "train.batch_size=2", "train.max_steps=1",
                f"run.output_dir={tmp_path / 'runs'}", "run.name=unprepared"]
    assert main(["train", *settings]) == 0
    printed = capsys.readouterr().out
    assert f"prepared coco (written) in {tmp_path / 'runs' / 'data'}/coco-" in printed
    assert "  train: 4 images" in printed
    assert printed.count("anchor recall (IoU") == 1 and "trained 1 steps" in printed


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
    assert "| AP50 |" in printed and "| class | AP | AP50 |" in printed and "| square | " in printed
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["metrics"]["AP50"] > 0.5 and metrics["metrics"]["AP"] > 0.2
    assert metrics["metrics"]["APl"] is None  # no large objects: undefined, not a number
    detections = json.loads((run_dir / "eval" / "detections.json").read_text())
    assert {d["category_id"] for d in detections} <= {1, 2}
    assert len(list((run_dir / "eval" / "pr_curves").glob("*.png"))) == 3
    assert len(list((run_dir / "eval" / "samples").glob("*.png"))) == 2


def test_eval_takes_the_postprocessing_overrides_as_predict_does(workspace):
    root, config = workspace
    run_dir = root / "runs" / "synthetic"

    def detections(*overrides: str) -> list[dict]:
        assert main(["eval", "--config", str(config), *overrides]) == 0
        return json.loads((run_dir / "eval" / "detections.json").read_text())

    trained = detections()
    best = {}
    for found in trained:
        if found["score"] >= 0.3 and found["score"] > best.get(found["image_id"], {"score": 0})["score"]:
            best[found["image_id"]] = found
    assert len(best) >= 2 and len(trained) > len(best)
    assert sorted(detections("model.detections_per_image=1", "model.score_thresh=0.3"),
                  key=lambda found: found["image_id"]) == sorted(best.values(), key=lambda found: found["image_id"])
    assert detections() == trained  # without overrides, the model's own again


@pytest.mark.parametrize("overrides", [
    pytest.param(["loss.classification=alrp"], id="alrp"),
    pytest.param(["loss.classification=rs", "loss.delta.start=0.5"], id="rs", marks=pytest.mark.slow)])
def test_the_ranking_family_learns_from_the_cli(workspace, overrides, capsys):
    root, config = workspace
    name = overrides[0].split("=")[1]
    args = ["--config", str(config), f"run.name={name}", *overrides]
    assert main(["train", *args]) == 0 and main(["eval", *args]) == 0
    run_dir = root / "runs" / name
    losses = [loss for _, loss in _logged(run_dir, "cls_loss")]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3  # the ranking loss falls
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics["AP50"] > 0.5, metrics
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    assert saved["config"]["loss"]["classification"] == name
    assert ("criterion.self_balance.weight" in saved["model"]) == (name == "alrp")


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
    assert main(["train", "--config", str(config), "model.anchors.scales_per_octave=3"]) == 2
    # Which key differs, not the whole model config.
    assert "another model config (model.anchors.scales_per_octave: 2 -> 3); choose another run.name" in (
        capsys.readouterr().err)


def test_bad_config_is_reported_without_a_traceback(workspace, capsys):
    _, config = workspace
    assert main(["train", "--config", str(config), "optim.learning_rate=0.1"]) == 2
    assert "unknown key(s) ['optim.learning_rate']" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, key", [(["train", "run.name=.."], "run.name"),
                                            (["robustness", "--run", "../elsewhere"], "--run"),
                                            (["report", "--sweep", "it's"], "--sweep")])
def test_a_run_name_that_leaves_the_output_dir_or_breaks_a_search_is_refused(workspace, capsys, arguments, key):
    root, config = workspace
    before = sorted(path.name for path in root.parent.iterdir())
    assert main([*arguments[:1], "--config", str(config), *arguments[1:]]) == 2
    assert f"{key}: must be 1 to 200 letters, digits, '.', '_' or '-'" in capsys.readouterr().err
    assert sorted(path.name for path in root.parent.iterdir()) == before


def _variant(root, name: str, change) -> None:
    """Another run whose model.pt is the trained one's, changed by `change`."""
    saved = torch.load(root / "runs" / "synthetic" / "model.pt", weights_only=False)
    change(saved)
    (root / "runs" / name).mkdir(exist_ok=True)
    torch.save(saved, root / "runs" / name / "model.pt")


def _noisier_weights(saved) -> None:
    generator = torch.Generator().manual_seed(0)
    for tensor in saved["model"].values():
        if tensor.is_floating_point():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.02 * tensor.std().nan_to_num())


def test_robustness_stage_evaluates_several_runs_in_one_pass(workspace, capsys, monkeypatch):
    import mlflow

    from pipeline.config import load_config
    from pipeline.evaluation import robustness
    from pipeline.evaluation.stages import robustness_stage

    root, config = workspace
    _variant(root, "synthetic-noisy", _noisier_weights)
    calls = []
    corrupt = robustness.corrupt
    monkeypatch.setattr(robustness, "corrupt", lambda *args: calls.append(args[1:3]) or corrupt(*args))
    overrides = ["robustness.occlusion=[1.0]", "robustness.noise=[0.3]",
                 "robustness.corruptions=[gaussian_noise, glass_blur]", "robustness.severities=[5]"]
    # In this process, where the calls are counted.
    assert main(["robustness", "--config", str(config), "--run", "synthetic", "--run", "synthetic-noisy",
                 *overrides, "robustness.workers=0"]) == 0
    assert len(calls) == 12 * 2  # each of the 12 images once per corruption, not once per model
    printed = capsys.readouterr().out
    assert "== synthetic\n" in printed and "== synthetic-noisy\n" in printed and "| summary | value |" in printed
    saved = {name: json.loads((root / "runs" / name / "robustness" / "robustness.json").read_text())
             for name in ("synthetic", "synthetic-noisy")}
    ap = saved["synthetic"]["ap"]
    assert set(ap) == {"clean", "occlusion@1", "noise@0.3", "gaussian_noise@5", "glass_blur@5"}
    assert ap["occlusion@1"] < 0.5 * ap["clean"]  # nothing left to see
    assert saved["synthetic"]["P"] == ap["clean"]
    assert saved["synthetic"]["mPC"] == pytest.approx((ap["gaussian_noise@5"] + ap["glass_blur@5"]) / 2)
    assert saved["synthetic"]["rPC"] == pytest.approx(saved["synthetic"]["mPC"] / saved["synthetic"]["P"])
    assert saved["synthetic-noisy"]["ap"] != ap
    # Evaluated alone, with the images perturbed in another process, each model gets the same
    # numbers as in the shared pass.
    alone = load_config(config, [*overrides, "robustness.workers=1"])
    for name in saved:
        (result, _), = robustness_stage(alone, [name]).values()
        assert result.ap == saved[name]["ap"]
    client = mlflow.MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("aploss").experiment_id
    runs = client.search_runs([experiment], "tags.`aploss.stage` = 'robustness'")
    parents = {run.info.run_id: run.data.tags["aploss.run_name"]
               for run in client.search_runs([experiment], "tags.`aploss.stage` = 'pipeline'")}
    by_name = {parents[run.data.tags["mlflow.parentRunId"]]: run for run in runs}
    assert set(by_name) == set(saved)
    for name, run in by_name.items():
        assert run.data.metrics["P"] == pytest.approx(saved[name]["P"])
        assert run.data.metrics["mPC"] == pytest.approx(saved[name]["mPC"])
        logged = {a.path for a in client.list_artifacts(run.info.run_id, "robustness")}
        assert {"robustness/robustness.png", "robustness/robustness.md", "robustness/robustness.json"} <= logged
    # Trained by `aploss train`, outside MLflow: the report reads the loss and seed from the model.
    capsys.readouterr()
    assert main(["report", "--config", str(config), "--run", "synthetic", "--run", "synthetic-noisy"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| synthetic")]
    assert len(rows) == 2 and all("| ap | constant | 0 |" in row for row in rows)


def test_robustness_refuses_bad_runs(workspace, capsys):
    root, config = workspace
    assert main(["robustness", "--config", str(config), "robustness.corruptions=[fogg]"]) == 2
    assert "unknown COCO-C corruption(s) ['fogg']" in capsys.readouterr().err
    assert main(["robustness", "--config", str(config), "--run", "never-trained"]) == 2
    assert "no trained model for run 'never-trained'" in capsys.readouterr().err
    _variant(root, "other-classes", lambda saved: saved.update(classes=["disc", "square"]))
    assert main(["robustness", "--config", str(config), "--run", "other-classes"]) == 2
    assert "run 'other-classes' was trained on classes ['disc', 'square']" in capsys.readouterr().err


def test_evaluation_adds_voc_map_when_asked(workspace, tmp_path):
    from pipeline.config import load_config
    from pipeline.data.dataset import DetectionDataset
    from pipeline.data.shards import ShardReader
    from pipeline.evaluation.evaluate import evaluate_split
    from pipeline.model import load_model

    root, config_path = workspace
    config = load_config(config_path)
    model, classes, _, _ = load_model(root / "runs" / "synthetic" / "model.pt", torch.device("cpu"))
    from pipeline.data.prep import locate_prepared
    split = locate_prepared(config) / "train"
    evaluation = evaluate_split(model, DetectionDataset(ShardReader(split)), split / "ground_truth.json", classes,
                                tmp_path, 8, torch.device("cpu"), voc=True)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["voc_area_map"] == pytest.approx(evaluation.voc.map_area)
    assert set(saved["per_class_voc07_11point"]) == {"square", "disc"}
    assert abs(saved["voc_area_map"] - saved["metrics"]["AP50"]) < 0.05  # both AP at IoU 0.5


def test_help_describes_every_command_with_examples(capsys):
    from pipeline.orchestration.cli import COMMANDS

    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    for command in COMMANDS:
        group = command.split()[0]
        assert f"\n    {group} " in top or f"\n    {group}\n" in top, command
        with pytest.raises(SystemExit):
            main([*command.split(), "--help"])
        text = capsys.readouterr().out
        assert f"usage: aploss {command} " in text and "\nexamples:\n  aploss " in text, command


def test_a_wrong_argument_gets_its_commands_usage(capsys):
    with pytest.raises(SystemExit) as exit_code:
        main(["pipeline", "run", "--samples", "2"])
    assert exit_code.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: aploss pipeline run ") and "unrecognized arguments: --samples" in error


def test_config_show_prints_the_effective_config_that_config_takes(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text("optim: {lr: 0.02}\ntracking: {uri: 'http://alice:s3cret@mlflow:5000'}\n")
    assert main(["config", "show", "--config", str(tmp_path / "base.yaml"), "train.epochs=3"]) == 0
    printed = capsys.readouterr().out
    assert "s3cret" not in printed
    (tmp_path / "shown.yaml").write_text(printed)
    shown = load_config(tmp_path / "shown.yaml")
    assert shown.optim.lr == 0.02 and shown.train.epochs == 3 and shown.model.arch == "retinanet_r18"
    assert main(["config", "show", "optim.lr=-1"]) == 2
    assert "optim.lr: must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["--help"], ["train", "--help"], ["config", "show", "optim.lr=0.02"]])
def test_help_and_config_show_load_neither_torch_ray_nor_mlflow(command):
    # They took 4 to 7 s and 850 MB to 1 GB, importing all three before anything else.
    script = ("import sys\nfrom pipeline.orchestration.cli import main\ntry:\n    main(sys.argv[1:])\n"
              "except SystemExit:\n    pass\n"
              "print(sorted(m for m in ('torch', 'torchvision', 'ray', 'mlflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_ray_loggers_quieted_are_still_ray_s():
    # Internal module names: a Ray upgrade that moves one would let its tracebacks through again.
    import importlib.util

    from pipeline.quiet import RAY_INTERNAL_LOGGERS, RAY_REPORT_MODULE

    for module in [*RAY_INTERNAL_LOGGERS, RAY_REPORT_MODULE]:
        assert importlib.util.find_spec(module) is not None, f"Ray no longer has {module}"


def test_third_party_notices_are_hidden_unless_verbose(monkeypatch):
    import logging
    import warnings

    from ray.train.v2._internal.execution import context

    from pipeline.quiet import quiet_third_party

    report_log = logging.getLogger(context.__file__)
    monkeypatch.setattr(report_log, "level", logging.NOTSET)
    monkeypatch.setattr(logging.getLogger("mlflow.pyfunc"), "level", logging.NOTSET)
    monkeypatch.setenv("APLOSS_VERBOSE", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn("An input example was not provided when logging the model.", UserWarning, stacklevel=1)
    assert len(caught) == 1 and report_log.level == logging.NOTSET
    monkeypatch.delenv("APLOSS_VERBOSE")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn("An input example was not provided when logging the model.", UserWarning, stacklevel=1)
        warnings.warn("something the user should see", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something the user should see"]
    assert report_log.level == logging.WARNING and logging.getLogger("mlflow.pyfunc").level == logging.WARNING
    token_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    enabled, disabled = (token_log.makeRecord(token_log.name, logging.WARNING, __file__, 0, message, (), None)
                         for message in ("Token authentication is enabled for this Ray cluster.",
                                         "Token authentication is disabled for this Ray cluster."))
    assert not token_log.filter(enabled) and token_log.filter(disabled)
