"""A synthetic dataset with COCO 2017's layout, categories and box statistics, at thumbnail size.

For tests and benchmarks that need COCO's counts (data-prep on Ray Data, distributed evaluation)
without COCO's 19 GB. `write_synthetic_coco_scale` writes `<root>/<split>/000000xxxxxx.jpg` and
`<root>/annotations/instances_<split>.json` shaped as COCO's instances files: the 80 categories
with their sparse ids 1-90, sparse image ids listed out of id order, about 7.3 boxes per image
(train2017's 860k boxes / 118k images) with a long tail and some empty images, about 2.9
categories per image, 1 % crowd boxes with an RLE segmentation and polygons for the rest. Each
box is a filled rectangle in its category's colour on dark noise, so that a detector can learn
the data. The same seed writes byte-identical files.

    python benchmarks/synthetic_coco.py OUT_DIR --train 20000 --val 2000 [--seed 0]

and read it with

    data.dataset=coco data.root=OUT_DIR data.test_split=val
    data.annotations={train: annotations/instances_train.json, val: annotations/instances_val.json}
    data.images={train: train, val: val}
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.io import encode_jpeg

# COCO 2017's categories in id order, by supercategory. Their ids run 1-90 with gaps where ten
# of the COCO paper's 91 categories were never annotated.
_SUPERCATEGORIES = (
    ("person", ("person",)),
    ("vehicle", ("bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat")),
    ("outdoor", ("traffic light", "fire hydrant", "stop sign", "parking meter", "bench")),
    ("animal", ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe")),
    ("accessory", ("backpack", "umbrella", "handbag", "tie", "suitcase")),
    ("sports", ("frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
                "skateboard", "surfboard", "tennis racket")),
    ("kitchen", ("bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl")),
    ("food", ("banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake")),
    ("furniture", ("chair", "couch", "potted plant", "bed", "dining table", "toilet")),
    ("electronic", ("tv", "laptop", "mouse", "remote", "keyboard", "cell phone")),
    ("appliance", ("microwave", "oven", "toaster", "sink", "refrigerator")),
    ("indoor", ("book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")),
)
UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
CATEGORIES = [{"supercategory": supercategory, "id": id_, "name": name} for id_, (supercategory, name) in zip(
    (i for i in range(1, 91) if i not in UNUSED_IDS),
    ((supercategory, name) for supercategory, names in _SUPERCATEGORIES for name in names))]

# Boxes per image: negative binomial with train2017's mean and a long tail (sd 5.8): 4.5 % of the
# images empty (COCO: 1 %), 4 % with 20 or more.
MEAN_BOXES, BOX_COUNT_SHAPE, MAX_BOXES = 7.3, 2, 60
# Categories drawn per image: 1 + Poisson, 2.9 on average as in train2017 (2.5 present once
# images with fewer boxes are counted). Person's weight puts it in 54 % of the images, as in
# COCO; the other 79 weigh the same.
CATEGORIES_PER_IMAGE = 2.9
PERSON_SHARE = 0.3
CROWD_SHARE = 0.01
MIN_BOX_SIDE = 2.0
SIZE_JITTER = 0.1
NOISE_SHIFT = 2  # background noise is 0-63, below every category colour's brightest channel
# 80 of the 125 colours of 5 levels per channel, each at least 96 in some channel: one per category.
_LEVELS = np.array([96, 136, 176, 216, 255], dtype=np.uint8)
PALETTE = np.stack([_LEVELS[np.array([k // 25, k // 5 % 5, k % 5])] for k in range(len(CATEGORIES))])
JPEG_QUALITY = 90
MAX_IMAGE_ID = 999_999  # COCO's file names are the id in 12 digits, the first six zeros


def write_synthetic_coco_scale(root: Path, images: dict[str, int], seed: int = 0, size: tuple[int, int] = (160, 120),
                               size_jitter: float = SIZE_JITTER) -> dict[str, tuple[Path, Path]]:
    """Write each split's `images[split]` JPEGs and instances json under `root`; returns split ->
    (json path, image folder). Widths and heights are drawn within `size` (width, height) +-
    `size_jitter` of it; `size_jitter=0` makes every image `size`."""
    if not 0 <= size_jitter < 1:
        raise ValueError(f"size_jitter must be in [0, 1), got {size_jitter}")
    sizes = [(round(side * (1 - size_jitter)), round(side * (1 + size_jitter))) for side in size]
    if min(low for low, _ in sizes) < MIN_BOX_SIDE:
        raise ValueError(f"images of {size} +- {size_jitter:.0%} cannot hold a {MIN_BOX_SIDE:g}-pixel box")
    total = sum(images.values())
    if total > MAX_IMAGE_ID:
        raise ValueError(f"{total} images: COCO-style file names hold at most {MAX_IMAGE_ID}")
    rng = np.random.default_rng(seed)
    # One draw for every split keeps image ids distinct across them, as COCO's are.
    image_ids = iter((rng.choice(MAX_IMAGE_ID, total, replace=False) + 1).tolist())
    weights = np.full(len(CATEGORIES), (1 - PERSON_SHARE) / (len(CATEGORIES) - 1))
    weights[0] = PERSON_SHARE
    written, annotation_id = {}, 1
    for split, count in images.items():
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        image_records, annotations = [], []
        for _ in range(count):
            image_id = next(image_ids)
            width, height = (int(rng.integers(low, high + 1)) for low, high in sizes)
            pixels, boxes = _draw_image(rng, width, height, weights)
            file_name = f"{image_id:012d}.jpg"
            jpeg = encode_jpeg(torch.from_numpy(pixels).permute(2, 0, 1), quality=JPEG_QUALITY)
            (folder / file_name).write_bytes(jpeg.numpy().tobytes())
            image_records.append({"license": 1, "file_name": file_name, "height": height, "width": width,
                                  "id": image_id})
            for category, box, crowd in boxes:
                annotations.append(_annotation(annotation_id, image_id, category, box, crowd, width, height))
                annotation_id += 1
        json_path = root / "annotations" / f"instances_{split}.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(_instances(split, image_records, annotations), separators=(",", ":")))
        written[split] = (json_path, folder)
    return written


Box = tuple[float, float, float, float]  # x, y, w, h


def _draw_image(rng: np.random.Generator, width: int, height: int, weights: np.ndarray
                ) -> tuple[np.ndarray, list[tuple[int, Box, bool]]]:
    """The image (uint8 [height, width, 3]) and its boxes as (category index, box, crowd)."""
    pixels = (np.frombuffer(rng.bytes(width * height * 3), dtype=np.uint8) >> NOISE_SHIFT).reshape(height, width, 3)
    pixels = pixels.copy()  # frombuffer's array is read-only
    count = min(int(rng.negative_binomial(BOX_COUNT_SHAPE, BOX_COUNT_SHAPE / (BOX_COUNT_SHAPE + MEAN_BOXES))),
                MAX_BOXES)
    if count == 0:
        return pixels, []
    present = rng.choice(len(CATEGORIES), min(count, 1 + int(rng.poisson(CATEGORIES_PER_IMAGE - 1))),
                         replace=False, p=weights)
    # Each present category gets a box, the other boxes any of them.
    extra = rng.integers(0, len(present), count - len(present))
    categories = present[np.concatenate([np.arange(len(present)), extra])]
    # sqrt(area) log-uniform from 4 px to the image's own, so small, medium and large all occur.
    side = np.exp(rng.uniform(np.log(4), np.log(np.sqrt(width * height)), count))
    stretch = np.sqrt(np.exp(rng.uniform(-np.log(2), np.log(2), count)))
    # Quarter pixels: exact in binary, so x + w never passes the border by rounding.
    w = np.clip(np.round(side * stretch * 4) / 4, MIN_BOX_SIDE, width)
    h = np.clip(np.round(side / stretch * 4) / 4, MIN_BOX_SIDE, height)
    x = np.floor(rng.random(count) * (width - w) * 4) / 4
    y = np.floor(rng.random(count) * (height - h) * 4) / 4
    crowd = rng.random(count) < CROWD_SHARE
    # A crowd region is a pixel mask in COCO, so its box is whole pixels.
    x1, y1 = np.where(crowd, np.ceil(x + w), x + w), np.where(crowd, np.ceil(y + h), y + h)
    x, y = np.where(crowd, np.floor(x), x), np.where(crowd, np.floor(y), y)
    boxes = []
    # Largest first, so that a small box is not hidden under a large one; a border of half the
    # colour keeps overlapping boxes of one category apart.
    for i in np.argsort(-(x1 - x) * (y1 - y), kind="stable"):
        left, top, right, bottom = round(x[i]), round(y[i]), round(x1[i]), round(y1[i])
        pixels[top:bottom, left:right] = PALETTE[categories[i]] // 2
        pixels[top + 1:bottom - 1, left + 1:right - 1] = PALETTE[categories[i]]
        boxes.append((int(categories[i]), (float(x[i]), float(y[i]), float(x1[i] - x[i]), float(y1[i] - y[i])),
                      bool(crowd[i])))
    return pixels, boxes


def _annotation(annotation_id: int, image_id: int, category: int, box: Box, crowd: bool, width: int, height: int
                ) -> dict:
    x, y, w, h = box
    segmentation = _rle(box, width, height) if crowd else [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return {"segmentation": segmentation, "area": w * h, "iscrowd": int(crowd), "image_id": image_id,
            "bbox": [x, y, w, h], "category_id": CATEGORIES[category]["id"], "id": annotation_id}


def _rle(box: Box, width: int, height: int) -> dict:
    """COCO's uncompressed RLE of a whole-pixel box: run lengths over the mask in column-major
    order, the first run of zeros (so 0 when the mask starts with a one)."""
    x, y, w, h = (int(v) for v in box)
    mask = np.zeros((height, width), dtype=bool)
    mask[y:y + h, x:x + w] = True
    flat = mask.ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {"counts": [0, *counts] if flat[0] else counts, "size": [height, width]}


def _instances(split: str, images: list[dict], annotations: list[dict]) -> dict:
    return {
        "info": {"description": f"aploss synthetic COCO-scale dataset, split {split}", "version": "1.0",
                 "year": 2017, "contributor": "benchmarks/synthetic_coco.py"},
        "licenses": [{"id": 1, "name": "synthetic, no rights reserved", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=0, help="training images")
    parser.add_argument("--val", type=int, default=0, help="validation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, nargs=2, default=(160, 120), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--size-jitter", type=float, default=SIZE_JITTER, help="0 makes every image --size")
    args = parser.parse_args(argv)
    splits = {split: count for split, count in (("train", args.train), ("val", args.val)) if count > 0}
    if not splits:
        parser.error("nothing to write: give --train and/or --val a number of images")
    start = time.perf_counter()
    written = write_synthetic_coco_scale(args.out_dir, splits, args.seed, tuple(args.size), args.size_jitter)
    seconds = time.perf_counter() - start
    for split, (json_path, folder) in written.items():
        data = json.loads(json_path.read_text())
        crowd = sum(annotation["iscrowd"] for annotation in data["annotations"])
        print(f"{split}: {len(data['images'])} images in {folder}, {len(data['annotations'])} boxes "
              f"({crowd} crowd) in {json_path}")
    print(f"{sum(splits.values())} images in {seconds:.1f} s ({sum(splits.values()) / seconds:.0f} images/s)")


if __name__ == "__main__":
    main()
