"""Data-prep: tiny VOC and COCO datasets built on the fly, plus the real BCCD when present."""
import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from pycocotools.coco import COCO
from torchvision.io import encode_jpeg

from pipeline.config import Config, ConfigError, config_from_dict
from pipeline.data import fetch as fetch_module
from pipeline.data import prep as prep_module
from pipeline.data.prep import prepare
from pipeline.data.shards import SCHEMA_VERSION, ShardReader, read_manifest
from pipeline.data.sources import VOC_CLASSES, PrepError
from pipeline.orchestration.cli import main
from tests.conftest import DATA_ROOT

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; prep still uses them.

BCCD_ROOT = DATA_ROOT


def jpeg(width: int, height: int, seed: int = 0) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    return bytes(encode_jpeg(pixels).numpy())


def voc_xml(name: str, size: tuple[int, int] | None, objects: list[tuple]) -> str:
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    objects_xml = "".join(
        f"<object><name>{cls}</name><difficult>{int(difficult)}</difficult><bndbox><xmin>{box[0]}</xmin>"
        f"<ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"
        for cls, box, difficult in objects)
    return f"<annotation><filename>{name}.jpg</filename>{size_xml}{objects_xml}</annotation>"


# name -> (width, height, objects); "b" holds one box of each kind prep must clip or drop.
VOC_IMAGES = {
    "a": (40, 30, [("dog", (2, 3, 20, 25), False), ("cat", (5, 5, 15, 15), True)]),
    "b": (40, 30, [("person", (30, 10, 50, 29), False),  # clipped at the right edge
                   ("dog", (10, 10, 10, 20), False),  # zero-size
                   ("dog", (20, 10, 12, 20), False),  # inverted
                   ("dog", (1, 1, 1.5, 9), False),  # 0.5 px wide: under min_box_size
                   ("cat", (45, 5, 60, 9), False)]),  # entirely outside
    "e": (32, 24, [("bird", (0, 0, 32, 24), False)]),
    "c": (24, 16, []),
    "d": (16, 16, [("car", (1, 2, 9, 10), False)]),
}
VOC_SPLITS = {"train": ["e", "b", "a"], "val": ["c"], "test": ["d"]}


def make_voc(root: Path, year: int = 2007, splits: dict[str, list[str]] = VOC_SPLITS) -> Path:
    base = root / "VOCdevkit" / f"VOC{year}"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for seed, (name, (width, height, objects)) in enumerate(VOC_IMAGES.items()):
        (base / "JPEGImages" / f"{name}.jpg").write_bytes(jpeg(width, height, seed + year))
        (base / "Annotations" / f"{name}.xml").write_text(voc_xml(name, (width, height), objects))
    for split, names in splits.items():
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return base


def make_config(tmp_path: Path, **data) -> Config:
    data = {"dataset": "voc2007", "root": str(tmp_path / "source"), "download": False, **data}
    return config_from_dict({"data": data, "run": {"output_dir": str(tmp_path / "runs")}})


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    return make_voc(tmp_path / "source")


def snapshot(directory: Path) -> dict[str, int]:
    return {str(path.relative_to(directory)): path.stat().st_mtime_ns for path in directory.rglob("*")}


