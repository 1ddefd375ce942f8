"""`aploss predict --ray`: a folder (or bucket) of images through the detector on a Ray cluster.

A pool of `ray.workers` actors (one GPU each with ray.use_gpu), each holding the detector, reads
through the image gate (`pipeline.images`), decodes and detects batches of eval.batch_size images,
and the detections are written as Parquet shards (in a shared folder or a bucket on a cluster: the
actors write them), one row per image: file_name, width, height,
boxes (xyxy pixels), scores, labels (0-based), category_ids (the dataset's) and names. The
detector, decoding and post-processing are `aploss predict`'s (`pipeline.inference.predict`).
"""
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import ray
import ray.data
import torch

from pipeline.config import Config
from pipeline.images import ImageLimits
from pipeline.inference.detection import detect, with_postprocessing
from pipeline.inference.inputs import image_files, read_image
from pipeline.model import load_model
from pipeline.storage import Location


class _Detector:
    """One actor's detector, loaded once and applied to every batch it is handed."""

    def __init__(self, weights: ray.ObjectRef, overrides: Sequence[str], use_gpu: bool, limits: ImageLimits
                 ) -> None:
        self.limits = limits
        self.device = torch.device("cuda" if use_gpu else "cpu")
        with tempfile.TemporaryDirectory() as scratch:
            model_path = Path(scratch) / "model.pt"
            model_path.write_bytes(ray.get(weights))
            model, self.classes, trained, self.ids = load_model(model_path, self.device)
        self.model = with_postprocessing(model, trained, overrides)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        images = [read_image(Location(path), self.limits) for path in batch["path"]]
        found = detect(self.model, images, self.device)
        return {"file_name": list(batch["path"]), "height": [image.shape[1] for image in images],
                "width": [image.shape[2] for image in images],
                "boxes": [f.boxes.tolist() for f in found], "scores": [f.scores.tolist() for f in found],
                "labels": [f.labels.tolist() for f in found],
                "category_ids": [[self.ids[label] for label in f.labels.tolist()] for f in found],
                "names": [f.names(self.classes) for f in found]}


def predict_on_ray(config: Config, model_path: Location, inputs: Sequence[str], overrides: Sequence[str],
                   out: Location) -> int:
    """Detections of every image `inputs` name as Parquet shards under `out`; the image count.
    Ray must be initialised (`pipeline.orchestration.run.start_ray`)."""
    files = [str(file) for file in image_files(inputs)]
    images = ray.data.from_items([{"path": file} for file in files])
    # The weights travel through Ray's object store: a path on this machine means nothing on another node.
    weights = ray.put(model_path.read_bytes())
    detections = images.map_batches(
        _Detector, fn_constructor_args=(weights, list(overrides), config.ray.use_gpu, ImageLimits.of(config.data)),
        batch_size=config.eval.batch_size, concurrency=config.ray.workers,
        num_gpus=1 if config.ray.use_gpu else 0, num_cpus=config.ray.cpus_per_worker)
    detections.write_parquet(str(out))
    return len(files)
