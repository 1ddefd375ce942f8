"""The evaluate stage: detections on a prepared split, COCO metrics (`coco_metrics`, on
faster-coco-eval) and Pascal VOC AP when asked, precision-recall curves, sample images with their
detections, and the detections json."""
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from aploss.detector import OneStageDetector
from pipeline.config import Config
from pipeline.data.bindings import prepared_category_ids, split_dir
from pipeline.data.dataset import DetectionDataset
from pipeline.data.shards import ShardReader
from pipeline.evaluation.coco_metrics import CocoResult, category_ids, evaluate_detections, plot_pr_curves
from pipeline.evaluation.voc_metrics import VocResult, voc_map
from pipeline.images import ImageLimits
from pipeline.inference.detection import (
    detect,
    detect_batches,
    detect_split,
    detection_slices,
    pack_detections,
    unpack_detections,
)
from pipeline.inference.drawing import DRAW_SCORE, draw_confident
from pipeline.io import write_json_atomic
from pipeline.storage import Location


def _process_group() -> tuple[int, int]:
    """(rank, world size) of this process's default group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def validation_ap(model: OneStageDetector, config: Config, device: torch.device) -> float | None:
    """COCO AP of `model` on the validation split of the prepared data `config` is bound to. In a
    process group of several, every process calls it at the same point and detects its slice
    (`detection_slices`); rank 0 gathers the detections and returns the AP, the others None."""
    split = split_dir(config, config.data.val_split)
    ground_truth = split / "ground_truth.json"
    dataset = DetectionDataset(ShardReader(split), limits=ImageLimits.of(config.data))
    rank, world_size = _process_group()
    batches = detection_slices(len(dataset), config.eval.batch_size, world_size)[rank]
    # The manifest's ids, not the ground truth's: every rank needs them, only rank 0 the whole json.
    detections = detect_batches(model, dataset, batches, device, prepared_category_ids(config))
    if world_size > 1:
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(pack_detections(detections), gathered, dst=0)
        if rank != 0:
            return None
        detections = [found for packed in gathered for found in unpack_detections(packed)]
    return evaluate_detections(ground_truth, detections).metrics["AP"]


@dataclass
class Evaluation:
    result: CocoResult
    detections_path: Location
    metrics_path: Location
    pr_curves: list[Location] = field(default_factory=list)
    samples: list[Location] = field(default_factory=list)
    voc: VocResult | None = None  # Pascal VOC AP, when asked for


def _draw_samples(model: OneStageDetector, dataset: DetectionDataset, count: int, classes: list[str],
                  device: torch.device, out_dir: Location) -> list[Location]:
    paths = []
    for index in range(min(count, len(dataset))):
        image, target, image_id = dataset[index]
        (found,) = detect(model, [image], device)
        paths.append(out_dir / f"sample-{image_id}.png")
        draw_confident(image, found, classes, DRAW_SCORE, paths[-1], ground_truth=target["boxes"])
    return paths


def _defined(values: dict[str, float]) -> dict[str, float | None]:
    """NaN (undefined: no ground truth of that kind) as null, which standard JSON can hold."""
    return {key: None if math.isnan(value) else value for key, value in values.items()}


def evaluate_split(model: OneStageDetector, dataset: DetectionDataset, ground_truth: Path, classes: list[str],
                   out_dir: Location, batch_size: int, device: torch.device, sample_images: int = 0,
                   voc: bool = False, progress: bool = True, detections: list[dict] | None = None) -> Evaluation:
    """Everything the evaluate stage writes, under `out_dir`; with `voc`, Pascal VOC AP on the
    same detections as well. `detections` made elsewhere (Ray workers) are taken as they are;
    `model` still draws the sample images."""
    if detections is None:
        detections = detect_split(model, dataset, batch_size, device, category_ids(ground_truth), progress=progress)
    result = evaluate_detections(ground_truth, detections)
    voc_result = voc_map(ground_truth, detections) if voc else None
    detections_path = out_dir / "detections.json"
    write_json_atomic(detections, detections_path)
    metrics_path = out_dir / "metrics.json"
    metrics = {"metrics": _defined(result.metrics), "per_class_ap": _defined(result.per_class_ap),
               "per_class_ap50": _defined(result.per_class_ap50)}
    if voc_result is not None:
        metrics |= _defined({"voc07_11point_map": voc_result.map_11point,
                             "voc_area_map": voc_result.map_area})
        metrics |= {"per_class_voc07_11point": _defined(voc_result.per_class_11point),
                    "per_class_voc_area": _defined(voc_result.per_class_area)}
    write_json_atomic(metrics, metrics_path)
    pr_curves = plot_pr_curves(result, out_dir / "pr_curves")
    samples = _draw_samples(model, dataset, sample_images, classes, device, out_dir / "samples")
    return Evaluation(result, detections_path, metrics_path, pr_curves, samples, voc_result)
