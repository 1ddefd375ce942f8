"""Prepared detection data as Parquet shards: the schema, the writer and a row-group reader.

One row per image: the original encoded file, never re-encoded (training decodes exactly the
pixels the boxes were checked against), plus its boxes. Rows are written in row groups of
ROW_GROUP_IMAGES so that a reader fetches a few images without reading a whole shard, and a
sampler can shuffle row groups, then rows within one, and still read sequentially.

Columns:
  image_id   int64              COCO's id, or the position in the sorted VOC split listing
  file_name  string             the image's path relative to its dataset's image folder
  width      int32, height int32  of the decoded image
  image      binary             the encoded file's bytes
  boxes      list<float32>      flattened xyxy in absolute pixels, 4 values per box
  class_ids  list<int32>        0-based, contiguous, in the manifest's class order
  crowd      list<bool>         COCO iscrowd or VOC difficult: evaluated as ignore regions,
                                not training targets
"""
import bisect
import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError, MissingInput
from pipeline.storage import Location, Where

# 2: manifest category_ids, ground truth in the dataset's own category ids; 3: box statistics per class
SCHEMA_VERSION = 3
ROW_GROUP_IMAGES = 32
MANIFEST = "manifest.json"
_VERSION_KEY = b"aploss.schema_version"

SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("file_name", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("boxes", pa.list_(pa.float32()), nullable=False),
        pa.field("class_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("crowd", pa.list_(pa.bool_()), nullable=False),
    ],
    metadata={_VERSION_KEY: str(SCHEMA_VERSION).encode()},
)


@dataclass(eq=False)
class ImageRecord:
    """One image and its boxes, as stored in a shard."""

    image_id: int
    file_name: str
    width: int
    height: int
    image: bytes  # the encoded file
    boxes: np.ndarray  # float32 [n, 4], xyxy, absolute pixels
    class_ids: np.ndarray  # int64 [n], 0-based
    crowd: np.ndarray  # bool [n]


def file_sha256(path: Where) -> str:
    digest = hashlib.sha256()
    with Location(path).open_input() as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _table(records: Sequence[ImageRecord]) -> pa.Table:
    columns = {
        "image_id": [r.image_id for r in records],
        "file_name": [r.file_name for r in records],
        "width": [r.width for r in records],
        "height": [r.height for r in records],
        "image": [r.image for r in records],
        "boxes": [np.asarray(r.boxes, dtype=np.float32).reshape(-1) for r in records],
        "class_ids": [np.asarray(r.class_ids, dtype=np.int32) for r in records],
        "crowd": [np.asarray(r.crowd, dtype=bool) for r in records],
    }
    return pa.table(columns, schema=SCHEMA)


def write_shard(path: Path, records: Sequence[ImageRecord]) -> None:
    """Write `records` to one Parquet file in row groups of ROW_GROUP_IMAGES images."""
    # Images are already compressed and dominate the bytes; compressing would only cost
    # decode time. Statistics are kept for image_id alone, so a reader can find an id.
    with pq.ParquetWriter(path, SCHEMA, compression="none", use_dictionary=False,
                          write_statistics=["image_id"]) as writer:
        for start in range(0, len(records), ROW_GROUP_IMAGES):
            writer.write_table(_table(records[start:start + ROW_GROUP_IMAGES]), row_group_size=ROW_GROUP_IMAGES)


def _check_version(version: Any, where: Where) -> None:
    if str(version) != str(SCHEMA_VERSION):
        raise DataError(f"{where}: prepared with schema version {version}, this code reads version "
                         f"{SCHEMA_VERSION}; run data-prep again")


def _records(table: pa.Table) -> list[ImageRecord]:
    columns = {name: table.column(name) for name in table.column_names}
    records = []
    for row in range(table.num_rows):
        records.append(ImageRecord(
            image_id=columns["image_id"][row].as_py(),
            file_name=columns["file_name"][row].as_py(),
            width=columns["width"][row].as_py(),
            height=columns["height"][row].as_py(),
            image=columns["image"][row].as_py(),
            boxes=columns["boxes"][row].values.to_numpy().reshape(-1, 4),
            class_ids=columns["class_ids"][row].values.to_numpy().astype(np.int64),
            crowd=columns["crowd"][row].values.to_numpy(zero_copy_only=False),
        ))
    return records


class ShardReader:
    """Random access to the images of one prepared split, reading a row group at a time.

    Only the shards' footers are read up front. Each read loads the one row group holding the
    index and keeps the `cache_row_groups` most recently used ones, so reading a row group's
    images in any order costs one read. Picklable (DataLoader and Ray workers): the cache is
    dropped on pickling and files are opened per row-group read, so no handle crosses over.
    """

    def __init__(self, directory: Where, cache_row_groups: int = 4):
        self.directory = Location(directory)
        if not self.directory.is_dir():
            raise MissingInput(f"{self.directory}: no prepared split here; run data-prep first")
        self.cache_row_groups = max(1, cache_row_groups)
        self._shards = self.directory.files("part-*.parquet")
        self._metadata = []
        for shard in self._shards:
            with shard.open_input() as handle:
                self._metadata.append(pq.read_metadata(handle))
        self._groups: list[tuple[int, int]] = []  # (shard, row group within it), in row order
        self._starts: list[int] = []  # first row of each group
        rows = 0
        for shard, (path, metadata) in enumerate(zip(self._shards, self._metadata)):
            _check_version((metadata.metadata or {}).get(_VERSION_KEY, b"none").decode(), path)
            for group in range(metadata.num_row_groups):
                self._groups.append((shard, group))
                self._starts.append(rows)
                rows += metadata.row_group(group).num_rows
        self._rows = rows
        self._cache: OrderedDict[int, list[ImageRecord]] = OrderedDict()

    def __len__(self) -> int:
        return self._rows

    def row_groups(self) -> list[range]:
        """The row indices of each row group, in order."""
        ends = self._starts[1:] + [self._rows]
        return [range(start, end) for start, end in zip(self._starts, ends)]

    def row_group_of(self, index: int) -> int:
        self._check_index(index)
        return bisect.bisect_right(self._starts, index) - 1

    def read(self, index: int) -> ImageRecord:
        group = self.row_group_of(index)
        record = self._group(group)[index - self._starts[group]]
        # Copies, so that a caller transforming boxes in place cannot corrupt the cache.
        return ImageRecord(record.image_id, record.file_name, record.width, record.height, record.image,
                           record.boxes.copy(), record.class_ids.copy(), record.crowd.copy())

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self._rows:
            raise IndexError(f"index {index} out of range for {self._rows} images in {self.directory}")

    def _group(self, group: int) -> list[ImageRecord]:
        if group in self._cache:
            self._cache.move_to_end(group)
            return self._cache[group]
        shard, within = self._groups[group]
        with self._shards[shard].open_input() as handle:
            records = _records(pq.ParquetFile(handle, metadata=self._metadata[shard]).read_row_group(within))
        self._cache[group] = records
        while len(self._cache) > self.cache_row_groups:
            self._cache.popitem(last=False)
        return records

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state


def read_manifest(prepared_dir: Where) -> dict:
    """The manifest data-prep wrote for a dataset directory, checked to be of this schema."""
    path = Location(prepared_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingInput(f"{path}: no manifest; run data-prep first") from None
    _check_version(manifest.get("schema_version"), path)
    return manifest
