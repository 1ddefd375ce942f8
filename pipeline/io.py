"""Atomic file writes: a reader (or a crashed writer) never sees a half-written file, locally or
in an object store (`pipeline.storage`)."""
import json
import os
from typing import Any

from pipeline.redaction import redact_tree
from pipeline.storage import Location


def write_bytes_atomic(data: bytes, path: "str | os.PathLike | Location") -> None:
    Location(path).write_bytes(data)


def write_json_atomic(obj: Any, path: "str | os.PathLike | Location") -> None:
    """Write `obj` as indented JSON to `path` atomically; a record never holds credentials."""
    write_bytes_atomic(json.dumps(redact_tree(obj), indent=2).encode(), path)
