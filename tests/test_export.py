"""`export_detector`: a trained detector as a TorchScript program that runs where this project is
not installed and finds what the eager detector finds."""
import os
import subprocess
import sys

import pytest
import torch

from pipeline.checkpoints import export_model
from pipeline.config import config_record, load_config
from pipeline.errors import MissingInput
from pipeline.inference.export import export_detector
from pipeline.model import build_model, load_model
from pipeline.orchestration.cli import main

CLASSES = ["RBC", "WBC", "Platelets"]

# The program's user: a finder put before every other refuses this project's packages, so the
# program cannot lean on them even where they are installed (this venv has them, editable).
USER = """
import sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("aploss", "pipeline", "tests"):
            raise ModuleNotFoundError(f"{name} refused: the exported program must run without it")

sys.meta_path.insert(0, Refuse())
try:
    import aploss  # noqa: F401
    sys.exit("aploss was importable")
except ModuleNotFoundError:
    pass
import torch
import torchvision  # noqa: F401  (registers the NMS operator the program calls)

program = torch.jit.load(sys.argv[1])
found = program(torch.load(sys.argv[2]))
torch.save({"classes": list(program.classes), "found": found}, sys.argv[3])
"""


def _model_pt(tmp_path, arch: str):
    config = load_config(None, [f"model.arch={arch}", "model.min_size=96", "model.max_size=96",
                                "model.score_thresh=0.0", f"run.output_dir={tmp_path}"])
    torch.manual_seed(0)
    return export_model({"model": build_model(config, len(CLASSES)).state_dict(), "config": config_record(config),
                         "classes": CLASSES}, list(range(1, len(CLASSES) + 1)), tmp_path / "model.pt")


@pytest.mark.parametrize("arch", ["retinanet_r18", "ssd300_vgg16", "ssdlite_mobilenet_v3"])
def test_the_exported_program_runs_without_aploss_and_finds_what_the_eager_detector_finds(tmp_path, arch):
    model_path = _model_pt(tmp_path, arch)
    program = export_detector(model_path, tmp_path / "out" / "detector.pt")
    assert program == tmp_path / "out" / "detector.pt"
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 80, 120, generator=generator), torch.rand(3, 101, 67, generator=generator)]
    torch.save(images, tmp_path / "images.pt")
    (tmp_path / "user.py").write_text(USER)

    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run([sys.executable, "user.py", str(program), "images.pt", "found.pt"], cwd=tmp_path,
                   env=environment, check=True, timeout=120)
    exported = torch.load(tmp_path / "found.pt")

    detector, _, _, _ = load_model(model_path, torch.device("cpu"))
    with torch.no_grad():
        expected = detector.eval()(images)
    assert exported["classes"] == CLASSES
    for mine, theirs in zip(exported["found"], expected):
        assert len(mine["scores"]) == len(theirs["scores"]) > 0
        assert torch.equal(mine["labels"], theirs["labels"]) and torch.equal(mine["scores"], theirs["scores"])
        torch.testing.assert_close(mine["boxes"], theirs["boxes"], atol=1e-4, rtol=0)


def test_a_missing_model_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(MissingInput) as raised:
        export_detector(tmp_path / "missing" / "model.pt", tmp_path / "detector.pt")
    message = str(raised.value)
    assert str(tmp_path / "missing" / "model.pt") in message and "\n" not in message
    assert not (tmp_path / "detector.pt").exists()


def test_aploss_export_from_the_cli_and_a_file_that_is_no_checkpoint(tmp_path, capsys):
    model_path = _model_pt(tmp_path, "retinanet_r18")
    assert main(["export", "--model", str(model_path), "--out", str(tmp_path / "detector.pt"),
                 "model.detections_per_image=3"]) == 0
    assert f"TorchScript program: {tmp_path / 'detector.pt'}" in capsys.readouterr().out
    program = torch.jit.load(str(tmp_path / "detector.pt"))
    (found,) = program([torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2))])
    assert program.classes == CLASSES and len(found["scores"]) == 3  # the override is in the program

    (tmp_path / "notes.pt").write_text("not a checkpoint")
    assert main(["export", "--model", str(tmp_path / "notes.pt"), "--out", str(tmp_path / "d.pt")]) == 2
    assert f"{tmp_path / 'notes.pt'}: not a readable checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "d.pt").exists()
