"""The data-prep stage: a dataset in its own layout becomes checked Parquet shards, COCO-format
ground truth for evaluation and a manifest, under `run.output_dir/data/<dataset>-<input hash>`:

    manifest.json
    <split>/part-00000.parquet, part-00001.parquet, ...
    <split>/ground_truth.json

Every image is decoded once here (`image_check`, through the image gate of pipeline.images, which
bounds its file, its pixels and its read time), so training never meets an unreadable file, and every box is clipped
to its image; boxes left empty or smaller than data.min_box_size are dropped. Each
clipped or dropped box, and each image skipped under data.skip_bad, is listed in the manifest.
With data.prep_workers > 0 the images are checked and the shards written by Ray Data tasks across
the cluster (`prep_on_ray`); the output is the same, file for file.

Idempotent: when the manifest's input hash matches and every file still has its recorded
sha256, the prepared data is returned untouched. Atomic: a new version is written into a
temporary sibling directory and renamed into place only once complete, so an interrupted prep
never leaves a half-written dataset and the previous version survives until then. In an object
store (run.output_dir=s3://...), which has no rename, it is written locally, then uploaded with
the manifest last: readers take a directory without a manifest for one not prepared yet.
"""
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.config import Config, DataConfig
from pipeline.data.fetch import fetch, image_folders
from pipeline.data.image_check import CheckedImage, check_image
from pipeline.data.shards import (
    MANIFEST,
    ROW_GROUP_IMAGES,
    SCHEMA_VERSION,
    file_sha256,
    read_manifest,
    write_shard,
)
from pipeline.data.sources import Entry, PrepError, Source, check_splits, open_source
from pipeline.errors import MissingInput, naming_full_disk
from pipeline.images import ImageLimits
from pipeline.storage import Location, Where, is_uri


@dataclass
class PrepResult:
    manifest: dict
    directory: Location
    reused: bool  # the existing prepared data matched its inputs and was returned untouched


def summary_lines(result: PrepResult) -> list[str]:
    """What prep made of each split: images, boxes, and how many boxes were dropped and images
    skipped, by reason (each is listed in the manifest)."""
    lines = []
    for split, summary in result.manifest["splits"].items():
        dropped = Counter(box["reason"] for box in summary["dropped"])
        why = f" ({', '.join(f'{count} {reason}' for reason, count in sorted(dropped.items()))})" if dropped else ""
        lines.append(f"  {split}: {summary['images']} images, {summary['boxes']} boxes, {len(summary['dropped'])} "
                     f"dropped{why}, {len(summary['skipped'])} images skipped")
    if any(summary["dropped"] or summary["skipped"] for summary in result.manifest["splits"].values()):
        lines.append(f"  each dropped box and skipped image is listed in {Location(result.directory) / MANIFEST}")
    return lines


def prepare(config: Config, progress: bool = True) -> PrepResult:
    """Prepare `config.data` (fetching a missing named dataset if allowed), or reuse it."""
    data = config.data
    splits = check_splits(data)
    # Ray's tasks read the images of a data root in an object store from there: only the
    # annotations are copied here.
    fetch(data, splits, images=not (data.prep_workers and is_uri(data.root_location())))
    source = open_source(data)
    settings = _settings(data, source, splits)
    input_hash = _input_hash(settings, source, _image_stats(data, splits))
    directory = prepared_directory(config, input_hash)
    manifest = _reusable(directory, input_hash)
    if manifest is not None:
        return PrepResult(manifest, directory, reused=True)

    _check_not_empty(source, splits)
    if directory.remote:  # staged here, then uploaded with the manifest last
        with tempfile.TemporaryDirectory(prefix="aploss-prep-") as staging:
            if data.prep_workers:
                # Ray's tasks write the shards in place: the directory (unusable, or it would have
                # been reused) goes first, and the manifest comes last as ever.
                directory.delete_tree()
            manifest = _write(Path(staging), data, source, settings, input_hash, progress, directory)
            if not data.prep_workers:
                directory.delete_tree()  # a reader finds no manifest, then the complete new version
            directory.upload(Path(staging), last=MANIFEST)
        return PrepResult(manifest, directory, reused=False)
    local = directory.local()
    local.parent.mkdir(parents=True, exist_ok=True)
    staging = local.with_name(f".{local.name}.tmp-{uuid.uuid4().hex[:12]}")
    staging.mkdir()
    try:
        with naming_full_disk(local.parent):
            manifest = _write(staging, data, source, settings, input_hash, progress, directory)
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
        "max_image_pixels": data.max_image_pixels, "max_image_mb": data.max_image_mb,
        "max_annotation_mb": data.max_annotation_mb,
    }


