"""The README's "Your own data" section works as written: its command, on a COCO set laid out as
it says, prepares the data (the rest of the pipeline is tested elsewhere on the same kind of set)."""
import json
import re
import shlex
import shutil
from pathlib import Path

from torchvision.io import decode_image, write_jpeg

from pipeline.data.shards import read_manifest
from pipeline.data.synthetic import write_synthetic_coco
from pipeline.orchestration.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _command(which: int) -> list[str]:
    section = README.read_text().split("### Your own data", 1)[1].split("\n### ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, re.S)[which]
    return shlex.split(block.replace("\\\n", " "))


def test_the_readme_s_own_data_command_prepares_a_coco_set_laid_out_as_it_says(tmp_path, monkeypatch, capsys):
    source = tmp_path / "source"
    write_synthetic_coco(source, {"train": 6, "val": 3})
    mydata = tmp_path / "mydata"
    for split in ("train", "val"):
        (mydata / "annotations").mkdir(parents=True, exist_ok=True)
        shutil.copy(source / f"{split}.json", mydata / "annotations" / f"{split}.json")
        shutil.copytree(source / split, mydata / "images" / split)
    command = _command(0)
    assert command[:3] == ["aploss", "pipeline", "run"]
    monkeypatch.chdir(tmp_path)  # `data.root=mydata` is relative, as a user types it
    assert main(["prep", *command[3:], f"run.output_dir={tmp_path / 'runs'}"]) == 0
    printed = capsys.readouterr().out
    assert "  train: 6 images" in printed and "  val: 3 images" in printed
    (prepared,) = [path for path in (tmp_path / "runs" / "data").iterdir() if path.name.startswith("coco-")]
    manifest = read_manifest(prepared)
    categories = json.loads((source / "train.json").read_text())["categories"]
    assert manifest["classes"] == [c["name"] for c in sorted(categories, key=lambda c: c["id"])]

    # Each mistake on the way names the key to set.
    for dropped, key in (("data.annotations=", "data.annotations"), ("data.test_split=", "data.test_split")):
        given = [arg for arg in command[3:] if not arg.startswith(dropped)]
        assert main(["prep", *given, f"run.output_dir={tmp_path / 'runs'}"]) == 2
        assert f"error: {key}: " in capsys.readouterr().err


def _write_voc(folder: Path, coco_root: Path, names: dict[int, str], splits: dict[str, str]) -> None:
    """A VOC-layout folder of the synthetic COCO set: JPEG images, one XML per image, a listing
    per split (VOC split name -> COCO split)."""
    for directory in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (folder / directory).mkdir(parents=True, exist_ok=True)
    for voc_split, coco_split in splits.items():
        coco = json.loads((coco_root / f"{coco_split}.json").read_text())
        ids = []
        for image in coco["images"]:
            image_id = f"{coco_split}{image['id']:04d}"
            ids.append(image_id)
            pixels = decode_image(str(coco_root / coco_split / image["file_name"]))
            write_jpeg(pixels, str(folder / "JPEGImages" / f"{image_id}.jpg"), quality=95)
            objects = "".join(
                f"<object><name>{names[a['category_id']]}</name><difficult>0</difficult><bndbox>"
                f"<xmin>{a['bbox'][0]}</xmin><ymin>{a['bbox'][1]}</ymin><xmax>{a['bbox'][0] + a['bbox'][2]}</xmax>"
                f"<ymax>{a['bbox'][1] + a['bbox'][3]}</ymax></bndbox></object>"
                for a in coco["annotations"] if a["image_id"] == image["id"])
            (folder / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><size><width>{image['width']}</width><height>{image['height']}</height>"
                f"<depth>3</depth></size>{objects}</annotation>")
        (folder / "ImageSets" / "Main" / f"{voc_split}.txt").write_text("".join(f"{i}\n" for i in ids))


def test_the_readme_s_voc_command_prepares_a_voc_folder_of_its_own_classes(tmp_path, monkeypatch, capsys):
    source = tmp_path / "source"
    write_synthetic_coco(source, {"train": 6, "val": 3})
    command = _command(1)
    assert command[:3] == ["aploss", "pipeline", "run"]
    classes = next(arg for arg in command if arg.startswith("data.classes="))
    names = dict(zip((1, 2), classes.removeprefix("data.classes=").strip("[]").split(", ")))
    _write_voc(tmp_path / "myvoc", source, names, {"train": "train", "val": "val"})
    (tmp_path / "myvoc" / "ImageSets" / "Main" / "cat_train.txt").write_text("train0001  1\n")  # VOC's own
    monkeypatch.chdir(tmp_path)
    settings = [*command[3:], f"run.output_dir={tmp_path / 'runs'}"]
    assert main(["prep", *settings]) == 0
    printed = capsys.readouterr().out
    boxes = {split: len(json.loads((source / f"{split}.json").read_text())["annotations"])
             for split in ("train", "val")}
    assert f"  train: 6 images, {boxes['train']} boxes" in printed
    assert f"  val: 3 images, {boxes['val']} boxes" in printed
    (prepared,) = [path for path in (tmp_path / "runs" / "data").iterdir() if path.name.startswith("voc-")]
    manifest = read_manifest(prepared)
    assert manifest["classes"] == list(names.values()) and manifest["category_ids"] == [1, 2]

    # Each mistake names the key, or the file, to mend.
    assert main(["prep", *[arg for arg in settings if arg != classes]]) == 2
    assert "error: data.classes: dataset 'voc' (a VOC-layout folder of your own at data.root) needs its class " \
        "names" in capsys.readouterr().err
    assert main(["prep", *settings, "data.test_split=test"]) == 2
    assert ("error: data.test_split: dataset 'voc' has no split 'test'; available: train, val; set "
            "data.test_split=val to test on the validation split; or list its images in ImageSets/Main/test.txt "
            "under the data root") in capsys.readouterr().err
    assert main(["prep", *settings[:-1], "data.classes=[cat, bird]", f"run.output_dir={tmp_path / 'other'}"]) == 2
    error = capsys.readouterr().err
    assert "myvoc/Annotations/train" in error and "unknown class 'dog'; expected one of ['cat', 'bird']" in error
