"""The image gate (pipeline.images) that data-prep, training, predict and the served model share,
tried with crafted files: a GIF whose second frame declares 30000x30000, a sparse file of 3 GB,
a FIFO, a TIFF above Pillow's own bomb threshold, a shard record swapped for a bomb. Each is
refused with one line before anything is decoded."""
import os
import signal
import struct
import time

import numpy as np
import pytest
import torchvision.io
from PIL import Image

from pipeline.data.dataset import DetectionDataset
from pipeline.data.prep import prepare
from pipeline.data.shards import ImageRecord, ShardReader, write_shard
from pipeline.data.sources import PrepError
from pipeline.errors import DataError
from pipeline.images import DEFAULT_LIMITS, ImageLimits, ImageRefused, decode_rgb, read_image_file
from pipeline.storage import Location
from tests import test_data_trust
from tests.test_data_trust import FIRST, coco_config, png_declaring, set_file_name

coco = test_data_trust.coco  # the fixture: a 3-image COCO split

GIGABYTE = 1 << 30


def gif_growing_to(side: int) -> bytes:
    """A GIF of a 1x1 screen and frame whose second frame declares side x side: some 40 bytes."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"

    def frame(width: int, height: int) -> bytes:
        return b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"

    return screen + frame(1, 1) + frame(side, side) + b"\x3b"


def tiff_declaring(width: int, height: int) -> bytes:
    """A TIFF header declaring width x height 8-bit grey pixels and no data."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8), (277, 3, 1),
               (278, 4, height), (279, 4, width * height)]
    directory = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", tag, kind, 1, value) if kind == 4 else struct.pack("<HHIHH", tag, kind, 1, value, 0)
        for tag, kind, value in entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + directory


@pytest.fixture
def decoded(monkeypatch) -> list[bytes]:
    """What reached the decoder (torchvision's, which the gate imports when it decodes)."""
    seen, real = [], torchvision.io.decode_image
    monkeypatch.setattr(torchvision.io, "decode_image", lambda data, mode: seen.append(bytes(data)) or real(data, mode))
    return seen


@pytest.mark.parametrize(("crafted", "problem"), [
    (gif_growing_to(30000), "holds several frames (GIF animation or pages)"),
    (png_declaring(12000, 12000), "declares 12000x12000 pixels, above data.max_image_pixels=64000000"),
    (tiff_declaring(15000, 12000), "declares 15000x12000 pixels, above data.max_image_pixels=64000000"),
])
def test_crafted_headers_are_refused_undecoded(crafted, problem, decoded):
    started = time.monotonic()
    with pytest.raises(ImageRefused) as error:
        decode_rgb(crafted, DEFAULT_LIMITS)
    assert str(error.value).startswith(problem) and decoded == []
    assert time.monotonic() - started < 1


def test_data_prep_refuses_a_gif_growing_in_its_second_frame_and_skips_it(tmp_path, coco, decoded):
    json_path, image_dir, _ = coco
    (image_dir / "grows.gif").write_bytes(gif_growing_to(30000))
    set_file_name(json_path, FIRST, "grows.gif")
    with pytest.raises(PrepError) as error:
        prepare(coco_config(tmp_path), progress=False)
    assert str(error.value).startswith(f"{image_dir / 'grows.gif'}: holds several frames")
    train = prepare(coco_config(tmp_path, skip_bad=True), progress=False).manifest["splits"]["train"]
    assert [skipped["image"] for skipped in train["skipped"]] == ["grows.gif"] and train["images"] == 2
    assert gif_growing_to(30000) not in decoded and len(decoded) == 2


def test_a_sparse_file_above_the_size_bound_is_refused_unread(tmp_path, coco):
    json_path, image_dir, _ = coco
    sparse = image_dir / "train-000.png"
    with open(sparse, "r+b") as handle:
        handle.truncate(3 * GIGABYTE)  # costs no disk, and nothing when refused by its size
    started = time.monotonic()
    with pytest.raises(PrepError) as error:
        prepare(coco_config(tmp_path), progress=False)
    assert str(error.value) == f"{sparse}: {3 * GIGABYTE} bytes, above data.max_image_mb ({128 << 20} bytes)"
    assert time.monotonic() - started < 10
    train = prepare(coco_config(tmp_path, skip_bad=True, max_image_mb=1), progress=False).manifest["splits"]["train"]
    assert [skipped["image"] for skipped in train["skipped"]] == ["train-000.png"]


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path, coco):
    json_path, image_dir, _ = coco
    os.mkfifo(image_dir / "p.jpg")
    set_file_name(json_path, FIRST, "p.jpg")
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("data-prep waited on the FIFO"))
    signal.alarm(60)
    try:
        with pytest.raises(PrepError) as error:
            prepare(coco_config(tmp_path), progress=False)
        train = prepare(coco_config(tmp_path, skip_bad=True), progress=False).manifest["splits"]["train"]
    finally:
        signal.alarm(0)
    assert str(error.value) == f"{image_dir / 'p.jpg'}: not a regular file"
    assert [skipped["image"] for skipped in train["skipped"]] == ["p.jpg"]


def test_reads_are_bounded_in_size_and_time(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (64, 48)).save(path)
    limits = ImageLimits(max_bytes=path.stat().st_size, max_pixels=64 * 48, read_timeout_s=60)
    assert read_image_file(path, limits) == path.read_bytes()
    with pytest.raises(ImageRefused, match=r"above data.max_image_mb"):
        read_image_file(path, ImageLimits(path.stat().st_size - 1, 64 * 48, 60))
    with pytest.raises(ImageRefused, match=r"reading it took longer than 0 s \(data.image_read_timeout_s\)"):
        read_image_file(path, ImageLimits(path.stat().st_size, 64 * 48, 0))
    with pytest.raises(ImageRefused, match="not a regular file"):
        read_image_file(Location("/dev/zero"), limits)


def test_training_refuses_a_shard_record_swapped_for_a_bomb(tmp_path):
    """The shards are files on shared storage: a record written there after data-prep is checked
    again when decoded."""
    bomb = png_declaring(30000, 30000)
    write_shard(tmp_path / "part-00000.parquet", [ImageRecord(7, "x.png", 1, 1, bomb, np.zeros((0, 4), np.float32),
                                                              np.zeros(0, np.int64), np.zeros(0, bool))])
    with pytest.raises(DataError) as error:
        DetectionDataset(ShardReader(Location(tmp_path)))[0]
    assert str(error.value) == ("prepared image 7: declares 30000x30000 pixels, above data.max_image_pixels=64000000; "
                                "raise it to admit this image; run data-prep again")
