"""The one gate every image passes before it is decoded: data-prep's source files, the records of
the shards training reads (the run folder is shared storage), predict's inputs and the served
model's requests. An image is refused, with the reason, when its file is not a regular file, is
larger than data.max_image_mb or takes longer than data.image_read_timeout_s to read, when its
header declares more than data.max_image_pixels, or when it holds more than one frame (an
animation or a multi-page file: each frame declares its own size, and a detector takes one
picture). Only then is it decoded, so what decoding allocates is bounded by the limits."""
import contextlib
import io
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.config import DataConfig

if TYPE_CHECKING:
    import torch
from pipeline.storage import InputRefused, Location, Where

MEGABYTE = 1 << 20
# Decoded by torchvision; the others Pillow opens (BMP, TIFF, ...) are decoded by Pillow.
_TORCHVISION_FORMATS = {"JPEG", "PNG", "GIF", "WEBP"}
# Pillow's own bomb limit is process-wide and would refuse by its number, not the configured
# one; it is lifted only while this gate opens an image it has bounded itself, one at a time.
_PILLOW_LIMIT = threading.Lock()


class ImageRefused(InputRefused):
    """An image refused by the gate; the message says why, without the image, which the caller names."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    read_timeout_s: float

    @classmethod
    def of(cls, data: DataConfig) -> "ImageLimits":
        """The limits of a DataConfig."""
        return cls(int(data.max_image_mb * MEGABYTE), data.max_image_pixels, data.image_read_timeout_s)


DEFAULT_LIMITS = ImageLimits.of(DataConfig())


def read_image_file(where: Where, limits: ImageLimits) -> bytes:
    """The encoded file, read within the limits and its header checked; FileNotFoundError or
    OSError when it cannot be read, ImageRefused when it is refused."""
    try:
        encoded = Location(where).read_bounded(limits.max_bytes, limits.read_timeout_s,
                                               ("data.max_image_mb", "data.image_read_timeout_s"))
    except InputRefused as refused:
        raise ImageRefused(str(refused)) from None
    declared_size(encoded, limits)
    return encoded


def declared_size(encoded: bytes, limits: ImageLimits) -> tuple[int, int]:
    """(width, height) as the image's header declares them, nothing decoded (a few KB of PNG can
    declare gigabytes of pixels); ImageRefused beyond the limits or for several frames."""
    if len(encoded) > limits.max_bytes:
        raise ImageRefused(f"{len(encoded)} bytes, above data.max_image_mb ({limits.max_bytes} bytes)")
    with _opened(encoded) as image:
        # is_animated reads the second frame's header at most: counting every frame of a GIF
        # would walk all of them.
        if getattr(image, "is_animated", False):
            raise ImageRefused(f"holds several frames ({image.format} animation or pages); a detector takes one "
                               "picture: save the frame you want as PNG or JPEG")
        width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageRefused(f"declares {width}x{height} pixels, above data.max_image_pixels={limits.max_pixels}; "
                           "raise it to admit this image")
    return width, height


def decode_rgb(encoded: bytes, limits: ImageLimits) -> "torch.Tensor":
    """The image as uint8 RGB, CHW, once its header passed `declared_size`; ImageRefused when it
    does not decode (truncated, corrupt)."""
    # torch's, here: what only locates prepared data (a finished run's rerun) does not load it.
    import torch
    from torchvision.io import ImageReadMode, decode_image

    declared_size(encoded, limits)
    with _opened(encoded) as image:
        image_format = image.format
        if image_format not in _TORCHVISION_FORMATS:
            try:
                return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
            except (OSError, ValueError, SyntaxError) as error:
                raise ImageRefused(f"cannot decode image: {error}") from None
    try:
        return decode_image(torch.frombuffer(bytearray(encoded), dtype=torch.uint8), ImageReadMode.RGB)
    except (RuntimeError, ValueError) as error:
        raise ImageRefused(f"cannot decode image: {str(error).splitlines()[-1]}") from None


@contextlib.contextmanager
def _opened(encoded: bytes) -> Iterator[Image.Image]:
    """Pillow's image of `encoded`, opened with Pillow's own limit lifted (the caller bounds it)
    and its warnings (the bomb's, corrupt metadata) silenced: decoding reports what matters."""
    with _PILLOW_LIMIT, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(io.BytesIO(encoded)) as image:
                yield image
        except UnidentifiedImageError:
            raise ImageRefused("cannot decode image: unknown format (JPEG, PNG, GIF, WebP, BMP and TIFF are "
                               "known)") from None
        except (OSError, ValueError, EOFError, SyntaxError) as error:
            if isinstance(error, ImageRefused):
                raise
            raise ImageRefused(f"cannot decode image: unreadable header: {error}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved
