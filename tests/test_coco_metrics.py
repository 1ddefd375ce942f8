"""COCO metrics against published numbers, hand-computed per-class AP and pycocotools' own
COCOeval; plots and drawings."""
import contextlib
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.config import config_from_dict
from pipeline.data.prep import prepare
from pipeline.evaluation.coco_metrics import METRIC_NAMES, PR_IOU_THRESHOLDS, evaluate_detections, plot_pr_curves
from pipeline.inference.drawing import draw_detections
from pipeline.io import write_json_atomic
from tests.conftest import DATA_ROOT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# cocoapi's val2014 fake-detections printout (dataset README), in METRIC_NAMES order.
PUBLISHED = (0.505, 0.697, 0.573, 0.586, 0.519, 0.501, 0.387, 0.594, 0.595, 0.640, 0.566, 0.564)


@pytest.fixture(scope="module")
def evalcase() -> Path:
    folder = DATA_ROOT / "coco_evalcase"
    if not (folder / "instances_val2014_100.json").is_file():
        pytest.skip(f"{folder} not present")
    return folder


def _box(category: int, xywh: list[float], score: float | None = None, id: int = 0) -> dict:
    if score is None:
        return {"id": id, "image_id": 1, "category_id": category, "bbox": xywh,
                "area": xywh[2] * xywh[3], "iscrowd": 0}
    return {"image_id": 1, "category_id": category, "bbox": xywh, "score": score}


def _case(tmp_path: Path) -> tuple[Path, list[dict]]:
    """One 200x200 image with small, medium and large objects whose per-class AP is known.

    A: both objects found                      -> AP 1
    B: one of two found, ranked first          -> recall 0.5 at precision 1: the 51 recall
                                                  points 0..0.50 score 1, the rest 0: 51/101
    C: a false positive outranks the one hit   -> precision 1/2 at recall 1, interpolated
                                                  back to recall 0: AP 0.5
    D: the one hit has IoU 0.72                -> a hit at IoU 0.50..0.70, a miss at
                                                  0.75..0.95: AP 0.5, AP50 1
    E ("empty"): no ground truth, no detections -> NaN
    """
    gt_boxes = [
        (1, [10, 10, 20, 20]), (1, [50, 50, 120, 120]),
        (2, [10, 100, 50, 50]), (2, [100, 10, 50, 50]),
        (3, [140, 140, 40, 40]),
        (4, [0, 0, 10, 10]),
    ]
    ground_truth = {
        "images": [{"id": 1, "width": 200, "height": 200}, {"id": 2, "width": 200, "height": 200}],
        "categories": [{"id": 1, "name": "A"}, {"id": 2, "name": "B/two"}, {"id": 3, "name": "C"},
                       {"id": 4, "name": "D"}, {"id": 5, "name": "empty"}],
        "annotations": [_box(c, xywh, id=i + 1) for i, (c, xywh) in enumerate(gt_boxes)],
    }
    detections = [
        _box(1, [10, 10, 20, 20], 0.9), _box(1, [50, 50, 120, 120], 0.8),
        _box(2, [10, 100, 50, 50], 0.95),
        _box(3, [0, 160, 30, 30], 0.9), _box(3, [140, 140, 40, 40], 0.8),
        _box(4, [0, 0, 10, 7.2], 0.7),
    ]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(ground_truth))
    return path, detections


def test_published_metrics(evalcase):
    result = evaluate_detections(evalcase / "instances_val2014_100.json",
                                 evalcase / "instances_val2014_fakebbox100_results.json")
    assert list(result.metrics) == list(METRIC_NAMES)
    assert tuple(round(result.metrics[name], 3) for name in METRIC_NAMES) == PUBLISHED
    assert result.metrics["AP"] == pytest.approx(0.5045806987249628, abs=1e-12)
    # Every class with ground truth has all its cells defined, so the class mean is the AP.
    defined = [ap for ap in result.per_class_ap.values() if not math.isnan(ap)]
    assert sum(defined) / len(defined) == pytest.approx(result.metrics["AP"])
    defined50 = [ap for ap in result.per_class_ap50.values() if not math.isnan(ap)]
    assert sum(defined50) / len(defined50) == pytest.approx(result.metrics["AP50"])
    assert "maxDets=100 ] = 0.505" in result.summary