def test_voc_round_trip_and_ground_truth(tmp_path, voc):
    result = prepare(make_config(tmp_path), progress=False)
    # Addressed by content: other inputs or settings never land in the same place.
    assert not result.reused
    assert result.directory == tmp_path / "runs" / "data" / f"voc2007-{result.manifest['input_hash'][:12]}"
    manifest = result.manifest
    assert manifest["classes"] == list(VOC_CLASSES) and manifest["schema_version"] == SCHEMA_VERSION
    train = manifest["splits"]["train"]
    assert (train["images"], train["boxes"], train["crowd_boxes"]) == (3, 4, 1)
    assert train["class_counts"]["dog"] == 1 and train["class_counts"]["person"] == 1

    reader = ShardReader(result.directory / "train")
    records = [reader.read(i) for i in range(len(reader))]
    # Image ids are positions in the sorted listing, whatever the listing's order.
    assert [(r.image_id, r.file_name) for r in records] == [(0, "a.jpg"), (1, "b.jpg"), (2, "e.jpg")]
    a = records[0]
    assert a.image == (voc / "JPEGImages" / "a.jpg").read_bytes()
    assert (a.width, a.height) == (40, 30)
    np.testing.assert_array_equal(a.boxes, np.array([[2, 3, 20, 25], [5, 5, 15, 15]], dtype=np.float32))
    assert a.boxes.dtype == np.float32 and a.class_ids.dtype == np.int64
    assert a.class_ids.tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("cat")]
    assert a.crowd.tolist() == [False, True]
    assert records[1].boxes.tolist() == [[30, 10, 40, 29]]

    ground_truth = COCO(str(result.directory / "train" / "ground_truth.json"))
    assert len(ground_truth.getImgIds()) == 3 and len(ground_truth.getAnnIds()) == 4
    assert len(ground_truth.getAnnIds(iscrowd=False)) == 3
    dog = ground_truth.loadAnns(ground_truth.getAnnIds(imgIds=[0], catIds=[VOC_CLASSES.index("dog") + 1]))
    assert dog[0]["bbox"] == [2, 3, 18, 22] and dog[0]["area"] == 18 * 22
    assert ground_truth.loadCats(1)[0]["name"] == "aeroplane"
    assert len(COCO(str(result.directory / "val" / "ground_truth.json")).getImgIds()) == 1


def test_voc0712_joins_both_years_and_tests_on_voc2007(tmp_path):
    voc07 = make_voc(tmp_path / "source", 2007, {"trainval": ["b", "a"], "test": ["d"]})
    voc12 = make_voc(tmp_path / "source", 2012, {"trainval": ["e", "a", "c"]})
    config = make_config(tmp_path, dataset="voc0712", train_split="trainval", val_split="test", test_split="test")
    result = prepare(config, progress=False)
    assert result.directory == tmp_path / "runs" / "data" / f"voc0712-{result.manifest['input_hash'][:12]}"
    assert result.manifest["classes"] == list(VOC_CLASSES)
    reader = ShardReader(result.directory / "trainval")
    records = [reader.read(i) for i in range(len(reader))]
    # Both years name an image "a": the file names keep them apart, the ids run on across years.
    assert [(r.image_id, r.file_name) for r in records] == [
        (0, "VOC2007/a.jpg"), (1, "VOC2007/b.jpg"), (2, "VOC2012/a.jpg"), (3, "VOC2012/c.jpg"), (4, "VOC2012/e.jpg")]
    assert records[0].image == (voc07 / "JPEGImages" / "a.jpg").read_bytes()
    assert records[2].image == (voc12 / "JPEGImages" / "a.jpg").read_bytes() != records[0].image
    trainval = result.manifest["splits"]["trainval"]
    assert (trainval["images"], trainval["boxes"]) == (5, 2 + 1 + 2 + 1 + 0)  # a, b of 2007; a, e, c of 2012
    assert {d["file"] for d in trainval["dropped"]} == {str(voc07 / "Annotations" / "b.xml")}
    ground_truth = COCO(str(result.directory / "trainval" / "ground_truth.json"))
    assert len({image["file_name"] for image in ground_truth.dataset["images"]}) == 5
    test = ShardReader(result.directory / "test")
    assert [test.read(i).file_name for i in range(len(test))] == ["VOC2007/d.jpg"]
    (voc12 / "ImageSets" / "Main" / "trainval.txt").unlink()
    with pytest.raises(PrepError, match="VOC2012/ImageSets/Main/trainval.txt"):
        prepare(config, progress=False)


