"""Data-prep on Ray Data (data.prep_workers > 0) writes what one process writes, file for file:
the same input hash, shards (rows, order, row groups), ground truth and manifest, with bad
images skipped or refused alike; a data root in an object store is read there, never copied."""
import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray

from pipeline.config import Config, config_from_dict
from pipeline.data import prep as prep_module
from pipeline.data import prep_on_ray
from pipeline.data.prep import prepare
from pipeline.data.sources import PrepError
from pipeline.storage import Location
from tests.conftest import DATA_ROOT
from tests.object_store import TEST_BUCKET as BUCKET
from tests.process_environment import environment
from tests.test_prep import make_voc

_spec = importlib.util.spec_from_file_location("synthetic_coco", Path(__file__).parents[1] / "benchmarks" /
                                               "synthetic_coco.py")
synthetic_coco = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synthetic_coco)


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A local Ray instance whose workers reach the S3 server."""
    with environment(s3_server.environment()):
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield
        ray.shutdown()


def placed(config: Config, output_dir: str | Path, prep_workers: int = 0) -> Config:
    return dataclasses.replace(config, data=dataclasses.replace(config.data, prep_workers=prep_workers),
                               run=dataclasses.replace(config.run, output_dir=str(output_dir)))


def on_ray(config: Config, output_dir: str | Path) -> Config:
    return placed(config, output_dir, prep_workers=2)


def files(directory: Location) -> dict[str, bytes]:
    if directory.remote:
        return {f"{split}{file.name}": file.read_bytes() for split in ("", "train/", "val/", "test/")
                for file in (directory / split if split else directory).files()}
    root = directory.local()
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def assert_same_prep(config: Config, tmp_path: Path) -> dict:
    here = prepare(placed(config, tmp_path / "here"), progress=False)
    there = prepare(on_ray(config, tmp_path / "on-ray"), progress=False)
    assert there.directory.name == here.directory.name  # the same input hash
    assert there.manifest == here.manifest
    assert files(there.directory) == files(here.directory)
    return here.manifest


def test_bccd_on_ray_is_the_single_process_prep(cluster, tmp_path):
    config = config_from_dict({"data": {"root": str(DATA_ROOT), "download": False, "shard_images": 48}})
    manifest = assert_same_prep(config, tmp_path)
    assert sum(split["images"] for split in manifest["splits"].values()) == 364


def coco_config(root: Path, **data) -> Config:
    return config_from_dict({"data": {
        "dataset": "coco", "root": str(root), "download": False, "test_split": "val",
        "annotations": {"train": "annotations/instances_train.json", "val": "annotations/instances_val.json"},
        "images": {"train": "train", "val": "val"}, **data}})


def test_synthetic_coco_with_bad_images_on_ray_is_the_single_process_prep(cluster, tmp_path, monkeypatch):
    """Skipped images shift every later image's shard and row group: the plan must follow, across
    the windows of images that Ray checks and writes at a time."""
    monkeypatch.setattr(prep_module, "WINDOW_IMAGES", 20)
    root = tmp_path / "coco"
    layout = synthetic_coco.write_synthetic_coco_scale(root, {"train": 90, "val": 30}, seed=3)
    train_images = sorted(layout["train"][1].iterdir())
    train_images[4].write_bytes(train_images[4].read_bytes()[:200])  # truncated
    train_images[40].unlink()
    train_images[41].write_bytes(b"not an image")
    manifest = assert_same_prep(coco_config(root, skip_bad=True, shard_images=8), tmp_path / "skip")
    train = manifest["splits"]["train"]
    assert len(train["skipped"]) == 3 and train["images"] == 87 and train["crowd_boxes"] > 0
    assert [shard["rows"] for shard in train["shards"]] == [8] * 10 + [7]

    with pytest.raises(PrepError) as here:
        prepare(placed(coco_config(root), tmp_path / "a"), progress=False)
    with pytest.raises(PrepError) as there:
        prepare(on_ray(coco_config(root), tmp_path / "b"), progress=False)
    assert str(there.value) == str(here.value) and "cannot decode image" in str(here.value)


def test_voc_with_clipped_dropped_and_skipped_on_ray_is_the_single_process_prep(cluster, tmp_path):
    voc = make_voc(tmp_path / "source")
    (voc / "Annotations" / "a.xml").write_text("<annotation>")  # refused when its annotation is read
    config = config_from_dict({"data": {"dataset": "voc2007", "root": str(tmp_path / "source"), "download": False,
                                        "skip_bad": True, "shard_images": 1}})
    manifest = assert_same_prep(config, tmp_path)
    train = manifest["splits"]["train"]
    assert train["dropped"] and train["clipped"] and train["skipped"][0]["image"] == "a.jpg"


def test_a_data_root_in_s3_is_read_there_by_the_tasks(cluster, s3_server, tmp_path, monkeypatch):
    """The raw images stay in the store: data-prep's machine copies the annotations only, and the
    result (input hash included) is the one a single process makes from its full copy."""
    synthetic_coco.write_synthetic_coco_scale(tmp_path / "raw", {"train": 20, "val": 6}, seed=1)
    raw = f"{BUCKET}/{tmp_path.name}/raw"
    pafs.copy_files(str(tmp_path / "raw"), raw, destination_filesystem=s3_server.filesystem())
    config = coco_config(Path(), shard_images=8)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, root=f"s3://{raw}"))

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "machine-1"))
    here = prepare(placed(config, tmp_path / "here"), progress=False)
    assert len(list((tmp_path / "machine-1").rglob("*.jpg"))) == 26

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "machine-2"))
    there = prepare(on_ray(config, f"s3://{BUCKET}/{tmp_path.name}/runs"), progress=False)
    assert there.directory.remote and there.directory.name == here.directory.name
    assert there.manifest == here.manifest and files(there.directory) == files(here.directory)
    assert not list((tmp_path / "machine-2").rglob("*.jpg"))
    assert sorted(path.name for path in (tmp_path / "machine-2").rglob("*.json")) == [
        "instances_train.json", "instances_val.json"]
    assert prepare(on_ray(config, f"s3://{BUCKET}/{tmp_path.name}/runs"), progress=False).reused


def test_aploss_prep_on_ray_from_the_command_line(tmp_path):
    """`aploss prep data.prep_workers=2` starts a Ray instance of its own and prepares what one
    process prepares."""
    synthetic_coco.write_synthetic_coco_scale(tmp_path / "coco", {"train": 12, "val": 4}, seed=2)
    arguments = ["data.dataset=coco", f"data.root={tmp_path / 'coco'}", "data.download=false", "data.test_split=val",
                 "data.annotations={train: annotations/instances_train.json, val: annotations/instances_val.json}",
                 "data.images={train: train, val: val}"]
    here = prepare(placed(coco_config(tmp_path / "coco"), tmp_path / "here"), progress=False)
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    environment.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "pipeline.orchestration.cli", "prep", *arguments,
                           "data.prep_workers=2", f"run.output_dir={tmp_path / 'on-ray'}"],
                          capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "started a local Ray instance" in done.stdout and "prepared coco (written)" in done.stdout
    there = Location(tmp_path / "on-ray" / "data" / here.directory.name)
    assert files(there) == files(here.directory)


def test_an_image_changed_between_the_passes_is_refused_in_one_line(cluster, tmp_path, monkeypatch):
    """The write pass reads each image again: bytes other than those checked stop data-prep with
    the file named, and nothing is left behind."""
    layout = synthetic_coco.write_synthetic_coco_scale(tmp_path / "coco", {"train": 12, "val": 4}, seed=4)
    changed = sorted(layout["train"][1].iterdir())[5]
    real_check = prep_on_ray.check_images

    def check_then_change(*args, **kwargs):
        checked = list(real_check(*args, **kwargs))
        changed.write_bytes(changed.read_bytes() + b"appended")
        yield from checked

    monkeypatch.setattr(prep_on_ray, "check_images", check_then_change)
    with pytest.raises(PrepError, match="changed while data-prep ran") as error:
        prepare(on_ray(coco_config(tmp_path / "coco"), tmp_path / "runs"), progress=False)
    assert str(changed) in str(error.value) and len(str(error.value).splitlines()) == 1
    assert not [path for path in (tmp_path / "runs" / "data").iterdir()]  # no staging, no half-written data
