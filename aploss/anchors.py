"""RetinaNet anchors that fit the data.

An `AnchorLayout` (`anchor_layout.py`) is the anchor sizes and aspect ratios of each FPN level,
from P2 (stride 4) or P3 (stride 8) up to P7. Its anchor recall on a set of ground-truth boxes is the share of boxes
that some anchor, placed on the feature grids exactly as the detector places them, overlaps at
IoU >= fg_iou: a box no anchor reaches gets only the assigner's forced low-IoU match, and a class
of such boxes is hardly learnt. `fit_layout` searches a small family of layouts for the one
whose recall, averaged over classes, is highest, preferring fewer anchors and no P2 when those
cost almost nothing in recall.
"""
import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from aploss.anchor_layout import HIGHEST_LEVEL, AnchorLayout


def input_scale(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The size torchvision's transform resizes an image to (the evaluation input)."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return math.floor(height * scale), math.floor(width * scale)


@dataclass
class GroundTruth:
    """Boxes of a set of images at the network input: one entry per image."""

    boxes: list[Tensor]  # [G, 4] xyxy, at the input size
    classes: list[Tensor]  # [G] int64
    sizes: list[tuple[int, int]]  # (height, width) at the input


def scaled_ground_truth(images: list[tuple[int, int]], boxes: list[Tensor], classes: list[Tensor],
                        min_size: int, max_size: int) -> GroundTruth:
    """Ground truth of images of original (height, width) `images`, resized as the detector's
    evaluation transform resizes them."""
    sizes, scaled = [], []
    for (height, width), image_boxes in zip(images, boxes):
        new_height, new_width = input_scale(height, width, min_size, max_size)
        factors = torch.tensor([new_width / width, new_height / height] * 2)
        sizes.append((new_height, new_width))
        scaled.append(image_boxes.to(torch.float32) * factors)
    return GroundTruth(scaled, classes, sizes)


def best_iou(layout: AnchorLayout, boxes: Tensor, height: int, width: int) -> Tensor:
    """[G] the highest IoU of each box with any anchor of an image resized to height x width.

    Equal to the maximum over all the image's anchors, without their G x A matrix: the overlap
    of a box with an anchor of fixed shape shrinks with the distance between them along each
    axis, so per level and shape only the grid points around the box's centre can be best (two
    per axis, for anchors that rounding has made off-centre by half a pixel)."""
    generator = layout.generator()
    best = torch.zeros(len(boxes), dtype=torch.float64)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    for cells, (rows, columns, row_stride, column_stride) in zip(generator.cell_anchors,
                                                                  layout.grids(height, width)):
        stride = torch.tensor([column_stride, row_stride], dtype=torch.float64)
        limit = torch.tensor([columns - 1, rows - 1], dtype=torch.float64)
        cells = cells.to(torch.float64)
        below = (centres / stride).floor().clamp(torch.zeros(2, dtype=torch.float64), limit)
        for step_x, step_y in itertools.product((0, 1), repeat=2):
            point = (below + torch.tensor([step_x, step_y], dtype=torch.float64)).clamp(max=limit) * stride
            anchors = cells[None] + point.repeat(1, 2)[:, None]  # [G, K, 4]
            best = torch.maximum(best, _paired_iou(boxes[:, None], anchors).amax(dim=1))
    return best


def _paired_iou(first: Tensor, second: Tensor) -> Tensor:
    """IoU of boxes that broadcast against each other (xyxy)."""
    low = torch.maximum(first[..., :2], second[..., :2])
    high = torch.minimum(first[..., 2:], second[..., 2:])
    inter = (high - low).clamp(min=0).prod(dim=-1)
    return inter / (_area(first) + _area(second) - inter)


def _area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2:] - boxes[..., :2]).prod(dim=-1)


def covered(layout: AnchorLayout, truth: GroundTruth, fg_iou: float) -> Tensor:
    """[G] bool over all boxes: some anchor of `layout` reaches IoU >= fg_iou with the box."""
    counts = [len(boxes) for boxes in truth.boxes]
    hits = torch.zeros(sum(counts), dtype=torch.bool)
    starts = torch.tensor([0, *counts]).cumsum(0).tolist()
    by_size: dict[tuple[int, int], list[int]] = {}
    for image, size in enumerate(truth.sizes):  # images of one size share their anchors: one call
        by_size.setdefault(size, []).append(image)
    for size, images in by_size.items():
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in images])
        boxes = torch.cat([truth.boxes[i] for i in images]).to(torch.float64)
        hits[rows] = best_iou(layout, boxes, *size) >= fg_iou
    return hits


def recall_per_class(layout: AnchorLayout, truth: GroundTruth, fg_iou: float, num_classes: int) -> list[float]:
    """Anchor recall of each class (NaN for a class without boxes)."""
    hits = covered(layout, truth, fg_iou).to(torch.float64)
    classes = torch.cat(truth.classes) if truth.classes else torch.zeros(0, dtype=torch.int64)
    counts = torch.bincount(classes, minlength=num_classes).to(torch.float64)
    found = torch.bincount(classes, weights=hits, minlength=num_classes)
    return (found / counts).tolist()


def _candidates(truth: GroundTruth) -> list[AnchorLayout]:
    """Paper-style layouts over base size, scales per octave, lowest level and ratio sets (the
    paper's, and the 10/50/90 % quantiles of the boxes' aspects)."""
    boxes = torch.cat(truth.boxes)
    aspects = (boxes[:, 3] - boxes[:, 1]) / (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-6)
    fitted = tuple(round(float(q), 2) for q in aspects.quantile(torch.tensor([0.1, 0.5, 0.9], dtype=aspects.dtype)))
    ratio_sets = {(0.5, 1.0, 2.0), tuple(sorted(set(fitted)))}
    return [_rounded(AnchorLayout.paper(scales, level, base, ratios))
            for level, scales, base, ratios in itertools.product((3, 2), (2, 3), (2.0, 2.83, 4.0), sorted(ratio_sets))]


def _rounded(layout: AnchorLayout) -> AnchorLayout:
    """Sizes to 0.01 px: what a config file shows (anchors themselves are whole pixels)."""
    return AnchorLayout(tuple(tuple(round(size, 2) for size in sizes) for sizes in layout.sizes), layout.ratios,
                        layout.lowest_level)


def fit_layout(truth: GroundTruth, fg_iou: float, num_classes: int, tolerance: float = 0.02) -> AnchorLayout:
    """The candidate layout with the highest class-averaged anchor recall; among those within
    `tolerance` of it, the one with the fewest anchors (P2 quadruples them), then the one with
    the largest anchors, closest to the paper's 4 x stride (each object stays on the level the
    paper's layout puts it)."""
    scored = []
    for layout in _candidates(truth):
        recalls = [r for r in recall_per_class(layout, truth, fg_iou, num_classes) if not math.isnan(r)]
        cost = layout.per_location * sum(4 ** -level for level in range(layout.lowest_level, HIGHEST_LEVEL + 1))
        scored.append((sum(recalls) / len(recalls), cost, -layout.sizes[0][0] / layout.strides[0], layout))
    best = max(score for score, *_ in scored)
    return min((cost, smaller, index, layout) for index, (score, cost, smaller, layout) in enumerate(scored)
               if score >= best - tolerance)[3]
