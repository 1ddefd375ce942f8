"""The robustness stage: trained detectors' AP under perturbed test images.

Three families, each a list of (kind, severity) settings evaluated with the same COCO metric:
  * occlusion: a black patch over each ground-truth object covering `severity` of its area
    (centred, with the box's aspect ratio);
  * noise: additive Gaussian noise of standard deviation `severity` on [0, 1] intensities;
  * COCO-C (Michaelis et al. 2019): the `imagecorruptions` package's 15 corruptions at
    severities 1-5. P is the clean AP, mPC the mean AP over corruptions and severities,
    rPC = mPC / P.
Perturbations are seeded per (robustness seed, setting, image), not by the model, so every model
sees the same images; several models are evaluated in one pass, each image perturbed once (some
corruptions, glass blur above all, cost seconds per image).
"""
import io
import json
import math
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from aploss.detector import OneStageDetector
from pipeline.config import ConfigError, RobustnessConfig
from pipeline.data.dataset import DetectionDataset, collate
from pipeline.evaluation.coco_metrics import category_ids, evaluate_detections
from pipeline.evaluation.imagecorruptions_compat import adapted_imagecorruptions
from pipeline.inference.detection import coco_results, detect, detection_slices
from pipeline.io import write_bytes_atomic, write_json_atomic
from pipeline.storage import Location

FAMILIES = ("occlusion", "noise", "coco-c")
# The benchmark's corruptions (Hendrycks & Dietterich 2019; Michaelis et al. 2019), in its order.
COCO_C = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
          "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
          "jpeg_compression")


def coco_c_corruptions() -> dict[str, str]:
    """Each COCO-C corruption -> why it cannot run here ('' when it can)."""
    try:
        package = adapted_imagecorruptions()
    except ImportError as error:
        return {name: f"imagecorruptions is not installed ({error})" for name in COCO_C}
    probe = np.full((32, 32, 3), 128, dtype=np.uint8)
    status = {}
    for name in COCO_C:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                package.corrupt(probe, corruption_name=name, severity=1)
            status[name] = ""
        except Exception as error:  # an incompatibility of the package with this environment
            status[name] = f"{type(error).__name__}: {error}"
    return status


def occlude(image: Tensor, boxes: Tensor, fraction: float) -> Tensor:
    """Black out `fraction` of each box's area, centred, keeping the box's aspect ratio."""
    image = image.clone()
    scale = math.sqrt(fraction)
    for x1, y1, x2, y2 in boxes.tolist():
        cx, cy, half_w, half_h = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * scale / 2, (y2 - y1) * scale / 2
        image[:, round(cy - half_h):round(cy + half_h), round(cx - half_w):round(cx + half_w)] = 0
    return image


