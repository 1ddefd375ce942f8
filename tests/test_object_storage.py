"""Prepared data in an object store (run.output_dir=s3://...), against an S3-compatible server
on loopback: written with its manifest last, reused when intact, streamed a row group at a time."""
import dataclasses
import hashlib
import json
import pickle

import mlflow
import pyarrow.fs as pafs
import pytest
import ray

from pipeline.config import config_from_dict, load_config
from pipeline.data.bindings import split_dir
from pipeline.data.prep import locate_prepared, prepare
from pipeline.data.shards import MANIFEST, ShardReader, read_manifest
from pipeline.data.sources import PrepError
from pipeline.data.synthetic import coco_settings, write_synthetic_coco
from pipeline.errors import MissingInput
from pipeline.evaluation.coco_metrics import category_ids, load_ground_truth
from pipeline.evaluation.stages import evaluate_stage
from pipeline.orchestration.cli import main
from pipeline.orchestration.tracking.records import param_safe
from pipeline.storage import Location
from pipeline.training.journal import read_journal
from pipeline.training.ray_train import train_distributed
from tests import ray_workers
from tests.mlflow_server import Server
from tests.object_store import TEST_BUCKET as BUCKET


@pytest.fixture
def s3(s3_server, monkeypatch):
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    return s3_server


def coco_config(tmp_path, output_dir: str):
    if not (tmp_path / "data").exists():
        write_synthetic_coco(tmp_path / "data", {"train": 40, "val": 6})
    return config_from_dict({
        "data": {"dataset": "coco", "root": str(tmp_path / "data"), "download": False, "shard_images": 16,
                 "annotations": {"train": "train.json", "val": "val.json"}, "images": {"train": "train", "val": "val"},
                 "test_split": "val"},
        "run": {"output_dir": output_dir}})


def records(reader: ShardReader) -> list[tuple]:
    return [(r.image_id, r.file_name, r.image, r.boxes.tolist(), r.class_ids.tolist())
            for r in (reader.read(index) for index in range(len(reader)))]


def test_prepared_data_in_s3_reads_back_as_the_local_copy(s3, tmp_path):
    local = prepare(coco_config(tmp_path, str(tmp_path / "runs")), progress=False)
    config = coco_config(tmp_path, f"s3://{BUCKET}/{tmp_path.name}/runs")
    remote = prepare(config, progress=False)
    assert remote.directory.remote and str(remote.directory).startswith(f"s3://{BUCKET}/")
    assert remote.manifest == local.manifest and remote.directory.name == local.directory.name
    assert read_manifest(remote.directory) == local.manifest

    bound = config.with_prepared(locate_prepared(config))
    assert bound.data.prepared == str(remote.directory)
    reader = ShardReader(split_dir(bound, "train"), cache_row_groups=1)
    assert len(reader.row_groups()) == 3  # 40 images in shards of 16 (row groups of 32 within)
    # Pickled as its address (Ray workers, loader processes), then streamed from the store.
    assert records(pickle.loads(pickle.dumps(reader))) == records(ShardReader(local.directory / "train"))
    ground_truth = split_dir(bound, "val") / "ground_truth.json"
    assert category_ids(ground_truth) == category_ids(local.directory / "val" / "ground_truth.json")
    assert len(load_ground_truth(ground_truth).getImgIds()) == 6

    again = prepare(config, progress=False)  # intact: every file's sha256 checked in the store
    assert again.reused and again.manifest == remote.manifest


def test_damaged_or_unfinished_prepared_data_in_s3_is_never_used(s3, tmp_path):
    config = coco_config(tmp_path, f"s3://{BUCKET}/{tmp_path.name}/runs")
    result = prepare(config, progress=False)
    first_image = ShardReader(result.directory / "train").read(0).image
    (result.directory / "train" / "part-00000.parquet").write_bytes(b"damaged")
    again = prepare(config, progress=False)  # every file's sha256 is checked in the store
    assert not again.reused and ShardReader(result.directory / "train").read(0).image == first_image

    # An upload cut short before its manifest (written last) is no prepared data.
    s3.filesystem().delete_file(str(result.directory / MANIFEST)[len("s3://"):])
    with pytest.raises(MissingInput, match="no prepared 'coco' data"):
        locate_prepared(config)
    with pytest.raises(MissingInput, match="holds no prepared data"):
        locate_prepared(dataclasses.replace(config, data=dataclasses.replace(config.data,
                                                                            prepared=str(result.directory))))


