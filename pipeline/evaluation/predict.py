"""A trained detector applied to a user's images: image files, folders, globs, local or in an
object store, to COCO-format detections in the dataset's own category ids and names.

The detections file is a COCO instances file whose annotations carry a score: `images` (id,
file_name, width, height), `categories` (the dataset's ids and names) and `annotations` (bbox as
x, y, w, h in pixels, score). pycocotools loads it as it is, and `loadRes` takes its annotations.
"""
import glob
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from aploss.detector import OneStageDetector
from pipeline.config import Config, apply_override, config_from_dict, config_to_dict, parse_override
from pipeline.data.bindings import check_split, split_dir
from pipeline.data.dataset import DetectionDataset
from pipeline.data.prep import locate_prepared
from pipeline.data.shards import ShardReader
from pipeline.errors import DataError, MissingInput
from pipeline.evaluation import evaluate
from pipeline.evaluation.drawing import DRAW_SCORE, draw_detections
from pipeline.images import ImageLimits, ImageRefused, decode_rgb, read_image_file
from pipeline.io import write_json_atomic
from pipeline.model import load_model, resolve_device
from pipeline.storage import Location, is_uri

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_files(inputs: Sequence[str]) -> list[Location]:
    """Every image the inputs name, in order: files as given, a folder's images (not its
    subfolders'), sorted by name, a local glob's matches sorted; each once."""
    found: dict[Location, None] = {}
    for given in inputs:
        if not is_uri(given) and glob.has_magic(given):
            matches = sorted(glob.glob(str(Path(given).expanduser()), recursive=True))
            if not matches:
                raise MissingInput(f"{given}: no file matches")
            found |= dict.fromkeys(Location(match) for match in matches if _is_image(match))
            continue
        location = Location(given)
        if location.is_dir():
            images = [file for file in location.files() if _is_image(file.name)]
            if not images:
                raise MissingInput(f"{location}: no images in this folder ({', '.join(IMAGE_SUFFIXES)})")
            found |= dict.fromkeys(images)
        elif location.is_file():
            found[location] = None
        else:
            raise MissingInput(f"{location}: no such file or folder")
    return list(found)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def decode(data: bytes, name: str, limits: ImageLimits) -> Tensor:
    """An encoded image as the detector takes it, through the image gate: RGB, float CHW in
    [0, 1]; DataError naming it when it is refused or not an image."""
    try:
        return decode_rgb(data, limits).float().div_(255)
    except ImageRefused as refused:
        raise DataError(f"{name}: {refused}") from None


def read_image(file: Location, limits: ImageLimits) -> Tensor:
    """An image file decoded as `decode` does; DataError naming it when it cannot be read."""
    try:
        return decode(read_image_file(file, limits), str(file), limits)
    except ImageRefused as refused:
        raise DataError(f"{file}: {refused}") from None
    except OSError as error:
        raise DataError(f"{file}: cannot read image: {error.strerror or error}") from None


@dataclass
class ImageDetections:
    """One image's detections: boxes as xyxy pixels, scores, 0-based labels and their names."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: list[str]


@torch.no_grad()
def detect(model: OneStageDetector, images: list[Tensor], classes: Sequence[str],
           device: torch.device) -> list[ImageDetections]:
    model.eval()
    results = []
    for found in model([image.to(device) for image in images]):
        labels = found["labels"].cpu().numpy()
        results.append(ImageDetections(found["boxes"].cpu().numpy(), found["scores"].cpu().numpy(), labels,
                                       [classes[label] for label in labels.tolist()]))
    return results


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
            for file, tensor, found in zip(batch, tensors, detect(model, tensors, classes, device)):
                image_id = len(images) + 1
                images.append({"id": image_id, "file_name": file.name, "height": tensor.shape[1],
                               "width": tensor.shape[2]})
                annotations += _annotations(found, image_id, ids, first_id=len(annotations) + 1)
                if draw_dir is not None:
                    _draw(tensor, found, classes, draw_score, draw_dir / f"{image_id:06d}-{Path(file.name).stem}.png")
            bar.update(len(batch))
    categories = [{"id": category, "name": name} for category, name in zip(ids, classes)]
    return {"images": images, "categories": categories, "annotations": annotations}


def _annotations(found: ImageDetections, image_id: int, ids: Sequence[int], first_id: int) -> list[dict]:
    results = []
    for box, score, label in zip(found.boxes.tolist(), found.scores.tolist(), found.labels.tolist()):
        results.append({"image_id": image_id, "category_id": ids[label],
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score})
    return _as_annotations(results, first_id)


def _as_annotations(results: list[dict], first_id: int) -> list[dict]:
    """COCO result dicts (image_id, category_id, bbox, score) as the annotations of a COCO file."""
    return [{"id": first_id + offset, **result, "bbox": list(result["bbox"]),
             "area": result["bbox"][2] * result["bbox"][3], "iscrowd": 0}
            for offset, result in enumerate(results)]


def _draw(image: Tensor, found: ImageDetections, classes: Sequence[str], min_score: float, path: Location) -> None:
    confident = found.scores >= min_score
    draw_detections((image * 255).to(torch.uint8), torch.from_numpy(found.boxes[confident]),
                    found.labels[confident].tolist(), classes, torch.from_numpy(found.scores[confident]), path)


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
    results = evaluate.predict(with_postprocessing(model, trained, overrides), dataset, config.eval.batch_size, device,
                               [category["id"] for category in categories], progress)
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