def add_noise(image: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    return (image + torch.randn(image.shape, generator=generator) * sigma).clamp_(0, 1)


def corrupt(image: Tensor, name: str, severity: int, seed: int) -> Tensor:
    """`image` ([3, H, W] in [0, 1]) under COCO-C corruption `name` at `severity`."""
    package = adapted_imagecorruptions()
    pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    state = np.random.get_state()
    np.random.seed(seed)  # the package draws from NumPy's global generator
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            corrupted = package.corrupt(pixels, corruption_name=name, severity=severity)
    finally:
        np.random.set_state(state)
    corrupted = np.ascontiguousarray(corrupted[:pixels.shape[0], :pixels.shape[1]])
    return torch.from_numpy(corrupted).permute(2, 0, 1).float() / 255


@dataclass(frozen=True)
class Setting:
    family: str  # clean | occlusion | noise | coco-c
    name: str  # the corruption (COCO-C) or the family
    severity: float

    @property
    def label(self) -> str:
        return "clean" if self.family == "clean" else f"{self.name}@{self.severity:g}"


class PerturbedDataset(Dataset):
    """`dataset`'s images under one setting; targets unchanged."""

    def __init__(self, dataset: DetectionDataset, setting: Setting, seed: int = 0) -> None:
        self.dataset, self.setting, self.seed = dataset, setting, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        image, target, image_id = self.dataset[index]
        setting = self.setting
        # crc32, not hash(): str hashes change from one process to the next.
        seed = int(np.random.SeedSequence([self.seed, index, zlib.crc32(setting.label.encode())]).generate_state(1)[0])
        if setting.family == "occlusion":
            image = occlude(image, target["boxes"], setting.severity)
        elif setting.family == "noise":
            image = add_noise(image, setting.severity, torch.Generator().manual_seed(seed))
        elif setting.family == "coco-c":
            image = corrupt(image, setting.name, int(setting.severity), seed)
        return image, target, image_id


@dataclass
class RobustnessResult:
    ap: dict[str, float]  # setting label -> AP
    settings: list[Setting]
    clean_ap: float  # P
    mpc: float | None  # mean AP over the COCO-C settings evaluated
    rpc: float | None  # mPC / P
    unavailable: dict[str, str] = field(default_factory=dict)  # corruption -> why it was not run
    # The evaluated model's training config (plain data), so a report can tell the runs apart
    # even when their training was not tracked in MLflow.
    trained_with: dict = field(default_factory=dict)

    def table(self) -> str:
        rows = [f"| {s.family} | {s.label} | {self.ap[s.label]:.3f} |" for s in self.settings]
        summary = [f"| P (clean AP) | {self.clean_ap:.3f} |"]
        if self.mpc is not None:  # rPC is undefined for a model of clean AP 0
            summary += [f"| mPC | {self.mpc:.3f} |", f"| rPC | {'n/a' if self.rpc is None else f'{self.rpc:.3f}'} |"]
        return "\n".join(["| family | setting | AP |", "|---|---|---|", *rows, "", "| summary | value |",
                          "|---|---|", *summary])


def settings(options: RobustnessConfig) -> tuple[list[Setting], dict[str, str]]:
    """The settings `options` ask for that can run here, and each asked-for corruption that
    cannot with the reason."""
    wanted = list(COCO_C) if options.corruptions == ["all"] else options.corruptions
    unknown = [name for name in wanted if name not in COCO_C]
    if unknown:
        raise ConfigError(f"robustness.corruptions: unknown COCO-C corruption(s) {unknown}; available: {list(COCO_C)}")
    status = coco_c_corruptions() if wanted else {}
    unavailable = {name: status[name] for name in wanted if status[name]}
    runnable = [name for name in wanted if name not in unavailable]
    chosen = ([Setting("clean", "clean", 0.0)] + [Setting("occlusion", "occlusion", f) for f in options.occlusion]
              + [Setting("noise", "noise", s) for s in options.noise]
              + [Setting("coco-c", name, s) for name in runnable for s in options.severities])
    return chosen, unavailable


def _result(ap: dict[str, float], chosen: list[Setting], unavailable: dict[str, str]) -> RobustnessResult:
    clean = ap["clean"]
    corrupted = [ap[s.label] for s in chosen if s.family == "coco-c"]
    mpc = float(np.mean(corrupted)) if corrupted else None
    rpc = mpc / clean if mpc is not None and clean > 0 else None
    return RobustnessResult(ap, chosen, clean, mpc, rpc, unavailable)


def perturbed_detections(models: dict[str, OneStageDetector], dataset: DetectionDataset, setting: Setting,
                         batches: list[list[int]], device: torch.device, categories: list[int], seed: int = 0,
                         workers: int = 0) -> dict[str, list[dict]]:
    """Each model's detections of the images in `batches` under `setting`; every batch of
    perturbed images is made once (by `workers` processes, or this one) and seen by all the models."""
    for model in models.values():
        model.eval()
    detections: dict[str, list[dict]] = {name: [] for name in models}
    for images, _, image_ids in DataLoader(PerturbedDataset(dataset, setting, seed), batch_sampler=batches,
                                           collate_fn=collate, num_workers=workers):
        for name, model in models.items():
            for image_id, found in zip(image_ids, detect(model, images, device)):
                detections[name] += coco_results(found, image_id, categories)
    return detections


def robustness_results(names: list[str], detections: Iterable[tuple[Setting, dict[str, list[dict]]]],
                       ground_truth: Path, chosen: list[Setting], unavailable: dict[str, str] | None = None,
                       progress: bool = False) -> dict[str, RobustnessResult]:
    """Each model's AP under each setting, from the detections of the whole split per setting
    (`detections` yields them in the order of `chosen`)."""
    ap: dict[str, dict[str, float]] = {name: {} for name in names}
    for setting, found in tqdm(detections, total=len(chosen), desc="robustness", unit="setting",
                               disable=not progress):
        for name in names:
            ap[name][setting.label] = evaluate_detections(ground_truth, found[name]).metrics["AP"]
    return {name: _result(ap[name], chosen, unavailable or {}) for name in names}


def evaluate_robustness(models: dict[str, OneStageDetector], dataset: DetectionDataset, ground_truth: Path,
                        chosen: list[Setting], batch_size: int, device: torch.device, seed: int = 0,
                        unavailable: dict[str, str] | None = None, workers: int = 0, progress: bool = False
                        ) -> dict[str, RobustnessResult]:
    """Each model's AP under each setting, detected in this process."""
    (batches,) = detection_slices(len(dataset), batch_size, 1)
    categories = category_ids(ground_truth)
    detections = ((setting, perturbed_detections(models, dataset, setting, batches, device, categories, seed, workers))
                  for setting in chosen)
    return robustness_results(list(models), detections, ground_truth, chosen, unavailable, progress)


def plot_robustness(results: dict[str, RobustnessResult], path: Location) -> Location:
    """AP against severity, one panel per family, one line per result (e.g. AP-loss vs focal)."""
    first = next(iter(results.values()))
    families = [f for f in FAMILIES if any(s.family == f for s in first.settings)]
    figure = Figure(figsize=(5 * max(len(families), 1), 4), constrained_layout=True)
    FigureCanvasAgg(figure)
    for column, family in enumerate(families, 1):
        axes = figure.add_subplot(1, len(families), column)
        for name, result in results.items():
            chosen = [s for s in result.settings if s.family == family]
            severities = sorted({s.severity for s in chosen})
            mean_ap = [np.mean([result.ap[s.label] for s in chosen if s.severity == v]) for v in severities]
            axes.plot([0, *severities], [result.clean_ap, *mean_ap], marker="o", label=name)
        axes.set(title=family + (" (mean over corruptions)" if family == "coco-c" else ""),
                 xlabel={"coco-c": "severity", "occlusion": "covered fraction"}.get(family, "sigma"),
                 ylabel="AP", ylim=(0, None))
        axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_bytes_atomic(buffer.getvalue(), path)
    return path


def read_result(path: Location) -> RobustnessResult:
    """A RobustnessResult as `write_result` saved it."""
    saved = json.loads(Location(path).read_text())
    return RobustnessResult(saved["ap"], [Setting(**setting) for setting in saved["settings"]], saved["P"],
                            saved["mPC"], saved["rPC"], saved["unavailable"], saved.get("trained_with", {}))


def write_result(result: RobustnessResult, out_dir: Location) -> list[Location]:
    json_path = out_dir / "robustness.json"
    write_json_atomic({"ap": result.ap, "P": result.clean_ap, "mPC": result.mpc, "rPC": result.rpc,
                       "settings": [asdict(setting) for setting in result.settings],
                       "unavailable": result.unavailable, "trained_with": result.trained_with}, json_path)
    table_path = out_dir / "robustness.md"
    write_bytes_atomic(result.table().encode(), table_path)
    return [json_path, table_path, plot_robustness({"model": result}, out_dir / "robustness.png")]
