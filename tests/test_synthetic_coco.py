"""benchmarks/synthetic_coco.py: COCO's shape and box statistics, deterministic bytes, and data-prep
taking every image and box of it."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.io import decode_jpeg

from pipeline.config import load_config
from pipeline.data.prep import prepare

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "synthetic_coco.py"
_spec = importlib.util.spec_from_file_location("synthetic_coco", SCRIPT)
synthetic_coco = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synthetic_coco)

COCO_UNUSED_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
# A sample of COCO 2017's (id, name, supercategory), around its gaps and at its ends.
COCO_SAMPLE = [(1, "person", "person"), (11, "fire hydrant", "outdoor"), (13, "stop sign", "outdoor"),
               (25, "giraffe", "animal"), (27, "backpack", "accessory"), (31, "handbag", "accessory"),
               (44, "bottle", "kitchen"), (46, "wine glass", "kitchen"),
               (65, "bed", "furniture"), (67, "dining table", "furniture"), (70, "toilet", "furniture"),
               (72, "tv", "electronic"), (82, "refrigerator", "appliance"), (84, "book", "indoor"),
               (90, "toothbrush", "indoor")]


def read_split(written: dict, split: str) -> tuple[dict, Path]:
    json_path, folder = written[split]
    return json.loads(json_path.read_text()), folder


def decoded(path: Path) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8))


@pytest.fixture(scope="module")
def coco_200(tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return read_split(synthetic_coco.write_synthetic_coco_scale(root, {"train": 200}), "train")


def test_categories_are_coco_2017s(coco_200):
    data, _ = coco_200
    categories = data["categories"]
    assert [c["id"] for c in categories] == sorted(set(range(1, 91)) - COCO_UNUSED_IDS)
    assert len({c["name"] for c in categories}) == 80
    by_id = {c["id"]: (c["name"], c["supercategory"]) for c in categories}
    assert all(by_id[id_] == (name, supercategory) for id_, name, supercategory in COCO_SAMPLE)


def test_images_and_boxes_have_cocos_shape_and_statistics(coco_200):
    data, folder = coco_200
    assert {"info", "licenses", "images", "annotations", "categories"} <= set(data)
    ids = [image["id"] for image in data["images"]]
    assert len(set(ids)) == 200 and ids != sorted(ids) and max(ids) - min(ids) > 10 * len(ids)
    sizes = {}
    for image in data["images"]:
        assert image["file_name"] == f"{image['id']:012d}.jpg"
        assert decoded(folder / image["file_name"]).shape == (3, image["height"], image["width"])
        sizes[image["id"]] = (image["width"], image["height"])
    assert len(set(sizes.values())) > 10  # sizes vary per image

    annotations = data["annotations"]
    per_image = np.bincount([ids.index(a["image_id"]) for a in annotations], minlength=len(ids))
    assert 5.5 <= per_image.mean() <= 9 and per_image.min() == 0 and per_image.max() >= 18
    assert len({a["id"] for a in annotations}) == len(annotations)
    crowd = [a for a in annotations if a["iscrowd"]]
    assert 0 < len(crowd) < 0.03 * len(annotations)
    for a in annotations:
        x, y, w, h = a["bbox"]
        width, height = sizes[a["image_id"]]
        assert all(isinstance(v, float) for v in a["bbox"])
        assert x >= 0 and y >= 0 and x + w <= width and y + h <= height and w >= 2 and h >= 2
        assert a["area"] == w * h
        if a["iscrowd"]:  # an uncompressed RLE whose mask is the box
            rle = mask_utils.frPyObjects(a["segmentation"], height, width)
            assert a["segmentation"]["size"] == [height, width]
            assert mask_utils.area(rle) == a["area"] and mask_utils.toBbox(rle).tolist() == a["bbox"]
        else:
            assert a["segmentation"] == [[x, y, x + w, y, x + w, y + h, x, y + h]]
    areas = np.array([a["area"] for a in annotations])
    assert (areas < 32 ** 2).any() and ((areas >= 32 ** 2) & (areas < 96 ** 2)).any() and (areas >= 96 ** 2).any()


def test_each_box_shows_its_category_colour(coco_200):
    data, folder = coco_200
    last = {a["image_id"]: a for a in data["annotations"]}  # drawn last, so on top
    files = {image["id"]: image["file_name"] for image in data["images"]}
    colours = {c["id"]: synthetic_coco.PALETTE[k] for k, c in enumerate(data["categories"])}
    checked = 0
    for image_id, a in last.items():
        x, y, w, h = a["bbox"]
        if min(w, h) < 6:
            continue
        pixel = decoded(folder / files[image_id])[:, int(y + h / 2), int(x + w / 2)].numpy()
        assert np.abs(pixel.astype(int) - colours[a["category_id"]]).max() <= 24, (image_id, a)
        checked += 1
    assert checked > 50


def test_one_size_without_jitter(tmp_path):
    written = synthetic_coco.write_synthetic_coco_scale(tmp_path, {"val": 20}, size=(64, 48), size_jitter=0)
    data, folder = read_split(written, "val")
    assert {(image["width"], image["height"]) for image in data["images"]} == {(64, 48)}
    assert all(decoded(folder / image["file_name"]).shape == (3, 48, 64) for image in data["images"])


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    splits = {"train": 30, "val": 10}
    runs = {name: tmp_path / name for name in ("first", "again", "other")}
    for name, seed in (("first", 3), ("again", 3), ("other", 4)):
        synthetic_coco.write_synthetic_coco_scale(runs[name], splits, seed=seed)
    first = file_bytes(runs["first"])
    assert len(first) == 40 + 2 and first == file_bytes(runs["again"])
    other = file_bytes(runs["other"])
    assert other.keys() != first.keys()  # other image ids, so other file names
    assert other["annotations/instances_val.json"] != first["annotations/instances_val.json"]


def test_image_ids_are_distinct_across_splits(tmp_path):
    written = synthetic_coco.write_synthetic_coco_scale(tmp_path, {"train": 50, "val": 50})
    ids = [{image["id"] for image in read_split(written, split)[0]["images"]} for split in ("train", "val")]
    assert len(ids[0]) == len(ids[1]) == 50 and not ids[0] & ids[1]


def test_data_prep_takes_every_image_and_box(tmp_path):
    root = tmp_path / "coco"
    written = synthetic_coco.write_synthetic_coco_scale(root, {"train": 60, "val": 20})
    config = load_config(None, [
        "data.dataset=coco", f"data.root={root}", "data.test_split=val",
        "data.annotations={train: annotations/instances_train.json, val: annotations/instances_val.json}",
        "data.images={train: train, val: val}", f"run.output_dir={tmp_path / 'runs'}"])
    splits = prepare(config, progress=False).manifest["splits"]
    assert set(splits) == {"train", "val"}
    for split, report in splits.items():
        data, _ = read_split(written, split)
        assert report["images"] == len(data["images"])
        assert report["boxes"] == len(data["annotations"])
        assert report["crowd_boxes"] == sum(a["iscrowd"] for a in data["annotations"])
        assert report["dropped"] == report["clipped"] == report["skipped"] == []
    assert splits["train"]["crowd_boxes"] + splits["val"]["crowd_boxes"] > 0


def test_cli_prints_what_it_wrote(tmp_path, capsys):
    synthetic_coco.main([str(tmp_path), "--train", "12", "--val", "5", "--seed", "1"])
    out = capsys.readouterr().out.splitlines()
    train, _ = read_split({"train": (tmp_path / "annotations" / "instances_train.json", None)}, "train")
    assert out[0].startswith(f"train: 12 images in {tmp_path / 'train'}, {len(train['annotations'])} boxes")
    assert out[1].startswith("val: 5 images") and out[2].startswith("17 images in ")
    assert len(list((tmp_path / "val").glob("*.jpg"))) == 5
