"""A user's images: the files, folders, globs or bucket a command names, each decoded through
the image gate as the detector takes it, with errors naming the file."""
import glob
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from pipeline.errors import DataError, MissingInput
from pipeline.images import ImageLimits, ImageRefused, decode_rgb, read_image_file
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
