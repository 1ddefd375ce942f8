"""Data-prep's per-image work as Ray Data jobs across a cluster (data.prep_workers > 0).

Two streaming passes, so that the shards come out exactly as one process writes them:
  1. check: every image is read where it lies (a folder every node sees, or the object store),
     decoded and checked, in `data.prep_workers` tasks at a time; what comes back, in order, is
     its record without its bytes. Data-prep's process then knows which images a split keeps
     (data.skip_bad drops some) and so which shard and row group each one lands in.
  2. write: one task per shard reads its images again, refuses any whose bytes changed since
     they were checked, and writes the shard: straight into an object store, or back to
     data-prep's process for a local directory, whose disk the other nodes may not share.
Annotations are read and parsed by data-prep's process (they are small, and it hashes them);
the raw images never pass through its disk.
"""
import hashlib
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import ray
import ray.data
from ray.data import DataContext

from pipeline.data.image_check import CheckedImage, check_image
from pipeline.data.shards import ImageRecord, file_sha256, write_shard
from pipeline.data.sources import Entry, PrepError, SourceImage, SourceObject
from pipeline.images import ImageLimits, ImageRefused, read_image_file
from pipeline.storage import Location

# Images a check task takes at a time: enough to amortise a task, few enough to share them out.
CHECK_BATCH = 16


def check_images(jobs: list[tuple[SourceImage, str]], min_box_size: float, limits: ImageLimits, workers: int
                 ) -> Iterator[CheckedImage | PrepError]:
    """Each (annotated image, where its file is) checked, or the PrepError that refused it, in
    order, `workers` tasks at a time."""
    if not ray.is_initialized():
        raise RuntimeError("data.prep_workers > 0 needs Ray initialised (pipeline.orchestration.run.start_ray)")
    items = [{"job": json.dumps(_image_job(image, where))} for image, where in jobs]
    blocks = _blocks(len(items), workers)
    with _ordered():
        # No more tasks at a time than blocks, or Ray Data warns that it cannot run them.
        checked = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            _check_batch, fn_kwargs={"min_box_size": min_box_size, "limits": limits},
            batch_size=CHECK_BATCH, concurrency=min(workers, blocks), num_cpus=1)
        for batch in checked.iter_batches(batch_size=None, batch_format="numpy"):
            for result in batch["result"]:
                yield _result_from_json(json.loads(result))


def write_shards(plans: list[tuple[str, list[CheckedImage]]], destination: Location, limits: ImageLimits,
                 workers: int) -> Iterator[tuple[dict, bytes]]:
    """Each (relative path, its images) written as a shard under `destination`, in order: its
    manifest entry, and its bytes when `destination` is local (data-prep's process writes them)."""
    items = [{"plan": json.dumps({"file": relative, "images": [_checked_json(image) for image in images]})}
             for relative, images in plans]
    target = str(destination) if destination.remote else ""
    with _ordered():
        written = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _write_batch, fn_kwargs={"destination": target, "limits": limits}, batch_size=1,
            concurrency=min(workers, len(items)), num_cpus=1)
        for batch in written.iter_batches(batch_size=None, batch_format="numpy"):
            for summary, data in zip(batch["summary"], batch["data"]):
                summary = json.loads(summary)
                if "problem" in summary:
                    raise PrepError(summary["image"], summary["problem"])
                yield summary, bytes(data)


