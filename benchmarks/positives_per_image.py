"""Positive anchor-class pairs per image: what the AP-loss gathers across workers each step.

On the synthetic COCO-scale set (`synthetic_coco.py`, COCO's box counts, 640 x 480 images) at
COCO's RetinaNet input (800 x 1333, the paper's anchors), the anchors of each image assigned as
in training (IoU >= 0.5, each ground truth's best anchors forced positive); prints the mean,
median and 95th percentile per image, and the anchor-class pairs per image. Only the anchor grid
and the boxes count: the backbone runs once per padded input size, for its feature maps' sizes.

    .venv/bin/python benchmarks/positives_per_image.py --images 200
"""
import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aploss.anchor_assignment import assign_anchors  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.bindings import split_dir  # noqa: E402
from pipeline.data.prep import prepare  # noqa: E402
from pipeline.data.shards import ShardReader  # noqa: E402
from pipeline.model import build_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
_spec = importlib.util.spec_from_file_location("synthetic_coco", Path(__file__).with_name("synthetic_coco.py"))
synthetic_coco = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synthetic_coco)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    root = RESULTS / "synthetic_coco" / f"positives-{args.images}"
    if not (root / "annotations" / "instances_val.json").is_file():
        synthetic_coco.write_synthetic_coco_scale(root, {"train": args.images, "val": 8}, size=(640, 480))
    config = load_config(None, [
        "data.dataset=coco", f"data.root={root}", "data.download=false", "data.test_split=val",
        "data.annotations={train: annotations/instances_train.json, val: annotations/instances_val.json}",
        "data.images={train: train, val: val}", "model.anchors.mode=paper", "model.min_size=800",
        "model.max_size=1333", f"run.output_dir={RESULTS / 'positives'}"])
    config = config.with_prepared(prepare(config, progress=False).directory)
    detector = build_model(config, 80)
    reader = ShardReader(split_dir(config, "train"))
    positives, pairs, grids = [], 0, {}
    detector.eval()
    for index in range(len(reader)):
        record = reader.read(index)
        images, _ = detector.transform([torch.zeros(3, record.height, record.width)])
        padded = tuple(images.tensors.shape[-2:])
        if padded not in grids:  # the feature maps' sizes, found once per padded input size
            with torch.no_grad():
                grids[padded] = [torch.empty(feature.shape) for feature in detector.backbone(images.tensors).values()]
        anchors = detector.anchor_generator(images, grids[padded])[0]
        scale = images.image_sizes[0][0] / record.height
        boxes = torch.from_numpy(record.boxes[~record.crowd]) * scale
        matched = assign_anchors(anchors, boxes, config.model.fg_iou, config.model.bg_iou)
        positives.append(int((matched >= 0).sum()))  # one class per positive anchor
        pairs = len(anchors) * 80
    positives.sort()
    print(f"{len(positives)} images at {config.model.min_size} x {config.model.max_size}, paper anchors: "
          f"positives per image mean {statistics.mean(positives):.0f}, median {statistics.median(positives):.0f}, "
          f"95th percentile {positives[int(0.95 * (len(positives) - 1))]}; {pairs:,} anchor-class pairs per image")


if __name__ == "__main__":
    main()
