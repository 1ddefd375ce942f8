"""Data-prep's work on one image: its file read and decoded whole (after its header's size is
checked against data.max_image_pixels), its annotated size checked, its boxes clipped to it or
dropped with the reason. The same in data-prep's own process and in its Ray Data tasks."""
import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import decode_image

from pipeline.data.shards import ImageRecord
from pipeline.data.sources import PrepError, SourceImage
from pipeline.storage import Location


@dataclass
class CheckedImage:
    record: ImageRecord
    areas: list[float]  # per kept box, for the ground truth
    dropped: list[dict]
    clipped: list[dict]
    source: str  # where the encoded file was read, to be read again by a task that writes its shard
    sha256: str  # of the encoded file: a second read must find the bytes that were checked


def read_image(where: Path | Location, max_pixels: int) -> tuple[bytes, int, int]:
    """The encoded file and its decoded (width, height); decoding it all catches truncation."""
    try:
        encoded = Location(where).read_bytes()
    except FileNotFoundError:
        raise PrepError(where, "image file not found") from None
    except OSError as error:
        raise PrepError(where, f"cannot read image: {error.strerror or error}") from None
    width, height, frames = _declared_size(encoded, where)
    if width * height * frames > max_pixels:
        in_frames = f" in {frames} frames" if frames > 1 else ""
        raise PrepError(where, f"declares {width}x{height} pixels{in_frames}, above "
                               f"data.max_image_pixels={max_pixels}; raise it to admit this image")
    try:
        pixels = decode_image(torch.frombuffer(bytearray(encoded), dtype=torch.uint8))
    except (RuntimeError, ValueError) as error:
        raise PrepError(where, f"cannot decode image: {str(error).splitlines()[-1]}") from None
    return encoded, pixels.shape[-1], pixels.shape[-2]


def _declared_size(encoded: bytes, where: Path | Location) -> tuple[int, int, int]:
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
        raise PrepError(where, "cannot decode image: unknown format (JPEG, PNG, GIF and WebP are known)") from None
    except (OSError, ValueError, EOFError, SyntaxError) as error:
        raise PrepError(where, f"cannot decode image: unreadable header: {error}") from None
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


def check_image(image: SourceImage, where: Path | Location, min_box_size: float, max_pixels: int) -> CheckedImage:
    """`image` read from `where`, decoded, checked against its annotation, its boxes clipped or
    dropped."""
    entry = image.entry
    encoded, width, height = read_image(where, max_pixels)
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
