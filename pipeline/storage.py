"""Where the pipeline's files live: a local directory, or an object store named by a URI that
`pyarrow.fs` opens (`s3://bucket/prefix`, `gs://...`, `hdfs://...`).

Object stores are reached with their standard settings and nothing of this project's: for S3 the
AWS variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` for
an S3-compatible server), which `pyarrow.fs.FileSystem.from_uri` reads. A `Location` pickles as
its address alone, so credentials never travel with it: each process opens the store itself.
"""
import fnmatch
import os
import posixpath
import re
import shutil
import stat
import time
import uuid
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from pipeline.errors import naming_full_disk

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_STREAM_BYTES = 1 << 20
# What `_temporary` names: one left behind was cut short by a crash, and is removed on sight.
PARTIAL_FILES = ".*.tmp"


class InputRefused(ValueError):
    """A file refused before or while it is read: not a regular file, too large, or too slow.
    The message says why without the file, which the caller names."""


def is_uri(where: str | os.PathLike) -> bool:
    """Whether `where` names an object store rather than a local path (file:// is local)."""
    text = os.fspath(where)
    return bool(_URI.match(text)) and not text.startswith("file://")


def absolute(where: str | os.PathLike) -> str:
    """A local path made absolute here (it means this process's directory, not a worker's); a URI
    as it is."""
    text = os.fspath(where)
    if is_uri(text):
        return text.rstrip("/")
    if text.startswith("file://"):
        text = text[len("file://"):]
    return str(Path(text).expanduser().resolve())


# Opened once per bucket and endpoint: a row-group read should not set up a client.
_filesystems: dict[tuple[str, str, str], tuple[pafs.FileSystem, str]] = {}