@pytest.fixture(scope="module")
def bccd_test_ground_truth(tmp_path_factory) -> Path:
    if not (DATA_ROOT / "bccd" / "BCCD").is_dir():
        pytest.skip("BCCD not in the data root")
    config = config_from_dict({"data": {"root": str(DATA_ROOT), "download": False},
                               "run": {"output_dir": str(tmp_path_factory.mktemp("bccd"))}})
    result = prepare(config, progress=False)
    return Path(str(result.directory)) / result.manifest["splits"]["test"]["ground_truth"]["file"]


def _plausible_detections(ground_truth: dict, seed: int) -> list[dict]:
    """Seeded detector-like results: most non-crowd boxes found (jittered, some twice, some under
    another class) with high scores, plus false positives with low scores; scores of 2 decimals,
    so that many tie within an image and class."""
    rng = np.random.default_rng(seed)
    sizes = {image["id"]: (image["width"], image["height"]) for image in ground_truth["images"]}
    categories = sorted(category["id"] for category in ground_truth["categories"])
    detections = []

    def add(image_id: int, category: int, x: float, y: float, w: float, h: float, score: float) -> None:
        width, height = sizes[image_id]
        x0, y0 = min(max(x, 0.0), width - 1.0), min(max(y, 0.0), height - 1.0)
        x1, y1 = min(max(x + w, x0 + 1.0), width), min(max(y + h, y0 + 1.0), height)
        detections.append({"image_id": image_id, "category_id": category, "score": round(float(score), 2),
                           "bbox": [x0, y0, x1 - x0, y1 - y0]})

    for annotation in ground_truth["annotations"]:
        if annotation["iscrowd"] or rng.random() > 0.85:
            continue
        x, y, w, h = annotation["bbox"]
        for _ in range(1 + int(rng.random() < 0.1)):
            category = int(rng.choice(categories)) if rng.random() < 0.05 else annotation["category_id"]
            dx, dy, sw, sh = rng.normal(0, 0.1, 4)
            add(annotation["image_id"], category, x + dx * w, y + dy * h, w * np.exp(sw), h * np.exp(sh),
                rng.beta(5, 2))
    for image_id, (width, height) in sizes.items():
        for _ in range(rng.poisson(3)):
            w, h = rng.uniform(0.03, 0.5) * width, rng.uniform(0.03, 0.5) * height
            add(image_id, int(rng.choice(categories)), rng.uniform(0, width - w), rng.uniform(0, height - h),
                w, h, rng.beta(2, 5))
    return detections


