"""What real runs meet: data mixed up between runs, foreign category ids, divergence, empty or
missing inputs, a full disk (each reproduced first, then fixed)."""
import json
import subprocess
import sys

import pytest
import torch
from pycocotools.coco import COCO

from aploss import detection_loss
from pipeline.config import load_config
from pipeline.data.prep import prepare
from pipeline.data.sources import PrepError
from pipeline.data.synthetic import write_synthetic_coco
from pipeline.errors import ConfigError, DataError
from pipeline.evaluation.coco_metrics import evaluate_detections
from pipeline.orchestration.cli import main
from pipeline.orchestration.tracking import connection, pipeline_runs, records


def _overrides(data_root, output, name="run", **splits):
    annotations = ", ".join(f"{split}: {split}.json" for split in ("train", "val"))
    images = ", ".join(f"{split}: {split}" for split in ("train", "val"))
    return ["data.dataset=coco", f"data.root={data_root}", f"data.annotations={{{annotations}}}",
            f"data.images={{{images}}}", "data.test_split=val", "model.min_size=96", "model.max_size=96",
            "train.batch_size=4", "train.epochs=100", "train.max_steps=6", "train.eval_every=6", "train.log_every=1",
            "optim.warmup_steps=2", "eval.sample_images=0", f"run.output_dir={output}", f"run.name={name}"]


def _renumber_categories(json_path, ids):
    """Give the synthetic set's categories the ids `ids` (old id -> new id), as a real COCO
    subset has: not 1..K."""
    data = json.loads(json_path.read_text())
    for category in data["categories"]:
        category["id"] = ids[category["id"]]
    for annotation in data["annotations"]:
        annotation["category_id"] = ids[annotation["category_id"]]
    json_path.write_text(json.dumps(data))


