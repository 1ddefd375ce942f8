"""The README's "Your own data" section works as written: its command, on a COCO set laid out as
it says, prepares the data (the rest of the pipeline is tested elsewhere on the same kind of set)."""
import json
import re
import shlex
import shutil
from pathlib import Path

from pipeline.data.shards import read_manifest
from pipeline.orchestration.cli import main
from tests.synthetic import write_synthetic_coco

README = Path(__file__).resolve().parents[1] / "README.md"


def _command() -> list[str]:
    section = README.read_text().split("### Your own data", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


def test_the_readme_s_own_data_command_prepares_a_coco_set_laid_out_as_it_says(tmp_path, monkeypatch, capsys):
    source = tmp_path / "source"
    write_synthetic_coco(source, {"train": 6, "val": 3})
    mydata = tmp_path / "mydata"
    for split in ("train", "val"):
        (mydata / "annotations").mkdir(parents=True, exist_ok=True)
        shutil.copy(source / f"{split}.json", mydata / "annotations" / f"{split}.json")
        shutil.copytree(source / split, mydata / "images" / split)
    command = _command()
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