def test_boxes_clipped_and_dropped_are_reported(tmp_path, voc):
    result = prepare(make_config(tmp_path), progress=False)
    train = result.manifest["splits"]["train"]
    # On the console too, by reason: a negative-width box used to go with exit 0 and no word.
    assert "  train: 3 images, 4 boxes, 4 dropped (1 inverted, 1 outside_image, 1 too_small, 1 zero_size), " \
           "0 images skipped" in prep_module.summary_lines(result)
    b_xml = str(voc / "Annotations" / "b.xml")
    assert train["clipped"] == [{"file": b_xml, "image": "b.jpg", "object": 0, "box": [30, 10, 50, 29],
                                 "clipped": [30, 10, 40, 29]}]
    assert [(d["file"], d["object"], d["reason"]) for d in train["dropped"]] == [
        (b_xml, 1, "zero_size"), (b_xml, 2, "inverted"), (b_xml, 3, "too_small"), (b_xml, 4, "outside_image")]


def test_xml_without_size_takes_the_image_size(tmp_path, voc):
    (voc / "Annotations" / "a.xml").write_text(voc_xml("a", None, [("dog", (2, 3, 20, 25), False)]))
    result = prepare(make_config(tmp_path), progress=False)
    assert ShardReader(result.directory / "train").read(0).width == 40


def test_coco_round_trip(tmp_path):
    folder = tmp_path / "coco"
    folder.mkdir()
    images = {10: (20, 12), 4: (16, 16)}
    for image_id, (width, height) in images.items():
        (folder / f"{image_id}.jpg").write_bytes(jpeg(width, height, image_id))
    annotations = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": w, "height": h} for i, (w, h) in images.items()],
        # Category ids neither start at 1 nor are contiguous: classes follow sorted ids.
        "categories": [{"id": 7, "name": "zebra"}, {"id": 3, "name": "apple"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [1, 2, 5, 6], "area": 20.5, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [0, 0, 30, 4], "area": 80, "iscrowd": 1},
            {"id": 3, "image_id": 4, "category_id": 3, "bbox": [2, 2, 3, 3], "iscrowd": 0},
        ],
    }
    (folder / "instances.json").write_text(json.dumps(annotations))
    config = make_config(tmp_path, dataset="coco", annotations={"train": str(folder / "instances.json")},
                         val_split="train", test_split="train")
    result = prepare(config, progress=False)
    assert result.manifest["classes"] == ["apple", "zebra"]
    reader = ShardReader(result.directory / "train")
    first, second = reader.read(0), reader.read(1)
    assert (first.image_id, second.image_id) == (4, 10)
    assert second.image == (folder / "10.jpg").read_bytes()
    assert second.boxes.tolist() == [[1, 2, 6, 8], [0, 0, 20, 4]]  # the crowd box clipped to 20 wide
    assert second.class_ids.tolist() == [1, 0] and second.crowd.tolist() == [False, True]

    ground_truth = COCO(str(result.directory / "train" / "ground_truth.json"))
    assert [c["name"] for c in ground_truth.loadCats(ground_truth.getCatIds())] == ["apple", "zebra"]
    zebra = ground_truth.loadAnns(ground_truth.getAnnIds(imgIds=[10], catIds=[7]))[0]  # the dataset's own id
    assert zebra["area"] == 20.5 and zebra["bbox"] == [1, 2, 5, 6]  # COCO's own area is kept
    assert ground_truth.loadAnns(ground_truth.getAnnIds(imgIds=[4]))[0]["area"] == 9


