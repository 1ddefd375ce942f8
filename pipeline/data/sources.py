"""Detection datasets in their own layouts (Pascal VOC XML, COCO instances json) as per-image
annotations.

A source lists a split's images cheaply (`entries`) and parses one image's annotations on
demand (`load`), so data-prep can report or skip one bad image instead of giving up on the
split. Boxes are returned as annotated; clipping and dropping degenerate boxes is data-prep's
job, so it can report them.

A dataset is data from elsewhere, not code: names in it stay inside their folders, annotation
files are refused above data.max_annotation_mb before they are read, and XML may declare no
entities.
"""
import json
import math
import os
import stat
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from pipeline.config import ConfigError, DataConfig
from pipeline.errors import DataError
from pipeline.storage import is_uri

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
BCCD_CLASSES = ("RBC", "WBC", "Platelets")
# Bounds on what an annotation file may make data-prep hold beside data.max_annotation_mb: a json
# may parse to at most this many times its size, a VOC image's side be at most this many pixels.
MAX_JSON_EXPANSION = 12
MAX_IMAGE_SIDE = 1 << 20


@dataclass(frozen=True)
class VOCLayout:
    classes: tuple[str, ...]
    splits: dict[str, tuple[str, ...]]  # split -> the VOC folders under the data root whose listings it joins

    @property
    def folders(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(folder for folders in self.splits.values() for folder in folders))


VOC2007_FOLDER, VOC2012_FOLDER = "VOCdevkit/VOC2007", "VOCdevkit/VOC2012"
_VOC_TRAIN_SPLITS = ("train", "val", "trainval")
# Named datasets in VOC layout.
VOC_LAYOUTS = {
    "bccd": VOCLayout(BCCD_CLASSES, {split: ("bccd/BCCD",) for split in ("train", "val", "trainval", "test")}),
    "voc2007": VOCLayout(VOC_CLASSES, {split: (VOC2007_FOLDER,) for split in (*_VOC_TRAIN_SPLITS, "test")}),
    "voc2012": VOCLayout(VOC_CLASSES, {split: (VOC2012_FOLDER,) for split in _VOC_TRAIN_SPLITS}),
    # "07+12", the usual Pascal VOC training set (16,551 trainval images); its test split is
    # VOC2007 test, since VOC2012's test annotations are not public.
    "voc0712": VOCLayout(VOC_CLASSES, {**{split: (VOC2007_FOLDER, VOC2012_FOLDER) for split in _VOC_TRAIN_SPLITS},
                                       "test": (VOC2007_FOLDER,)}),
}
PASCAL_VOC = ("voc2007", "voc2012", "voc0712")  # evaluated with Pascal VOC mAP beside COCO's
COCO2017_SPLITS = ("train", "val")  # test2017 has no public annotations


class PrepError(DataError):
    """An input file is missing, unreadable or malformed; the message names the file."""

    def __init__(self, file: str | Path, problem: str):
        super().__init__(f"{file}: {problem}")
        self.file = str(file)
        self.problem = problem


@dataclass(frozen=True)
class Entry:
    """One image of a split, listed without parsing its annotations."""

    image_id: int
    file_name: str  # relative to the split's image folder
    image_path: Path
    annotation_path: Path  # the image's XML, or the split's json
    # Set when the image's names reach outside their folder: `load` raises it, nothing reads the files.
    refused: PrepError | None = None


@dataclass
class SourceObject:
    box: tuple[float, float, float, float]  # xyxy, absolute pixels, as annotated
    class_id: int
    crowd: bool  # COCO iscrowd or VOC difficult
    ref: int  # for reports: VOC, the <object>'s position in the XML; COCO, the annotation id
    area: float | None = None  # COCO's own area, kept so COCOeval's size ranges stay official


@dataclass
class SourceImage:
    entry: Entry
    width: int | None  # as annotated; None when the annotation gives no size
    height: int | None
    objects: list[SourceObject]


class Source(Protocol):
    classes: list[str]
    category_ids: list[int]  # the dataset's own id of each class, for COCO-format outputs

    def entries(self, split: str) -> list[Entry]: ...

    def annotation_files(self, split: str) -> list[Path]: ...

    def load(self, split: str, entry: Entry) -> SourceImage: ...


