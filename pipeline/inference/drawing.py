"""Detections drawn on their images: evaluation's sample images and predict --draw."""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from pipeline.errors import DataError
from pipeline.io import write_bytes_atomic

if TYPE_CHECKING:
    import torch

    from pipeline.inference.detection import ImageDetections
    from pipeline.storage import Location

GROUND_TRUTH_COLOUR = "lime"
# Each class in a colour of its own, the same on every image: matplotlib's tab10, in class order.
CLASS_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                 "#17becf")
DRAW_SCORE = 0.3  # detections drawn on images (evaluation samples, predict --draw): the confident ones


def draw_detections(image: torch.Tensor, boxes: torch.Tensor, labels: list[int], classes: Sequence[str],
                    scores: torch.Tensor, out_path: Path,
                    ground_truth: torch.Tensor | None = None) -> None:
    """Save `image` (uint8 [C, H, W]) as a PNG with `boxes` ([n, 4] xyxy), each in its class's
    colour (`labels` index `classes` and CLASS_COLOURS) captioned "class score", over
    `ground_truth` boxes ([m, 4] xyxy) in GROUND_TRUTH_COLOUR."""
    if not len(boxes) == len(labels) == len(scores):
        raise DataError(f"{len(boxes)} boxes, {len(labels)} labels and {len(scores)} scores")
    from torchvision.utils import draw_bounding_boxes  # torch's: the CLI reads DRAW_SCORE without it

    canvas = image.cpu()
    # draw_bounding_boxes warns on an empty box set, so those are skipped.
    if ground_truth is not None and len(ground_truth):
        canvas = draw_bounding_boxes(canvas, ground_truth.cpu(), colors=GROUND_TRUTH_COLOUR, width=2)
    if len(boxes):
        captions = [f"{classes[label]} {score:.2f}" for label, score in zip(labels, scores.tolist())]
        colours = [CLASS_COLOURS[label % len(CLASS_COLOURS)] for label in labels]
        canvas = draw_bounding_boxes(canvas, boxes.cpu(), labels=captions, colors=colours, width=2)
    # Pillow rather than torchvision.io, whose PNG encoder is deprecated since torchvision 0.29.
    buffer = io.BytesIO()
    Image.fromarray(canvas.permute(1, 2, 0).squeeze(-1).numpy()).save(buffer, format="png")
    write_bytes_atomic(buffer.getvalue(), out_path)


def draw_confident(image: torch.Tensor, found: ImageDetections, classes: Sequence[str], min_score: float,
                   out_path: Location, ground_truth: torch.Tensor | None = None) -> None:
    """`draw_detections` of an image ([3, H, W] in [0, 1]) with its detections scoring at least `min_score`."""
    import torch  # here: the CLI reads DRAW_SCORE without loading torch

    confident = found.scores >= min_score
    draw_detections((image * 255).to(torch.uint8), torch.from_numpy(found.boxes[confident]),
                    found.labels[confident].tolist(), classes, torch.from_numpy(found.scores[confident]), out_path,
                    ground_truth=ground_truth)
