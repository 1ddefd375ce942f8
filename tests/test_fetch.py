"""Dataset downloads are pinned and extracted safely: crafted archives served from file:// URLs."""
import dataclasses
import hashlib
import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from pipeline.data import fetch as fetch_module
from pipeline.data.fetch import Archive
from pipeline.orchestration.cli import main
from tests.test_prep import BCCD_ROOT, bccd_members, write_archive


def served(path: Path, **fields) -> Archive:
    """An archive at a file:// URL with the md5 of `path` unless `fields` say otherwise."""
    pinned = {"md5": hashlib.md5(path.read_bytes()).hexdigest(), "into": "", "max_mb": 64, **fields}
    return Archive(path.as_uri(), **pinned)


def refused(archive: Archive, root: Path) -> str:
    with pytest.raises(fetch_module.PrepError) as error:
        fetch_module._download(archive, root)
    return str(error.value)


def test_a_pinned_archive_is_extracted(tmp_path):
    write_archive(tmp_path / "good.tar", {"VOCdevkit/VOC2007/ImageSets/Main/train.txt": b"000001\n"})
    fetch_module._download(served(tmp_path / "good.tar"), tmp_path / "root")
    assert (tmp_path / "root" / "VOCdevkit/VOC2007/ImageSets/Main/train.txt").read_bytes() == b"000001\n"
    assert [p.name for p in (tmp_path / "root").iterdir()] == ["VOCdevkit"]  # no scratch left


def test_another_md5_is_refused_and_leaves_nothing(tmp_path):
    write_archive(tmp_path / "altered.zip", {"coco/annotations/x.json": b"{}"})
    message = refused(served(tmp_path / "altered.zip", md5="f4bbac642086de4f52a3fdda2de5fa2c"), tmp_path / "root")
    assert "refused it:" in message and "not the published f4bbac642086de4f52a3fdda2de5fa2c" in message
    assert not (tmp_path / "root").exists()


def test_more_than_the_known_size_is_refused_while_it_streams(tmp_path):
    (tmp_path / "big.tar").write_bytes(os.urandom(3 << 20))
    message = refused(served(tmp_path / "big.tar", max_mb=1), tmp_path / "root")
    assert "more than 1 MB, larger than the archive is" in message


def tar_with(path: Path, info: tarfile.TarInfo, content: bytes = b"") -> None:
    with tarfile.open(path, "w") as archive:
        archive.addfile(info, io.BytesIO(content) if content else None)


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


@pytest.mark.parametrize("member, why", [
    (tar_member("../escaped.txt", size=2), "outside the destination"),
    (tar_member("/tmp/absolute.txt", size=2), None),  # the filter strips the leading /: stays inside
    (tar_member("VOCdevkit/link", tarfile.SYMTYPE, link="/etc/passwd"), "absolute path"),
    (tar_member("VOCdevkit/up", tarfile.SYMTYPE, link="../../../../etc"), "outside the destination"),
    (tar_member("VOCdevkit/fifo", tarfile.FIFOTYPE), "special file"),
    (tar_member("VOCdevkit/tty", tarfile.CHRTYPE), "special file"),
])
def test_a_tar_is_extracted_with_the_data_filter(tmp_path, member, why):
    tar_with(tmp_path / "crafted.tar", member, b"hi" if member.size else b"")
    root = tmp_path / "data" / "root"
    if why is None:
        fetch_module._download(served(tmp_path / "crafted.tar"), root)
        assert (root / "tmp" / "absolute.txt").read_bytes() == b"hi"
        return
    message = refused(served(tmp_path / "crafted.tar"), root)
    assert "refused it: refused:" in message and why in message
    assert not (tmp_path / "data" / "escaped.txt").exists() and not root.exists()


def zip_with(path: Path, name: str, content: bytes = b"x", mode: int = 0o100644) -> None:
    info = zipfile.ZipInfo(name)
    info.external_attr, info.compress_type = mode << 16, zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(info, content)


@pytest.mark.parametrize("name, mode, why", [
    ("../escaped.txt", 0o100644, "points outside the archive's folder"),
    ("/etc/cron.d/x", 0o100644, "points outside the archive's folder"),
    ("coco\\..\\..\\x", 0o100644, "points outside the archive's folder"),
    ("coco/link", 0o120777, "is a link or a special file"),
])
def test_a_zip_member_outside_its_folder_or_a_link_is_refused(tmp_path, name, mode, why):
    zip_with(tmp_path / "crafted.zip", name, b"/etc/passwd", mode)
    message = refused(served(tmp_path / "crafted.zip"), tmp_path / "root")
    assert repr(name) in message and why in message
    assert not (tmp_path / "escaped.txt").exists()


def test_a_zip_bomb_is_refused_before_extraction(tmp_path):
    zip_with(tmp_path / "bomb.zip", "coco/zeros.json", bytes(64 << 20))  # 64 MB of zeros in about 64 KB
    message = refused(served(tmp_path / "bomb.zip"), tmp_path / "root")
    assert "would extract to 64 MB, more than 16 times its size" in message
    assert not (tmp_path / "root").exists()


@pytest.mark.skipif(not (BCCD_ROOT / "bccd" / "BCCD").is_dir(), reason="BCCD not in the data root")
def test_bccd_is_pinned_by_the_content_of_its_commit(tmp_path, monkeypatch, capsys):
    members = bccd_members("BCCD_Dataset-d272fb1e")
    write_archive(tmp_path / "bccd.zip", members)
    pinned = dataclasses.replace(fetch_module.BCCD, url=(tmp_path / "bccd.zip").as_uri())
    monkeypatch.setattr(fetch_module, "BCCD", pinned)
    root = tmp_path / "data"
    args = ["prep", f"data.root={root}", "data.download=true", f"run.output_dir={tmp_path / 'runs'}"]
    assert main(args) == 0
    assert fetch_module.content_digest(root / "bccd" / "BCCD") == fetch_module.BCCD.content_sha256
    capsys.readouterr()

    # One box moved by a pixel in one annotation: not the pinned release, and nothing is kept.
    name = "BCCD_Dataset-d272fb1e/BCCD/Annotations/BloodImage_00000.xml"
    members[name] = members[name].replace(b"<xmin>", b"<xmin>1", 1)
    write_archive(tmp_path / "bccd.zip", members)
    other = tmp_path / "other"
    assert main(["prep", f"data.root={other}", "data.download=true", f"run.output_dir={tmp_path / 'runs2'}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "its BCCD files are not those of the pinned release" in error[0]
    assert not other.exists()
