"""Pascal VOC AP on hand-built cases with hand-computed values, and against pycocotools' AP50."""
import json
import math
from pathlib import Path

import pytest

from pipeline.evaluation.coco_metrics import evaluate_detections
from pipeline.evaluation.voc_metrics import voc_map
from tests.conftest import DATA_ROOT

# 11-point and area AP of the ranking TP, FP, TP against two positives. The precision-recall
# points are (P 1, R 0.5), (P 0.5, R 0.5), (P 2/3, R 1):
#   11-point: thresholds 0, 0.1, ..., 0.5 reach precision 1 (first point), 0.6, ..., 1 only
#             2/3 (last point): (6 * 1 + 5 * 2/3) / 11
#   area: the envelope is 1 up to recall 0.5 and 2/3 from 0.5 to 1: 0.5 * 1 + 0.5 * 2/3
TP_FP_TP_11POINT = (6 * 1 + 5 * 2 / 3) / 11
TP_FP_TP_AREA = 0.5 * 1 + 0.5 * 2 / 3


def _ground_truth(tmp_path: Path, boxes: list[tuple[int, int, list[float], int]]) -> Path:
    """A COCO instances file of 200x200 images 1 and 2, classes 1 "a" and 2 "b", and `boxes`
    as (image_id, category_id, xywh, iscrowd)."""
    data = {
        "images": [{"id": 1, "width": 200, "height": 200}, {"id": 2, "width": 200, "height": 200}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [{"id": index + 1, "image_id": image, "category_id": category, "bbox": xywh,
                         "area": xywh[2] * xywh[3], "iscrowd": crowd}
                        for index, (image, category, xywh, crowd) in enumerate(boxes)],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


def _detection(xywh: list[float], score: float, category: int = 1, image: int = 1) -> dict:
    return {"image_id": image, "category_id": category, "bbox": xywh, "score": score}


def test_tp_fp_tp(tmp_path):
    gt = _ground_truth(tmp_path, [(1, 1, [0, 0, 10, 10], 0), (1, 1, [20, 20, 10, 10], 0)])
    detections = [_detection([0, 0, 10, 10], 0.9),  # TP
                  _detection([50, 50, 10, 10], 0.8),  # FP: overlaps nothing
                  _detection([20, 20, 10, 10], 0.7)]  # TP
    result = voc_map(gt, detections)
    assert result.per_class_11point["a"] == pytest.approx(TP_FP_TP_11POINT)
    assert result.per_class_area["a"] == pytest.approx(TP_FP_TP_AREA)
    assert result.map_11point == pytest.approx(TP_FP_TP_11POINT)
    assert result.map_area == pytest.approx(TP_FP_TP_AREA)


def test_duplicate_is_a_false_positive(tmp_path):
    # The second detection's best ground truth (IoU 9*10 / (200 - 90) = 0.82) is already taken,
    # so the ranking is again TP, FP, TP.
    gt = _ground_truth(tmp_path, [(1, 1, [0, 0, 10, 10], 0), (1, 1, [20, 20, 10, 10], 0)])
    detections = [_detection([0, 0, 10, 10], 0.9), _detection([1, 0, 10, 10], 0.8),
                  _detection([20, 20, 10, 10], 0.7)]
    result = voc_map(gt, detections)
    assert result.per_class_11point["a"] == pytest.approx(TP_FP_TP_11POINT)
    assert result.per_class_area["a"] == pytest.approx(TP_FP_TP_AREA)


def test_difficult_objects_are_ignored(tmp_path):
    # One ordinary object and one difficult. The two top-ranked detections hit the difficult
    # one: neither TP nor FP. Then a TP on the ordinary object, its only positive: precision
    # 1 at recall 1, AP 1. Counting the difficult hits as FPs would give precision 1/3;
    # counting the difficult object as a positive would cap recall at 0.5.
    gt = _ground_truth(tmp_path, [(1, 1, [0, 0, 10, 10], 0), (1, 1, [20, 20, 10, 10], 1)])
    detections = [_detection([20, 20, 10, 10], 0.95), _detection([21, 20, 10, 10], 0.9),
                  _detection([0, 0, 10, 10], 0.8)]
    result = voc_map(gt, detections)
    assert result.per_class_11point["a"] == pytest.approx(1.0)
    assert result.per_class_area["a"] == pytest.approx(1.0)


def test_iou_is_continuous(tmp_path):
    # Image 1: IoU (10*5) / (100 + 50 - 50) = 0.5 exactly, a TP (>= 0.5). Image 2: IoU 0.49, an
    # FP; the devkit's "+1" would make it 11*5.9 / 121 = 0.54, a TP. TP, FP against two
    # positives: points (1, 0.5), (0.5, 0.5): 11-point 6/11, area 0.5.
    gt = _ground_truth(tmp_path, [(1, 1, [0, 0, 10, 10], 0), (2, 1, [0, 0, 10, 10], 0)])
    detections = [_detection([0, 0, 10, 5], 0.9), _detection([0, 0, 10, 4.9], 0.8, image=2)]
    result = voc_map(gt, detections)
    assert result.per_class_11point["a"] == pytest.approx(6 / 11)
    assert result.per_class_area["a"] == pytest.approx(0.5)


def test_class_without_positives_is_nan_and_left_out(tmp_path):
    # "b" has only a difficult object, so no positives; its detections do not matter.
    gt = _ground_truth(tmp_path, [(1, 1, [0, 0, 10, 10], 0), (2, 2, [0, 0, 10, 10], 1)])
    detections = [_detection([0, 0, 10, 10], 0.9), _detection([50, 50, 10, 10], 0.9, category=2)]
    result = voc_map(gt, detections)
    assert math.isnan(result.per_class_11point["b"]) and math.isnan(result.per_class_area["b"])
    assert result.per_class_11point["a"] == result.per_class_area["a"] == pytest.approx(1.0)
    assert result.map_11point == result.map_area == pytest.approx(1.0)


def test_no_detections_score_zero(tmp_path):
    gt = _ground_truth(tmp_path, [(1, 1, [0, 0, 10, 10], 0)])
    result = voc_map(gt, [])
    assert result.per_class_11point["a"] == result.per_class_area["a"] == 0.0
    assert math.isnan(result.per_class_area["b"])
    assert result.map_11point == result.map_area == 0.0


def test_unknown_category_is_an_error(tmp_path):
    gt = _ground_truth(tmp_path, [(1, 1, [0, 0, 10, 10], 0)])
    with pytest.raises(ValueError, match="category_id"):
        voc_map(gt, [_detection([0, 0, 10, 10], 0.9, category=7)])


def test_close_to_coco_ap50():
    folder = DATA_ROOT / "coco_evalcase"
    if not (folder / "instances_val2014_100.json").is_file():
        pytest.skip(f"{folder} not present")
    gt = folder / "instances_val2014_100.json"
    detections = folder / "instances_val2014_fakebbox100_results.json"
    voc = voc_map(gt, detections).map_area
    coco = evaluate_detections(gt, detections).metrics["AP50"]
    # Not equal: COCO interpolates at 101 recall points, keeps 100 detections per image and
    # matches crowd regions by intersection over the detection's area.
    assert voc != coco and abs(voc - coco) < 0.03, f"VOC area mAP {voc:.4f}, COCO AP50 {coco:.4f}"