def voc_layout(data: DataConfig) -> VOCLayout | None:
    """The VOC layout `data` is read in: a named dataset's, or a folder of your own (data.root
    itself) with the splits its ImageSets/Main listings name; None for COCO data."""
    if data.dataset in VOC_LAYOUTS:
        return VOC_LAYOUTS[data.dataset]
    if data.dataset != "voc":
        return None
    if is_uri(data.root_location()):  # the listings are copied here only once the splits are known
        splits = data.splits
    else:
        listings = data.resolved_root() / "ImageSets" / "Main"
        # Class listings (cat_train.txt) beside the split listings are VOC's own: not splits.
        splits = sorted(path.stem for path in listings.glob("*.txt") if "_" not in path.stem)
    return VOCLayout(tuple(data.classes), {split: ("",) for split in splits})


def available_splits(data: DataConfig) -> tuple[str, ...]:
    if (layout := voc_layout(data)) is not None:
        return tuple(layout.splits)
    if data.dataset == "coco2017":
        return COCO2017_SPLITS
    return tuple(data.annotations)


def check_splits(data: DataConfig) -> list[str]:
    """The configured splits, or ConfigError naming one the dataset does not have."""
    available = available_splits(data)
    for key in ("train_split", "val_split", "test_split"):
        split = getattr(data, key)
        if split not in available:
            advice = {"coco": f"; or give data.annotations.{split} a json",
                      "voc": f"; or list its images in ImageSets/Main/{split}.txt under the data root"
                      }.get(data.dataset, "")
            test = "; set data.test_split=val to test on the validation split" if key == "test_split" else ""
            raise ConfigError(f"data.{key}: dataset {data.dataset!r} has no split {split!r}; "
                              f"available: {', '.join(available)}{test}{advice}")
    return data.splits


def coco2017_paths(root: Path, split: str) -> tuple[Path, Path]:
    """(instances json, image folder) of a COCO 2017 split under the data root."""
    return root / "coco" / "annotations" / f"instances_{split}2017.json", root / "coco" / f"{split}2017"


def open_source(data: DataConfig) -> Source:
    root = data.resolved_root()
    if (layout := voc_layout(data)) is not None:
        return VOCSource(root, layout, data.max_annotation_mb)
    if data.dataset == "coco2017":
        paths = {split: coco2017_paths(root, split) for split in data.splits}
        return COCOSource({split: p[0] for split, p in paths.items()}, {split: p[1] for split, p in paths.items()},
                          data.max_annotation_mb)
    # Relative paths are taken from the data root, not the working directory, so a config means
    # the same on every Ray worker.
    annotations = {split: root / Path(data.annotations[split]).expanduser() for split in data.splits}
    images = {split: root / Path(data.images[split]).expanduser() if split in data.images
              else annotations[split].parent for split in data.splits}
    for split in data.splits:  # named by the key that sets them: the likelier mistake is there
        if not annotations[split].exists():
            raise PrepError(annotations[split], f"annotation file not found (data.annotations.{split}, "
                                                f"relative to the data root {root})")
        # An object-store root's images stay there when Ray tasks read them (data.prep_workers).
        if not is_uri(data.root_location()) and not images[split].is_dir():
            raise PrepError(images[split], f"image folder not found (data.images.{split}, relative to the data "
                                           f"root {root}; without it, the folder of the split's json)")
    return COCOSource(annotations, images, data.max_annotation_mb)


class _Inside:
    """A dataset folder that the names in its annotations (file names, image ids) must stay inside."""

    def __init__(self, folder: Path, label: str):
        self.folder, self.label = folder, label
        self.real = Path(os.path.realpath(folder))  # the folder itself may be a link (to a bigger disk, say)

    def problem(self, name: str) -> str | None:
        """Why `name`, taken relative to the folder, would reach outside it; None if it stays inside."""
        if "\0" in name:
            return f"{name!r} contains a NUL character"
        path = PurePosixPath(name)
        if path.is_absolute():
            return f"{name!r} is an absolute path, outside the {self.label} {self.folder}"
        if ".." in path.parts:
            return f"{name!r} escapes the {self.label} {self.folder}"
        real = Path(os.path.realpath(self.folder / name))
        if not real.is_relative_to(self.real):
            return f"{name!r} resolves to {real}, outside the {self.label} {self.folder}"
        return None


