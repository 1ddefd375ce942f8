"""The environment of this process, changed for a while: the processes Ray starts (raylets,
workers) take the environment of the process that starts them, and a local ray.init() changes
this one's (RAY_AUTH_MODE) for good."""
import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator


@contextlib.contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """This process's environment with `variables` set, restored as it was after."""
    saved = dict(os.environ)
    os.environ.update(variables)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def kill_session(process: subprocess.Popen) -> None:
    """kill -9 of a process started with start_new_session and of everything it started (Ray's
    own processes included)."""
    session = process.pid
    listing = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        pid, sid = (int(value) for value in line.split())
        if sid == session:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    process.wait()