def test_reader_row_groups_cache_and_pickle(tmp_path, monkeypatch):
    folder = tmp_path / "coco"
    folder.mkdir()
    for i in range(70):
        (folder / f"{i}.jpg").write_bytes(jpeg(8, 8, i))
    annotations = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 8, "height": 8} for i in range(70)],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": i + 1, "image_id": i, "category_id": 1, "bbox": [0, 0, 1 + i % 7, 2]}
                        for i in range(70)],
    }
    (folder / "train.json").write_text(json.dumps(annotations))
    config = make_config(tmp_path, dataset="coco", annotations={"train": str(folder / "train.json")},
                         val_split="train", test_split="train", shard_images=40)
    result = prepare(config, progress=False)
    assert [shard["rows"] for shard in result.manifest["splits"]["train"]["shards"]] == [40, 30]

    reader = ShardReader(result.directory / "train")
    assert len(reader) == 70
    assert reader.row_groups() == [range(0, 32), range(32, 40), range(40, 70)]
    assert reader.row_group_of(33) == 1 and reader.row_group_of(69) == 2

    reads = []
    real_read = pq.ParquetFile.read_row_group

    def counted_read(self, group, **kwargs):
        reads.append(group)
        return real_read(self, group, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted_read)
    for i in reversed(range(32)):
        assert reader.read(i).boxes.tolist() == [[0, 0, 1 + i % 7, 2]]
    assert reads == [0]  # one row group read, then served from the cache
    reader.read(0).boxes[:] = -1  # a caller's in-place change must not reach the cache
    assert reader.read(0).boxes.tolist() == [[0, 0, 1, 2]]

    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read(45).image == (folder / "45.jpg").read_bytes() and clone.read(45).image_id == 45
    with pytest.raises(IndexError):
        reader.read(70)


@pytest.mark.skipif(not (BCCD_ROOT / "bccd" / "BCCD").is_dir(), reason="BCCD not in the data root")
def test_bccd(tmp_path):
    config = config_from_dict({"data": {"root": str(BCCD_ROOT), "download": False},
                               "run": {"output_dir": str(tmp_path / "runs")}})
    result = prepare(config, progress=False)
    manifest = result.manifest
    assert manifest["classes"] == ["RBC", "WBC", "Platelets"]
    splits = manifest["splits"]
    assert {name: split["images"] for name, split in splits.items()} == {"train": 205, "val": 87, "test": 72}
    dropped = [(Path(d["file"]).name, d["object"], d["reason"])
               for split in splits.values() for d in split["dropped"]]
    assert sorted(dropped) == [("BloodImage_00338.xml", 12, "zero_size"), ("BloodImage_00343.xml", 3, "zero_size")]
    assert not any(split["clipped"] or split["skipped"] for split in splits.values())
    for name, split in splits.items():
        assert sum(split["class_counts"].values()) == split["boxes"]
        ground_truth = COCO(str(result.directory / name / "ground_truth.json"))
        assert len(ground_truth.getImgIds()) == split["images"] and len(ground_truth.getAnnIds()) == split["boxes"]


def test_rerun_reuses_and_changes_reprepare(tmp_path, voc):
    config = make_config(tmp_path)
    first = prepare(config, progress=False)
    before = snapshot(Path(first.directory))
    second = prepare(config, progress=False)
    assert second.reused and second.manifest == first.manifest and snapshot(Path(first.directory)) == before

    (voc / "Annotations" / "a.xml").write_text(voc_xml("a", (40, 30), [("dog", (2, 3, 21, 25), False)]))
    changed = prepare(config, progress=False)
    assert not changed.reused and changed.manifest["input_hash"] != first.manifest["input_hash"]
    assert changed.manifest["content_hash"] != first.manifest["content_hash"]
    assert ShardReader(changed.directory / "train").read(0).boxes.tolist() == [[2, 3, 21, 25]]

    smaller = prepare(make_config(tmp_path, min_box_size=0.25), progress=False)
    assert not smaller.reused and smaller.directory != changed.directory
    shard = smaller.directory / "train" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])  # damaged output is prepared again, not reused
    assert not prepare(make_config(tmp_path, min_box_size=0.25), progress=False).reused


UNICORN = voc_xml("a", (40, 30), [("unicorn", (1, 1, 5, 5), False)])


