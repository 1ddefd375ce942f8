"""`aploss predict`: a trained detector on a user's image files, equal to its evaluation on the
same images, in the dataset's own category ids."""
import contextlib
import http.server
import io
import json
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.config import load_config
from pipeline.data.bindings import split_dir
from pipeline.data.dataset import DetectionDataset
from pipeline.data.prep import prepare
from pipeline.data.shards import ShardReader, read_manifest
from pipeline.data.synthetic import coco_settings, write_synthetic_coco
from pipeline.errors import DataError
from pipeline.inference.detection import detect_split
from pipeline.model import load_model
from pipeline.orchestration.cli import main
from pipeline.orchestration.tracking.registered_model import RegisteredDetector
from pipeline.training.local import train_stage
from tests.conftest import DATA_ROOT
from tests.test_data_trust import png_declaring
from tests.test_image_gate import gif_growing_to, tiff_declaring


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    write_synthetic_coco(root / "data", {"train": 4, "val": 3})
    overrides = [
        *_data_settings(root / "data"), "model.min_size=96", "model.max_size=96",
        "train.batch_size=2", "train.max_steps=1", "train.eval_every=1000", f"run.output_dir={root / 'runs'}",
        "run.name=predict-test"]
    config = load_config(None, overrides)
    prepare(config, progress=False)
    return root, overrides[-2:], train_stage(config, progress=False).model_path


def _data_settings(data_root) -> list[str]:
    return [*coco_settings(data_root)]


def _rounded(box: list[float], score: float) -> tuple:
    return tuple(round(value, 3) for value in box) + (round(score, 5),)


def test_predict_on_image_files_equals_the_evaluation_of_the_same_images(trained, tmp_path, capsys):
    root, run_settings, model_path = trained
    out, drawn = tmp_path / "detections.json", tmp_path / "drawn"
    assert main(["predict", "--model", "predict-test", str(root / "data" / "val"), "--out", str(out),
                 "--draw", str(drawn), *run_settings, "model.score_thresh=0.01", "eval.batch_size=2"]) == 0
    detections = json.loads(out.read_text())
    assert f"detections on 3 images: {out}" in capsys.readouterr().out

    model, classes, config, _ = load_model(model_path, torch.device("cpu"))
    manifest = read_manifest(config.data.prepared)
    assert detections["categories"] == [{"id": i, "name": n} for i, n in zip(manifest["category_ids"], classes)]
    assert [image["file_name"] for image in detections["images"]] == sorted(
        path.name for path in (root / "data" / "val").iterdir())
    assert sorted(path.name for path in drawn.iterdir()) == [f"{i:06d}-{p.stem}.png" for i, p in enumerate(
        sorted((root / "data" / "val").iterdir()), start=1)]

    # The same detector on the prepared copies of the same files, as evaluation runs it (in batches
    # of the same size: a convolution's rounding depends on the batch).
    model.score_thresh = 0.01
    ground_truth = json.loads((split_dir(config, "val") / "ground_truth.json").read_text())
    names = {image["id"]: image["file_name"] for image in ground_truth["images"]}
    evaluated = detect_split(model, DetectionDataset(ShardReader(split_dir(config, "val"))), 2, torch.device("cpu"),
                        manifest["category_ids"])
    files = {image["id"]: image["file_name"] for image in detections["images"]}
    assert evaluated and sorted((files[a["image_id"]], a["category_id"], _rounded(a["bbox"], a["score"]))
                                for a in detections["annotations"]) == sorted(
        (names[r["image_id"]], r["category_id"], _rounded(r["bbox"], r["score"])) for r in evaluated)

    # Post-processing from the model's config unless overridden.
    assert main(["predict", "--model", str(model_path), str(root / "data" / "val" / "*.png"), "--out", str(out),
                 "model.detections_per_image=2", "model.score_thresh=0.0"]) == 0
    counts = [sum(a["image_id"] == image["id"] for a in json.loads(out.read_text())["annotations"])
              for image in detections["images"]]
    assert counts == [2, 2, 2]


