"""The evaluate stage: detections on a prepared split, COCO metrics with pycocotools (and Pascal
VOC AP when asked), precision-recall curves, sample images with their detections, and the
detections json."""
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from aploss.detector import OneStageDetector
from pipeline.config import Config
from pipeline.data.bindings import split_dir
from pipeline.data.dataset import DetectionDataset, collate
from pipeline.data.shards import ShardReader
from pipeline.evaluation.coco_metrics import (
    CocoResult,
    category_ids,
    draw_detections,
    evaluate_detections,
    plot_pr_curves,
)
from pipeline.evaluation.voc_metrics import VocResult, voc_map
from pipeline.io import write_json_atomic

SAMPLE_SCORE = 0.3  # detections drawn on sample images: the confident ones


@torch.no_grad()
def detect(model: OneStageDetector, images: list[Tensor], image_ids: list[int], device: torch.device,
           category_ids: Sequence[int]) -> list[dict]:
    """COCO result dicts (the dataset's category id of each class, bbox x, y, w, h) of `model`
    on one batch."""
    results = []
    for image_id, detections in zip(image_ids, model([image.to(device) for image in images])):
        boxes = detections["boxes"].cpu()
        boxes[:, 2:] -= boxes[:, :2]
        for bbox, score, label in zip(boxes.tolist(), detections["scores"].tolist(), detections["labels"].tolist()):
            results.append({"image_id": image_id, "category_id": category_ids[label], "bbox": bbox, "score": score})
    return results


def predict(model: OneStageDetector, dataset: DetectionDataset, batch_size: int, device: torch.device,
            category_ids: Sequence[int], indices: list[int] | None = None, progress: bool = False) -> list[dict]:
    """COCO result dicts of `model` on `indices` of `dataset` (default all), with a progress
    bar if asked."""
    model.eval()
    indices = list(range(len(dataset))) if indices is None else indices
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    results = []
    with tqdm(total=len(indices), desc="evaluate", unit="img", disable=not progress) as bar:
        for images, _, image_ids in DataLoader(dataset, batch_sampler=batches, collate_fn=collate):
            results += detect(model, images, image_ids, device, category_ids)
            bar.update(len(images))
    return results


def validation_ap(model: OneStageDetector, config: Config, device: torch.device) -> float:
    """COCO AP of `model` on the validation split of the prepared data `config` is bound to."""
    split = split_dir(config, config.data.val_split)
    ground_truth = split / "ground_truth.json"
    detections = predict(model, DetectionDataset(ShardReader(split)), config.eval.batch_size, device,
                         category_ids(ground_truth))
    return evaluate_detections(ground_truth, detections).metrics["AP"]


@dataclass
class Evaluation:
    result: CocoResult
    detections_path: Path
    metrics_path: Path
    pr_curves: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    voc: VocResult | None = None  # Pascal VOC AP, when asked for


def _draw_samples(model: OneStageDetector, dataset: DetectionDataset, count: int, classes: list[str],
                  device: torch.device, out_dir: Path) -> list[Path]:
    paths = []
    model.eval()
    with torch.no_grad():
        for index in range(min(count, len(dataset))):
            image, target, image_id = dataset[index]
            detections = model([image.to(device)])[0]
            confident = detections["scores"] >= SAMPLE_SCORE
            path = out_dir / f"sample-{image_id}.png"
            draw_detections((image * 255).to(torch.uint8), detections["boxes"][confident].cpu(),
                            [classes[i] for i in detections["labels"][confident].tolist()],
                            detections["scores"][confident].cpu(), path, ground_truth=target["boxes"])
            paths.append(path)
    return paths


def _defined(values: dict[str, float]) -> dict[str, float | None]:
    """NaN (undefined: no ground truth of that kind) as null, which standard JSON can hold."""
    return {key: None if math.isnan(value) else value for key, value in values.items()}


def evaluate_split(model: OneStageDetector, dataset: DetectionDataset, ground_truth: Path, classes: list[str],
                   out_dir: Path, batch_size: int, device: torch.device, sample_images: int = 0,
                   voc: bool = False, progress: bool = True) -> Evaluation:
    """Everything the evaluate stage writes, under `out_dir`; with `voc`, Pascal VOC AP on the
    same detections as well."""
    detections = predict(model, dataset, batch_size, device, category_ids(ground_truth), progress=progress)
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


def metrics_table(result: CocoResult) -> str:
    """A markdown table of the COCO metrics and per-class AP."""
    rows = [f"| {name} | {value:.3f} |" for name, value in result.metrics.items()]
    rows += [f"| AP[{name}] | {value:.3f} |" for name, value in result.per_class_ap.items()]
    return "\n".join(["| metric | value |", "|---|---|", *rows])
