"""COCO box metrics, per-class precision-recall curves, and sample drawings.

`evaluate_detections` runs COCOeval (bbox) on COCO result dicts and returns a `CocoResult`:
the twelve summary metrics, AP and AP50 per class name, and the precision of every class at
IoU 0.50 and 0.75 over COCO's 101 recall points. "Undefined" is NaN throughout: a class
without ground truth has NaN AP and a NaN curve, and a metric whose area range holds no
ground truth (COCOeval's -1) is NaN. No detections at all is not undefined: every class with
ground truth then scores 0.

The evaluator is faster-coco-eval's `COCOeval_faster`: pycocotools' algorithm with its per-image
matching and accumulation in C++, 5-12x faster on one CPU, and pycocotools' numbers to the last
bit or within one ulp (`tests/test_coco_metrics.py` holds it to pycocotools' own COCOeval;
benchmarks/README.md, "COCO evaluation"). pycocotools' `COCO` stays the index that
`load_ground_truth` returns.
"""
import builtins
import contextlib
import functools
import io
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from faster_coco_eval import COCO as FasterCOCO
from faster_coco_eval import COCOeval_faster
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pycocotools.coco import COCO

from pipeline.errors import DataError, MissingInput
from pipeline.io import write_bytes_atomic
from pipeline.storage import Location, Where

# The order of COCOeval.stats.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# IoU thresholds of the stored precision-recall curves (rows of `CocoResult.precision`).
PR_IOU_THRESHOLDS = (0.5, 0.75)

# What COCOeval indexes in each section of a ground-truth file.
_GROUND_TRUTH_KEYS = {
    "images": ("id",),
    "categories": ("id", "name"),
    "annotations": ("id", "image_id", "category_id", "bbox", "area", "iscrowd"),
}
_DETECTION_KEYS = ("image_id", "category_id", "bbox", "score")


@dataclass
class CocoResult:
    metrics: dict[str, float]  # METRIC_NAMES -> value
    per_class_ap: dict[str, float]  # class name -> AP@[.50:.95]
    per_class_ap50: dict[str, float]  # class name -> AP@.50
    recall: np.ndarray  # [101] COCO's recall points 0, 0.01, ..., 1
    precision: dict[str, np.ndarray]  # class name -> [len(PR_IOU_THRESHOLDS), 101]
    summary: str  # COCOeval.summarize() printout: its 12 lines, one per METRIC_NAMES


def evaluate_detections(ground_truth: Where | COCO | FasterCOCO,
                        detections: list[dict[str, Any]] | str | Path) -> CocoResult:
    """COCO bbox evaluation of `detections` (result dicts with image_id, category_id, bbox
    as xywh, score; or a JSON file of them) against a ground-truth instances file or a COCO
    index (pycocotools' or faster-coco-eval's)."""
    gt = load_ground_truth(ground_truth)
    where = ground_truth if isinstance(ground_truth, (str, Path, Location)) else "the ground truth"
    if not any(not annotation.get("iscrowd") for annotation in gt.dataset["annotations"]):
        raise DataError(f"{where}: no ground-truth boxes to evaluate against (AP is undefined)")
    # faster-coco-eval's index turns image ids into ints in place (pycocotools took any).
    if not all(_is_int(image["id"]) for image in gt.dataset["images"]):
        raise DataError(f"{where}: image ids must be integers, as in COCO's format")
    results = load_detections(detections)
    check_detections(results, gt)
    index = _faster_index(gt)
    # faster-coco-eval reports through `print_function` (else logging.info or print): all of it
    # off the console, and summarize()'s lines kept as the summary.
    with _captured_prints():
        evaluator = COCOeval_faster(index, index.loadRes(results), iouType="bbox", print_function=_quiet)
        evaluator.evaluate()
        evaluator.accumulate()
        lines: list[str] = []
        evaluator.print_function = lambda *args, **_: lines.append(" ".join(map(str, args)))
        evaluator.summarize()
    # pycocotools' twelve lines; faster-coco-eval adds AR at IoU 0.50 and 0.75 after them.
    return _collect(evaluator, gt, "".join(f"{line}\n" for line in lines[:len(METRIC_NAMES)]))


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    pass


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _faster_index(gt: COCO | FasterCOCO) -> FasterCOCO:
    """faster-coco-eval's index of `gt`'s dataset (the same dicts, not a copy)."""
    if isinstance(gt, FasterCOCO):
        return gt
    index = FasterCOCO(print_function=_quiet)
    index.dataset = gt.dataset
    index.createIndex()
    return index


@contextlib.contextmanager
def _captured_prints() -> Iterator[io.StringIO]:
    """pycocotools reports through print(): into the returned buffer, off the console. Ray Train
    workers send print() to stdout to their logger, `redirect_stdout` or not, so print itself is
    pointed at the buffer (a file other than stdout, which they leave to print)."""
    buffer = io.StringIO()
    real_print = builtins.print
    builtins.print = functools.partial(real_print, file=buffer)
    try:
        yield buffer
    finally:
        builtins.print = real_print


def category_ids(ground_truth: Where) -> list[int]:
    """The category id of each class of a prepared split's ground truth, in class order."""
    return [category["id"] for category in _read_json(ground_truth)["categories"]]


