"""Downloading the named datasets into the data root, in the layout the sources read.

Only what the configured splits need is fetched: VOC 2007's test archive, or COCO's 18 GB of
training images, only when asked for. Every download is pinned: by its archive's published md5
(VOC, COCO) or, where the host builds the archive on demand (GitHub's zip of BCCD at a fixed
commit, whose bytes GitHub does not promise), by a SHA-256 of the files the layout reads. Its
size is bounded while it streams, and it is extracted with Python's `data` filter (tar) or the
same rules checked by hand (zip): no absolute paths, no `..`, no links out, no devices, and no
more than `MAX_EXPANSION` times the archive's size.
"""
import hashlib
import os
import posixpath
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.config import DataConfig
from pipeline.data.sources import VOC2007_FOLDER, VOC2012_FOLDER, VOC_LAYOUTS, PrepError, coco2017_paths, voc_layout
from pipeline.redaction import redact
from pipeline.storage import Location, is_uri

MB = 1 << 20
# Extracted bytes per archive byte at most: COCO's annotation zip, the most compressed of these
# archives, expands about 7 times.
MAX_EXPANSION = 16
READ_TIMEOUT_S = 60
# The files a VOC-layout folder's layout reads, which BCCD's digest covers.
_VOC_READ = ("Annotations/*.xml", "ImageSets/Main/*.txt", "JPEGImages/*.jpg")


@dataclass(frozen=True)
class Archive:
    url: str
    into: str  # folder under the data root the archive is extracted into
    max_mb: int  # its size is known: more than this is not the archive
    md5: str = ""  # the archive's published checksum
    # The part of the archive the layout wants, when the archive wraps it in other folders
    # (BCCD's GitHub zip: <repo>-<commit>/BCCD); it is moved to `into/<its name>`, the rest discarded.
    subfolder: str = ""
    content_sha256: str = ""  # of the subfolder's files the layout reads (`content_digest`)


BCCD_COMMIT = "d272fb1"
BCCD = Archive(f"https://github.com/Shenggan/BCCD_Dataset/archive/{BCCD_COMMIT}.zip", "bccd", max_mb=128,
               subfolder="BCCD", content_sha256="9358971741c3024a99b84f230651fabb7f0d28dad10b752e0732c9798b99391a")
# The Oxford mirror torchvision uses; the md5s are torchvision's.
_VOC = "https://thor.robots.ox.ac.uk/pascal/VOC"
VOC2007_TRAINVAL = Archive(f"{_VOC}/voc2007/VOCtrainval_06-Nov-2007.tar", "", 512, "c52e279531787c972589f7e41ab4ae64")
VOC2007_TEST = Archive(f"{_VOC}/voc2007/VOCtest_06-Nov-2007.tar", "", 512, "b6e924de25625d8de591ea690078ad9f")
VOC2012_TRAINVAL = Archive(f"{_VOC}/voc2012/VOCtrainval_11-May-2012.tar", "", 2200, "6cd6e144f989b92b3379bac3b3de84fd")
# The md5s COCO's download page lists.
_COCO = "https://images.cocodataset.org"
COCO2017_ANNOTATIONS = Archive(f"{_COCO}/annotations/annotations_trainval2017.zip", "coco", 280,
                               "f4bbac642086de4f52a3fdda2de5fa2c")
COCO2017_IMAGES = {"train": Archive(f"{_COCO}/zips/train2017.zip", "coco", 21000, "cced6f7f71b7629ddf16f17bbcfab6b2"),
                   "val": Archive(f"{_COCO}/zips/val2017.zip", "coco", 900, "442b8da7639aecaf257c1dceb8ba8c80")}


def _archive(folder: str, split: str) -> Archive:
    """The archive that holds a VOC-layout folder's `split`."""
    if folder == VOC2007_FOLDER:
        return VOC2007_TEST if split == "test" else VOC2007_TRAINVAL
    return VOC2012_TRAINVAL if folder == VOC2012_FOLDER else BCCD


def _requirements(dataset: str, root: Path, split: str, images: bool = True) -> list[tuple[Path, Archive]]:
    """What must exist under `root` for `split` (without `images`, for its annotations), each with
    the archive that provides it."""
    if dataset == "coco2017":
        annotations, folder = coco2017_paths(root, split)
        return [(annotations, COCO2017_ANNOTATIONS)] + ([(folder, COCO2017_IMAGES[split])] if images else [])
    return [(root / folder / "ImageSets" / "Main" / f"{split}.txt", _archive(folder, split))
            for folder in VOC_LAYOUTS[dataset].splits[split]]


