"""The multi-node scenario of tests/test_multinode.py, run as its own process:

    python -m tests.multinode_scenario RAW_URI OUTPUT_URI

It starts a Ray cluster of a head and two worker nodes, runs the pipeline on it twice (a clean
run, then a run that loses a worker node mid-training) and prints one JSON line of what the test
checks. A process of its own, because a pytest process that has held an earlier Ray session can
fail its first Ray Data job on the new cluster (OwnerDiedError for an object of that session);
a user's driver starts fresh, and so does this one."""
import json
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from pipeline.config import load_config
from pipeline.data.prep import prepare
from pipeline.data.synthetic import coco_settings
from pipeline.evaluation.stages import evaluate_stage
from pipeline.storage import Location
from pipeline.training.journal import read_journal
from pipeline.training.ray_train import train_distributed
from tests import ray_workers


def overrides(raw: str, output: str, name: str) -> list[str]:
    return [
        *coco_settings(raw), "data.download=false",
        "data.prep_workers=2", "model.min_size=96", "model.max_size=96", "train.batch_size=4", "train.epochs=100",
        "train.max_steps=10", "train.checkpoint_every=2", "train.eval_every=5", "train.log_every=1",
        "optim.warmup_steps=2", "eval.batch_size=2", "eval.workers=2", "eval.sample_images=0", "ray.workers=2",
        "ray.placement_strategy=SPREAD", "ray.max_failures=2", f"run.output_dir={output}", f"run.name={name}"]


def run(raw: str, output: Location, name: str) -> dict:
    config = load_config(None, overrides(raw, str(output / name), name))
    prepare(config, progress=False)
    _, model_path = train_distributed(config, extra_hooks=[ray_workers.PlacementHooks])
    evaluation = evaluate_stage(config)
    return {"model": str(model_path), "metrics": json.loads(evaluation.metrics_path.read_text())}


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


def main(raw: str, output: Location) -> dict:
    """A head that runs no work (the driver's node) and two worker nodes of 2 CPUs: either can take
    both training workers once the other is gone."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    first, second = (cluster.add_node(num_cpus=2) for _ in range(2))
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        ray.cloudpickle.register_pickle_by_value(ray_workers)
        clean = run(raw, output, "clean")
        removed: list[int] = []
        journal = output / "lost-node" / "lost-node" / "train" / "metrics.jsonl"
        watcher = remove_when(cluster, second, journal, 5, removed)
        lost = run(raw, output, "lost-node")
        watcher.join(timeout=5)
        return {"head": cluster.head_node.node_id, "nodes": [first.node_id, second.node_id], "removed": removed,
                "clean": clean, "lost": lost}
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], Location(sys.argv[2]))))