def test_prepared_data_is_addressed_by_content_and_a_run_keeps_its_own(tmp_path, capsys):
    # Two COCO sets prepared into one output folder used to share <output>/data/coco: the second
    # replaced the first, and `aploss eval` of a run trained on the first scored the second.
    first, second = tmp_path / "first", tmp_path / "second"
    write_synthetic_coco(first, {"train": 8, "val": 4}, seed=1)
    write_synthetic_coco(second, {"train": 8, "val": 3}, seed=2)
    output = tmp_path / "runs"
    assert main(["prep", *_overrides(first, output)]) == 0
    assert main(["train", *_overrides(first, output)]) == 0
    assert main(["eval", *_overrides(first, output)]) == 0
    trained_metrics = json.loads((output / "run" / "eval" / "metrics.json").read_text())
    assert main(["prep", *_overrides(second, output)]) == 0
    prepared = sorted(p.name for p in (output / "data").iterdir() if not p.name.startswith("."))
    assert len(prepared) == 2 and all(name.startswith("coco-") for name in prepared)

    # eval asked for the second set's data is refused, not quietly given the first's.
    capsys.readouterr()
    assert main(["eval", *_overrides(second, output)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"aploss eval: error: data.root: {str(second)!r} is not the data run 'run' was trained on ({str(first)!r}); "
        "evaluation uses the run's own data. To evaluate on other data, prepare it (aploss prep with those data.* "
        "settings) and set data.prepared to the directory it prints")

    # eval with no data.* at all: the run remembers what it trained on, and the split.
    assert main(["eval", f"run.output_dir={output}", "run.name=run"]) == 0
    assert json.loads((output / "run" / "eval" / "metrics.json").read_text()) == trained_metrics
    detections = json.loads((output / "run" / "eval" / "detections.json").read_text())
    assert {d["image_id"] for d in detections} <= {1000 + i for i in range(4)}  # the first set's val images

    # Resuming the run on the other data would mix two trainings in one set of weights.
    assert main(["train", *_overrides(second, output), "train.max_steps=8"]) == 2
    assert "was trained on the prepared data" in capsys.readouterr().err

    # data.prepared evaluates the same model on other prepared data, when asked.
    other = next(p for p in (output / "data").iterdir() if json.loads((p / "manifest.json").read_text())
                 ["splits"]["val"]["images"] == 3)
    assert main(["eval", f"run.output_dir={output}", "run.name=run", f"data.prepared={other}"]) == 2
    assert f"{other} has no split 'test' (it has train, val): set eval.split" in capsys.readouterr().err
    assert main(["eval", f"run.output_dir={output}", "run.name=run", f"data.prepared={other}", "eval.split=val"]) == 0
    detections = json.loads((output / "run" / "eval" / "detections.json").read_text())
    assert len({d["image_id"] for d in detections}) <= 3


def test_detections_carry_the_dataset_s_own_category_ids(tmp_path):
    data = tmp_path / "data"
    write_synthetic_coco(data, {"train": 8, "val": 4})
    for split in ("train", "val"):
        _renumber_categories(data / f"{split}.json", {1: 62, 2: 7})  # square 62, disc 7
    output = tmp_path / "runs"
    assert main(["prep", *_overrides(data, output)]) == 0
    assert main(["train", *_overrides(data, output), "train.max_steps=12", "train.eval_every=12"]) == 0
    assert main(["eval", *_overrides(data, output)]) == 0
    detections = json.loads((output / "run" / "eval" / "detections.json").read_text())
    assert detections and {d["category_id"] for d in detections} <= {7, 62}
    # Scored against the dataset's original json (ids 7 and 62), as a COCO server would: the
    # same numbers as our own evaluation of the prepared ground truth.
    ours = json.loads((output / "run" / "eval" / "metrics.json").read_text())
    original = evaluate_detections(COCO(str(data / "val.json")), detections)
    assert original.metrics["AP"] == pytest.approx(ours["metrics"]["AP"], abs=1e-12)
    assert ours["metrics"]["AP50"] > 0  # it did find squares and discs under their own ids
    assert set(original.per_class_ap) == {"square", "disc"}


def test_divergence_stops_training_before_a_broken_checkpoint(tmp_path, capsys):
    # optim.lr=1e6 without clipping used to train on NaN, exit 0 and save a NaN model as the best.
    data = tmp_path / "data"
    write_synthetic_coco(data, {"train": 8, "val": 2})
    output = tmp_path / "runs"
    overrides = [*_overrides(data, output), "train.checkpoint_every=1", "train.max_steps=20"]
    assert main(["prep", *overrides]) == 0
    assert main(["train", *overrides, "optim.lr=1e6", "optim.grad_clip=0", "optim.warmup_steps=0"]) == 2
    error = capsys.readouterr().err
    assert "training diverged at step" in error and "rerun the same command with run.name=run-2" in error
    step = int(error.split("training diverged at step ")[1].split(":")[0])
    assert not (output / "run" / "model.pt").exists()
    saved = sorted((output / "run" / "checkpoints").glob("step-*.pt"))
    assert saved and int(saved[-1].stem.split("-")[1]) < step
    for path in saved:  # every checkpoint kept is finite
        state = torch.load(path, weights_only=False)["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    journal = [json.loads(line) for line in (output / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert all(record["step"] < step for record in journal)


def test_a_training_split_without_boxes_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    write_synthetic_coco(data, {"train": 8, "val": 2})
    train = json.loads((data / "train.json").read_text())
    (data / "train.json").write_text(json.dumps({**train, "annotations": []}))
    overrides = _overrides(data, tmp_path / "runs")
    assert main(["prep", *overrides]) == 0
    assert main(["train", *overrides]) == 2
    assert "split 'train' has no ground-truth boxes to train on" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "run" / "checkpoints").exists()


def test_evaluating_against_no_ground_truth_is_an_error(tmp_path):
    ground_truth = {"images": [{"id": 1, "width": 10, "height": 10}], "annotations": [],
                    "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "gt.json").write_text(json.dumps(ground_truth))
    with pytest.raises(DataError, match="no ground-truth boxes to evaluate against"):
        evaluate_detections(tmp_path / "gt.json", [])


def test_an_empty_split_is_refused_and_good_data_survives(tmp_path, capsys):
    data = tmp_path / "data"
    write_synthetic_coco(data, {"train": 8, "val": 2})
    output = tmp_path / "runs"
    assert main(["prep", *_overrides(data, output)]) == 0
    before = sorted(p.relative_to(output) for p in output.rglob("*"))
    val = json.loads((data / "val.json").read_text())
    (data / "val.json").write_text(json.dumps({**val, "images": [], "annotations": []}))
    assert main(["prep", *_overrides(data, output)]) == 2
    assert f"{data / 'val.json'}: split 'val' lists no images" in capsys.readouterr().err
    assert sorted(p.relative_to(output) for p in output.rglob("*")) == before


def test_an_annotation_of_a_missing_image_names_its_ids(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "x.jpg"}], "categories": [{"id": 1, "name": "a"}],
        "annotations": [{"id": 9, "image_id": 4, "category_id": 1, "bbox": [0, 0, 1, 1],
                         "segmentation": [[0.5] * 400]}]}))
    config = load_config(None, ["data.dataset=coco", f"data.annotations={{train: {path}}}", "data.val_split=train",
                                "data.test_split=train", f"run.output_dir={tmp_path / 'runs'}"])
    with pytest.raises(PrepError) as error:
        prepare(config, progress=False)
    assert str(error.value) == (f"{path}: malformed COCO json: annotation 9 refers to image_id 4, "
                                "which is not in 'images'")


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path):
    # RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG), as a full disk refuses
    # them (ENOSPC): the same OSError path, without filling a real disk.
    data = tmp_path / "data"
    write_synthetic_coco(data, {"train": 8, "val": 2})
    output = tmp_path / "runs"
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
              "from pipeline.orchestration.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", script, "prep", *_overrides(data, output)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert lines == [next(line for line in done.stderr.splitlines() if line.startswith("aploss prep: error:"))]
    assert "File too large" in lines[0] and "Traceback" not in done.stderr
    assert not [p for p in (output / "data").iterdir()]  # no prepared directory, whole or half


