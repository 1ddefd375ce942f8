"""Data-prep treats a dataset as untrusted input: names stay inside their folders, images are
bounded by their declared size before decoding, annotation files by their size before reading,
and VOC XML may declare no entities."""
import json
import os
import re
import struct
import time
import warnings
import zlib
from pathlib import Path

import pytest
import torch
import torchvision.io
import yaml
from PIL import Image
from torchvision.io import write_png

from pipeline.config import Config, config_from_dict
from pipeline.data import prep as prep_module
from pipeline.data.prep import prepare
from pipeline.data.sources import PrepError
from pipeline.data.synthetic import write_synthetic_coco
from pipeline.orchestration.cli import main
from tests.test_prep import jpeg, make_config, make_voc, voc_xml

FIRST = 1000  # the id write_synthetic_coco gives a split's first image


def coco_data(tmp_path: Path, **data) -> dict:
    return {"data": {"dataset": "coco", "root": str(tmp_path / "data"), "annotations": {"train": "train.json"},
                     "images": {"train": "train"}, "val_split": "train", "test_split": "train", "download": False,
                     **data},
            "run": {"output_dir": str(tmp_path / "runs")}}


def coco_config(tmp_path: Path, **data) -> Config:
    return config_from_dict(coco_data(tmp_path, **data))


def set_file_name(json_path: Path, image_id: int, file_name: str) -> None:
    coco = json.loads(json_path.read_text())
    next(image for image in coco["images"] if image["id"] == image_id)["file_name"] = file_name
    json_path.write_text(json.dumps(coco))


def shard_bytes(directory: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(Path(directory).rglob("*.parquet")))