@pytest.mark.slow  # ~1.5 min; the multi-node run keeps data and outputs only in S3 too
def test_a_run_lives_in_s3_through_a_killed_worker_and_evaluation(s3, tmp_path, monkeypatch):
    """prep -> 2 Ray Train workers, one killed and resumed from the checkpoints Ray keeps in the
    store -> evaluation: every output in s3://, nothing written in the working directory."""
    monkeypatch.chdir(tmp_path)
    write_synthetic_coco(tmp_path / "data", {"train": 8, "val": 2})  # the raw input stays local
    output = Location(f"s3://{BUCKET}/{tmp_path.name}/runs")
    config = load_config(None, [
        *coco_settings(tmp_path / 'data'), "data.download=false", "model.min_size=96",
        "model.max_size=96", "train.batch_size=4", "train.max_steps=6", "train.checkpoint_every=2",
        "optim.warmup_steps=2", "train.eval_every=1000", "train.log_every=1", "ray.workers=2", "ray.max_failures=1",
        f"run.output_dir={output}", "run.name=in-s3"])
    prepare(config, progress=False)
    (output / "kill_at").write_text("5")
    before = sorted(path.name for path in tmp_path.iterdir())
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # its workers get this process's AWS_*
    ray.cloudpickle.register_pickle_by_value(ray_workers)
    try:
        result, model_path = train_distributed(config, extra_hooks=[ray_workers.FlakyHooks])
    finally:
        ray.shutdown()
    steps = [json.loads(line) for line in (output / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s["attempt"] == 1] == [1, 2, 3, 4, 5]
    assert [s["step"] for s in steps if s["attempt"] == 2] == [5, 6]  # resumed from the step-4 checkpoint
    assert result.metrics["step"] == 6 and str(result.checkpoint.path).startswith(f"{BUCKET}/{tmp_path.name}/runs/ray/")
    assert model_path == output / "in-s3" / "model.pt" and model_path.is_file()
    # The journal, rewritten whole in the store at each record, holds each step once across the restart.
    journal = read_journal(output / "in-s3" / "train" / "metrics.jsonl")
    assert [r["step"] for r in journal if "val_ap" not in r] == [1, 2, 3, 4, 5, 6]

    evaluation = evaluate_stage(config)
    assert evaluation.metrics_path == output / "in-s3" / "eval" / "metrics.json"
    assert json.loads(evaluation.metrics_path.read_text())["metrics"]["AP"] == evaluation.result.metrics["AP"]
    assert sorted(path.name for path in tmp_path.iterdir()) == before  # no local output


def test_a_data_root_in_s3_is_copied_once_and_prepares_alike_on_every_machine(s3, tmp_path, monkeypatch):
    write_synthetic_coco(tmp_path / "data", {"train": 6, "val": 2})
    raw = f"{BUCKET}/{tmp_path.name}/raw"
    pafs.copy_files(str(tmp_path / "data"), raw, destination_filesystem=s3.filesystem())
    local = prepare(coco_config(tmp_path, str(tmp_path / "runs")), progress=False)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "machine-1"))
    config = dataclasses.replace(coco_config(tmp_path, f"s3://{BUCKET}/{tmp_path.name}/runs"), data=dataclasses.replace(
        coco_config(tmp_path, "").data, root=f"s3://{BUCKET}/{tmp_path.name}/raw"))
    first = prepare(config, progress=False)
    assert first.manifest["content_hash"] == local.manifest["content_hash"]  # the same images and boxes
    copies = sorted((tmp_path / "machine-1").rglob("*.png"))
    assert len(copies) == 8 and param_safe(config)["data.root"] == f"s3://{BUCKET}/{tmp_path.name}/raw"
    stamps = [path.stat().st_mtime_ns for path in copies]
    assert prepare(config, progress=False).reused  # nothing copied again, nothing prepared again
    assert [path.stat().st_mtime_ns for path in copies] == stamps

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "machine-2"))  # another machine's copy hashes alike
    again = prepare(config, progress=False)
    assert again.reused and again.directory == first.directory

    missing = dataclasses.replace(config, data=dataclasses.replace(config.data, root=f"s3://{BUCKET}/nothing-here"))
    with pytest.raises(PrepError, match="nothing-here/train: the data root holds no 'train' for dataset 'coco'"):
        prepare(missing, progress=False)


@pytest.mark.slow  # ~1.5 min; the run through a killed worker above covers the stages in the store
def test_the_pipeline_runs_with_its_outputs_in_s3_and_mlflow_on_a_server(s3, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_synthetic_coco(tmp_path / "data", {"train": 8, "val": 2})
    output = Location(f"s3://{BUCKET}/{tmp_path.name}/runs")
    overrides = [
        *coco_settings(tmp_path / 'data'), "model.min_size=96", "model.max_size=96",
        "train.batch_size=4", "train.max_steps=2", "train.eval_every=2", "eval.sample_images=1", "ray.workers=2",
        "ray.local_cpus=4", f"run.output_dir={output}", "run.name=s3-pipeline"]
    assert main(["pipeline", "run", *overrides]) == 2  # the default sqlite store cannot live in a bucket
    assert "tracking.uri: run.output_dir is an object store" in capsys.readouterr().err

    server = Server(tmp_path / "mlflow")
    server.start()
    try:
        local_files = sorted(path.name for path in tmp_path.iterdir())
        assert main(["pipeline", "run", *overrides, f"tracking.uri={server.uri}"]) == 0
        assert "| AP50 |" in capsys.readouterr().out
        for written in ("model.pt", "eval/metrics.json", "eval/detections.json", "train/metrics.jsonl"):
            assert (output / "s3-pipeline" / written).is_file(), written
        assert sorted(path.name for path in tmp_path.iterdir()) == local_files  # no local output

        client = mlflow.MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("aploss").experiment_id
        (parent,) = client.search_runs([experiment], "tags.`aploss.stage` = 'pipeline'")
        assert parent.info.status == "FINISHED" and "AP50" in parent.data.metrics
        assert client.get_registered_model("aploss-coco-" + hashlib.sha256(b"square\ndisc").hexdigest()[:8])
        assert main(["pipeline", "run", *overrides, f"tracking.uri={server.uri}"]) == 0  # reread from the store
        assert "skipped (already done): data-prep, train, evaluate" in capsys.readouterr().out

        tracked = [*overrides, f"tracking.uri={server.uri}"]
        assert main(["robustness", *tracked, "robustness.occlusion=[0.5]", "robustness.noise=[]",
                     "robustness.corruptions=[]", "robustness.severities=[3]"]) == 0
        assert main(["report", "--run", "s3-pipeline", *tracked]) == 0
        for written in ("s3-pipeline/robustness/robustness.json", "report/report.md", "report/ap.png"):
            assert (output / written).is_file(), written
        assert sorted(path.name for path in tmp_path.iterdir()) == local_files
    finally:
        server.stop()
        ray.shutdown()
