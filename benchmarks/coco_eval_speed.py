"""Does faster-coco-eval give pycocotools' COCO bbox numbers, and how much faster is it?

On each case both libraries evaluate the same ground truth and detections through their
pycocotools API (COCO, loadRes, then COCOeval or COCOeval_faster; bbox, default parameters). The
table gives the largest difference of the twelve summary stats and of the per-class AP (taken
from `eval['precision']` as `pipeline/evaluation/coco_metrics.py` takes it), how many cells of
the accumulated precision array differ and whether the recall and score arrays are identical,
and the seconds of evaluate + accumulate + summarize (median of --repeats, the two libraries
interleaved, the process held to one CPU; wall clock and the process's CPU time, which a busy
machine disturbs less). The cases:

- `evalcase`, `evalcase-variant`: $APLOSS_DATA_ROOT/coco_evalcase, COCO ground truth and
  detections with published metrics, which both libraries are also checked against;
- `bccd-test`: BCCD's prepared test split (prepared under --work if missing) with plausible
  detections;
- `synthetic-N`: N val images of benchmarks/synthetic_coco.py (--synthetic-images) with
  plausible detections.

Plausible detections (seeded): 85 % of the non-crowd ground-truth boxes found, each jittered by
about 10 % of its size, 5 % of them with a wrong class and 10 % found twice, with high scores;
plus Poisson(2) false positives per image at random places and classes, with low scores. Scores
keep 3 decimals, as detectors' json often does, so that the libraries' sorting of ties is
compared too.

faster-coco-eval is a dependency of this project since this check (pipeline/evaluation/
coco_metrics.py evaluates with it; benchmarks/README.md, "COCO evaluation"):

    APLOSS_DATA_ROOT=../shared/datasets .venv/bin/python benchmarks/coco_eval_speed.py --synthetic-images 2000 5000

Prints a markdown table and writes benchmarks/results/coco_eval_speed.json.
"""
import argparse
import contextlib
import importlib.util
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from pipeline.data.prep import prepare  # noqa: E402
from pipeline.evaluation.coco_metrics import METRIC_NAMES  # noqa: E402

# coco_evalcase/README.md's published bbox stats, in METRIC_NAMES' order, and their decimals.
PUBLISHED = {
    "evalcase": (3, [0.505, 0.697, 0.573, 0.586, 0.519, 0.501, 0.387, 0.594, 0.595, 0.640, 0.566, 0.564]),
    "evalcase-variant": (6, [0.503647, 0.696973, 0.571667, 0.593252, 0.557991, 0.489363, 0.386813, 0.593680,
                             0.595353, 0.654764, 0.603130, 0.553744]),
}
FOUND, WRONG_CLASS, FOUND_TWICE, JITTER, FALSE_POSITIVES = 0.85, 0.05, 0.10, 0.10, 2.0


@dataclass
class Case:
    name: str
    ground_truth: str  # json text, parsed afresh for every run: both libraries mark its annotations
    detections: list[dict]


@dataclass
class Run:
    stats: np.ndarray
    precision: np.ndarray  # eval['precision'] [iou, recall, class, area, max dets]
    recall: np.ndarray
    scores: np.ndarray
    seconds: float  # evaluate + accumulate + summarize, wall clock
    cpu_seconds: float  # the same, this process's CPU time


def run_pycocotools(ground_truth: str, detections: list[dict]) -> Run:
    dataset = json.loads(ground_truth)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools print()s its progress
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        return _evaluate(COCOeval(gt, gt.loadRes([dict(d) for d in detections]), iouType="bbox"))


def faster_runner() -> Callable[[str, list[dict]], Run]:
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster

    def run_faster(ground_truth: str, detections: list[dict]) -> Run:
        dataset = json.loads(ground_truth)
        gt = FasterCOCO(dataset)
        return _evaluate(COCOeval_faster(gt, gt.loadRes([dict(d) for d in detections]), iouType="bbox",
                                         print_function=lambda *_: None))

    return run_faster


def _evaluate(evaluator: Any) -> Run:
    start, start_cpu = time.perf_counter(), time.process_time()
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    result = evaluator.eval
    return Run(np.asarray(evaluator.stats[:len(METRIC_NAMES)], dtype=float), np.asarray(result["precision"]),
               np.asarray(result["recall"]), np.asarray(result["scores"]), seconds, cpu_seconds)


