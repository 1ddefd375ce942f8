"""The trained detector run on images: one `detect` for every caller (predict, the registered
model, Ray Data's actors, validation and evaluation), its detections as COCO result dicts in a
dataset's own category ids, and a prepared split detected in whole batches, in one process or
in slices over several."""
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from aploss.detector import OneStageDetector
from pipeline.config import Config, apply_override, config_from_dict, config_to_dict, parse_override
from pipeline.data.dataset import DetectionDataset, collate


@dataclass
class ImageDetections:
    """One image's detections: boxes as xyxy pixels, scores and 0-based labels (float32, as the
    detector gives them)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def names(self, classes: Sequence[str]) -> list[str]:
        return [classes[label] for label in self.labels.tolist()]


@torch.no_grad()
def detect(model: OneStageDetector, images: list[Tensor], device: torch.device) -> list[ImageDetections]:
    """`model`'s detections of each image (RGB float CHW in [0, 1], any size), in its own pixels."""
    model.eval()
    return [ImageDetections(found["boxes"].cpu().numpy(), found["scores"].cpu().numpy(), found["labels"].cpu().numpy())
            for found in model([image.to(device) for image in images])]


def coco_results(found: ImageDetections, image_id: int, category_ids: Sequence[int]) -> list[dict]:
    """One image's detections as COCO result dicts: the dataset's category id of each class, bbox
    as x, y, w, h (its width and height computed in the detector's float32)."""
    boxes = found.boxes.copy()
    boxes[:, 2:] -= boxes[:, :2]
    return [{"image_id": image_id, "category_id": category_ids[label], "bbox": bbox, "score": score}
            for bbox, score, label in zip(boxes.tolist(), found.scores.tolist(), found.labels.tolist())]


def with_postprocessing(model: OneStageDetector, trained: Config, overrides: Sequence[str]) -> OneStageDetector:
    """The detector with the score threshold, NMS IoU and detections per image it was trained
    with, or those `overrides` give."""
    data = config_to_dict(trained)
    for text in overrides:
        apply_override(data, *parse_override(text))
    settings = config_from_dict(data).model
    model.score_thresh = settings.score_thresh
    model.nms_thresh = settings.nms_thresh
    model.detections_per_image = settings.detections_per_image
    return model


def detection_slices(num_images: int, batch_size: int, workers: int) -> list[list[list[int]]]:
    """The batches of indices each of `workers` processes detects: the single-process batches of
    `batch_size`, in order, cut into consecutive runs (the first runs one batch longer when they do
    not divide evenly, empty ones when there are fewer batches than workers). Whole batches, since
    a batch is padded to its largest image and GroupNorm sees the padding: each image is detected
    exactly as in one process, and the slices' detections in order are one process's."""
    batches = [list(range(start, min(start + batch_size, num_images))) for start in range(0, num_images, batch_size)]
    share, longer = divmod(len(batches), workers)
    bounds = [0]
    for worker in range(workers):
        bounds.append(bounds[-1] + share + (worker < longer))
    return [batches[start:stop] for start, stop in zip(bounds, bounds[1:])]


def detect_batches(model: OneStageDetector, dataset: DetectionDataset, batches: list[list[int]], device: torch.device,
                   category_ids: Sequence[int], progress: bool = False, desc: str = "evaluate") -> list[dict]:
    """COCO result dicts of `model` on `batches` of `dataset`'s indices, with a progress bar if asked."""
    results = []
    with tqdm(total=sum(map(len, batches)), desc=desc, unit="img", disable=not progress) as bar:
        for images, _, image_ids in DataLoader(dataset, batch_sampler=batches, collate_fn=collate):
            for image_id, found in zip(image_ids, detect(model, images, device)):
                results += coco_results(found, image_id, category_ids)
            bar.update(len(images))
    return results


def detect_split(model: OneStageDetector, dataset: DetectionDataset, batch_size: int, device: torch.device,
                 category_ids: Sequence[int], progress: bool = False, desc: str = "evaluate") -> list[dict]:
    """COCO result dicts of `model` on all of `dataset`, in batches of `batch_size`: the one slice
    of a single process."""
    (batches,) = detection_slices(len(dataset), batch_size, 1)
    return detect_batches(model, dataset, batches, device, category_ids, progress, desc)


def pack_detections(detections: list[dict]) -> np.ndarray:
    """`detections` as one float64 array [n, 7] of image_id, category_id, x, y, w, h, score, to
    ship between processes: float64 holds the ids and the detector's float32 values exactly."""
    rows = [[d["image_id"], d["category_id"], *d["bbox"], d["score"]] for d in detections]
    return np.array(rows, dtype=np.float64).reshape(-1, 7)


def unpack_detections(packed: np.ndarray) -> list[dict]:
    """The result dicts `pack_detections` packed, equal to the originals."""
    return [{"image_id": int(row[0]), "category_id": int(row[1]), "bbox": row[2:6], "score": row[6]}
            for row in packed.tolist()]
