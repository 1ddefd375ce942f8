"""Data-prep's work on one image: its file read and decoded whole through the image gate
(pipeline.images), its annotated size checked, its boxes clipped to it or
dropped with the reason. The same in data-prep's own process and in its Ray Data tasks."""
import hashlib
from dataclasses import dataclass

import numpy as np

from pipeline.data.shards import ImageRecord
from pipeline.data.sources import PrepError, SourceImage
from pipeline.images import ImageLimits, ImageRefused, decode_rgb, read_image_file
from pipeline.storage import Where


@dataclass
class CheckedImage:
    record: ImageRecord
    areas: list[float]  # per kept box, for the ground truth
    dropped: list[dict]
    clipped: list[dict]
    source: str  # where the encoded file was read, to be read again by a task that writes its shard
    sha256: str  # of the encoded file: a second read must find the bytes that were checked


def read_image(where: Where, limits: ImageLimits) -> tuple[bytes, int, int]:
    """The encoded file and its decoded (width, height), through the image gate; decoding it all
    catches truncation."""
    try:
        encoded = read_image_file(where, limits)
        pixels = decode_rgb(encoded, limits)
    except FileNotFoundError:
        raise PrepError(where, "image file not found") from None
    except ImageRefused as refused:
        raise PrepError(where, str(refused)) from None
    except OSError as error:
        raise PrepError(where, f"cannot read image: {error.strerror or error}") from None
    return encoded, pixels.shape[-1], pixels.shape[-2]


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


def check_image(image: SourceImage, where: Where, min_box_size: float, limits: ImageLimits) -> CheckedImage:
    """`image` read from `where`, decoded, checked against its annotation, its boxes clipped or
    dropped."""
    entry = image.entry
    encoded, width, height = read_image(where, limits)
    if image.width is not None and (image.width, image.height) != (width, height):
        raise PrepError(entry.annotation_path, f"{entry.file_name}: annotated size {image.width}x{image.height} "
                                               f"differs from the image's {width}x{height}")
    kept, dropped, clipped = [], [], []
    for obj in image.objects:
        box, reason = _clip(obj.box, width, height, min_box_size)
        where_annotated = {"file": str(entry.annotation_path), "image": entry.file_name, "object": obj.ref,
                           "box": list(obj.box)}
        if box is None:
            dropped.append({**where_annotated, "reason": reason})
            continue
        if box != obj.box:
            clipped.append({**where_annotated, "clipped": list(box)})
        kept.append((box, obj))
    boxes = np.array([box for box, _ in kept], dtype=np.float32).reshape(-1, 4)
    areas = [obj.area if obj.area is not None else (x1 - x0) * (y1 - y0)
             for (x0, y0, x1, y1), (_, obj) in zip(boxes.tolist(), kept)]
    record = ImageRecord(entry.image_id, entry.file_name, width, height, encoded, boxes,
                         np.array([obj.class_id for _, obj in kept], dtype=np.int64),
                         np.array([obj.crowd for _, obj in kept], dtype=bool))
    return CheckedImage(record, areas, dropped, clipped, str(where), hashlib.sha256(encoded).hexdigest())