@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A 3-image COCO split and, outside its folders, a valid PNG no dataset name may reach."""
    json_path, image_dir = write_synthetic_coco(tmp_path / "data", {"train": 3})["train"]
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    write_png(torch.full((3, 128, 128), 7, dtype=torch.uint8), str(secret))
    return json_path, image_dir, secret


def escaping_name(case: str, image_dir: Path, secret: Path) -> str:
    """A file_name that reaches `secret` from `image_dir`, in one of three ways."""
    if case == "dotdot":
        return "../../outside/secret.png"
    if case == "absolute":
        return str(secret)
    (image_dir / "link.png").symlink_to(secret)
    return "link.png"


ESCAPES = {"dotdot": "escapes the image folder", "absolute": "is an absolute path, outside the image folder",
           "symlink": "resolves to"}


@pytest.mark.parametrize("case", ESCAPES)
def test_escaping_file_name_is_an_error_naming_it(tmp_path, coco, case):
    json_path, image_dir, secret = coco
    name = escaping_name(case, image_dir, secret)
    set_file_name(json_path, FIRST, name)
    with pytest.raises(PrepError) as error:
        prepare(coco_config(tmp_path), progress=False)
    message = str(error.value)
    assert message.startswith(f"{json_path}: image {FIRST}: file_name {name!r} {ESCAPES[case]}")
    assert str(image_dir) in message and "\n" not in message


@pytest.mark.parametrize("case", ESCAPES)
def test_escaping_file_name_from_the_cli_is_one_line_and_exit_2(tmp_path, coco, capsys, case):
    json_path, image_dir, secret = coco
    set_file_name(json_path, FIRST, escaping_name(case, image_dir, secret))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(coco_data(tmp_path)))
    assert main(["prep", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("aploss prep")]
    assert len(errors) == 1 and "Traceback" not in err  # the rest is the progress bar
    assert errors[0].startswith(f"aploss prep: error: {json_path}: image {FIRST}: file_name ")
    assert ESCAPES[case] in errors[0]


@pytest.mark.parametrize("case", ESCAPES)
def test_skip_bad_skips_an_escaping_file_name_and_never_reads_it(tmp_path, coco, case):
    json_path, image_dir, secret = coco
    name = escaping_name(case, image_dir, secret)
    set_file_name(json_path, FIRST, name)
    result = prepare(coco_config(tmp_path, skip_bad=True), progress=False)
    train = result.manifest["splits"]["train"]
    assert train["images"] == 2
    assert [(s["file"], s["image"]) for s in train["skipped"]] == [(str(json_path), name)]
    assert ESCAPES[case] in train["skipped"][0]["reason"]
    assert secret.read_bytes() not in shard_bytes(result.directory)  # shards are uncompressed


def test_links_inside_the_folder_are_kept(tmp_path, coco):
    """A data root or image folder that is itself a link, or a link to another image of the
    folder, stays inside."""
    json_path, image_dir, _ = coco
    elsewhere = tmp_path / "big-disk" / "train"
    elsewhere.parent.mkdir()
    image_dir.rename(elsewhere)
    image_dir.symlink_to(elsewhere)
    (elsewhere / "again.png").symlink_to(elsewhere / "train-001.png")
    set_file_name(json_path, FIRST, "again.png")
    assert prepare(coco_config(tmp_path), progress=False).manifest["splits"]["train"]["images"] == 3


def test_voc_listing_id_with_dotdot_is_refused_and_skipped(tmp_path):
    base = make_voc(tmp_path / "source")
    # What the id reaches, from either folder, is a valid image and annotation.
    (tmp_path / "source" / "x.jpg").write_bytes(jpeg(40, 30))
    (tmp_path / "source" / "x.xml").write_text(voc_xml("x", (40, 30), [("dog", (2, 3, 20, 25), False)]))
    listing = base / "ImageSets" / "Main" / "train.txt"
    listing.write_text("a\n../../../x\ne\n")
    with pytest.raises(PrepError) as error:
        prepare(make_config(tmp_path), progress=False)
    assert str(error.value).startswith(f"{listing}: image id '../../../x': '../../../x.jpg' escapes the image folder "
                                       f"{base / 'JPEGImages'}")
    result = prepare(make_config(tmp_path, skip_bad=True), progress=False)
    train = result.manifest["splits"]["train"]
    assert train["images"] == 2
    assert [(s["file"], s["image"]) for s in train["skipped"]] == [(str(listing), "../../../x.jpg")]
    assert (tmp_path / "source" / "x.jpg").read_bytes() not in shard_bytes(result.directory)


def test_voc_xml_linked_outside_is_refused_unread(tmp_path, monkeypatch):
    base = make_voc(tmp_path / "source")
    outside = tmp_path / "outside.xml"
    outside.write_text(voc_xml("a", (40, 30), []))
    (base / "Annotations" / "a.xml").unlink()
    (base / "Annotations" / "a.xml").symlink_to(outside)
    hashed = []
    real_sha256 = prep_module.file_sha256
    monkeypatch.setattr(prep_module, "file_sha256", lambda path: hashed.append(Path(path)) or real_sha256(path))
    train = prepare(make_config(tmp_path, skip_bad=True), progress=False).manifest["splits"]["train"]
    assert [s["image"] for s in train["skipped"]] == ["a.jpg"]
    assert f"'a.xml' resolves to {outside}, outside the annotation folder" in train["skipped"][0]["reason"]
    assert base / "Annotations" / "a.xml" not in hashed  # not even read into the input hash


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height 8-bit grey pixels, followed by only a few
    rows of data: a few hundred bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


# 30000x30000 is above Pillow's own refusal threshold, 10000x10000 above its warning threshold.
@pytest.mark.parametrize("side", [30000, 10000])
def test_image_declaring_too_many_pixels_is_refused_undecoded(tmp_path, coco, monkeypatch, side):
    _, image_dir, _ = coco
    bomb = image_dir / "train-000.png"
    bomb.write_bytes(png_declaring(side, side))
    assert bomb.stat().st_size < 4096
    decoded = []
    real_decode = torchvision.io.decode_image  # the gate imports it where it decodes
    monkeypatch.setattr(torchvision.io, "decode_image",
                        lambda data, mode: decoded.append(len(data)) or real_decode(data, mode))
    pillow_limit = Image.MAX_IMAGE_PIXELS
    start = time.monotonic()
    with warnings.catch_warnings(), pytest.raises(PrepError) as error:
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not surface either
        prepare(coco_config(tmp_path), progress=False)
    assert time.monotonic() - start < 10
    assert str(error.value) == (f"{bomb}: declares {side}x{side} pixels, above data.max_image_pixels=64000000; "
                                "raise it to admit this image")
    assert decoded == [] and Image.MAX_IMAGE_PIXELS == pillow_limit

    train = prepare(coco_config(tmp_path, skip_bad=True), progress=False).manifest["splits"]["train"]
    assert [(s["file"], s["image"]) for s in train["skipped"]] == [(str(bomb), "train-000.png")]


def test_unreadable_header_is_an_error_without_warnings(tmp_path, coco):
    _, image_dir, _ = coco
    image = image_dir / "train-000.png"
    image.write_bytes(b"II*\x00\x08\x00\x00\x00")  # a TIFF header pointing at a directory that is not there
    with warnings.catch_warnings(), pytest.raises(PrepError) as error:
        warnings.simplefilter("error")  # Pillow warns of the corrupt TIFF on its way to giving up
        prepare(coco_config(tmp_path), progress=False)
    assert str(error.value) == (f"{image}: cannot decode image: unknown format (JPEG, PNG, GIF, WebP, BMP and TIFF "
                                "are known)")


def test_max_image_pixels_is_the_bound(tmp_path, coco):
    """The synthetic images are 128x128: admitted at exactly their pixel count, refused below."""
    assert prepare(coco_config(tmp_path, max_image_pixels=128 * 128), progress=False).manifest["splits"]["train"][
        "images"] == 3
    with pytest.raises(PrepError, match=r"declares 128x128 pixels, above data.max_image_pixels=16383"):
        prepare(coco_config(tmp_path, max_image_pixels=128 * 128 - 1), progress=False)


def test_images_of_several_frames_are_refused(tmp_path, coco):
    """Every frame of an animation declares its own size; a detector takes one picture."""
    json_path, image_dir, _ = coco
    frames = [Image.new("RGB", (128, 128), (50 * i, 0, 0)) for i in range(3)]
    frames[0].save(image_dir / "anim.gif", save_all=True, append_images=frames[1:])
    set_file_name(json_path, FIRST, "anim.gif")
    with pytest.raises(PrepError) as error:
        prepare(coco_config(tmp_path), progress=False)
    assert str(error.value) == (f"{image_dir / 'anim.gif'}: holds several frames (GIF animation or pages); a "
                                "detector takes one picture: save the frame you want as PNG or JPEG")


def test_annotation_json_above_the_limit_is_refused(tmp_path, coco):
    json_path, _, _ = coco
    limit = json_path.stat().st_size / 2**20 / 2
    # Even with skip_bad: without its json a split has no image to skip.
    with pytest.raises(PrepError) as error:
        prepare(coco_config(tmp_path, max_annotation_mb=limit, skip_bad=True), progress=False)
    assert str(error.value) == (f"{json_path}: annotation file of 0.0 MB is above data.max_annotation_mb={limit:g}; "
                                "raise it to read this file")


def test_voc_xml_above_the_limit_is_refused_and_skipped(tmp_path):
    base = make_voc(tmp_path / "source")
    big = base / "Annotations" / "a.xml"
    big.write_text(voc_xml("a", (40, 30), []).replace("</annotation>", f"<!--{'x' * 300_000}--></annotation>"))
    with pytest.raises(PrepError, match=r"annotation file of 0.3 MB is above data.max_annotation_mb=0.25") as error:
        prepare(make_config(tmp_path, max_annotation_mb=0.25), progress=False)
    assert str(error.value).startswith(f"{big}: ")
    train = prepare(make_config(tmp_path, max_annotation_mb=0.25, skip_bad=True), progress=False
                    ).manifest["splits"]["train"]
    assert [(s["file"], s["image"]) for s in train["skipped"]] == [(str(big), "a.jpg")]


LAUGHS = "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10))
BILLION_LAUGHS = (f'<?xml version="1.0"?><!DOCTYPE annotation [<!ENTITY lol0 "lol">{LAUGHS}]>'
                  "<annotation><filename>&lol9;</filename></annotation>")
# Harmless by size, but an entity all the same: refused, not expanded.
ONE_ENTITY = voc_xml("a", (40, 30), [("&cls;", (2, 3, 20, 25), False)]).replace(
    "<annotation>", '<!DOCTYPE annotation [<!ENTITY cls "dog">]><annotation>')


@pytest.mark.parametrize("text", [BILLION_LAUGHS, ONE_ENTITY], ids=["billion-laughs", "one-entity"])
def test_xml_entities_are_refused(tmp_path, text):
    base = make_voc(tmp_path / "source")
    xml = base / "Annotations" / "a.xml"
    xml.write_text(text)
    start = time.monotonic()
    with pytest.raises(PrepError, match="entity declarations are not allowed") as error:
        prepare(make_config(tmp_path), progress=False)
    assert time.monotonic() - start < 10
    assert str(error.value).startswith(f"{xml}: ")
    train = prepare(make_config(tmp_path, skip_bad=True), progress=False).manifest["splits"]["train"]
    assert [(s["file"], s["image"]) for s in train["skipped"]] == [(str(xml), "a.jpg")]


@pytest.mark.parametrize("key, value, problem", [
    ("max_image_pixels", 0, "data.max_image_pixels: must be >= 1, got 0"),
    ("max_annotation_mb", 0, "data.max_annotation_mb: must be > 0, got 0.0"),
])
def test_limits_are_validated(key, value, problem):
    with pytest.raises(ValueError, match=problem):
        config_from_dict({"data": {key: value}})


def test_limits_are_part_of_the_input_hash(tmp_path, coco):
    first = prepare(coco_config(tmp_path), progress=False)
    assert first.manifest["settings"]["max_image_pixels"] == 64_000_000
    assert first.manifest["settings"]["max_annotation_mb"] == 2048
    for changed in ({"max_image_pixels": 10**8}, {"max_annotation_mb": 100}):
        assert prepare(coco_config(tmp_path, **changed), progress=False).directory != first.directory


def test_annotation_files_that_would_parse_to_gigabytes_or_overflow_are_one_line(tmp_path, coco):
    json_path, _, _ = coco
    json_path.write_text("[" + "{}," * 2_000_000 + "{}]")  # 6 MB that Python holds as 200 MB
    with pytest.raises(PrepError, match=r"malformed json: parsing it would take about 0\.\d GB, 3\d times its size"):
        prepare(coco_config(tmp_path), progress=False)
    json_path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PrepError, match="malformed json: nested too deep"):
        prepare(coco_config(tmp_path), progress=False)
    os.remove(json_path)
    os.mkfifo(json_path)
    with pytest.raises(PrepError, match="annotation file is not a regular file"):
        prepare(coco_config(tmp_path), progress=False)


@pytest.mark.parametrize("width", ["inf", "1e300", "-5"])
def test_a_voc_size_out_of_range_is_one_line(tmp_path, width):
    voc = make_voc(tmp_path / "source")
    xml = sorted((voc / "Annotations").iterdir())[0]
    xml.write_text(re.sub(r"<width>\d+</width>", f"<width>{width}</width>", xml.read_text()))
    with pytest.raises(PrepError, match=rf"{xml.name}: malformed XML: <size>"):
        prepare(make_config(tmp_path), progress=False)
