"""A trained detector as one TorchScript file that runs with torch and torchvision alone, without
this project installed: the resize and normalisation, the network, anchors, box decoding, NMS
and the boxes mapped back to each image's pixels, exactly as the eager detector in eval mode.

TorchScript rather than `torch.export`: the program takes a list of images of any sizes, as the
detector does (each is resized on its own, then padded into one batch), and keeps a data-dependent
number of detections per image (score threshold, top-k, NMS); a list of tensors and control flow
on their sizes are TorchScript's own, while `torch.export` would need one traced size range per
image count and guards on every data-dependent shape.
"""
import io
import warnings
from collections.abc import Sequence
from os import PathLike

import torch
from torch import Tensor, nn

from aploss.detector import OneStageDetector
from pipeline.errors import MissingInput
from pipeline.inference.detection import with_postprocessing
from pipeline.model import load_model
from pipeline.storage import Location


class DetectorProgram(nn.Module):
    """images (list of RGB [3, H, W] float tensors in [0, 1], each of any size) -> per image a
    dict of "boxes" [D, 4] (x1, y1, x2, y2 in that image's pixels), "scores" [D] and "labels" [D]
    (int64 indices into `classes`), best first."""

    def __init__(self, detector: OneStageDetector, classes: list[str]) -> None:
        super().__init__()
        self.detector = detector.eval()
        self.classes = classes

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        with torch.no_grad():
            return self.detector.detect(images)


def export_detector(model_path: str | PathLike | Location, out: str | PathLike | Location,
                    overrides: Sequence[str] = ()) -> Location:
    """Write the detector of a run's model.pt (local or in an object store) to `out` as a
    TorchScript program, with the score threshold, NMS IoU and detections per image it was
    trained with or those `overrides` give (`model.score_thresh=0.3`).

    The program is saved on the CPU and needs torch and torchvision (whose import registers the
    NMS operator the program calls):

        import torch, torchvision
        program = torch.jit.load("detector.pt")
        found = program([image])  # image: [3, H, W] float in [0, 1]
        names = [program.classes[label] for label in found[0]["labels"].tolist()]
    """
    if not Location(model_path).is_file():
        raise MissingInput(f"{model_path}: no such model file (export takes a run's model.pt)")
    detector, classes, trained, _ = load_model(model_path, torch.device("cpu"))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # TorchScript's deprecation notices: nothing a user of the command can act on.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+. is deprecated", category=FutureWarning)
        program = torch.jit.script(DetectorProgram(with_postprocessing(detector, trained, overrides), classes))
        torch.jit.save(program, buffer)
    Location(out).write_bytes(buffer.getvalue())
    return Location(out)