def _pycocotools(ground_truth: Path, detections: list[dict]) -> tuple[COCOeval, str]:
    """pycocotools' COCOeval run directly, and its summary printout."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ground_truth))
        evaluator = COCOeval(gt, gt.loadRes([dict(detection) for detection in detections]), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    with contextlib.redirect_stdout(io.StringIO()) as summary:
        evaluator.summarize()
    return evaluator, summary.getvalue()


# faster-coco-eval computes some precision cells 1 ulp away from pycocotools (the recall and
# score arrays are identical); on BCCD none of them reaches a summary stat or a class's AP, on
# COCO's 80 classes they move some means by 1 ulp. A real difference (a match, a tie's order,
# an interpolation) moves them by 1e-4 or more.
@pytest.mark.parametrize("case, stats_tolerance", [("bccd-test", 0.0), ("coco_evalcase", 1e-15)])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_same_numbers_as_pycocotools(request, case, stats_tolerance, seed):
    if case == "bccd-test":  # 3 classes, no crowd
        ground_truth = request.getfixturevalue("bccd_test_ground_truth")
    else:  # 80 sparse category ids, crowd boxes, classes without ground truth
        ground_truth = request.getfixturevalue("evalcase") / "instances_val2014_100.json"
    detections = _plausible_detections(json.loads(ground_truth.read_text()), seed)
    scores = [(d["image_id"], d["category_id"], d["score"]) for d in detections]
    assert len(set(scores)) < len(scores) - 20  # plenty of tied scores within an image and class
    result = evaluate_detections(ground_truth, detections)
    reference, summary = _pycocotools(ground_truth, detections)

    expected = dict(zip(METRIC_NAMES, reference.stats.tolist()))
    assert set(expected.values()) != {0.0} and -1 not in expected.values()
    if stats_tolerance == 0:
        assert result.metrics == expected
    else:
        assert result.metrics == pytest.approx(expected, abs=stats_tolerance, rel=0)
    assert result.summary == summary

    params = reference.params
    cells = reference.eval["precision"][:, :, :, params.areaRngLbl.index("all"), params.maxDets.index(100)]
    names = [reference.cocoGt.cats[category]["name"] for category in params.catIds]
    rows = [int(np.flatnonzero(np.isclose(params.iouThrs, iou))[0]) for iou in PR_IOU_THRESHOLDS]
    assert list(result.per_class_ap) == names and np.array_equal(result.recall, params.recThrs)
    for k, name in enumerate(names):
        defined = cells[:, :, k][cells[:, :, k] > -1]
        ap = defined.mean() if defined.size else math.nan
        assert result.per_class_ap[name] == pytest.approx(ap, abs=stats_tolerance, rel=0, nan_ok=True)
        curves = np.where(cells[rows, :, k] > -1, cells[rows, :, k], np.nan)
        np.testing.assert_allclose(result.precision[name], curves, rtol=0, atol=1e-12, equal_nan=True)
    assert any(math.isnan(ap) for ap in result.per_class_ap.values()) == (case == "coco_evalcase")


def test_evaluation_keeps_off_the_console(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    gt, detections = _case(tmp_path)
    evaluate_detections(gt, detections)
    evaluate_detections(gt, [])
    assert capsys.readouterr() == ("", "") and not caplog.records


def test_per_class_ap_by_construction(tmp_path):
    gt, detections = _case(tmp_path)
    result = evaluate_detections(gt, detections)
    assert result.per_class_ap["A"] == pytest.approx(1.0)
    assert result.per_class_ap["B/two"] == pytest.approx(51 / 101)
    assert result.per_class_ap["C"] == pytest.approx(0.5)
    assert result.per_class_ap["D"] == pytest.approx(0.5)
    assert math.isnan(result.per_class_ap["empty"])
    ap50 = {name: value for name, value in result.per_class_ap50.items() if name != "empty"}
    assert ap50 == pytest.approx({"A": 1.0, "B/two": 51 / 101, "C": 0.5, "D": 1.0})
    assert result.metrics["AP"] == pytest.approx((1 + 51 / 101 + 0.5 + 0.5) / 4)


def test_precision_curves(tmp_path):
    gt, detections = _case(tmp_path)
    result = evaluate_detections(gt, detections)
    assert result.recall.shape == (101,) and result.recall[50] == 0.5
    # COCOeval divides by tp + fp + eps, so a perfect precision is 1 - eps.
    at50, at75 = result.precision["D"]
    assert at50 == pytest.approx([1.0] * 101) and (at75 == 0).all()
    b = result.precision["B/two"][0]
    assert b[:51] == pytest.approx([1.0] * 51) and (b[51:] == 0).all()
    assert torch.isnan(torch.from_numpy(result.precision["empty"])).all()


def test_detections_from_file_and_inputs_untouched(tmp_path):
    gt, detections = _case(tmp_path)
    snapshot = json.loads(json.dumps(detections))
    from_list = evaluate_detections(gt, detections)
    assert detections == snapshot
    path = tmp_path / "detections.json"
    path.write_text(json.dumps(detections))
    assert evaluate_detections(gt, path).metrics == from_list.metrics


def test_empty_detections_score_zero(tmp_path):
    gt, _ = _case(tmp_path)
    result = evaluate_detections(gt, [])
    assert result.metrics == dict.fromkeys(METRIC_NAMES, 0.0)
    assert {name: ap for name, ap in result.per_class_ap.items() if name != "empty"} == {
        "A": 0.0, "B/two": 0.0, "C": 0.0, "D": 0.0}
    assert "Average Precision" in result.summary


def test_area_without_ground_truth_is_nan(tmp_path):
    gt, detections = _case(tmp_path)
    small_only = json.loads(gt.read_text())
    small_only["annotations"] = [a for a in small_only["annotations"] if a["area"] < 32 ** 2]
    gt.write_text(json.dumps(small_only))
    metrics = evaluate_detections(gt, detections).metrics
    assert math.isnan(metrics["APm"]) and math.isnan(metrics["APl"]) and metrics["APs"] > 0


@pytest.mark.parametrize("key, bad_id", [("category_id", 77), ("image_id", 9)])
def test_unknown_ids_are_named(tmp_path, key, bad_id):
    gt, detections = _case(tmp_path)
    detections[2][key] = bad_id
    with pytest.raises(ValueError, match=rf"{key}.*: {bad_id}$"):
        evaluate_detections(gt, detections)


def test_detection_without_score(tmp_path):
    gt, detections = _case(tmp_path)
    del detections[1]["score"]
    with pytest.raises(ValueError, match="detection 1 lacks score"):
        evaluate_detections(gt, detections)


def test_bad_ground_truth_files_are_named(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError, match="missing.json"):
        evaluate_detections(missing, [])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        evaluate_detections(broken, [])
    no_area = tmp_path / "no_area.json"
    no_area.write_text(json.dumps({"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}],
                                   "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                                                    "bbox": [0, 0, 1, 1], "iscrowd": 0}]}))
    with pytest.raises(ValueError, match=r"no_area.json: annotations\[0\] lacks area"):
        evaluate_detections(no_area, [])
    named = tmp_path / "named_images.json"
    named.write_text(json.dumps({"images": [{"id": "a"}], "categories": [{"id": 1, "name": "a"}],
                                 "annotations": [{"id": 1, "image_id": "a", "category_id": 1,
                                                  "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0}]}))
    with pytest.raises(ValueError, match="named_images.json: image ids must be integers"):
        evaluate_detections(named, [])


def test_pr_curve_pngs(tmp_path):
    gt, detections = _case(tmp_path)
    out_dir = tmp_path / "plots"
    paths = plot_pr_curves(evaluate_detections(gt, detections), out_dir)
    # One per class with ground truth, none for "empty", then the overview.
    assert [p.name for p in paths] == ["pr_000_A.png", "pr_001_B_two.png", "pr_002_C.png",
                                       "pr_003_D.png", "pr_all_classes.png"]
    assert sorted(out_dir.iterdir()) == sorted(paths)  # no temporary files left behind
    for path in paths:
        assert path.read_bytes().startswith(PNG_SIGNATURE)
        with Image.open(path) as png:
            png.verify()


def test_draw_detections_in_a_colour_per_class(tmp_path):
    image = torch.full((3, 60, 120), 128, dtype=torch.uint8)
    out = tmp_path / "sample" / "drawn.png"
    draw_detections(image, torch.tensor([[10.0, 10.0, 40.0, 50.0], [80.0, 10.0, 110.0, 50.0]]), [0, 1],
                    ["cat", "dog"], torch.tensor([0.87, 0.5]), out,
                    ground_truth=torch.tensor([[50.0, 5.0, 75.0, 55.0]]))
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(out) as png:
        drawn = np.asarray(png)
    assert drawn.shape == (60, 120, 3)
    assert drawn[30, 10].tolist() == [0x1F, 0x77, 0xB4]  # the cat's left edge, in tab10's first colour
    assert drawn[30, 80].tolist() == [0xFF, 0x7F, 0x0E]  # the dog's, in its second
    assert drawn[30, 50].tolist() == [0, 255, 0]  # ground truth's left edge
    assert drawn[30, 25].tolist() == [128, 128, 128]  # untouched inside
    with pytest.raises(ValueError, match="1 boxes, 2 labels"):
        draw_detections(image, torch.zeros(1, 4), [0, 1], ["a", "b"], torch.zeros(1), out)


def test_write_json_atomic(tmp_path):
    path = tmp_path / "deep" / "metrics.json"
    write_json_atomic({"AP": 0.5}, path)
    write_json_atomic({"AP": 0.6}, path)
    assert json.loads(path.read_text()) == {"AP": 0.6}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


def test_a_class_without_ground_truth_reads_n_a_in_every_table():
    # `aploss eval` printed nan where `pipeline run` printed n/a.
    from pipeline.evaluation.metrics_table import metrics_table

    table = metrics_table({"AP": 0.5, "AP_small": float("nan")}, {"RBC": 0.25, "WBC": None},
                          {"RBC": 0.75, "WBC": float("nan")})
    assert table.splitlines() == ["| metric | value |", "|---|---|", "| AP | 0.500 |", "| AP_small | n/a |", "",
                                  "| class | AP | AP50 |", "|---|---|---|", "| RBC | 0.250 | 0.750 |",
                                  "| WBC | n/a | n/a |",
                                  "(n/a: the split holds no ground truth of that class or size)"]
    assert "n/a" not in metrics_table({"AP": 0.5}, {"n/a": 0.25}, {"n/a": 0.5}).replace("| n/a |", "")