@pytest.mark.parametrize("damage, names, problem", [
    (lambda voc: (voc / "JPEGImages" / "a.jpg").unlink(), "JPEGImages/a.jpg", "image file not found"),
    (lambda voc: (voc / "JPEGImages" / "a.jpg").write_bytes(b"not a jpeg"), "JPEGImages/a.jpg", "cannot decode"),
    (lambda voc: (voc / "Annotations" / "a.xml").write_text("<annotation><object>"), "Annotations/a.xml",
     "malformed XML"),
    (lambda voc: (voc / "Annotations" / "a.xml").unlink(), "Annotations/a.xml", "annotation file not found"),
    (lambda voc: (voc / "Annotations" / "a.xml").write_text(UNICORN),
     "Annotations/a.xml", "unknown class 'unicorn'"),
    (lambda voc: (voc / "Annotations" / "a.xml").write_text(voc_xml("a", (41, 30), [])), "Annotations/a.xml",
     "annotated size 41x30 differs"),
])
def test_bad_inputs_name_the_file(tmp_path, voc, damage, names, problem):
    damage(voc)
    with pytest.raises(PrepError, match=problem) as error:
        prepare(make_config(tmp_path), progress=False)
    assert str(voc / names) in str(error.value)


@pytest.mark.parametrize("text, problem", [
    ("{not json", "malformed json"),
    (json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "categories": [{"id": 1, "name": "a"}],
                 "annotations": [{"id": 5, "image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1]}]}),
     "image 1, annotation 5: unknown category_id 2"),
])
def test_bad_coco_json_names_the_file(tmp_path, text, problem):
    path = tmp_path / "instances.json"
    path.write_text(text)
    (tmp_path / "x.jpg").write_bytes(jpeg(4, 4))
    config = make_config(tmp_path, dataset="coco", annotations={"train": str(path)}, val_split="train",
                         test_split="train")
    with pytest.raises(PrepError, match=problem) as error:
        prepare(config, progress=False)
    assert str(path) in str(error.value)


def test_skip_bad_skips_and_reports(tmp_path, voc):
    (voc / "Annotations" / "a.xml").write_text("<annotation>")
    (voc / "JPEGImages" / "b.jpg").unlink()
    result = prepare(make_config(tmp_path, skip_bad=True), progress=False)
    train = result.manifest["splits"]["train"]
    assert train["images"] == 1 and ShardReader(result.directory / "train").read(0).file_name == "e.jpg"
    assert [(s["file"], s["image"]) for s in train["skipped"]] == [
        (str(voc / "Annotations" / "a.xml"), "a.jpg"), (str(voc / "JPEGImages" / "b.jpg"), "b.jpg")]
    assert "malformed XML" in train["skipped"][0]["reason"]
    assert train["skipped"][1]["reason"] == "image file not found"


def test_failure_mid_write_keeps_the_previous_dataset(tmp_path, voc, monkeypatch):
    config = make_config(tmp_path, shard_images=1)
    previous = prepare(config, progress=False)
    before = {path: path.read_bytes() for path in Path(previous.directory).rglob("*") if path.is_file()}

    real_write = prep_module.write_shard
    calls = []

    def fail_after_first(path, records):
        calls.append(path)
        if len(calls) > 1:
            raise RuntimeError("disk full")
        real_write(path, records)

    monkeypatch.setattr(prep_module, "write_shard", fail_after_first)
    (voc / "Annotations" / "e.xml").write_text(voc_xml("e", (32, 24), []))
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(config, progress=False)
    assert {path: path.read_bytes() for path in Path(previous.directory).rglob("*") if path.is_file()} == before
    assert [p.name for p in Path(previous.directory).parent.iterdir()] == [previous.directory.name]  # no staging left
    assert read_manifest(previous.directory) == previous.manifest


def test_unknown_split_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data.test_split: dataset 'voc2012' has no split 'test'; "
                                          r"available: train, val, trainval"):
        prepare(make_config(tmp_path, dataset="voc2012"), progress=False)


def test_missing_dataset_without_download(tmp_path):
    config = make_config(tmp_path, dataset="bccd")
    with pytest.raises(PrepError, match="data.download=true") as error:
        prepare(config, progress=False)
    message = str(error.value)
    assert str(tmp_path / "source" / "bccd" / "BCCD" / "ImageSets" / "Main" / "train.txt") in message
    assert fetch_module.BCCD.url in message


# What each (faked) archive holds; BCCD's is the real dataset, which its digest pins.
ARCHIVE_CONTENTS = {
    fetch_module.VOC2007_TRAINVAL.url: [f"VOCdevkit/VOC2007/ImageSets/Main/{s}.txt"
                                        for s in ("train", "val", "trainval")],
    fetch_module.VOC2007_TEST.url: ["VOCdevkit/VOC2007/ImageSets/Main/test.txt"],
    fetch_module.VOC2012_TRAINVAL.url: [f"VOCdevkit/VOC2012/ImageSets/Main/{s}.txt" for s in ("train", "trainval")],
    fetch_module.COCO2017_ANNOTATIONS.url: [f"annotations/instances_{s}2017.json" for s in ("train", "val")],
    fetch_module.COCO2017_IMAGES["train"].url: ["train2017/0.jpg"],
    fetch_module.COCO2017_IMAGES["val"].url: ["val2017/0.jpg"],
}


def write_archive(path: Path, members: dict[str, bytes]) -> None:
    """A zip or tar (by `path`'s suffix) holding `members`."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as archive:
            for name, content in members.items():
                archive.writestr(name, content)
        return
    with tarfile.open(path, "w") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))


def bccd_members(folder: str) -> dict[str, bytes]:
    """The shipped BCCD as GitHub's zip of the pinned commit holds it."""
    source = BCCD_ROOT / "bccd" / "BCCD"
    return {f"{folder}/BCCD/{path.relative_to(source).as_posix()}": path.read_bytes()
            for path in sorted(source.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("dataset, splits, urls", [
    ("bccd", ["train", "val", "test"], [fetch_module.BCCD.url]),
    ("voc2007", ["train", "val", "test"], [fetch_module.VOC2007_TRAINVAL.url, fetch_module.VOC2007_TEST.url]),
    ("voc2007", ["train"], [fetch_module.VOC2007_TRAINVAL.url]),
    ("voc0712", ["trainval", "test"], [fetch_module.VOC2007_TRAINVAL.url, fetch_module.VOC2012_TRAINVAL.url,
                                       fetch_module.VOC2007_TEST.url]),
    ("coco2017", ["train", "val"], [fetch_module.COCO2017_ANNOTATIONS.url,
                                    *(fetch_module.COCO2017_IMAGES[s].url for s in ("train", "val"))]),
])
def test_fetch_downloads_what_the_splits_need(tmp_path, monkeypatch, dataset, splits, urls):
    if dataset == "bccd" and not (BCCD_ROOT / "bccd" / "BCCD").is_dir():
        pytest.skip("BCCD not in the data root")
    calls = []

    def fake_download(archive, path):
        calls.append(archive.url)
        members = bccd_members("BCCD_Dataset-d272fb1") if archive is fetch_module.BCCD else \
            {name: b"" for name in ARCHIVE_CONTENTS[archive.url]}
        write_archive(path, members)

    monkeypatch.setattr(fetch_module, "download", fake_download)
    data = make_config(tmp_path, dataset=dataset, download=True).data
    fetch_module.fetch(data, splits)
    assert calls == urls
    fetch_module.fetch(data, splits)
    assert calls == urls  # present now: nothing fetched again
    if dataset == "bccd":
        assert sorted(p.name for p in (tmp_path / "source" / "bccd").iterdir()) == ["BCCD"]


@pytest.mark.parametrize("failure", [URLError("[Errno -3] Temporary failure in name resolution"),
                                     ConnectionResetError(104, "Connection reset by peer"), TimeoutError("timed out")])
def test_offline_download_is_one_line_and_leaves_nothing_behind(tmp_path, monkeypatch, capsys, failure):
    def offline(archive, path):
        path.write_text("half")
        raise failure

    monkeypatch.setattr(fetch_module, "download", offline)
    root = tmp_path / "data"
    assert main(["prep", f"data.root={root}", f"run.output_dir={tmp_path / 'runs'}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("aploss prep: error: ")
    assert f"could not download {fetch_module.BCCD.url}" in error[0] and "APLOSS_DATA_ROOT" in error[0]
    assert not root.exists()
