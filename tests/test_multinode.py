"""The pipeline on a Ray cluster of a head and two worker nodes (separate raylets, as on a real
cluster), with the raw data and every output only in an S3 server: data-prep on Ray Data,
2-worker training with one worker per node, validation on both workers, evaluation on Ray; then
the same run losing a whole worker node mid-training, which resumes on the node left and ends
with the uninterrupted run's weights.

The raylets share this machine's disk, so the raw dataset is deleted here once uploaded and the
run writes nothing here: whatever the workers read, they read from the store."""
import json
import threading
import time

import pyarrow.fs as pafs
import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from pipeline.config import load_config
from pipeline.data.prep import prepare
from pipeline.evaluation.stages import evaluate_stage
from pipeline.storage import Location
from pipeline.training.journal import METRICS_FILE, read_journal
from pipeline.training.ray_train import train_distributed
from tests import ray_workers
from tests.object_store import TEST_BUCKET as BUCKET
from tests.process_environment import environment
from tests.synthetic import write_synthetic_coco



@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head that runs no work (the driver's node) and two worker nodes of 2 CPUs: either can
    take both training workers once the other is gone. Every raylet, and so every worker,
    reaches the store; Ray Data's usage poller, which queries a Prometheus that is not there,
    stays off."""
    with environment({**s3_server.environment(), "RAY_USAGE_STATS_ENABLED": "0"}):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
        ray.init(address=cluster.address, log_to_driver=False)
        ray.cloudpickle.register_pickle_by_value(ray_workers)
        yield cluster, workers
        ray.shutdown()
        cluster.shutdown()


def overrides(raw: str, output: str, name: str) -> list[str]:
    return [
        "data.dataset=coco", f"data.root={raw}", "data.annotations={train: train.json, val: val.json}",
        "data.images={train: train, val: val}", "data.test_split=val", "data.download=false",
        "data.prep_workers=2", "model.min_size=96", "model.max_size=96", "train.batch_size=4", "train.epochs=100",
        "train.max_steps=10", "train.checkpoint_every=2", "train.eval_every=5", "train.log_every=1",
        "optim.warmup_steps=2", "eval.batch_size=2", "eval.workers=2", "eval.sample_images=0", "ray.workers=2",
        "ray.placement_strategy=SPREAD", "ray.max_failures=2", f"run.output_dir={output}", f"run.name={name}"]


def placements(output: Location) -> list[dict]:
    return sorted((json.loads(path.read_text()) for path in (output / "placement").files()),
                  key=lambda record: (record["step"], record["rank"]))


def run(raw: str, output: Location, name: str) -> tuple[Location, dict]:
    config = load_config(None, overrides(raw, str(output / name), name))
    prepare(config, progress=False)
    _, model_path = train_distributed(config, train_loop=ray_workers.placement_worker)
    evaluation = evaluate_stage(config)
    return model_path, json.loads(evaluation.metrics_path.read_text())


def remove_when(cluster: Cluster, node, journal: Location, step: int, removed: list[int]) -> threading.Thread:
    """A thread that removes `node` once the journal has passed `step` (a checkpoint is behind it)."""
    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            steps = [record["step"] for record in read_journal(journal) if "loss" in record]
            if steps and max(steps) >= step:
                cluster.remove_node(node, allow_graceful=False)
                removed.append(max(steps))
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# Slow for now: in its own process it passes (about 2.5 min), but after another test's Ray session
# in the same pytest process its first Ray Data job can fail with OwnerDiedError (an object of
# the earlier session); run it alone: bash .ci/run -m slow tests/test_multinode.py
@pytest.mark.slow
def test_a_run_across_nodes_survives_losing_one(cluster, s3_server, tmp_path, monkeypatch):
    ray_cluster, (first_node, second_node) = cluster
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "driver-cache"))
    write_synthetic_coco(tmp_path / "raw", {"train": 8, "val": 3})
    raw = f"{BUCKET}/{tmp_path.name}/raw"
    pafs.copy_files(str(tmp_path / "raw"), raw, destination_filesystem=s3_server.filesystem())
    for path in sorted((tmp_path / "raw").rglob("*"), reverse=True):  # no node can read it here
        path.unlink() if path.is_file() else path.rmdir()
    (tmp_path / "raw").rmdir()
    output = Location(f"s3://{BUCKET}/{tmp_path.name}/runs")
    (tmp_path / "driver-cache").mkdir()
    before = sorted(path.name for path in tmp_path.iterdir())

    clean_model, clean_metrics = run(f"s3://{raw}", output, "clean")
    head = ray_cluster.head_node.node_id
    first = placements(output / "clean")
    assert [record["rank"] for record in first] == [0, 1]
    assert len({record["node"] for record in first}) == 2 and head not in {record["node"] for record in first}
    clean_journal = read_journal(output / "clean" / "clean" / "train" / METRICS_FILE)
    assert [record["step"] for record in clean_journal if "val_ap" in record] == [5, 10]

    removed = []
    journal = output / "lost-node" / "lost-node" / "train" / METRICS_FILE
    watcher = remove_when(ray_cluster, second_node, journal, 5, removed)
    lost_model, lost_metrics = run(f"s3://{raw}", output, "lost-node")
    watcher.join(timeout=5)
    assert removed, "the node was never removed"
    attempts = placements(output / "lost-node")
    resumed = [record for record in attempts if record["step"] > 1]
    assert resumed and {record["node"] for record in resumed} == {first_node.node_id}  # the node left
    records = read_journal(journal)
    assert [record["step"] for record in records if "loss" in record] == list(range(1, 11))  # each step once
    assert [record["step"] for record in records if "val_ap" in record] == [5, 10]

    clean_weights = torch.load(_fetch(clean_model, tmp_path), weights_only=False)["model"]
    lost_weights = torch.load(_fetch(lost_model, tmp_path), weights_only=False)["model"]
    for key, value in clean_weights.items():
        torch.testing.assert_close(lost_weights[key], value, rtol=1e-4, atol=2e-6, msg=lambda m: f"{key}: {m}")
    assert lost_metrics["metrics"]["AP"] == pytest.approx(clean_metrics["metrics"]["AP"], abs=1e-3)

    assert sorted(path.name for path in tmp_path.iterdir() if path.name != "fetched") == sorted(before)
    assert not [path for path in (tmp_path / "driver-cache").rglob("*.png")]  # the images stayed in the store


def _fetch(model: Location, tmp_path) -> str:
    target = tmp_path / "fetched" / f"{model.parent.name}.pt"
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(model.read_bytes())
    return str(target)
