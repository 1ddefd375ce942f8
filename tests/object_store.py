"""An S3-compatible server on loopback (moto's server mode) for the tests of object storage."""
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pyarrow.fs as pafs

from tests.mlflow_server import free_port, wait_for

TEST_BUCKET = "aploss-test"
# Credentials the server accepts (moto takes any); the variables are the standard AWS ones.
S3_VARIABLES = {"AWS_ACCESS_KEY_ID": "aploss-test", "AWS_SECRET_ACCESS_KEY": "aploss-test-secret",
                "AWS_REGION": "us-east-1"}


class S3Server:
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(f"{self.endpoint}/moto-api/", 60, "moto server")

    def environment(self) -> dict[str, str]:
        return {**S3_VARIABLES, "AWS_ENDPOINT_URL": self.endpoint}

    def filesystem(self) -> pafs.S3FileSystem:
        """The server's store, opened apart from the code under test."""
        return pafs.S3FileSystem(endpoint_override=self.endpoint, access_key=S3_VARIABLES["AWS_ACCESS_KEY_ID"],
                                 secret_key=S3_VARIABLES["AWS_SECRET_ACCESS_KEY"], region=S3_VARIABLES["AWS_REGION"],
                                 allow_bucket_creation=True)

    def create_bucket(self, name: str) -> None:
        self.filesystem().create_dir(name)

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None


@contextlib.contextmanager
def running_s3(bucket: str) -> Iterator[S3Server]:
    """A server with `bucket` in it, stopped after."""
    server = S3Server()
    server.start()
    try:
        server.create_bucket(bucket)
        yield server
    finally:
        server.stop()
