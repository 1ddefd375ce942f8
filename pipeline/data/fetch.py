"""Downloading the named datasets into the data root, in the layout the sources read.

Only what the configured splits need is fetched: VOC 2007's test archive, or COCO's 18 GB of
training images, only when asked for.
"""
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from torchvision.datasets.utils import download_and_extract_archive

from pipeline.config import DataConfig
from pipeline.data.sources import VOC2007_FOLDER, VOC2012_FOLDER, VOC_LAYOUTS, PrepError, coco2017_paths
from pipeline.storage import Location, is_uri


@dataclass(frozen=True)
class Archive:
    url: str
    into: str  # folder under the data root the archive is extracted into
    md5: str | None = None
    # The part of the archive the layout wants, when the archive wraps it in other folders
    # (BCCD's GitHub zip); it is moved to `into/<its name>` and the rest is discarded.
    subfolder: str = ""


BCCD = Archive("https://github.com/Shenggan/BCCD_Dataset/archive/refs/heads/master.zip", "bccd",
               subfolder="BCCD_Dataset-master/BCCD")
# The Oxford mirror torchvision uses; the md5s are torchvision's.
_VOC = "https://thor.robots.ox.ac.uk/pascal/VOC"
VOC2007_TRAINVAL = Archive(f"{_VOC}/voc2007/VOCtrainval_06-Nov-2007.tar", "", "c52e279531787c972589f7e41ab4ae64")
VOC2007_TEST = Archive(f"{_VOC}/voc2007/VOCtest_06-Nov-2007.tar", "", "b6e924de25625d8de591ea690078ad9f")
VOC2012_TRAINVAL = Archive(f"{_VOC}/voc2012/VOCtrainval_11-May-2012.tar", "", "6cd6e144f989b92b3379bac3b3de84fd")
_COCO = "http://images.cocodataset.org"
COCO2017_ANNOTATIONS = Archive(f"{_COCO}/annotations/annotations_trainval2017.zip", "coco")
COCO2017_IMAGES = {split: Archive(f"{_COCO}/zips/{split}2017.zip", "coco") for split in ("train", "val")}


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
    if data.dataset in VOC_LAYOUTS:
        folders = sorted({folder for split in splits for folder in VOC_LAYOUTS[data.dataset].splits[split]})
        annotated = [f"{folder}/{part}" for folder in folders for part in ("ImageSets", "Annotations")]
        return folders if images else annotated
    if data.dataset == "coco2017":
        pairs = [coco2017_paths(Path(), split) for split in splits]
    else:
        pairs = [(Path(data.annotations[split]), Path(data.images[split]) if split in data.images
                  else Path(data.annotations[split]).parent) for split in splits]
    return sorted({str(path) for annotations, folder in pairs for path in ((annotations, folder) if images
                                                                             else (annotations,))})


def image_folders(data: DataConfig, splits: Sequence[str]) -> list[str]:
    """The folders, relative to the data root, that hold the images of `splits`."""
    annotated = set(_inputs(data, splits, images=False))
    if data.dataset in VOC_LAYOUTS:
        return sorted({f"{folder}/JPEGImages" for folder in _inputs(data, splits)})
    return sorted(set(_inputs(data, splits)) - annotated)


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
    when data.download allows; `coco` datasets given by path are never fetched. A data root in
    an object store is copied to this machine first: all of it, or without `images` (which
    data-prep's Ray workers read from the store) only its listings and annotations."""
    if is_uri(data.root_location()):
        copy_from_store(data, splits, images)
    if data.dataset == "coco":
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
    """Download and extract `archive` into `root`, or raise PrepError leaving nothing behind:
    it is extracted into a scratch folder first and moved into place only once complete."""
    target = root / archive.into
    created = [folder for folder in (root, target) if not folder.exists()]
    target.mkdir(parents=True, exist_ok=True)
    try:
        # Next to the target (same filesystem), so that the parts are moved by renames.
        with tempfile.TemporaryDirectory(dir=target, prefix=".download-") as scratch:
            download_and_extract_archive(archive.url, download_root=scratch, md5=archive.md5, remove_finished=True)
            if archive.subfolder:
                os.replace(Path(scratch) / archive.subfolder, target / Path(archive.subfolder).name)
            else:
                _merge(Path(scratch), target)
    except (OSError, RuntimeError) as error:  # offline, refused, truncated or corrupt (md5)
        for folder in reversed(created):
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
        reason = getattr(error, "reason", None) or error
        raise PrepError(root, f"could not download {archive.url} ({reason}); without network access, set "
                              "APLOSS_DATA_ROOT or data.root to a folder that holds the dataset") from None


def _merge(source: Path, destination: Path) -> None:
    """Move `source`'s tree into `destination`, keeping what is there (VOC's test archive
    extracts into the folders its trainval archive made)."""
    for entry in source.iterdir():
        into = destination / entry.name
        if not into.exists():
            os.replace(entry, into)
        elif entry.is_dir() and into.is_dir():
            _merge(entry, into)