def _read_annotation(path: Path, max_mb: float, what: str = "annotation file") -> bytes:
    """The whole file, refused unread above data.max_annotation_mb: parsers hold several times
    its size, and a dataset's file can be any size."""
    limit = int(max_mb * 2**20)
    try:
        # Opened without waiting for a FIFO's writer; only a regular file is read.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
            status = os.fstat(handle.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise PrepError(path, f"{what} is not a regular file")
            size = status.st_size
            data = b"" if size > limit else handle.read(limit + 1)  # bounded if it grows meanwhile
    except FileNotFoundError:
        raise PrepError(path, f"{what} not found") from None
    except OSError as error:
        raise PrepError(path, f"cannot read {what}: {error.strerror}") from None
    if max(size, len(data)) > limit:
        raise PrepError(path, f"{what} of {max(size, len(data)) / 2**20:.1f} MB is above data.max_annotation_mb="
                              f"{max_mb:g}; raise it to read this file")
    return data


class VOCSource:
    """Pascal VOC layout: ImageSets/Main/<split>.txt, Annotations/<id>.xml, JPEGImages/<id>.jpg,
    in one folder, or in several joined (VOC 07+12).

    Image ids are positions in the split's listing, sorted within each folder, folders in the
    layout's order: stable across runs and platforms. Where the layout joins folders, file
    names carry the folder's name (VOC2007/000005.jpg), as the years reuse image names.
    """

    def __init__(self, root: Path, layout: VOCLayout, max_annotation_mb: float):
        self.root = root
        self.layout = layout
        self.max_annotation_mb = max_annotation_mb
        self.classes = list(layout.classes)
        self.category_ids = list(range(1, len(self.classes) + 1))  # VOC has no ids: from 1, as COCO tools expect
        self._class_index = {name: i for i, name in enumerate(layout.classes)}
        self._entries: dict[str, list[Entry]] = {}

    def _listings(self, split: str) -> list[tuple[Path, Path]]:
        """(folder, its listing of `split`) for each folder the split joins."""
        return [(self.root / folder, self.root / folder / "ImageSets" / "Main" / f"{split}.txt")
                for folder in self.layout.splits[split]]

    def entries(self, split: str) -> list[Entry]:
        if split not in self._entries:
            entries = []
            for directory, listing in self._listings(split):
                text = _read_annotation(listing, self.max_annotation_mb, "split listing")
                try:
                    lines = text.decode().splitlines()
                except UnicodeDecodeError:
                    raise PrepError(listing, "split listing is not UTF-8 text") from None
                prefix = f"{directory.name}/" if len(self.layout.folders) > 1 else ""
                names = sorted({line.split()[0] for line in lines if line.strip()})
                images = _Inside(directory / "JPEGImages", "image folder")
                xmls = _Inside(directory / "Annotations", "annotation folder")
                entries += [_voc_entry(len(entries) + i, name, prefix, listing, images, xmls)
                            for i, name in enumerate(names)]
            self._entries[split] = entries
        return self._entries[split]

    def annotation_files(self, split: str) -> list[Path]:
        return [listing for _, listing in self._listings(split)] + [entry.annotation_path
                                                                    for entry in self.entries(split)
                                                                    if entry.refused is None]

    def load(self, split: str, entry: Entry) -> SourceImage:
        if entry.refused is not None:
            raise entry.refused
        path = entry.annotation_path
        text = _read_annotation(path, self.max_annotation_mb)
        try:
            root = SafeET.fromstring(text)
        except ET.ParseError as error:
            raise PrepError(path, f"malformed XML: {error}") from None
        except DefusedXmlException as error:
            raise PrepError(path, f"entity declarations are not allowed in annotation XML: {error}") from None
        width, height = _voc_size(root, path)
        objects = [self._object(node, i, path) for i, node in enumerate(root.findall("object"))]
        return SourceImage(entry, width, height, objects)

    def _object(self, node: ET.Element, index: int, path: Path) -> SourceObject:
        name = (node.findtext("name") or "").strip()
        if name not in self._class_index:
            raise PrepError(path, f"object {index}: unknown class {name!r}; expected one of {self.classes}")
        box = tuple(_voc_number(node, f"bndbox/{key}", index, path) for key in ("xmin", "ymin", "xmax", "ymax"))
        difficult = _voc_number(node, "difficult", index, path) if node.find("difficult") is not None else 0
        return SourceObject(box, self._class_index[name], crowd=difficult != 0, ref=index)


def _voc_entry(image_id: int, name: str, prefix: str, listing: Path, images: _Inside, xmls: _Inside) -> Entry:
    problem = images.problem(f"{name}.jpg") or xmls.problem(f"{name}.xml")
    return Entry(image_id, f"{prefix}{name}.jpg", images.folder / f"{name}.jpg", xmls.folder / f"{name}.xml",
                 PrepError(listing, f"image id {name!r}: {problem}") if problem else None)


def _voc_number(node: ET.Element, tag: str, index: int, path: Path) -> float:
    text = node.findtext(tag)
    if text is None:
        raise PrepError(path, f"malformed XML: object {index} has no <{tag}>")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise PrepError(path, f"malformed XML: object {index} <{tag}> is not a number: {text!r}")
    return value


def _voc_size(root: ET.Element, path: Path) -> tuple[int | None, int | None]:
    """The annotated size; (None, None) when absent or zero, as some VOC-style tools write."""
    width, height = root.findtext("size/width"), root.findtext("size/height")
    if width is None or height is None:
        return None, None
    try:
        size = int(float(width)), int(float(height))
    except (ValueError, OverflowError):  # OverflowError: inf
        raise PrepError(path, f"malformed XML: <size> is not numeric: {width!r:.40} x {height!r:.40}") from None
    if not all(0 <= side <= MAX_IMAGE_SIDE for side in size):
        raise PrepError(path, f"malformed XML: <size> {size[0]} x {size[1]} is not an image's")
    return (None, None) if size == (0, 0) else size


@dataclass
class _COCOSplit:
    path: Path
    categories: list[tuple[int, str]]  # sorted by id
    entries: list[Entry]
    images: dict[int, dict]
    annotations: dict[int, list[dict]]  # by image id, only the fields prep uses


class COCOSource:
    """COCO instances json per split; classes are the categories sorted by id.

    The json is parsed when the source is built, so a json that is not valid COCO is an error
    even with data.skip_bad: there is no image to skip. An image's own fields and annotations
    are checked in `load`, so one bad image can be skipped.
    """

    def __init__(self, annotations: dict[str, Path], images: dict[str, Path], max_annotation_mb: float):
        self._splits = {split: _read_coco(path, images[split], max_annotation_mb)
                        for split, path in annotations.items()}
        first, *others = self._splits.values()
        for other in others:
            if other.categories != first.categories:
                raise PrepError(other.path, f"categories differ from those of {first.path}")
        self.classes = [name for _, name in first.categories]
        self.category_ids = [category for category, _ in first.categories]
        self._class_index = {category: i for i, (category, _) in enumerate(first.categories)}

    def entries(self, split: str) -> list[Entry]:
        return self._splits[split].entries

    def annotation_files(self, split: str) -> list[Path]:
        return [self._splits[split].path]

    def load(self, split: str, entry: Entry) -> SourceImage:
        if entry.refused is not None:
            raise entry.refused
        coco = self._splits[split]
        image = coco.images[entry.image_id]
        where = f"image {entry.image_id}"
        width, height = image.get("width"), image.get("height")
        if width is not None or height is not None:
            if not all(_is_int(v) and v > 0 for v in (width, height)):
                raise PrepError(coco.path, f"{where}: width and height must be positive integers, "
                                           f"got {width!r} x {height!r}")
        objects = [self._object(annotation, i, coco.path, where)
                   for i, annotation in enumerate(coco.annotations.get(entry.image_id, []))]
        return SourceImage(entry, width, height, objects)

    def _object(self, annotation: dict, index: int, path: Path, where: str) -> SourceObject:
        ref = annotation["id"] if _is_int(annotation.get("id")) else index
        where = f"{where}, annotation {ref}"
        bbox = annotation.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite(v) for v in bbox)):
            raise PrepError(path, f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
        category = annotation.get("category_id")
        if not (_is_int(category) and category in self._class_index):
            raise PrepError(path, f"{where}: unknown category_id {category!r}")
        crowd = annotation.get("iscrowd", 0)
        if crowd not in (0, 1):
            raise PrepError(path, f"{where}: iscrowd must be 0 or 1, got {crowd!r}")
        area = annotation.get("area")
        if area is not None and not _is_finite(area):
            raise PrepError(path, f"{where}: area must be a number, got {area!r}")
        x, y, w, h = (float(v) for v in bbox)
        return SourceObject((x, y, x + w, y + h), self._class_index[category], bool(crowd), ref,
                            None if area is None else float(area))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_COCO_FIELDS = ("id", "bbox", "category_id", "iscrowd", "area")


def _read_coco(path: Path, image_dir: Path, max_mb: float) -> _COCOSplit:
    data = _load_json(path, max_mb)
    if not isinstance(data, dict):
        raise PrepError(path, "malformed COCO json: the top level must be an object")
    images = _coco_list(data, "images", path)
    annotations = _coco_list(data, "annotations", path) if "annotations" in data else []
    categories = _coco_categories(_coco_list(data, "categories", path), path)

    by_id: dict[int, dict] = {}
    for image in images:
        if not (isinstance(image, dict) and _is_int(image.get("id")) and isinstance(image.get("file_name"), str)):
            raise PrepError(path, f"malformed COCO json: an image needs an integer id and a file_name, "
                                  f"got {image!r}")
        if image["id"] in by_id:
            raise PrepError(path, f"malformed COCO json: image id {image['id']} appears twice")
        by_id[image["id"]] = image
    grouped: dict[int, list[dict]] = {}
    for annotation in annotations:
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        if not (_is_int(image_id) and image_id in by_id):
            where = f"annotation {annotation.get('id')!r}" if isinstance(annotation, dict) else "an annotation"
            raise PrepError(path, f"malformed COCO json: {where} refers to image_id {image_id!r}, "
                                  "which is not in 'images'")
        # Keep only what prep reads: segmentations are most of a COCO json's memory.
        kept = {key: annotation[key] for key in _COCO_FIELDS if key in annotation}
        grouped.setdefault(image_id, []).append(kept)
    inside = _Inside(image_dir, "image folder")
    entries = [_coco_entry(i, by_id[i]["file_name"], path, inside) for i in sorted(by_id)]
    return _COCOSplit(path, categories, entries, by_id, grouped)


def _coco_entry(image_id: int, file_name: str, path: Path, inside: _Inside) -> Entry:
    problem = inside.problem(file_name)
    return Entry(image_id, file_name, inside.folder / file_name, path,
                 PrepError(path, f"image {image_id}: file_name {problem}") if problem else None)


def _load_json(path: Path, max_mb: float) -> Any:
    text = _read_annotation(path, max_mb)
    # What parsing will hold, estimated from a byte count before it starts: Python's objects take
    # about 72 bytes a container and 32 a member. COCO's files come to 4-8 times their size; a
    # file of empty objects to 35 times, which data.max_annotation_mb alone would admit.
    estimate = 72 * (text.count(b"{") + text.count(b"[")) + 32 * (text.count(b",") + text.count(b":"))
    if estimate > MAX_JSON_EXPANSION * max(len(text), 1 << 20):
        raise PrepError(path, f"malformed json: parsing it would take about {estimate / 2**30:.1f} GB, "
                              f"{estimate / len(text):.0f} times its size (annotation files take under "
                              f"{MAX_JSON_EXPANSION})")
    try:
        return json.loads(text)
    except RecursionError:
        raise PrepError(path, "malformed json: nested too deep") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise PrepError(path, f"malformed json: {error}") from None


def _coco_list(data: dict, key: str, path: Path) -> list:
    if not isinstance(data.get(key), list):
        raise PrepError(path, f"malformed COCO json: {key!r} must be a list")
    return data[key]


def _coco_categories(categories: list, path: Path) -> list[tuple[int, str]]:
    pairs = []
    for category in categories:
        if not (isinstance(category, dict) and _is_int(category.get("id"))
                and isinstance(category.get("name"), str)):
            raise PrepError(path, f"malformed COCO json: a category needs an integer id and a name, "
                                  f"got {category!r}")
        pairs.append((category["id"], category["name"]))
    if len({id_ for id_, _ in pairs}) != len(pairs):
        raise PrepError(path, "malformed COCO json: category ids repeat")
    if not pairs:
        raise PrepError(path, "malformed COCO json: no categories")
    return sorted(pairs)