def prepared_directory(config: Config, input_hash: str) -> Location:
    """Prepared data is addressed by what it was made of: other data never lands in its place."""
    return config.run.outputs().prepared / f"{config.data.dataset}-{input_hash[:12]}"


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
        directory = prepared_directory(config, _input_hash(_settings(data, source, splits), source,
                                                           _image_stats(data, splits)))
    except PrepError as error:
        raise MissingInput(f"no prepared {data.dataset!r} data can be found, since its inputs cannot be read "
                           f"({error}): "
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


ImageStat = Callable[[Entry], tuple[int, int] | None]
# On Ray, images checked per Ray Data job, and at most about as many held checked before their
# shards are written: enough to keep a cluster's workers busy, few enough to bound memory.
WINDOW_IMAGES = 4096


def _image_stats(data: DataConfig, splits: list[str]) -> ImageStat:
    """Entry -> its image's (size, modification time in ns), None if missing. A data root in an
    object store is listed there, one listing per image folder, with the times its copies here
    take (`Location.mirror`): the same hash wherever, whether or not its images were copied."""
    root = data.root_location()
    if not is_uri(root):
        def local(entry: Entry) -> tuple[int, int] | None:
            try:
                stat = entry.image_path.stat()
            except OSError:
                return None
            return stat.st_size, stat.st_mtime_ns
        return local
    listed = {f"{folder}/{name}": stat for folder in image_folders(data, splits)
              for name, stat in (Location(root) / folder).file_stats().items()}
    copies = data.resolved_root()
    return lambda entry: listed.get(entry.image_path.relative_to(copies).as_posix())


def _input_hash(settings: dict, source: Source, image_stat: ImageStat) -> str:
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
            stat = image_stat(entry)
            add([entry.file_name, *stat] if stat is not None else [entry.file_name, "missing"])
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


def _write(staging: Path, data: DataConfig, source: Source, settings: dict, input_hash: str, progress: bool,
           directory: Location) -> dict:
    """Everything but the shards of an object store on Ray into `staging`; the manifest."""
    splits = {}
    for split in settings["splits"]:
        writer = _SplitWriter(staging, split, source.classes, source.category_ids, data.shard_images,
                              planned=data.prep_workers > 0)
        for entry, checked in _checked_images(data, source, split, progress):
            if isinstance(checked, PrepError):
                if not data.skip_bad:
                    raise checked
                writer.skipped.append({"file": checked.file, "image": entry.file_name, "reason": checked.problem})
            else:
                writer.add(checked)
            if len(writer.plans) * data.shard_images >= WINDOW_IMAGES:  # what data-prep holds stays bounded
                _write_planned_shards(writer.take_plans(), staging, directory, data)
        if not writer.images:
            raise PrepError(source.annotation_files(split)[0],
                            f"split {split!r}: every image was skipped ({len(writer.skipped)}, see the errors above "
                            "with data.skip_bad=false)")
        writer.close()
        if writer.plans:
            _write_planned_shards(writer.take_plans(), staging, directory, data)
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


def _image_source(data: DataConfig) -> Callable[[Entry], Where]:
    """Where an entry's image is read: the data root's file, except that Ray's tasks read a data
    root in an object store there, not from this machine's copy."""
    root = data.root_location()
    if not (data.prep_workers and is_uri(root)):
        return lambda entry: entry.image_path
    copies = data.resolved_root()
    return lambda entry: Location(root) / entry.image_path.relative_to(copies).as_posix()


def _checked_images(data: DataConfig, source: Source, split: str, progress: bool
                    ) -> Iterator[tuple[Entry, CheckedImage | PrepError]]:
    """Each entry of `split`, in order, with its checked image or the error that refused it; on
    Ray, a window of WINDOW_IMAGES at a time, so that what is in flight does not grow with the
    split."""
    entries = tqdm(source.entries(split), desc=f"{data.dataset} {split}", unit="img", disable=not progress)
    where = _image_source(data)
    if not data.prep_workers:
        for entry in entries:
            try:
                yield entry, check_image(source.load(split, entry), where(entry), data.min_box_size,
                                         ImageLimits.of(data))
            except PrepError as error:
                yield entry, error
        return
    window = []
    for entry in entries:
        window.append(entry)
        if len(window) == WINDOW_IMAGES:
            yield from _checked_on_ray(data, source, split, window, where)
            window = []
    yield from _checked_on_ray(data, source, split, window, where)


def _checked_on_ray(data: DataConfig, source: Source, split: str, entries: list[Entry],
                    where: Callable[[Entry], Where]) -> Iterator[tuple[Entry, CheckedImage | PrepError]]:
    from pipeline.data import prep_on_ray  # Ray Data only for a prep that runs on it

    # Annotations are parsed here (data-prep hashed their files already); the images go to Ray.
    loaded: list[PrepError | None] = []
    jobs = []
    for entry in entries:
        try:
            jobs.append((source.load(split, entry), str(where(entry))))
            loaded.append(None)
        except PrepError as error:
            loaded.append(error)
    if not jobs:
        yield from zip(entries, loaded)
        return
    checked = prep_on_ray.check_images(jobs, data.min_box_size, ImageLimits.of(data), data.prep_workers)
    for entry, refused in zip(entries, loaded):
        yield entry, refused if refused is not None else next(checked)


def _write_planned_shards(plans: list[tuple[dict, list[CheckedImage]]], staging: Path, directory: Location,
                          data: DataConfig) -> None:
    """Planned shards, written by Ray's tasks: in place in an object store, or handed back and
    written into `staging`; their sha256 completes their manifest entries."""
    from pipeline.data import prep_on_ray

    written = prep_on_ray.write_shards([(summary["file"], images) for summary, images in plans], directory,
                                       ImageLimits.of(data), data.prep_workers)
    for (summary, _), (written_summary, data) in zip(plans, written):
        if not directory.remote:
            (staging / summary["file"]).write_bytes(data)
        summary.update(written_summary)


class _SplitWriter:
    """Streams one split's images into shards, or when `planned` only plans them (`plans`: each
    shard's manifest entry, its sha256 yet to come, and its images) for Ray's tasks to write;
    collects its ground truth and its report."""

    def __init__(self, staging: Path, split: str, classes: list[str], category_ids: list[int], shard_images: int,
                 planned: bool = False):
        (staging / split).mkdir()
        self.staging, self.split, self.classes, self.shard_images = staging, split, classes, shard_images
        self.category_ids = category_ids
        self.pending: list[CheckedImage] = []
        self.planned = planned
        self.plans: list[tuple[dict, list[CheckedImage]]] = []
        self.shards: list[dict] = []
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.dropped: list[dict] = []
        self.clipped: list[dict] = []
        self.skipped: list[dict] = []

    def add(self, image: CheckedImage) -> None:
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
        self.pending.append(image)
        if len(self.pending) == self.shard_images:
            self._flush()

    def _flush(self) -> None:
        relative = f"{self.split}/part-{len(self.shards):05d}.parquet"
        if self.planned:
            self.shards.append({"file": relative, "rows": len(self.pending), "sha256": ""})
            self.plans.append((self.shards[-1], self.pending))
        else:
            write_shard(self.staging / relative, [image.record for image in self.pending])
            self.shards.append({"file": relative, "rows": len(self.pending),
                                "sha256": file_sha256(self.staging / relative)})
        self.pending = []

    def take_plans(self) -> list[tuple[dict, list[CheckedImage]]]:
        """The shards planned since the last call, handed over to be written."""
        plans, self.plans = self.plans, []
        return plans

    def close(self) -> None:
        """The last shard, however few its images."""
        if self.pending:
            self._flush()

    def _box_stats(self) -> dict[str, dict]:
        """Per class, the 5/50/95 % quantiles of its boxes' width, height, sqrt(area) and aspect
        (height / width) in image pixels: what anchors must reach (crowd boxes left out)."""
        sizes: dict[int, list] = {}  # one pass over the boxes: COCO has 860k of them and 80 classes
        for annotation in self.annotations:
            if not annotation["iscrowd"]:
                sizes.setdefault(annotation["category_id"], []).append(annotation["bbox"][2:])
        stats = {}
        for id_, name in zip(self.category_ids, self.classes):
            if id_ not in sizes:
                continue
            boxes = np.array(sizes[id_], dtype=np.float64).reshape(-1, 2)
            width, height = boxes[:, 0], boxes[:, 1]
            measures = {"width": width, "height": height, "sqrt_area": np.sqrt(width * height),
                        "aspect": height / np.maximum(width, 1e-6)}
            stats[name] = {"boxes": len(boxes), **{key: np.round(np.quantile(values, [0.05, 0.5, 0.95]), 2).tolist()
                                                   for key, values in measures.items()}}
        return stats

    def finish(self) -> dict:
        """Write the ground truth; the split's part of the manifest (its shards written)."""
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