def test_a_nan_logit_stops_training_at_its_step_and_the_advice_given_works(tmp_path, capsys, monkeypatch):
    # The AP-loss makes a NaN in one negative's logit a NaN loss (never a silent zero gradient),
    # and the trainer stops at that step, naming the best validated checkpoint and the command
    # that goes on from it (the advice once named the last checkpoint, not a sound one, and a
    # rerun under the same name that MLflow refused).
    data = tmp_path / "data"
    write_synthetic_coco(data, {"train": 8, "val": 2})
    output = tmp_path / "runs"
    overrides = [*_overrides(data, output), "train.checkpoint_every=2", "train.eval_every=2", "train.max_steps=6"]
    assert main(["prep", *overrides]) == 0
    capsys.readouterr()
    real_loss, calls = detection_loss.global_ap_loss, []

    def poisoned_at_step_5(logits, labels, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            logits = logits.clone()
            logits.view(-1)[(labels.reshape(-1) == 0).nonzero()[0]] = float("nan")
        return real_loss(logits, labels, *args, **kwargs)

    monkeypatch.setattr(detection_loss, "global_ap_loss", poisoned_at_step_5)
    assert main(["train", *overrides]) == 2
    scores = json.loads((output / "run" / "checkpoints" / "index.json").read_text())
    best = max(sorted(scores), key=lambda name: scores[name])  # the later on a tie, as checkpoints.sound
    checkpoint = output / "run" / "checkpoints" / best
    lower = load_config(None, []).optim.lr / 10
    assert "\n" + (  # a line of its own, after the progress bar's
        f"aploss train: error: training diverged at step 5: classification loss is nan; its best validated "
        f"checkpoint is {checkpoint}. To go on from it, rerun the same command with run.name=run-2 "
        f"model.init={checkpoint} and a lower optim.lr (e.g. optim.lr={lower:g}) or optim.grad_clip set\n"
    ) in capsys.readouterr().err
    assert not (output / "run" / "model.pt").exists()

    monkeypatch.setattr(detection_loss, "global_ap_loss", real_loss)
    assert main(["train", *overrides, "run.name=run-2", f"model.init={checkpoint}", f"optim.lr={lower:g}"]) == 0
    assert (output / "run-2" / "model.pt").exists()


def test_a_run_keeps_its_settings_and_a_rerun_with_others_says_which_differ(tmp_path):
    # Rerunning a diverged pipeline run with a new optim.lr ended in MLflow's "Changing param
    # values is not allowed" (exit 1).
    config = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r"])
    experiment = connection.configure(config)
    run_id, _ = pipeline_runs.stage_run(experiment, pipeline_runs.pipeline_run(config, experiment), "train")
    with pipeline_runs.active(run_id):
        records.log_train_params(config)
        records.log_train_params(config)  # the same settings again: nothing to change
    changed = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", f"optim.lr={config.optim.lr / 10:g}"])
    with pytest.raises(ConfigError) as error, pipeline_runs.active(run_id):
        records.log_train_params(changed)
    assert str(error.value) == (f"run 'r' was started with other settings (optim.lr: {config.optim.lr} -> "
                                f"{config.optim.lr / 10:g}), and a run keeps its settings: choose another run.name")
