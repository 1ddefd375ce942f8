"""Pascal VOC box metrics: 11-point (VOC2007) and area (VOC2010+) average precision.

`voc_map` evaluates COCO result dicts against a COCO instances file, with VOC's rules rather
than COCO's: per class, every detection ranked by score (no per-image cap); a detection is a
true positive when the ground truth it overlaps most (same image, same class) has IoU >= the
threshold and no higher-ranked detection took it first, and a false positive otherwise;
a detection whose best ground truth is "difficult" (`iscrowd=1` in our COCO files) counts as
neither, and difficult objects are not among the positives. A class without positives has
NaN AP and is left out of the means.

IoU is plain continuous-coordinate IoU. This deliberately differs from the VOC devkit, which
treats boxes as inclusive integer pixel ranges (width = x2 - x1 + 1); our boxes are continuous
pixel coordinates, so the "+1" would inflate every box by a pixel.
"""
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from pipeline.evaluation.coco_metrics import check_detections, load_detections, load_ground_truth

# Per-detection outcomes.
FALSE_POSITIVE, TRUE_POSITIVE, IGNORED = 0, 1, 2


@dataclass(frozen=True)
class VocResult:
    map_11point: float  # mean over classes with positives of the VOC2007 11-point AP
    map_area: float  # mean over classes with positives of the VOC2010+ area AP
    per_class_11point: dict[str, float]  # class name -> 11-point AP (NaN: no positives)
    per_class_area: dict[str, float]  # class name -> area AP (NaN: no positives)


def voc_map(ground_truth: str | Path | COCO, detections: list[dict[str, Any]] | str | Path,
            iou_threshold: float = 0.5) -> VocResult:
    """VOC AP of `detections` (COCO result dicts: image_id, category_id, bbox as xywh, score;
    or a JSON file of them) against a COCO ground-truth instances file or COCO index."""
    gt = load_ground_truth(ground_truth)
    results = load_detections(detections)
    check_detections(results, gt)
    by_class: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for detection in results:
        by_class[detection["category_id"]].append(detection)
    per_class_11point, per_class_area = {}, {}
    for category in gt.getCatIds():
        name = gt.cats[category]["name"]
        outcomes = _class_outcomes(gt, category, by_class[category], iou_threshold)
        positives = sum(not annotation["iscrowd"]
                        for annotation in gt.loadAnns(gt.getAnnIds(catIds=[category])))
        per_class_11point[name], per_class_area[name] = _average_precisions(outcomes, positives)
    return VocResult(_mean_defined(per_class_11point), _mean_defined(per_class_area),
                     per_class_11point, per_class_area)


def _class_outcomes(gt: COCO, category: int, detections: list[dict[str, Any]],
                    iou_threshold: float) -> np.ndarray:
    """The outcome of each of one class's detections, ranked by descending score."""
    # Stable, so tied scores keep their input order and the result is deterministic.
    ranked = sorted(detections, key=lambda detection: -detection["score"])
    # A ground truth can only be taken by a detection on its own image, so matching runs per
    # image, in rank order within it.
    positions: dict[int, list[int]] = defaultdict(list)
    for position, detection in enumerate(ranked):
        positions[detection["image_id"]].append(position)
    outcomes = np.empty(len(ranked), dtype=np.int8)
    for image_id, image_positions in positions.items():
        annotations = gt.loadAnns(gt.getAnnIds(imgIds=[image_id], catIds=[category]))
        outcomes[image_positions] = _match_image(
            np.array([ranked[position]["bbox"] for position in image_positions], dtype=float).reshape(-1, 4),
            np.array([annotation["bbox"] for annotation in annotations], dtype=float).reshape(-1, 4),
            np.array([bool(annotation["iscrowd"]) for annotation in annotations], dtype=bool),
            iou_threshold)
    return outcomes


def _match_image(detections: np.ndarray, truths: np.ndarray, difficult: np.ndarray,
                 iou_threshold: float) -> np.ndarray:
    """Outcomes of one image's detections ([n, 4] xywh, best first) against its ground truths
    ([m, 4] xywh) of the same class."""
    outcomes = np.full(len(detections), FALSE_POSITIVE, dtype=np.int8)
    if not len(truths):
        return outcomes
    taken = np.zeros(len(truths), dtype=bool)
    for index, overlaps in enumerate(_iou(detections, truths)):
        # VOC looks only at the best-overlapping ground truth: if that one is already taken
        # the detection is a duplicate, even when another object would have matched.
        best = int(overlaps.argmax())
        if overlaps[best] < iou_threshold:
            continue
        if difficult[best]:
            outcomes[index] = IGNORED
        elif not taken[best]:
            outcomes[index] = TRUE_POSITIVE
            taken[best] = True
    return outcomes


def _iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """[n, m] IoU of xywh boxes in continuous coordinates (no VOC "+1")."""
    low = np.maximum(boxes[:, None, :2], others[None, :, :2])
    high = np.minimum(boxes[:, None, :2] + boxes[:, None, 2:], others[None, :, :2] + others[None, :, 2:])
    intersection = np.clip(high - low, 0, None).prod(axis=2)
    union = boxes[:, None, 2:].prod(axis=2) + others[None, :, 2:].prod(axis=2) - intersection
    # Two degenerate (zero-area) boxes have no overlap to speak of, not 0/0.
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def _average_precisions(outcomes: np.ndarray, positives: int) -> tuple[float, float]:
    """(11-point AP, area AP) of ranked outcomes; NaN for both without positives."""
    if positives == 0:
        return math.nan, math.nan
    # Ignored detections would only repeat the previous precision-recall point (or add one at
    # recall 0), which changes neither AP, so they are dropped.
    hits = outcomes[outcomes != IGNORED] == TRUE_POSITIVE
    if not hits.size:
        return 0.0, 0.0
    true_positives = np.cumsum(hits)
    recall = true_positives / positives
    precision = true_positives / np.arange(1, hits.size + 1)
    return _eleven_point(recall, precision), _area(recall, precision)


def _eleven_point(recall: np.ndarray, precision: np.ndarray) -> float:
    # k / 10 rather than accumulated steps of 0.1: a recall of exactly 3/10 must reach the
    # 0.3 threshold, and both are then the same correctly rounded double.
    thresholds = np.arange(11) / 10
    return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                          for t in thresholds]))


def _area(recall: np.ndarray, precision: np.ndarray) -> float:
    # The envelope: at each point the best precision at this or any higher recall.
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.diff(recall, prepend=0.0)
    return float(np.sum(steps * envelope))


def _mean_defined(values: dict[str, float]) -> float:
    defined = [value for value in values.values() if not math.isnan(value)]
    return float(np.mean(defined)) if defined else math.nan