def _blocks(items: int, workers: int) -> int:
    """Several blocks per worker, so that a slow one does not hold up the end."""
    return max(1, min(items, max(4 * workers, items // (8 * CHECK_BATCH))))


@contextmanager
def _ordered() -> Iterator[None]:
    """Ray Data keeps the items' order (the shards' rows depend on it), without progress bars of
    its own (data-prep shows one per split). Its reservation of resources per operator, which keeps the
    stages of a longer pipeline from starving each other, is off: a pass is one map, and with
    it on, 2 workers ran one task at a time on a 4-CPU instance (benchmarks/prep_scaling.py)."""
    context = DataContext.get_current()
    options = context.execution_options
    saved = options.preserve_order, context.enable_progress_bars, context.op_resource_reservation_enabled
    options.preserve_order, context.enable_progress_bars, context.op_resource_reservation_enabled = True, False, False
    try:
        yield
    finally:
        options.preserve_order, context.enable_progress_bars, context.op_resource_reservation_enabled = saved


def _image_job(image: SourceImage, where: str) -> dict:
    entry = image.entry
    return {"where": where, "image_id": entry.image_id, "file_name": entry.file_name,
            "image_path": str(entry.image_path), "annotation_path": str(entry.annotation_path),
            "width": image.width, "height": image.height,
            "objects": [[*obj.box, obj.class_id, obj.crowd, obj.ref, obj.area] for obj in image.objects]}


def _source_image(job: dict) -> SourceImage:
    entry = Entry(job["image_id"], job["file_name"], Path(job["image_path"]), Path(job["annotation_path"]))
    objects = [SourceObject((x0, y0, x1, y1), class_id, crowd, ref, area)
               for x0, y0, x1, y1, class_id, crowd, ref, area in job["objects"]]
    return SourceImage(entry, job["width"], job["height"], objects)


def _checked_json(image: CheckedImage) -> dict:
    """Everything of a checked image but its bytes (JSON's floats round-trip exactly)."""
    record = image.record
    return {"image_id": record.image_id, "file_name": record.file_name, "width": record.width,
            "height": record.height, "boxes": record.boxes.tolist(), "class_ids": record.class_ids.tolist(),
            "crowd": record.crowd.tolist(), "areas": image.areas, "dropped": image.dropped, "clipped": image.clipped,
            "source": image.source, "sha256": image.sha256}


def _checked(saved: dict, encoded: bytes = b"") -> CheckedImage:
    record = ImageRecord(saved["image_id"], saved["file_name"], saved["width"], saved["height"], encoded,
                         np.array(saved["boxes"], dtype=np.float32).reshape(-1, 4),
                         np.array(saved["class_ids"], dtype=np.int64), np.array(saved["crowd"], dtype=bool))
    return CheckedImage(record, saved["areas"], saved["dropped"], saved["clipped"], saved["source"], saved["sha256"])


def _result_from_json(saved: dict) -> CheckedImage | PrepError:
    if "problem" in saved:
        return PrepError(saved["file"], saved["problem"])
    return _checked(saved)


def _check_batch(batch: dict[str, np.ndarray], min_box_size: float, limits: ImageLimits) -> dict[str, list[str]]:
    """A Ray Data task: each job's image checked, or why it was refused."""
    results = []
    for job in batch["job"]:
        job = json.loads(job)
        try:
            checked = check_image(_source_image(job), Location(job["where"]), min_box_size, limits)
            results.append(json.dumps(_checked_json(checked)))
        except PrepError as error:
            results.append(json.dumps({"file": error.file, "problem": error.problem}))
    return {"result": results}


def _write_batch(batch: dict[str, np.ndarray], destination: str, limits: ImageLimits) -> dict[str, list]:
    """A Ray Data task: each planned shard written from its images, read again, or why not (an
    error raised here would reach data-prep wrapped in Ray's, not as the one line it is)."""
    summaries, contents = [], []
    for plan in batch["plan"]:
        plan = json.loads(plan)
        try:
            records = [_reread(saved, limits) for saved in plan["images"]]
        except PrepError as error:
            summaries.append(json.dumps({"file": plan["file"], "image": error.file, "problem": error.problem}))
            contents.append(b"")
            continue
        with tempfile.TemporaryDirectory(prefix="aploss-shard-") as scratch:
            path = Path(scratch) / "shard.parquet"
            write_shard(path, records)
            digest = file_sha256(path)
            data = path.read_bytes()
        if destination:
            (Location(destination) / plan["file"]).write_bytes(data)
            data = b""
        summaries.append(json.dumps({"file": plan["file"], "rows": len(records), "sha256": digest}))
        contents.append(data)
    return {"summary": summaries, "data": contents}


def _reread(saved: dict, limits: ImageLimits) -> ImageRecord:
    source = Location(saved["source"])
    try:
        encoded = read_image_file(source, limits)
    except (OSError, ImageRefused) as error:
        raise PrepError(source, f"cannot read image again to write its shard: {error}") from None
    if hashlib.sha256(encoded).hexdigest() != saved["sha256"]:
        raise PrepError(source, "changed while data-prep ran; run data-prep again")
    return _checked(saved, encoded).record
