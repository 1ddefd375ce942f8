"""The data-prep stage: a dataset in its own layout becomes checked Parquet shards, COCO-format
ground truth for evaluation and a manifest, under `run.prepared_root()/<dataset>-<input hash>`:

    manifest.json
    <split>/part-00000.parquet, part-00001.parquet, ...
    <split>/ground_truth.json

Every image is decoded once here (after its header's size is checked against
data.max_image_pixels), so training never meets an unreadable file, and every box is clipped
to its image; boxes left empty or smaller than data.min_box_size are dropped. Each
clipped or dropped box, and each image skipped under data.skip_bad, is listed in the manifest.

Idempotent: when the manifest's input hash matches and every file still has its recorded
sha256, the prepared data is returned untouched. Atomic: a new version is written into a
temporary sibling directory and renamed into place only once complete, so an interrupted prep
never leaves a half-written dataset and the previous version survives until then. In an object
store (run.output_dir=s3://...), which has no rename, it is written locally, then uploaded with
the manifest last: readers take a directory without a manifest for one not prepared yet.
"""
import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import decode_image
from tqdm import tqdm

from pipeline.config import Config, DataConfig
from pipeline.data.fetch import fetch
from pipeline.data.shards import (
    MANIFEST,
    ROW_GROUP_IMAGES,
    SCHEMA_VERSION,
    ImageRecord,
    file_sha256,
    read_manifest,
    write_shard,
)
from pipeline.data.sources import PrepError, Source, SourceImage, check_splits, open_source
from pipeline.errors import MissingInput
from pipeline.storage import Location


@dataclass
class PrepResult:
    manifest: dict
    directory: Location
    reused: bool  # the existing prepared data matched its inputs and was returned untouched


def prepare(config: Config, progress: bool = True) -> PrepResult:
    """Prepare `config.data` (fetching a missing named dataset if allowed), or reuse it."""
    data = config.data
    splits = check_splits(data)
    fetch(data, splits)
    source = open_source(data)
    settings = _settings(data, source, splits)
    input_hash = _input_hash(settings, source)
    directory = prepared_directory(config, input_hash)
    manifest = _reusable(directory, input_hash)
    if manifest is not None:
        return PrepResult(manifest, directory, reused=True)

    _check_not_empty(source, splits)
    if directory.remote:  # staged here, then uploaded with the manifest last
        with tempfile.TemporaryDirectory(prefix="aploss-prep-") as staging:
            manifest = _write(Path(staging), data, source, settings, input_hash, progress)
            directory.delete_tree()  # a reader finds no manifest, then the complete new version
            directory.upload(Path(staging), last=MANIFEST)
        return PrepResult(manifest, directory, reused=False)
    local = directory.local()
    local.parent.mkdir(parents=True, exist_ok=True)
    staging = local.with_name(f".{local.name}.tmp-{uuid.uuid4().hex[:12]}")
    staging.mkdir()
    try:
        manifest = _write(staging, data, source, settings, input_hash, progress)
        _swap(staging, local)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once swapped in
    return PrepResult(manifest, directory, reused=False)


def _settings(data: DataConfig, source: Source, splits: list[str]) -> dict:
    return {
        "schema_version": SCHEMA_VERSION, "dataset": data.dataset, "classes": source.classes,
        "category_ids": source.category_ids, "splits": splits, "shard_images": data.shard_images,
        "row_group_images": ROW_GROUP_IMAGES, "min_box_size": data.min_box_size, "skip_bad": data.skip_bad,
        # Which images a split holds under skip_bad depends on these too.
        "max_image_pixels": data.max_image_pixels, "max_annotation_mb": data.max_annotation_mb,
    }


def prepared_directory(config: Config, input_hash: str) -> Location:
    """Prepared data is addressed by what it was made of: other data never lands in its place."""
    return config.run.prepared_root() / f"{config.data.dataset}-{input_hash[:12]}"