def _missing(dataset: str, root: Path, splits: Sequence[str], images: bool = True) -> dict[Archive, list[Path]]:
    missing: dict[Archive, list[Path]] = {}
    for split in splits:
        for path, archive in _requirements(dataset, root, split, images):
            if not path.exists():
                missing.setdefault(archive, []).append(path)
    return missing


def _inputs(data: DataConfig, splits: Sequence[str], images: bool = True) -> list[str]:
    """The files and folders, relative to the data root, that the sources read for `splits`;
    without `images`, only what lists and annotates them."""
    if (layout := voc_layout(data)) is not None:
        folders = sorted({folder for split in splits for folder in layout.splits[split]})
        parts = ("ImageSets", "Annotations", *(("JPEGImages",) if images else ()))
        return [posixpath.join(folder, part) for folder in folders for part in parts]
    if data.dataset == "coco2017":
        pairs = [coco2017_paths(Path(), split) for split in splits]
    else:
        pairs = [(Path(data.annotations[split]), Path(data.images[split]) if split in data.images
                  else Path(data.annotations[split]).parent) for split in splits]
    return sorted({str(path) for annotations, folder in pairs for path in ((annotations, folder) if images
                                                                             else (annotations,))})


def image_folders(data: DataConfig, splits: Sequence[str]) -> list[str]:
    """The folders, relative to the data root, that hold the images of `splits`."""
    return sorted(set(_inputs(data, splits)) - set(_inputs(data, splits, images=False)))


def copy_from_store(data: DataConfig, splits: Sequence[str], images: bool = True) -> None:
    """A data root in an object store: the inputs of `splits` (without `images`, only their
    listings and annotations) copied to this machine's copy of it (`DataConfig.resolved_root`),
    each file once; what the store lacks is left missing."""
    store, local = Location(data.root_location()), data.resolved_root()
    for relative in _inputs(data, splits, images):
        if relative.startswith("/") or ".." in Path(relative).parts:
            raise PrepError(local, f"data root {store}: {relative!r} is outside it")
        try:
            (store / relative).mirror(local / relative)
        except FileNotFoundError:
            raise PrepError(store / relative, f"the data root holds no {relative!r} for dataset {data.dataset!r}; "
                                              "put the dataset there in its own layout") from None
        except OSError as error:
            raise PrepError(store / relative, f"cannot copy it here: {error}") from None


def fetch(data: DataConfig, splits: Sequence[str], images: bool = True) -> None:
    """Make sure a named dataset's `splits` are in the data root, downloading what is missing
    when data.download allows; data of your own (coco, voc) is never fetched. A data root in
    an object store is copied to this machine first: all of it, or without `images` (which
    data-prep's Ray workers read from the store) only its listings and annotations."""
    if is_uri(data.root_location()):
        copy_from_store(data, splits, images)
    if data.dataset in ("coco", "voc"):  # your own data
        return
    root = data.resolved_root()
    missing = _missing(data.dataset, root, splits, images)
    if not missing:
        return
    if not data.download:
        paths = ", ".join(str(path) for paths in missing.values() for path in paths)
        urls = ", ".join(archive.url for archive in missing)
        raise PrepError(root, f"dataset {data.dataset!r} not found: missing {paths}. Set data.download=true "
                              f"to fetch it, or download {urls} and extract it there yourself")
    for archive in missing:
        _download(archive, root)
    still = _missing(data.dataset, root, splits, images)
    if still:
        paths = ", ".join(str(path) for paths in still.values() for path in paths)
        raise PrepError(root, f"downloaded {data.dataset!r} but still missing {paths}")