def per_class_ap(precision: np.ndarray) -> np.ndarray:
    """AP@[.50:.95] per class at area all and 100 detections, NaN without ground truth."""
    cells = precision[:, :, :, 0, -1]
    defined = cells > -1
    with np.errstate(invalid="ignore"):
        return np.where(defined, cells, 0).sum(axis=(0, 1)) / defined.sum(axis=(0, 1))


def max_difference(a: np.ndarray, b: np.ndarray) -> float:
    """The largest |a - b|, where NaN (undefined) on both sides counts as equal."""
    both_nan = np.isnan(a) & np.isnan(b)
    if (np.isnan(a) != np.isnan(b)).any():
        return float("inf")
    return float(np.abs(a[~both_nan] - b[~both_nan]).max(initial=0.0))


def plausible_detections(ground_truth: dict, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    sizes = {image["id"]: (image["width"], image["height"]) for image in ground_truth["images"]}
    categories = [category["id"] for category in ground_truth["categories"]]
    detections = []

    def add(image_id: int, category: int, x: float, y: float, w: float, h: float, score: float) -> None:
        width, height = sizes[image_id]
        x0, y0 = min(max(x, 0.0), width - 1.0), min(max(y, 0.0), height - 1.0)
        x1, y1 = min(max(x + w, x0 + 1.0), width), min(max(y + h, y0 + 1.0), height)
        detections.append({"image_id": image_id, "category_id": category, "score": round(score, 3),
                           "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]})

    for annotation in ground_truth["annotations"]:
        if annotation["iscrowd"] or rng.random() > FOUND:
            continue
        x, y, w, h = annotation["bbox"]
        for _ in range(1 + int(rng.random() < FOUND_TWICE)):
            category = int(rng.choice(categories)) if rng.random() < WRONG_CLASS else annotation["category_id"]
            dx, dy, sw, sh = rng.normal(0, JITTER, 4)
            add(annotation["image_id"], category, x + dx * w, y + dy * h, w * np.exp(sw), h * np.exp(sh),
                rng.beta(5, 2))
    for image_id, (width, height) in sizes.items():
        for _ in range(rng.poisson(FALSE_POSITIVES)):
            w, h = rng.uniform(0.03, 0.5) * width, rng.uniform(0.03, 0.5) * height
            add(image_id, int(rng.choice(categories)), rng.uniform(0, width - w), rng.uniform(0, height - h), w, h,
                rng.beta(2, 5))
    return detections


def evalcase_cases(data_root: Path) -> list[Case]:
    folder = data_root / "coco_evalcase"
    pairs = {"evalcase": ("instances_val2014_100.json", "instances_val2014_fakebbox100_results.json"),
             "evalcase-variant": ("variant_bboxarea_nocrowd/sampled_gts_bbox_area.json",
                                  "variant_bboxarea_nocrowd/sampled_bbox_results.json")}
    cases = []
    for name, (gt, dt) in pairs.items():
        detections = json.loads((folder / dt).read_text())
        # The variant's detections come as the annotations of a COCO file.
        cases.append(Case(name, (folder / gt).read_text(),
                          detections["annotations"] if isinstance(detections, dict) else detections))
    return cases


def bccd_case(work: Path, seed: int) -> Case:
    result = prepare(load_config(None, [f"run.output_dir={work / 'bccd'}"]), progress=False)
    text = (Path(str(result.directory)) / result.manifest["splits"]["test"]["ground_truth"]["file"]).read_text()
    return Case("bccd-test", text, plausible_detections(json.loads(text), seed))


def synthetic_case(work: Path, images: int, seed: int) -> Case:
    spec = importlib.util.spec_from_file_location("synthetic_coco", REPO / "benchmarks" / "synthetic_coco.py")
    synthetic_coco = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(synthetic_coco)
    written = synthetic_coco.write_synthetic_coco_scale(work / f"synthetic-{images}", {"val": images}, seed)
    json_path, _ = written["val"]
    text = json_path.read_text()
    return Case(f"synthetic-{images}", text, plausible_detections(json.loads(text), seed))


def compare(case: Case, runners: dict[str, Callable[[str, list[dict]], Run]], repeats: int) -> dict:
    runs: dict[str, list[Run]] = {name: [] for name in runners}
    for _ in range(repeats):  # interleaved, so a slower spell of the machine hits both
        for name, runner in runners.items():
            runs[name].append(runner(case.ground_truth, case.detections))
    reference, faster = runs["pycocotools"][0], runs["faster-coco-eval"][0]
    gt = json.loads(case.ground_truth)
    row = {
        "case": case.name, "images": len(gt["images"]), "boxes": len(gt["annotations"]),
        "detections": len(case.detections),
        "stats_max_diff": max_difference(reference.stats, faster.stats),
        "per_class_ap_max_diff": max_difference(per_class_ap(reference.precision), per_class_ap(faster.precision)),
        "precision_equal": bool(np.array_equal(reference.precision, faster.precision)),
        "precision_cells_differing": int((reference.precision != faster.precision).sum()),
        "precision_cells": int(reference.precision.size),
        "precision_max_diff": float(np.abs(reference.precision - faster.precision).max()),
        "recall_equal": bool(np.array_equal(reference.recall, faster.recall)),
        "scores_equal": bool(np.array_equal(reference.scores, faster.scores)),
        "stats": {name: dict(zip(METRIC_NAMES, run.stats.tolist())) for name, run in
                  (("pycocotools", reference), ("faster-coco-eval", faster))},
        "seconds": {name: {"wall": [run.seconds for run in their], "cpu": [run.cpu_seconds for run in their]}
                    for name, their in runs.items()},
    }
    if case.name in PUBLISHED:
        decimals, published = PUBLISHED[case.name]
        row["published_max_diff"] = {name: float(np.abs(np.round(run.stats, decimals) - published).max())
                                     for name, run in (("pycocotools", reference), ("faster-coco-eval", faster))}
    return row


def table(rows: list[dict]) -> str:
    lines = ["| case | images | gt boxes | detections | max Δ 12 stats | max Δ per-class AP "
             "| precision cells differing (max Δ) | recall, scores equal | pycocotools s (cpu) | faster s (cpu) "
             "| speed-up (cpu) |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for row in rows:
        median = {name: {kind: statistics.median(values) for kind, values in seconds.items()}
                  for name, seconds in row["seconds"].items()}
        reference, faster = median["pycocotools"], median["faster-coco-eval"]
        lines.append(
            f"| {row['case']} | {row['images']:,} | {row['boxes']:,} | {row['detections']:,} "
            f"| {row['stats_max_diff']:.1e} | {row['per_class_ap_max_diff']:.1e} "
            f"| {row['precision_cells_differing']:,} of {row['precision_cells']:,} ({row['precision_max_diff']:.1e}) "
            f"| {'yes' if row['recall_equal'] and row['scores_equal'] else 'no'} "
            f"| {reference['wall']:.3f} ({reference['cpu']:.3f}) | {faster['wall']:.3f} ({faster['cpu']:.3f}) "
            f"| {reference['wall'] / faster['wall']:.1f}x ({reference['cpu'] / faster['cpu']:.1f}x) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--synthetic-images", type=int, nargs="+", default=[2000], help="one case per number")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/coco_eval_speed"),
                        help="where the prepared BCCD and the synthetic data go")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "coco_eval_speed.json")
    args = parser.parse_args()
    if importlib.util.find_spec("faster_coco_eval") is None:
        print("coco_eval_speed: faster_coco_eval is not importable; install the project's dependencies "
              "(.venv/bin/python -m pip install -e .)", file=sys.stderr)
        return 2
    data_root = Path(os.environ.get("APLOSS_DATA_ROOT", REPO / "data"))
    # One CPU, as an evaluation worker gets: the timing is of one thread whatever either library starts.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    cases = [*evalcase_cases(data_root), bccd_case(args.work, args.seed),
             *(synthetic_case(args.work, images, args.seed) for images in args.synthetic_images)]
    runners = {"pycocotools": run_pycocotools, "faster-coco-eval": faster_runner()}
    rows = [compare(case, runners, args.repeats) for case in cases]
    print(table(rows))
    for row in rows:
        if "published_max_diff" in row:
            print(f"{row['case']}: max |stat - published| " + ", ".join(
                f"{name} {diff:.1e}" for name, diff in row["published_max_diff"].items()) + " (at its decimals)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
