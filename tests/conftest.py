import os
import subprocess
from pathlib import Path

import pytest

from tests.object_store import TEST_BUCKET, running_s3

# Where tests find the shipped datasets: $APLOSS_DATA_ROOT (CI sets it), else ../shared/datasets
# beside the project.
DATA_ROOT = Path(os.environ.get("APLOSS_DATA_ROOT") or Path(__file__).resolve().parents[2] / "shared" / "datasets")


@pytest.fixture(scope="module")
def s3_server():
    """An S3-compatible server on loopback, for a test module, with the bucket TEST_BUCKET."""
    with running_s3(TEST_BUCKET) as server:
        yield server


@pytest.fixture
def small_disk(tmp_path):
    """A 30 MB file system, which holds the prepared data and MLflow's store but no checkpoint."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("a full disk takes a small file system: mounting a 30 MB tmpfs needs root")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=False)
