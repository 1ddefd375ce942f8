"""A trained detector applied to a user's images: image files, folders, globs, local or in an
object store, to COCO-format detections in the dataset's own category ids and names.

The detections file is a COCO instances file whose annotations carry a score: `images` (id,
file_name, width, height), `categories` (the dataset's ids and names) and `annotations` (bbox as
x, y, w, h in pixels, score). pycocotools loads it as it is, and `loadRes` takes its annotations.
"""
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from aploss.detector import OneStageDetector
from pipeline.config import Config
from pipeline.data.bindings import check_split, split_dir
from pipeline.data.dataset import DetectionDataset
from pipeline.data.prep import locate_prepared
from pipeline.data.shards import ShardReader
from pipeline.images import ImageLimits
from pipeline.inference.detection import ImageDetections, coco_results, detect, detect_split, with_postprocessing
from pipeline.inference.drawing import DRAW_SCORE, draw_confident
from pipeline.inference.inputs import image_files, read_image
from pipeline.io import write_json_atomic
from pipeline.model import load_model, resolve_device
from pipeline.storage import Location


def _batches(files: list[Location], batch_size: int) -> Iterator[list[Location]]:
    for start in range(0, len(files), batch_size):
        yield files[start:start + batch_size]


def predict_files(model: OneStageDetector, classes: Sequence[str], ids: Sequence[int], files: list[Location],
                  batch_size: int, device: torch.device, limits: ImageLimits, draw_dir: Location | None = None,
                  progress: bool = True, draw_score: float = DRAW_SCORE) -> dict:
    """The COCO-format detections of `files`, image ids 1..n in order, each named by its file's
    name (a path would tie the file to this machine); in `draw_dir` if given, the images with
    their detections scoring at least `draw_score`."""
    images, annotations = [], []
    with tqdm(total=len(files), desc="predict", unit="img", disable=not progress) as bar:
        for batch in _batches(files, batch_size):
            tensors = [read_image(file, limits) for file in batch]
            for file, tensor, found in zip(batch, tensors, detect(model, tensors, device)):
                image_id = len(images) + 1
                images.append({"id": image_id, "file_name": file.name, "height": tensor.shape[1],
                               "width": tensor.shape[2]})
                annotations += _annotations(found, image_id, ids, first_id=len(annotations) + 1)
                if draw_dir is not None:
                    drawn = draw_dir / f"{image_id:06d}-{Path(file.name).stem}.png"
                    draw_confident(tensor, found, classes, draw_score, drawn)
            bar.update(len(batch))
    categories = [{"id": category, "name": name} for category, name in zip(ids, classes)]
    return {"images": images, "categories": categories, "annotations": annotations}


def _annotations(found: ImageDetections, image_id: int, ids: Sequence[int], first_id: int) -> list[dict]:
    return _as_annotations(coco_results(found, image_id, ids), first_id)


def _as_annotations(results: list[dict], first_id: int) -> list[dict]:
    """COCO result dicts (image_id, category_id, bbox, score) as the annotations of a COCO file."""
    return [{"id": first_id + offset, **result, "bbox": list(result["bbox"]),
             "area": result["bbox"][2] * result["bbox"][3], "iscrowd": 0}
            for offset, result in enumerate(results)]


def predict_split(config: Config, model_path: Location, split: str, overrides: Sequence[str], out: Location,
                  progress: bool = True) -> dict:
    """Detections of the model at `model_path` on the split `split` of the prepared data of
    `config`, written to `out` with the dataset's own image ids, file names and categories: they
    score against the split's ground truth as they are. A model trained on other classes is
    refused."""
    device = resolve_device(config.train.device)
    model, classes, trained, _ = load_model(model_path, device)
    config = config.with_prepared(locate_prepared(config))
    check_split(config, split, "--split", classes, f"--model {model_path}")
    directory = split_dir(config, split)
    ground_truth = json.loads((directory / "ground_truth.json").read_text())
    categories = ground_truth["categories"]
    dataset = DetectionDataset(ShardReader(directory), limits=ImageLimits.of(config.data))
    results = detect_split(with_postprocessing(model, trained, overrides), dataset, config.eval.batch_size, device,
                           [category["id"] for category in categories], progress, desc="predict")
    images = [{key: image[key] for key in ("id", "file_name", "height", "width")} for image in ground_truth["images"]]
    detections = {"images": images, "categories": categories, "annotations": _as_annotations(results, 1)}
    write_json_atomic(detections, out)
    return detections


def predict_stage(config: Config, model_path: Location, inputs: Sequence[str], overrides: Sequence[str],
                  out: Location, draw_dir: Location | None = None, progress: bool = True,
                  draw_score: float = DRAW_SCORE) -> dict:
    """Detections of the model at `model_path` on the images `inputs` name, written to `out`."""
    device = resolve_device(config.train.device)
    model, classes, trained, ids = load_model(model_path, device)
    files = image_files(inputs)
    detections = predict_files(with_postprocessing(model, trained, overrides), classes, ids, files,
                               config.eval.batch_size, device,
                               ImageLimits.of(config.data), draw_dir, progress, draw_score)
    write_json_atomic(detections, out)
    return detections