def load_ground_truth(source: Where | COCO | FasterCOCO) -> COCO | FasterCOCO:
    """A COCO index (pycocotools') of an instances JSON file; errors name the file. A COCO index
    given is returned as it is."""
    if isinstance(source, (COCO, FasterCOCO)):
        return source
    path = Location(source)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a COCO instances file (expected a JSON object)")
    for section, keys in _GROUND_TRUTH_KEYS.items():
        entries = data.get(section)
        if not isinstance(entries, list):
            raise DataError(f"{path}: not a COCO instances file ('{section}' must be a list)")
        for index, entry in enumerate(entries):
            missing = [key for key in keys if not isinstance(entry, dict) or key not in entry]
            if missing:
                raise DataError(f"{path}: {section}[{index}] lacks {', '.join(missing)}")
    coco = COCO()
    coco.dataset = data
    with _captured_prints():
        coco.createIndex()
    return coco


def _read_json(path: Where) -> Any:
    try:
        return json.loads(Location(path).read_bytes())
    except FileNotFoundError:
        raise MissingInput(f"{path}: no such file") from None
    except OSError as error:
        raise OSError(f"{path}: cannot read: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON: {error}") from None


def load_detections(source: list[dict[str, Any]] | str | Path) -> list[dict[str, Any]]:
    """COCO result dicts from a JSON list file, or copies of the given ones."""
    if isinstance(source, (str, Path)):
        data = _read_json(Path(source))
        if not isinstance(data, list):
            raise DataError(f"{source}: detections must be a JSON list of COCO result dicts")
        return data
    # loadRes adds keys to the dicts it gets; copy so the caller's stay as they were.
    return [dict(detection) for detection in source]


def check_detections(detections: list[dict[str, Any]], gt: COCO | FasterCOCO) -> None:
    """ValueError for a detection lacking a key or naming an image or category `gt` lacks."""
    for index, detection in enumerate(detections):
        missing = [key for key in _DETECTION_KEYS if key not in detection]
        if missing:
            raise DataError(f"detection {index} lacks {', '.join(missing)}")
    # COCOeval would silently drop unknown categories and assert on unknown images.
    for key, known in (("image_id", gt.getImgIds()), ("category_id", gt.getCatIds())):
        unknown = sorted({detection[key] for detection in detections} - set(known))
        if unknown:
            shown = ", ".join(map(str, unknown[:20])) + (" ..." if len(unknown) > 20 else "")
            raise DataError(f"detections reference {len(unknown)} {key}(s) absent from the "
                             f"ground truth: {shown}")


def _collect(evaluator: COCOeval_faster, gt: COCO | FasterCOCO, summary: str) -> CocoResult:
    params = evaluator.params
    # [iou, recall, class] at area "all" and 100 detections per image: the headline AP's setting.
    precision = evaluator.eval["precision"][:, :, :, params.areaRngLbl.index("all"),
                                            params.maxDets.index(100)]
    rows = [int(np.argmin(np.abs(params.iouThrs - iou))) for iou in PR_IOU_THRESHOLDS]
    names = [gt.cats[category]["name"] for category in params.catIds]
    return CocoResult(
        metrics={name: _defined(value) for name, value in zip(METRIC_NAMES, evaluator.stats)},
        per_class_ap={name: _mean_defined(precision[:, :, k]) for k, name in enumerate(names)},
        per_class_ap50={name: _mean_defined(precision[rows[0], :, k]) for k, name in enumerate(names)},
        recall=params.recThrs.copy(),
        precision={name: np.where(precision[rows, :, k] > -1, precision[rows, :, k], np.nan)
                   for k, name in enumerate(names)},
        summary=summary,
    )


def _defined(value: float) -> float:
    return float(value) if value > -1 else math.nan


def _mean_defined(values: np.ndarray) -> float:
    # COCOeval marks (iou, recall) cells without ground truth -1.
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else math.nan


def plot_pr_curves(result: CocoResult, out_dir: Location) -> list[Location]:
    """One PNG per class with ground truth (precision vs recall at each PR_IOU_THRESHOLDS),
    then one of all those classes at IoU 0.5; returns the paths written."""
    out_dir = Location(out_dir)
    written = []
    overview, overview_axes = _pr_figure("all classes, IoU 0.50")
    for index, (name, curves) in enumerate(result.precision.items()):
        if np.isnan(curves).all():
            continue  # no ground truth, no curve
        ap50 = result.per_class_ap50[name]
        figure, axes = _pr_figure(f"{name}  (AP50 {ap50:.3f})")
        for iou, curve in zip(PR_IOU_THRESHOLDS, curves):
            axes.plot(result.recall, curve, label=f"IoU {iou:.2f}")
        axes.legend(loc="lower left")
        # The index keeps names that slug alike ("a/b", "a b") apart.
        written.append(_save_figure(figure, out_dir / f"pr_{index:03d}_{_slug(name)}.png"))
        overview_axes.plot(result.recall, curves[0], label=f"{name} ({ap50:.2f})")
    if overview_axes.lines:
        overview_axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="x-small",
                             ncol=math.ceil(len(overview_axes.lines) / 30))
    written.append(_save_figure(overview, out_dir / "pr_all_classes.png"))
    return written


def _pr_figure(title: str) -> tuple[Figure, Axes]:
    # A bare Figure on an Agg canvas: no GUI backend, and nothing registered with pyplot that
    # would have to be closed.
    figure = Figure(figsize=(5, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set(title=title, xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    axes.grid(alpha=0.3)
    return figure, axes


def _save_figure(figure: Figure, path: Location) -> Location:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    write_bytes_atomic(buffer.getvalue(), path)
    return path


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("._") or "class"

