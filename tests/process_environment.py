"""The environment of this process, changed for a while: the processes Ray starts (raylets,
workers) take the environment of the process that starts them, and a local ray.init() changes
this one's (RAY_AUTH_MODE) for good."""
import contextlib
import os
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
