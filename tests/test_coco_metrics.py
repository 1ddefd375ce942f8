"""COCO metrics against published numbers and hand-computed per-class AP; plots and drawings."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.evaluation.coco_metrics import METRIC_NAMES, draw_detections, evaluate_detections, plot_pr_curves
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


def test_draw_detections(tmp_path):
    image = torch.full((3, 60, 80), 128, dtype=torch.uint8)
    out = tmp_path / "sample" / "drawn.png"
    draw_detections(image, torch.tensor([[10.0, 10.0, 40.0, 50.0]]), ["cat"], torch.tensor([0.87]),
                    out, ground_truth=torch.tensor([[50.0, 5.0, 75.0, 55.0]]))
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(out) as png:
        drawn = np.asarray(png)
    assert drawn.shape == (60, 80, 3)
    assert drawn[30, 10].tolist() == [255, 0, 0]  # detection's left edge
    assert drawn[30, 50].tolist() == [0, 255, 0]  # ground truth's left edge
    assert drawn[30, 25].tolist() == [128, 128, 128]  # untouched inside
    with pytest.raises(ValueError, match="1 boxes, 2 labels"):
        draw_detections(image, torch.zeros(1, 4), ["a", "b"], torch.zeros(1), out)


def test_write_json_atomic(tmp_path):
    path = tmp_path / "deep" / "metrics.json"
    write_json_atomic({"AP": 0.5}, path)
    write_json_atomic({"AP": 0.6}, path)
    assert json.loads(path.read_text()) == {"AP": 0.6}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]