def _open(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a URI's bucket and the path within it."""
    scheme, rest = uri.split("://", 1)
    root = f"{scheme}://{rest.split('/', 1)[0]}"
    key = (root, os.environ.get("AWS_ENDPOINT_URL", ""), os.environ.get("AWS_ENDPOINT_URL_S3", ""))
    if key not in _filesystems:
        try:
            _filesystems[key] = pafs.FileSystem.from_uri(root)
        except (OSError, ValueError) as error:
            raise OSError(f"{root}: cannot open this storage: {error}") from None
    filesystem, bucket = _filesystems[key]
    return filesystem, posixpath.join(bucket, rest.split("/", 1)[1]) if "/" in rest else bucket


class Location:
    """A file or directory, local or in an object store, with the few operations the pipeline
    needs on both. Object stores have no rename, but an object appears only once it is complete,
    so a write is atomic on both."""

    def __init__(self, where: "str | os.PathLike | Location") -> None:
        self.address = where.address if isinstance(where, Location) else absolute(where)

    @property
    def remote(self) -> bool:
        return is_uri(self.address)

    def __truediv__(self, part: str) -> "Location":
        joined = posixpath.join(self.address, part) if self.remote else os.path.join(self.address, part)
        return Location(joined)

    @property
    def name(self) -> str:
        return posixpath.basename(self.address) if self.remote else Path(self.address).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def parent(self) -> "Location":
        return Location(posixpath.dirname(self.address) if self.remote else str(Path(self.address).parent))

    def __str__(self) -> str:
        return self.address

    def __repr__(self) -> str:
        return f"Location({self.address!r})"

    def __fspath__(self) -> str:
        """A local location is a path to everything that takes one (open, Path, shutil)."""
        return str(self.local())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (str, os.PathLike)) and not isinstance(other, Location):
            other = Location(other)
        return isinstance(other, Location) and other.address == self.address

    def __lt__(self, other: "Location") -> bool:
        return self.address < Location(other).address

    def __hash__(self) -> int:
        return hash(self.address)

    def local(self) -> Path:
        """The local path; a remote location is a mistake of the caller's."""
        if self.remote:
            raise ValueError(f"{self.address}: a local path is needed here")
        return Path(self.address)

    def _info(self) -> pafs.FileInfo:
        filesystem, path = _open(self.address)
        return filesystem.get_file_info(path)

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File if self.remote else Path(self.address).is_file()

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory if self.remote else Path(self.address).is_dir()

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound if self.remote else Path(self.address).exists()

    def read_bytes(self) -> bytes:
        if not self.remote:
            return Path(self.address).read_bytes()
        with self.open_input() as handle:
            return handle.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_bounded(self, limit: int, timeout_s: float, settings: tuple[str, str]) -> bytes:
        """The whole file, refused before it is read when it is not a regular file (a FIFO would
        block forever, a device never end) or holds more than `limit` bytes (a sparse file of
        gigabytes costs nothing to make), and refused when reading it outlasts `timeout_s` (a
        stalled store). `settings` names the two limits in the messages."""
        size_setting, time_setting = settings
        deadline = time.monotonic() + timeout_s
        if self.remote:
            handle = self.open_input()
            size = handle.size()
        else:
            # Opened without waiting for a FIFO's writer, then checked on the open file itself.
            descriptor = os.open(self.address, os.O_RDONLY | os.O_NONBLOCK)
            status = os.fstat(descriptor)
            if not stat.S_ISREG(status.st_mode):
                os.close(descriptor)
                raise InputRefused("not a regular file")
            handle, size = os.fdopen(descriptor, "rb"), status.st_size
        with handle:
            if size > limit:
                raise InputRefused(f"{size} bytes, above {size_setting} ({limit} bytes)")
            chunks, read = [], 0
            while chunk := handle.read(min(_STREAM_BYTES, limit + 1 - read)):
                chunks.append(chunk)
                read += len(chunk)
                if read > limit:
                    raise InputRefused(f"grew past {size_setting} ({limit} bytes) while read")
                if time.monotonic() > deadline:
                    raise InputRefused(f"reading it took longer than {timeout_s:g} s ({time_setting})")
        return b"".join(chunks)

    def open_input(self):
        """A seekable binary file: a local file, or a pyarrow random-access stream."""
        if not self.remote:
            return open(self.address, "rb")
        filesystem, path = _open(self.address)
        try:
            return filesystem.open_input_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.address}: no such file") from None

    def write_bytes(self, data: bytes) -> None:
        if not self.remote:
            _write_local(data, Path(self.address))
            return
        filesystem, path = _open(self.address)
        with filesystem.open_output_stream(path) as handle:
            handle.write(data)

    def delete(self) -> None:
        """Remove this file, if it exists."""
        if not self.remote:
            Path(self.address).unlink(missing_ok=True)
            return
        filesystem, path = _open(self.address)
        try:
            filesystem.delete_file(path)
        except FileNotFoundError:
            pass

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def files(self, pattern: str = "*") -> list["Location"]:
        """The files directly in this directory whose names match `pattern`, sorted by name."""
        if not self.remote:
            return [Location(path) for path in sorted(Path(self.address).glob(pattern)) if path.is_file()]
        filesystem, path = _open(self.address)
        infos = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        names = sorted(info.base_name for info in infos
                       if info.type == pafs.FileType.File and fnmatch.fnmatch(info.base_name, pattern))
        return [self / name for name in names]

    def file_stats(self) -> dict[str, tuple[int, int]]:
        """Every file under this directory (recursively) -> (size, modification time in ns), keyed
        by its path relative to here: one listing, where a stat per file would be a request each.
        An object's time is what `mirror` gives its copy, so both stat alike."""
        if not self.remote:
            root = Path(self.address)
            return {path.relative_to(root).as_posix(): (stat.st_size, stat.st_mtime_ns)
                    for path in root.rglob("*") if path.is_file() and (stat := path.stat())}
        filesystem, path = _open(self.address)
        selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
        return {entry.path[len(path):].lstrip("/"): (entry.size, entry.mtime_ns or 0)
                for entry in filesystem.get_file_info(selector) if entry.type == pafs.FileType.File}

    def delete_tree(self) -> None:
        """Remove this directory and everything under it, if it exists."""
        if not self.remote:
            shutil.rmtree(self.address, ignore_errors=True)
            return
        filesystem, path = _open(self.address)
        if filesystem.get_file_info(path).type != pafs.FileType.NotFound:
            filesystem.delete_dir(path)

    def mirror(self, local: Path) -> None:
        """Copy this file, or this directory's files, from an object store to `local`, each
        unless it is there already with the same size and modification time; the copy takes
        the object's time, so it is the same input wherever it is made (prep hashes them)."""
        filesystem, path = _open(self.address)
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{self.address}: no such file or folder")
        if info.type == pafs.FileType.File:
            files = [(info, local)]
        else:
            selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
            files = [(entry, local / entry.path[len(path):].lstrip("/"))
                     for entry in filesystem.get_file_info(selector) if entry.type == pafs.FileType.File]
        for entry, target in files:
            stamp = entry.mtime_ns or 0
            if target.is_file() and target.stat().st_size == entry.size and target.stat().st_mtime_ns == stamp:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = _temporary(target)
            try:
                with filesystem.open_input_stream(entry.path) as reader, open(temporary, "wb") as writer:
                    shutil.copyfileobj(reader, writer, _STREAM_BYTES)
                os.utime(temporary, ns=(stamp, stamp))
                os.replace(temporary, target)
            finally:
                temporary.unlink(missing_ok=True)

    def upload(self, source: Path, last: str) -> None:
        """Copy the local directory `source` here, the file named `last` after every other one, so
        that a reader who finds `last` finds everything else complete."""
        files = sorted(path for path in source.rglob("*") if path.is_file())
        for path in sorted(files, key=lambda path: path.name == last):
            target = self / path.relative_to(source).as_posix()
            if not self.remote:
                target.local().parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target.local())
                continue
            filesystem, key = _open(target.address)
            with open(path, "rb") as reader, filesystem.open_output_stream(key) as writer:
                shutil.copyfileobj(reader, writer, _STREAM_BYTES)


def _temporary(path: Path) -> Path:
    # A unique name lets concurrent writers of the same path each rename a complete file;
    # open() rather than mkstemp() so the result gets the usual umask permissions, not 0600.
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def _write_local(data: bytes, path: Path) -> None:
    """Through a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path)
    try:
        with naming_full_disk(path), open(temporary, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# What every function that reads or writes a file of the pipeline takes: a local path or an
# object-store URI, as `Location` itself takes them (a Location made from a Location is itself).
Where = str | os.PathLike | Location
