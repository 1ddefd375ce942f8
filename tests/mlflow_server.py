"""`mlflow server` on loopback for the tests that need a real tracking server."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, seconds: float, what: str) -> None:
    """Until `url` answers; RuntimeError naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not start")


class Server:
    """`mlflow server` on loopback, stopped and started again on the same port and store."""

    def __init__(self, directory: Path, port: int | None = None):
        self.directory, self.port, self.process = Path(directory), port or free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.directory / 'mlflow.db'}",
             "--default-artifact-root", str(self.directory / "artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        # A loaded 2-core machine starts it in ~10 s, at worst far slower.
        wait_for(f"{self.uri}/health", 120, "mlflow server")

    def stop(self) -> None:
        if self.process is not None:  # the server and its web workers, which hold the port
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None
