"""RetinaNet's anchors against the prepared data a config is bound to: `model.anchors.mode=auto`
fitted to the training split, and the anchor recall per class that data-prep and training
report (a class whose boxes no anchor reaches is hardly learnt)."""
import dataclasses
import json
import math
from dataclasses import dataclass

import torch

from aploss.anchors import GroundTruth, covered, fit_layout, scaled_ground_truth
from pipeline.config import Config
from pipeline.data.shards import read_manifest
from pipeline.storage import Location

# Fitting and recall look at this many training images at most (a seeded sample): enough for
# box statistics, and seconds rather than minutes on COCO's 118k.
SAMPLE_IMAGES = 2000
LOW_RECALL = 0.5


def ground_truth(config: Config, split: str) -> GroundTruth:
    """The split's non-crowd boxes at the network input (the evaluation resize of model.*)."""
    prepared = Location(config.data.prepared)
    manifest = read_manifest(prepared)
    index = {category: i for i, category in enumerate(manifest["category_ids"])}
    coco = json.loads((prepared / manifest["splits"][split]["ground_truth"]["file"]).read_text())
    images = sorted(coco["images"], key=lambda image: image["id"])
    if len(images) > SAMPLE_IMAGES:
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:SAMPLE_IMAGES]
        images = [images[i] for i in sorted(order.tolist())]
    by_image: dict[int, list[dict]] = {image["id"]: [] for image in images}
    for annotation in coco["annotations"]:
        if annotation["image_id"] in by_image and not annotation["iscrowd"]:
            by_image[annotation["image_id"]].append(annotation)
    boxes = [torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in by_image[image["id"]])],
                          dtype=torch.float64).reshape(-1, 4) for image in images]
    classes = [torch.tensor([index[a["category_id"]] for a in by_image[image["id"]]], dtype=torch.int64)
               for image in images]
    return scaled_ground_truth([(image["height"], image["width"]) for image in images], boxes, classes,
                               config.model.min_size, config.model.max_size)


def fit_anchors(config: Config) -> Config:
    """`config` with `auto` anchors fitted to its training split (sizes, ratios and lowest level
    filled in); any other config unchanged. The config must be bound to prepared data."""
    anchors = config.model.anchors
    if anchors.mode != "auto" or anchors.sizes or not config.model.arch.startswith("retinanet"):
        return config
    truth = ground_truth(config, config.data.train_split)
    if not sum(len(boxes) for boxes in truth.boxes):
        return config  # nothing to fit to; training refuses such a split (bindings.training_data)
    manifest = read_manifest(config.data.prepared)
    layout = fit_layout(truth, config.model.fg_iou, len(manifest["classes"]))
    fitted = dataclasses.replace(anchors, sizes=[list(s) for s in layout.sizes],
                                 ratios=[list(r) for r in layout.ratios], lowest_level=layout.lowest_level)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, anchors=fitted))


@dataclass
class ClassRecall:
    recall: float  # share of the class's boxes some anchor reaches at IoU >= model.fg_iou
    boxes: int
    median_size: tuple[float, float]  # width, height at the network input


def anchor_recall(config: Config, split: str) -> dict[str, ClassRecall]:
    """Per class, the anchor recall of `config`'s RetinaNet anchors on `split` (empty for SSD)."""
    if not config.model.arch.startswith("retinanet"):
        return {}
    classes = read_manifest(config.data.prepared)["classes"]
    truth = ground_truth(config, split)
    hits = covered(config.model.anchors.layout(), truth, config.model.fg_iou)
    labels, boxes = torch.cat(truth.classes), torch.cat(truth.boxes)
    result = {}
    for i, name in enumerate(classes):
        mine = labels == i
        if mine.any():
            sizes = (boxes[mine, 2:] - boxes[mine, :2]).median(dim=0).values.tolist()
            result[name] = ClassRecall(hits[mine].double().mean().item(), int(mine.sum()), (sizes[0], sizes[1]))
    return result


def recall_lines(recall: dict[str, ClassRecall], config: Config) -> list[str]:
    """What to print: one line of every class's recall, and a warning per class below 50 %."""
    if not recall:
        return []
    anchors = config.model.anchors
    where = f"P{anchors.lowest_level}-P7, {anchors.mode}"
    lines = [f"anchor recall (IoU >= {config.model.fg_iou:g}, {where}): "
             + ", ".join(f"{name} {value.recall:.0%}" for name, value in recall.items())]
    for name, value in recall.items():
        if value.recall < LOW_RECALL and not math.isnan(value.recall):
            width, height = value.median_size
            lines.append(f"warning: class {name}: only {value.recall:.0%} of its boxes have an anchor at IoU >= "
                         f"{config.model.fg_iou:g} (median box {width:.0f}x{height:.0f} px at the network input); "
                         f"it will hardly be learnt: set {_remedies(config)}")
    return lines


def _remedies(config: Config) -> str:
    """The settings that give a class of small boxes anchors it can match, those not already on."""
    anchors = config.model.anchors
    remedies = ["model.anchors.mode=auto"] if anchors.mode != "auto" else []
    remedies += [f"model.anchors.lowest_level={anchors.lowest_level - 1}"] if anchors.lowest_level > 2 else []
    remedies.append("a larger model.min_size")
    return ", ".join(remedies[:-1]) + (" or " if len(remedies) > 1 else "") + remedies[-1]


def report_anchor_recall(config: Config) -> dict[str, ClassRecall]:
    """Print the anchor recall of `config` (bound to prepared data, anchors fitted) on its
    training split, with a warning per class below 50 %; returned for MLflow."""
    recall = anchor_recall(config, config.data.train_split)
    for line in recall_lines(recall, config):
        print(line, flush=True)
    return recall