def _download(archive: Archive, root: Path) -> None:
    """Download, check and extract `archive` into `root`, or raise PrepError leaving nothing
    behind: it is extracted into a scratch folder first and moved into place only once complete."""
    target = root / archive.into
    created = [folder for folder in (root, target) if not folder.exists()]
    target.mkdir(parents=True, exist_ok=True)
    try:
        # Next to the target (same filesystem), so that the parts are moved by renames.
        with tempfile.TemporaryDirectory(dir=target, prefix=".download-") as scratch:
            path = Path(scratch) / PurePosixPath(archive.url).name
            download(archive, path)
            extract(path, Path(scratch) / "x", archive)
            _place(Path(scratch) / "x", target, archive)
    except (OSError, PrepError) as error:  # offline, refused, truncated, altered or unsafe
        for folder in reversed(created):
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
        if isinstance(error, PrepError):
            raise PrepError(root, f"downloaded {redact(archive.url)} and refused it: {error.problem}") from None
        raise PrepError(root, f"could not download {redact(archive.url)} ({getattr(error, 'reason', None) or error});"
                              " without network access, set APLOSS_DATA_ROOT or data.root to a folder that holds"
                              " the dataset") from None


def download(archive: Archive, path: Path) -> None:
    """`archive` streamed into `path`, refused past its known size or with another md5."""
    limit, md5 = archive.max_mb * MB, hashlib.md5(usedforsecurity=False)
    request = urllib.request.Request(archive.url, headers={"User-Agent": "aploss"})
    with urllib.request.urlopen(request, timeout=READ_TIMEOUT_S) as response, path.open("wb") as out:
        received = 0
        while chunk := response.read(MB):
            received += len(chunk)
            if received > limit:
                raise PrepError(path, f"more than {archive.max_mb} MB, larger than the archive is")
            md5.update(chunk)
            out.write(chunk)
    if archive.md5 and md5.hexdigest() != archive.md5:
        raise PrepError(path, f"md5 {md5.hexdigest()}, not the published {archive.md5}: altered or truncated")


def extract(path: Path, into: Path, archive: Archive) -> None:
    """Extract a tar or zip archive with no member outside `into`, no link, device or FIFO, and
    at most MAX_EXPANSION times its size in all."""
    budget = MAX_EXPANSION * path.stat().st_size
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as opened:
            members = opened.infolist()
            for member in members:
                name = PurePosixPath(member.filename)
                if name.is_absolute() or ".." in name.parts or "\\" in member.filename:
                    raise PrepError(path, f"member {member.filename!r} points outside the archive's folder")
                if (member.external_attr >> 16) & 0o170000 not in (0, 0o100000, 0o040000):
                    raise PrepError(path, f"member {member.filename!r} is a link or a special file")
            _check_expansion(path, sum(member.file_size for member in members), budget)
            opened.extractall(into)
        return
    try:
        with tarfile.open(path) as opened:
            members = opened.getmembers()
            _check_expansion(path, sum(member.size for member in members), budget)
            opened.extractall(into, filter="data")
    except tarfile.FilterError as error:
        raise PrepError(path, f"refused: {error}") from None
    except tarfile.TarError as error:
        raise PrepError(path, f"not a tar or zip archive ({error})") from None


def _check_expansion(path: Path, size: int, budget: int) -> None:
    if size > budget:
        raise PrepError(path, f"would extract to {size // MB} MB, more than {MAX_EXPANSION} times its size")


def content_digest(folder: Path) -> str:
    """SHA-256 over the files a VOC layout reads in `folder`, by relative path and content."""
    digest = hashlib.sha256()
    for file in sorted(path for pattern in _VOC_READ for path in folder.glob(pattern)):
        digest.update(f"{file.relative_to(folder).as_posix()}\0".encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _place(extracted: Path, target: Path, archive: Archive) -> None:
    """The extracted archive into `target`: its `subfolder` alone (found under the one folder a
    GitHub zip wraps it in) after its content digest is checked, or all of it."""
    if not archive.subfolder:
        _merge(extracted, target)
        return
    found = [folder for folder in extracted.glob(f"*/{archive.subfolder}") if folder.is_dir()]
    if len(found) != 1:
        raise PrepError(extracted, f"the archive holds no single */{archive.subfolder} folder")
    if archive.content_sha256 and content_digest(found[0]) != archive.content_sha256:
        raise PrepError(extracted, f"its {archive.subfolder} files are not those of the pinned release")
    os.replace(found[0], target / archive.subfolder)


def _merge(source: Path, destination: Path) -> None:
    """Move `source`'s tree into `destination`, keeping what is there (VOC's test archive
    extracts into the folders its trainval archive made)."""
    for entry in source.iterdir():
        into = destination / entry.name
        if not into.exists():
            os.replace(entry, into)
        elif entry.is_dir() and into.is_dir():
            _merge(entry, into)