def locate_prepared(config: Config) -> Location:
    """The prepared data a stage works on: data.prepared if set, else the directory data-prep
    made of the data.* settings and their current inputs (an error if it has not run)."""
    if config.data.prepared:
        directory = Location(config.data.prepared)
        if not (directory / MANIFEST).is_file():
            raise MissingInput(f"data.prepared: {directory} holds no prepared data (no {MANIFEST})")
        return directory
    data = config.data
    splits = check_splits(data)
    try:
        source = open_source(data)
        directory = prepared_directory(config, _input_hash(_settings(data, source, splits), source))
    except PrepError as error:
        raise MissingInput(f"no prepared {data.dataset!r} data can be found, since its inputs cannot be read ({error}): "
                           "run data-prep first (aploss prep or python -m jobs.prep, with the same data.* and "
                           "run.output_dir), or set data.prepared to a prepared-data directory") from None
    if not (directory / MANIFEST).is_file():
        raise MissingInput(f"no prepared {data.dataset!r} data for these inputs and settings in {directory}: run "
                           "data-prep first (aploss prep or python -m jobs.prep, with the same data.* and "
                           "run.output_dir), or set data.prepared to a prepared-data directory")
    return directory


def _check_not_empty(source: Source, splits: list[str]) -> None:
    """An empty split is a mistake (an empty listing, `images: []`), never a dataset to train or
    evaluate on: refused before anything is written."""
    for split in splits:
        if not source.entries(split):
            raise PrepError(source.annotation_files(split)[0], f"split {split!r} lists no images")


def _input_hash(settings: dict, source: Source) -> str:
    """sha256 over what the output depends on. Images count by (name, size, mtime) rather
    than content: hashing every image would cost as much as preparing them."""
    digest = hashlib.sha256()

    def add(item: object) -> None:
        digest.update(json.dumps(item).encode() + b"\n")

    add(settings)
    for split in settings["splits"]:
        add(["split", split])
        for path in source.annotation_files(split):
            add(file_sha256(path) if path.is_file() else "missing")
        for entry in source.entries(split):
            if entry.refused is not None:  # outside its folder: not even stat-ed
                add([entry.file_name, "refused"])
                continue
            try:
                stat = entry.image_path.stat()
                add([entry.file_name, stat.st_size, stat.st_mtime_ns])
            except OSError:
                add([entry.file_name, "missing"])
    return digest.hexdigest()


def _files(splits: dict) -> list[dict]:
    """Every file the manifest's splits list, each with its relative path and sha256."""
    return [item for split in splits.values() for item in [*split["shards"], split["ground_truth"]]]


def _reusable(directory: Location, input_hash: str) -> dict | None:
    """The existing manifest, if made from the same inputs and with every file intact."""
    try:
        manifest = read_manifest(directory)
        if manifest["input_hash"] != input_hash:
            return None
        files = _files(manifest["splits"])
        intact = all(file_sha256(directory / item["file"]) == item["sha256"] for item in files)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing, unreadable or from another schema: prepare anew
    return manifest if intact else None


def _swap(staging: Path, directory: Path) -> None:
    """Put `staging` in place of `directory`, removing the old version only after."""
    if not directory.exists():
        os.rename(staging, directory)
        return
    retired = staging.with_name(staging.name + "-old")
    os.rename(directory, retired)
    os.rename(staging, directory)
    shutil.rmtree(retired)


def _write(staging: Path, data: DataConfig, source: Source, settings: dict, input_hash: str,
           progress: bool) -> dict:
    splits = {}
    for split in settings["splits"]:
        writer = _SplitWriter(staging, split, source.classes, source.category_ids, data.shard_images)
        entries = source.entries(split)
        for entry in tqdm(entries, desc=f"{data.dataset} {split}", unit="img", disable=not progress):
            try:
                writer.add(_check_image(source.load(split, entry), data))
            except PrepError as error:
                if not data.skip_bad:
                    raise
                writer.skipped.append({"file": error.file, "image": entry.file_name, "reason": error.problem})
        if not writer.images:
            raise PrepError(source.annotation_files(split)[0],
                            f"split {split!r}: every image was skipped ({len(writer.skipped)}, see the errors above "
                            "with data.skip_bad=false)")
        splits[split] = writer.finish()
    content = sorted((item["file"], item["sha256"]) for item in _files(splits))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "dataset": data.dataset,
        "classes": source.classes,
        "category_ids": source.category_ids,
        "settings": settings,
        "input_hash": input_hash,
        "content_hash": hashlib.sha256(json.dumps(content).encode()).hexdigest(),
        "splits": splits,
    }
    # Written last: a directory with a manifest is complete.
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