def test_predict_on_a_prepared_split_keeps_the_dataset_ids_and_scores_against_its_ground_truth(trained, tmp_path,
                                                                                               capsys):
    root, run_settings, model_path = trained
    split_out, files_out = tmp_path / "split.json", tmp_path / "files.json"
    settings = [*_data_settings(root / "data"), *run_settings, "model.score_thresh=0.01", "eval.batch_size=2"]
    assert main(["predict", "--model", "predict-test", "--split", "val", "--out", str(split_out), *settings]) == 0
    assert f"detections on 3 images of the val split: {split_out}" in capsys.readouterr().out
    assert main(["predict", "--model", "predict-test", str(root / "data" / "val"), "--out", str(files_out),
                 *settings]) == 0
    from_split, from_files = json.loads(split_out.read_text()), json.loads(files_out.read_text())
    ground_truth_path = split_dir(load_model(model_path, torch.device("cpu")).config, "val") / "ground_truth.json"
    ground_truth = json.loads(ground_truth_path.read_text())
    assert from_split["images"] == [{key: image[key] for key in ("id", "file_name", "height", "width")}
                                    for image in ground_truth["images"]]
    assert from_split["categories"] == ground_truth["categories"]

    # The same detections as of the image files, which only their file names tie to the dataset.
    dataset_id = {image["file_name"]: image["id"] for image in ground_truth["images"]}
    file_name = {image["id"]: image["file_name"] for image in from_files["images"]}
    mapped = [{**a, "image_id": dataset_id[file_name[a["image_id"]]]} for a in from_files["annotations"]]
    assert mapped and sorted((a["image_id"], a["category_id"], _rounded(a["bbox"], a["score"])) for a in mapped) == \
        sorted((a["image_id"], a["category_id"], _rounded(a["bbox"], a["score"])) for a in from_split["annotations"])

    # pycocotools scores the file as it is against the split's ground truth.
    truth = COCO(str(ground_truth_path))
    with contextlib.redirect_stdout(io.StringIO()):
        scores = []
        for annotations in (from_split["annotations"], mapped):
            scored = COCOeval(truth, truth.loadRes(annotations), "bbox")
            scored.evaluate(), scored.accumulate(), scored.summarize()
            scores.append(scored.stats[0])
    assert scores[0] == pytest.approx(scores[1], abs=1e-6) and scores[0] >= 0


def test_predict_refuses_a_split_of_other_classes(trained, tmp_path, capsys):
    root, run_settings, _ = trained
    other = tmp_path / "other"
    shutil.copytree(root / "data", other)
    for split in ("train", "val"):
        coco = json.loads((other / f"{split}.json").read_text())
        coco["categories"][0]["name"] = "box"
        (other / f"{split}.json").write_text(json.dumps(coco))
    settings = [*_data_settings(other), *run_settings]
    assert main(["prep", *settings]) == 0
    capsys.readouterr()
    assert main(["predict", "--model", "predict-test", "--split", "val", "--out", str(tmp_path / "d.json"),
                 *settings]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"aploss predict: error: --model {root / 'runs' / 'predict-test' / 'model.pt'} was "
                            "trained on classes ['square', 'disc'], but ")
    assert error.endswith("has ['box', 'disc']: give a model trained on this data")
    assert not (tmp_path / "d.json").exists()
    assert main(["predict", "--model", "predict-test", "--split", "val", str(root / "data" / "val"),
                 *settings]) == 2
    assert "predict: --split labels a prepared split in this process; leave out the images" in capsys.readouterr().err


def test_predict_writes_beside_the_runs_unless_told_and_draws_above_its_score(trained, tmp_path, capsys,
                                                                              monkeypatch):
    # detections.json landed in the working directory: the repository's root, following the README.
    root, run_settings, _ = trained
    monkeypatch.chdir(tmp_path)
    drawn = {}
    for score in ("0", "1"):
        assert main(["predict", "--model", "predict-test", str(root / "data" / "val" / "*.png"), "--draw",
                     str(tmp_path / score), "--draw-score", score, "model.score_thresh=0.0", *run_settings]) == 0
        drawn[score] = [np.asarray(Image.open(path)) for path in sorted((tmp_path / score).iterdir())]
    out = root / "runs" / "predict" / "detections.json"
    assert f"detections on 3 images: {out}" in capsys.readouterr().out
    assert json.loads(out.read_text())["annotations"] and not list(tmp_path.glob("*.json"))
    original = [np.asarray(Image.open(path).convert("RGB")) for path in sorted((root / "data" / "val").iterdir())]
    assert all((image == plain).all() for image, plain in zip(drawn["1"], original))  # none scores 1
    assert all((image != plain).any() for image, plain in zip(drawn["0"], original))
    assert main(["predict", "--model", "predict-test", str(root / "data" / "val"), "--draw-score", "2",
                 *run_settings]) == 2
    assert "predict: --draw-score must be in [0, 1], got 2.0" in capsys.readouterr().err


def test_predict_refuses_what_is_not_there_or_not_an_image(trained, tmp_path, capsys):
    root, run_settings, _ = trained
    assert main(["predict", "--model", "no-such-run", str(root / "data" / "val"), *run_settings]) == 2
    assert "--model=no-such-run: no such model file" in capsys.readouterr().err
    assert main(["predict", "--model", "run:predict-test", str(tmp_path / "missing.jpg"), *run_settings]) == 2
    assert f"{tmp_path / 'missing.jpg'}: no such file or folder" in capsys.readouterr().err
    (tmp_path / "notes.jpg").write_text("not an image")
    assert main(["predict", "--model", "run:predict-test", str(tmp_path / "notes.jpg"),
                 "--out", str(tmp_path / "d.json"), *run_settings]) == 2
    assert f"{tmp_path / 'notes.jpg'}: cannot decode image: unknown format" in capsys.readouterr().err
    assert not (tmp_path / "d.json").exists()


