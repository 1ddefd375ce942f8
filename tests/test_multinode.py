"""The pipeline on a Ray cluster of a head and two worker nodes (separate raylets, as on a real
cluster), with the raw data and every output only in an S3 server: data-prep on Ray Data,
2-worker training with one worker per node, validation on both workers, evaluation on Ray; then
the same run losing a whole worker node mid-training, which resumes on the node left and ends
with the uninterrupted run's weights.

The raylets share this machine's disk, so the raw dataset is deleted here once uploaded and the
run writes nothing here: whatever the workers read, they read from the store. The driver is a
process of its own (tests/multinode_scenario.py), as a user's is."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from pipeline.data.synthetic import write_synthetic_coco
from pipeline.storage import Location
from pipeline.training.journal import read_journal
from tests.object_store import TEST_BUCKET as BUCKET

PROJECT = Path(__file__).resolve().parents[1]


def placements(output: Location) -> list[dict]:
    return sorted((json.loads(path.read_text()) for path in (output / "placement").files()),
                  key=lambda record: (record["step"], record["rank"]))


def driver_environment(s3_server, cache: Path) -> dict[str, str]:
    """This process's environment without the Ray settings an earlier in-process session left in
    it (RAY_AUTH_MODE), with the store's and no usage poller (it queries a Prometheus that is
    not there)."""
    kept = {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}
    return {**kept, **s3_server.environment(), "RAY_USAGE_STATS_ENABLED": "0", "XDG_CACHE_HOME": str(cache),
            "PYTHONPATH": str(PROJECT)}


def test_a_run_across_nodes_survives_losing_one(s3_server, tmp_path, monkeypatch):
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    write_synthetic_coco(tmp_path / "raw", {"train": 8, "val": 3})
    raw = f"{BUCKET}/{tmp_path.name}/raw"
    pafs.copy_files(str(tmp_path / "raw"), raw, destination_filesystem=s3_server.filesystem())
    for path in sorted((tmp_path / "raw").rglob("*"), reverse=True):  # no node can read it here
        path.unlink() if path.is_file() else path.rmdir()
    (tmp_path / "raw").rmdir()
    output = Location(f"s3://{BUCKET}/{tmp_path.name}/runs")
    (tmp_path / "driver-cache").mkdir()
    before = sorted(path.name for path in tmp_path.iterdir())

    driver = subprocess.run(
        [sys.executable, "-m", "tests.multinode_scenario", f"s3://{raw}", str(output)], cwd=tmp_path,
        env=driver_environment(s3_server, tmp_path / "driver-cache"), capture_output=True, text=True, timeout=900)
    assert driver.returncode == 0, driver.stderr[-4000:]
    result = json.loads(driver.stdout.strip().splitlines()[-1])
    first_node, _ = result["nodes"]

    first = placements(output / "clean")
    assert [record["rank"] for record in first] == [0, 1]
    assert len({record["node"] for record in first}) == 2 and result["head"] not in {r["node"] for r in first}
    clean_journal = read_journal(output / "clean" / "clean" / "train" / "metrics.jsonl")
    assert [record["step"] for record in clean_journal if "val_ap" in record] == [5, 10]

    assert result["removed"], "the node was never removed"
    attempts = placements(output / "lost-node")
    resumed = [record for record in attempts if record["step"] > 1]
    assert resumed and {record["node"] for record in resumed} == {first_node}  # the node left
    records = read_journal(output / "lost-node" / "lost-node" / "train" / "metrics.jsonl")
    assert [record["step"] for record in records if "loss" in record] == list(range(1, 11))  # each step once
    assert [record["step"] for record in records if "val_ap" in record] == [5, 10]

    clean_weights = torch.load(_fetch(Location(result["clean"]["model"]), tmp_path), weights_only=False)["model"]
    lost_weights = torch.load(_fetch(Location(result["lost"]["model"]), tmp_path), weights_only=False)["model"]
    for key, value in clean_weights.items():
        torch.testing.assert_close(lost_weights[key], value, rtol=1e-4, atol=2e-6,
                                   msg=lambda m, key=key: f"{key}: {m}")
    clean_ap, lost_ap = (result[run]["metrics"]["metrics"]["AP"] for run in ("clean", "lost"))
    assert lost_ap == pytest.approx(clean_ap, abs=1e-3)

    assert sorted(path.name for path in tmp_path.iterdir() if path.name != "fetched") == sorted(before)
    assert not [path for path in (tmp_path / "driver-cache").rglob("*.png")]  # the images stayed in the store


def _fetch(model: Location, tmp_path: Path) -> str:
    target = tmp_path / "fetched" / f"{model.parent.name}.pt"
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(model.read_bytes())
    return str(target)