@dataclass
class _CheckedImage:
    record: ImageRecord
    areas: list[float]  # per kept box, for the ground truth
    dropped: list[dict]
    clipped: list[dict]


def _read_image(path: Path, max_pixels: int) -> tuple[bytes, int, int]:
    """The encoded file and its decoded (width, height); decoding it all catches truncation."""
    try:
        encoded = path.read_bytes()
    except FileNotFoundError:
        raise PrepError(path, "image file not found") from None
    except OSError as error:
        raise PrepError(path, f"cannot read image: {error.strerror}") from None
    width, height, frames = _declared_size(encoded, path)
    if width * height * frames > max_pixels:
        in_frames = f" in {frames} frames" if frames > 1 else ""
        raise PrepError(path, f"declares {width}x{height} pixels{in_frames}, above data.max_image_pixels={max_pixels}; "
                              "raise it to admit this image")
    try:
        pixels = decode_image(torch.frombuffer(bytearray(encoded), dtype=torch.uint8))
    except (RuntimeError, ValueError) as error:
        raise PrepError(path, f"cannot decode image: {str(error).splitlines()[-1]}") from None
    return encoded, pixels.shape[-1], pixels.shape[-2]


def _declared_size(encoded: bytes, path: Path) -> tuple[int, int, int]:
    """(width, height, frames) as the image's header declares them, nothing decoded: a few KB of
    PNG can declare gigabytes of pixels."""
    # Pillow's own bomb check would refuse by its limit rather than data.max_image_pixels, without
    # the size; lifted only while the header is read (data-prep reads one image at a time). Its
    # warnings (the bomb's, corrupt metadata) would only repeat what decoding reports.
    pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(encoded)) as image:
                # decode_image returns every frame of a GIF.
                return image.width, image.height, image.n_frames if image.format == "GIF" else 1
    except UnidentifiedImageError:
        raise PrepError(path, "cannot decode image: unknown format (JPEG, PNG, GIF and WebP are known)") from None
    except (OSError, ValueError, EOFError, SyntaxError) as error:
        raise PrepError(path, f"cannot decode image: unreadable header: {error}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


Box = tuple[float, float, float, float]


def _clip(box: Box, width: int, height: int, min_size: float) -> tuple[Box | None, str]:
    """The box clipped to the image, or None and the reason it is dropped."""
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        return None, "inverted"
    if x1 == x0 or y1 == y0:
        return None, "zero_size"
    clipped = (min(max(x0, 0.0), width), min(max(y0, 0.0), height),
               min(max(x1, 0.0), width), min(max(y1, 0.0), height))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None, "outside_image"
    if clipped[2] - clipped[0] < min_size or clipped[3] - clipped[1] < min_size:
        return None, "too_small"
    return clipped, ""


def _check_image(image: SourceImage, data: DataConfig) -> _CheckedImage:
    """The image decoded, checked against its annotation, and its boxes clipped or dropped."""
    entry = image.entry
    encoded, width, height = _read_image(entry.image_path, data.max_image_pixels)
    if image.width is not None and (image.width, image.height) != (width, height):
        raise PrepError(entry.annotation_path, f"{entry.file_name}: annotated size {image.width}x{image.height} "
                                               f"differs from the image's {width}x{height}")
    kept, dropped, clipped = [], [], []
    for obj in image.objects:
        box, reason = _clip(obj.box, width, height, data.min_box_size)
        where = {"file": str(entry.annotation_path), "image": entry.file_name, "object": obj.ref,
                 "box": list(obj.box)}
        if box is None:
            dropped.append({**where, "reason": reason})
            continue
        if box != obj.box:
            clipped.append({**where, "clipped": list(box)})
        kept.append((box, obj))
    boxes = np.array([box for box, _ in kept], dtype=np.float32).reshape(-1, 4)
    areas = [obj.area if obj.area is not None else (x1 - x0) * (y1 - y0)
             for (x0, y0, x1, y1), (_, obj) in zip(boxes.tolist(), kept)]
    record = ImageRecord(entry.image_id, entry.file_name, width, height, encoded, boxes,
                         np.array([obj.class_id for _, obj in kept], dtype=np.int64),
                         np.array([obj.crowd for _, obj in kept], dtype=bool))
    return _CheckedImage(record, areas, dropped, clipped)


class _SplitWriter:
    """Streams one split's images into shards; collects its ground truth and its report."""

    def __init__(self, staging: Path, split: str, classes: list[str], category_ids: list[int], shard_images: int):
        (staging / split).mkdir()
        self.staging, self.split, self.classes, self.shard_images = staging, split, classes, shard_images
        self.category_ids = category_ids
        self.pending: list[ImageRecord] = []
        self.shards: list[dict] = []
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.dropped: list[dict] = []
        self.clipped: list[dict] = []
        self.skipped: list[dict] = []

    def add(self, image: _CheckedImage) -> None:
        record = image.record
        self.images.append({"id": record.image_id, "file_name": record.file_name,
                            "width": record.width, "height": record.height})
        for (x0, y0, x1, y1), class_id, crowd, area in zip(record.boxes.tolist(), record.class_ids.tolist(),
                                                           record.crowd.tolist(), image.areas):
            self.annotations.append({"id": len(self.annotations) + 1, "image_id": record.image_id,
                                     "category_id": self.category_ids[class_id], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                     "area": area, "iscrowd": int(crowd)})
        self.dropped += image.dropped
        self.clipped += image.clipped
        self.pending.append(record)
        if len(self.pending) == self.shard_images:
            self._flush()

    def _flush(self) -> None:
        relative = f"{self.split}/part-{len(self.shards):05d}.parquet"
        write_shard(self.staging / relative, self.pending)
        self.shards.append({"file": relative, "rows": len(self.pending),
                            "sha256": file_sha256(self.staging / relative)})
        self.pending = []

    def _box_stats(self) -> dict[str, dict]:
        """Per class, the 5/50/95 % quantiles of its boxes' width, height, sqrt(area) and aspect
        (height / width) in image pixels: what anchors must reach (crowd boxes left out)."""
        stats = {}
        for id_, name in zip(self.category_ids, self.classes):
            boxes = np.array([a["bbox"][2:] for a in self.annotations if a["category_id"] == id_ and not a["iscrowd"]],
                             dtype=np.float64).reshape(-1, 2)
            if not len(boxes):
                continue
            width, height = boxes[:, 0], boxes[:, 1]
            measures = {"width": width, "height": height, "sqrt_area": np.sqrt(width * height),
                        "aspect": height / np.maximum(width, 1e-6)}
            stats[name] = {"boxes": len(boxes), **{key: np.round(np.quantile(values, [0.05, 0.5, 0.95]), 2).tolist()
                                                   for key, values in measures.items()}}
        return stats

    def finish(self) -> dict:
        """Write the last shard and the ground truth; the split's part of the manifest."""
        if self.pending:
            self._flush()
        relative = f"{self.split}/ground_truth.json"
        ground_truth = {
            "info": {"description": f"aploss prepared ground truth, split {self.split}"},
            "licenses": [],
            "images": self.images,
            "annotations": self.annotations,
            # The dataset's own ids, so that detections can be scored against its original json too.
            "categories": [{"id": id_, "name": name} for id_, name in zip(self.category_ids, self.classes)],
        }
        (self.staging / relative).write_text(json.dumps(ground_truth))
        counts = Counter(a["category_id"] for a in self.annotations)
        return {
            "images": len(self.images),
            "boxes": len(self.annotations),
            "crowd_boxes": sum(a["iscrowd"] for a in self.annotations),
            "class_counts": {name: counts[id_] for id_, name in zip(self.category_ids, self.classes)},
            "box_stats": self._box_stats(),
            "shards": self.shards,
            "ground_truth": {"file": relative, "sha256": file_sha256(self.staging / relative)},
            "dropped": self.dropped,
            "clipped": self.clipped,
            "skipped": self.skipped,
        }