@pytest.mark.parametrize(("crafted", "problem"), [
    (png_declaring(12000, 12000), "declares 12000x12000 pixels, above data.max_image_pixels=64000000"),
    (gif_growing_to(30000), "holds several frames"),
    (tiff_declaring(15000, 12000), "declares 15000x12000 pixels"),
])
def test_predict_and_the_served_model_refuse_crafted_images_with_one_line(trained, tmp_path, capsys, crafted,
                                                                           problem):
    root, run_settings, model_path = trained
    image = tmp_path / "crafted.png"
    image.write_bytes(crafted)
    assert main(["predict", "--model", "run:predict-test", str(image), "--out", str(tmp_path / "d.json"),
                 *run_settings]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert line.startswith(f"aploss predict: error: {image}: {problem}") and not (tmp_path / "d.json").exists()

    served = RegisteredDetector()
    served.load_context(SimpleNamespace(artifacts={"model": str(model_path)}))
    with pytest.raises(DataError, match=f"image 0: {problem}"):
        served.predict(None, pd.DataFrame({"image": [crafted]}))


class _Recorder(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that answers nothing and remembers every request it was sent."""
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        self.seen.append(self.path)
        self.send_error(403)

    do_HEAD = do_PUT = do_POST = do_GET

    def log_message(self, *args) -> None:
        pass


def test_a_model_file_names_no_data_that_predict_would_read(trained, tmp_path, capsys, monkeypatch):
    # A model.pt handed over by someone else, its config bound to "prepared data" in their bucket:
    # predict used to read that manifest for the category ids, signing requests with the user's keys.
    root, run_settings, model_path = trained
    saved = torch.load(model_path, weights_only=True)
    saved["config"]["data"]["prepared"] = "s3://their-bucket/prepared"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "user-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "user-secret")
    try:
        for ids in ([62, 7], None):  # the ids it was saved with; none in a model.pt from before they were saved
            if ids is None:
                del saved["category_ids"]
            else:
                saved["category_ids"] = ids
            torch.save(saved, tmp_path / "model.pt")
            out = tmp_path / "d.json"
            assert main(["predict", "--model", str(tmp_path / "model.pt"), str(root / "data" / "val"),
                         "--out", str(out), *run_settings]) == 0
            categories = json.loads(out.read_text())["categories"]
            assert [c["id"] for c in categories] == (ids or [1, 2])
    finally:
        server.shutdown()
    assert _Recorder.seen == []

    saved["category_ids"] = ["1; rm", 2]
    torch.save(saved, tmp_path / "model.pt")
    assert main(["predict", "--model", str(tmp_path / "model.pt"), str(root / "data" / "val"), *run_settings]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"aploss predict: error: {tmp_path / 'model.pt'}: category_ids must be one integer per class")


def test_predict_on_ray_equals_the_single_process_predictions_on_bccd_test(trained, tmp_path, capsys):
    root, run_settings, _ = trained
    folder = DATA_ROOT / "bccd" / "BCCD"
    names = (folder / "ImageSets" / "Main" / "test.txt").read_text().split()
    images = [str(folder / "JPEGImages" / f"{name}.jpg") for name in names]
    settings = [*run_settings, "model.score_thresh=0.01", "eval.batch_size=1"]  # a batch's rounding is its own
    single = tmp_path / "single.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in an actor with one CPU: a convolution's rounding depends on the threads
    try:
        assert main(["predict", "--model", "predict-test", *images, "--out", str(single), *settings]) == 0
    finally:
        torch.set_num_threads(threads)
    try:
        assert main(["predict", "--ray", "--model", "predict-test", *images, "--out", str(tmp_path / "shards"),
                     *settings, "ray.workers=2", "ray.local_cpus=3"]) == 0
    finally:
        ray.shutdown()
    assert f"detections of 72 images: {tmp_path / 'shards'}" in capsys.readouterr().out

    expected = json.loads(single.read_text())
    by_file = {image["file_name"]: [] for image in expected["images"]}
    ids = {image["id"]: image["file_name"] for image in expected["images"]}
    for annotation in expected["annotations"]:
        by_file[ids[annotation["image_id"]]].append(annotation)
    rows = pq.read_table(tmp_path / "shards").to_pylist()
    # The shards name each image by where Ray Data read it (a bucket's key at scale), the json by
    # its file's name.
    assert len(rows) == 72 and sorted(row["file_name"] for row in rows) == sorted(images)
    assert sum(len(row["scores"]) for row in rows) == len(expected["annotations"]) > 0
    for row in rows:
        wanted = by_file[Path(row["file_name"]).name]
        assert row["scores"] == [a["score"] for a in wanted]
        assert row["category_ids"] == [a["category_id"] for a in wanted]
        corners = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in wanted)]  # x + w: rounding only
        assert torch.allclose(torch.tensor(row["boxes"]).reshape(-1, 4), torch.tensor(corners).reshape(-1, 4),
                              atol=1e-4)
