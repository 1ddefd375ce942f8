"""benchmarks/peer_yolo.py's YOLO export: every image of the prepared splits as a file named by its
image id, and its boxes as YOLO labels, checked against the COCO annotations they came from.
Needs no Ultralytics (the benchmark itself runs in an environment of its own)."""
import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipeline.config import load_config
from pipeline.data.prep import prepare
from pipeline.data.synthetic import coco_settings, write_synthetic_coco

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peer_yolo.py"
_spec = importlib.util.spec_from_file_location("peer_yolo", SCRIPT)
peer_yolo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer_yolo)

SYNTHETIC_SIZE = 128  # write_synthetic_coco's default image side


def _expected_labels(coco: dict, image_id: int, width: int, height: int) -> list[str]:
    """YOLO lines of an image's COCO boxes (xywh, absolute pixels), category ids 1..K as classes 0..K-1."""
    lines = []
    for annotation in coco["annotations"]:
        if annotation["image_id"] == image_id:
            x, y, w, h = annotation["bbox"]
            lines.append(f"{annotation['category_id'] - 1} {(x + w / 2) / width:.6f} {(y + h / 2) / height:.6f} "
                         f"{w / width:.6f} {h / height:.6f}")
    return sorted(lines)


def test_export_writes_every_image_unchanged_and_its_boxes_as_yolo_labels(tmp_path):
    layout = write_synthetic_coco(tmp_path / "data", {"train": 5, "val": 3})
    config = load_config(None, [*coco_settings(tmp_path / "data"), f"run.output_dir={tmp_path / 'runs'}"])
    prepared = prepare(config, progress=False).directory
    destination = tmp_path / "yolo"
    data_yaml = peer_yolo.export_yolo_dataset(prepared, {"train": "train", "val": "val", "test": "val"}, destination)

    assert yaml.safe_load(data_yaml.read_text()) == {
        "path": str(destination.resolve()), "train": "images/train", "val": "images/val", "test": "images/val",
        "names": {0: "square", 1: "disc"}}
    for split, count in (("train", 5), ("val", 3)):
        coco_json, image_dir = layout[split]
        coco = json.loads(coco_json.read_text())
        images, labels = destination / "images" / split, destination / "labels" / split
        expected_files = sorted(f"{image['id']}.png" for image in coco["images"])
        assert sorted(path.name for path in images.iterdir()) == expected_files
        assert len(list(labels.iterdir())) == count
        for image in coco["images"]:
            assert (images / f"{image['id']}.png").read_bytes() == (image_dir / image["file_name"]).read_bytes()
            written = sorted((labels / f"{image['id']}.txt").read_text().splitlines())
            assert written == _expected_labels(coco, image["id"], SYNTHETIC_SIZE, SYNTHETIC_SIZE)
            assert written  # every synthetic image has one or two objects


def test_an_exif_rotated_image_is_written_unrotated_and_crowd_boxes_are_left_out(tmp_path):
    """OpenCV (Ultralytics' reader) would turn a JPEG by its EXIF orientation; the project's boxes
    are on the stored pixels, so the export writes those pixels as a PNG without the tag."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    exif = Image.Exif()
    exif[peer_yolo.EXIF_ORIENTATION] = 6  # "rotate 90 degrees clockwise to display"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(root / "images" / "rotated.jpg", exif=exif)
    coco = {"images": [{"id": 7, "file_name": "rotated.jpg", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [8, 4, 16, 12], "area": 192,
                             "iscrowd": 0},
                            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [30, 20, 20, 20], "area": 400,
                             "iscrowd": 1}],
            "categories": [{"id": 1, "name": "box"}]}
    (root / "train.json").write_text(json.dumps(coco))
    config = load_config(None, ["data.dataset=coco", f"data.root={root}", "data.annotations={train: train.json}",
                                "data.images={train: images}", "data.val_split=train", "data.test_split=train",
                                f"run.output_dir={tmp_path / 'runs'}"])
    prepared = prepare(config, progress=False).directory
    destination = tmp_path / "yolo"
    peer_yolo.export_yolo_dataset(prepared, {"train": "train", "val": "train"}, destination)

    assert [path.name for path in (destination / "images" / "train").iterdir()] == ["7.png"]
    with Image.open(destination / "images" / "train" / "7.png") as written:
        assert (written.format, written.size) == ("PNG", (64, 48))
        assert peer_yolo.EXIF_ORIENTATION not in written.getexif()
    # cx = (8 + 16 / 2) / 64, cy = (4 + 12 / 2) / 48, w = 16 / 64, h = 12 / 48; the crowd box is left out.
    assert (destination / "labels" / "train" / "7.txt").read_text() == "0 0.250000 0.208333 0.250000 0.250000\n"


def test_the_epoch_count_fitted_to_a_budget_takes_the_calibrations_last_epoch_as_the_steady_cost():
    # The 2026-12-08 run's numbers: a first epoch of 32.5 CPU-s, then 23.0, and 4.5 of setup and
    # final validation. At 720 CPU-s that is 31 epochs (32.5 + 30 x 23 + 4.5 = 727); a one-epoch
    # calibration read as 32.5 per epoch planned 22, which spent 530.
    calibration = peer_yolo.YoloRun(model=None, spent=peer_yolo.Spent(cpu_s=60.0, cpu_s_getrusage=60.0, wall_s=60.0),
                                    epochs=2, epoch_cpu_s=[32.5, 23.0])
    assert peer_yolo.epochs_within(720.0, calibration) == 31
    assert peer_yolo.epochs_within(1831.0, calibration) == 79
    assert peer_yolo.epochs_within(10.0, calibration) == 1


def test_our_rows_come_back_from_an_earlier_run_and_a_file_without_them_is_refused(tmp_path):
    ours = {"run": "aploss 1x", "cpu_s": 720.4, "steps": 275, "AP": 0.47, "per_class_ap50": {"RBC": 0.8}}
    theirs = {"run": "yolov8n at aploss 1x's budget", "cpu_s": 529.8, "epochs": 22, "AP": 0.36,
              "per_class_ap50": {"RBC": 0.7}}
    earlier = tmp_path / "peer_yolo.json"
    earlier.write_text(json.dumps({"rows": [ours, theirs]}))
    assert peer_yolo.earlier_rows(earlier) == [ours]
    for text in ["{", json.dumps({"rows": [theirs]}), json.dumps({"rows": [{**ours, "cpu_s": "720"}]})]:
        earlier.write_text(text)
        with pytest.raises(SystemExit, match=f"--ours-from {earlier}: not a peer_yolo.json of ours"):
            peer_yolo.earlier_rows(earlier)
