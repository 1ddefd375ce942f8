"""Atomic file writes: a reader (or a crashed writer) never sees a half-written file."""
import json
import os
import uuid
from pathlib import Path
from typing import Any

from pipeline.redaction import redact_tree


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name lets concurrent writers of the same path each rename a complete file;
    # open() rather than mkstemp() so the result gets the usual umask permissions, not 0600.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write `obj` as indented JSON to `path` atomically; a record never holds credentials."""
    write_bytes_atomic(json.dumps(redact_tree(obj), indent=2).encode(), path)
