"""The evaluate stage: detections on a prepared split, COCO metrics (`coco_metrics`, on
faster-coco-eval) and Pascal VOC AP when asked, precision-recall curves, sample images with their
detections, and the detections json."""
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from aploss.detector import OneStageDetector
from pipeline.config import Config
from pipeline.data.bindings import prepared_category_ids, split_dir
from pipeline.data.dataset import DetectionDataset, collate
from pipeline.data.shards import ShardReader
from pipeline.evaluation.coco_metrics import CocoResult, category_ids, evaluate_detections, plot_pr_curves
from pipeline.evaluation.drawing import DRAW_SCORE, draw_detections
from pipeline.evaluation.voc_metrics import VocResult, voc_map
from pipeline.images import ImageLimits
from pipeline.io import write_json_atomic


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


def evaluation_slices(num_images: int, batch_size: int, workers: int) -> list[list[list[int]]]:
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
                   category_ids: Sequence[int], progress: bool = False) -> list[dict]:
    """COCO result dicts of `model` on `batches` of `dataset`'s indices, with a progress bar if asked."""
    model.eval()
    results = []
    with tqdm(total=sum(map(len, batches)), desc="evaluate", unit="img", disable=not progress) as bar:
        for images, _, image_ids in DataLoader(dataset, batch_sampler=batches, collate_fn=collate):
            results += detect(model, images, image_ids, device, category_ids)
            bar.update(len(images))
    return results


def predict(model: OneStageDetector, dataset: DetectionDataset, batch_size: int, device: torch.device,
            category_ids: Sequence[int], progress: bool = False) -> list[dict]:
    """COCO result dicts of `model` on all of `dataset`, in batches of `batch_size`: the one slice
    of a single process."""
    (batches,) = evaluation_slices(len(dataset), batch_size, 1)
    return detect_batches(model, dataset, batches, device, category_ids, progress)


def pack_detections(detections: list[dict]) -> np.ndarray:
    """`detections` as one float64 array [n, 7] of image_id, category_id, x, y, w, h, score, to
    ship between processes: float64 holds the ids and the detector's float32 values exactly."""
    rows = [[d["image_id"], d["category_id"], *d["bbox"], d["score"]] for d in detections]
    return np.array(rows, dtype=np.float64).reshape(-1, 7)


def unpack_detections(packed: np.ndarray) -> list[dict]:
    """The result dicts `pack_detections` packed, equal to the originals."""
    return [{"image_id": int(row[0]), "category_id": int(row[1]), "bbox": row[2:6], "score": row[6]}
            for row in packed.tolist()]


def _process_group() -> tuple[int, int]:
    """(rank, world size) of this process's default group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def validation_ap(model: OneStageDetector, config: Config, device: torch.device) -> float | None:
    """COCO AP of `model` on the validation split of the prepared data `config` is bound to. In a
    process group of several, every process calls it at the same point and detects its slice
    (`evaluation_slices`); rank 0 gathers the detections and returns the AP, the others None."""
    split = split_dir(config, config.data.val_split)
    ground_truth = split / "ground_truth.json"
    dataset = DetectionDataset(ShardReader(split), limits=ImageLimits.of(config.data))
    rank, world_size = _process_group()
    batches = evaluation_slices(len(dataset), config.eval.batch_size, world_size)[rank]
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
            confident = detections["scores"] >= DRAW_SCORE
            path = out_dir / f"sample-{image_id}.png"
            draw_detections((image * 255).to(torch.uint8), detections["boxes"][confident].cpu(),
                            detections["labels"][confident].tolist(), classes,
                            detections["scores"][confident].cpu(), path, ground_truth=target["boxes"])
            paths.append(path)
    return paths


def _defined(values: dict[str, float]) -> dict[str, float | None]:
    """NaN (undefined: no ground truth of that kind) as null, which standard JSON can hold."""
    return {key: None if math.isnan(value) else value for key, value in values.items()}


def evaluate_split(model: OneStageDetector, dataset: DetectionDataset, ground_truth: Path, classes: list[str],
                   out_dir: Path, batch_size: int, device: torch.device, sample_images: int = 0,
                   voc: bool = False, progress: bool = True, detections: list[dict] | None = None) -> Evaluation:
    """Everything the evaluate stage writes, under `out_dir`; with `voc`, Pascal VOC AP on the
    same detections as well. `detections` made elsewhere (Ray workers) are taken as they are;
    `model` still draws the sample images."""
    if detections is None:
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
