"""Anchors that fit the data: the anchor recall computed without an IoU matrix equals the brute
force over the detector's own anchors; `auto` fitted to BCCD's training boxes reaches the small
platelets the paper's anchors miss; the recall warning names such a class."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from aploss.anchor_layout import AnchorLayout
from aploss.anchors import best_iou, input_scale
from aploss.architectures import build_detector
from pipeline.config import ConfigError, config_from_dict, load_config
from pipeline.data.anchors import ClassRecall, anchor_recall, fit_anchors, recall_lines, report_anchor_recall
from pipeline.data.prep import prepare
from pipeline.model import build_model
from tests.conftest import DATA_ROOT

LAYOUTS = [AnchorLayout.paper(), AnchorLayout.paper(3, 2, 2.0, (0.77, 0.96, 1.18)), AnchorLayout.paper(2, 3, 2.83)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["paper", "p2-fitted-ratios", "base-2.83"])
@pytest.mark.parametrize("size", [(256, 341), (300, 300), (97, 530)])
def test_best_iou_is_the_maximum_over_every_anchor(layout, size):
    height, width = size
    generator = torch.Generator().manual_seed(height)
    centres = torch.rand(400, 2, generator=generator) * torch.tensor([width, height]) * 1.2 - 10
    sides = torch.rand(400, 2, generator=generator) ** 2 * 300 + 2
    boxes = torch.cat([centres - sides / 2, centres + sides / 2], dim=1).to(torch.float64)
    brute = box_iou(boxes, layout.anchors(height, width).to(torch.float64)).amax(dim=1)
    assert torch.equal(best_iou(layout, boxes, height, width), brute)


@pytest.mark.parametrize("layout", LAYOUTS[:2], ids=["paper", "p2"])
def test_the_layout_s_anchors_are_the_detector_s(layout):
    model = build_detector("retinanet_r18", 2, min_size=256, max_size=342, anchors=layout).eval()
    seen = {}
    generate = model.anchor_generator.forward

    def capture(batch, features):
        seen["anchors"], seen["size"] = generate(batch, features), batch.image_sizes[0]
        return seen["anchors"]

    model.anchor_generator.forward = capture
    with torch.no_grad():
        model([torch.rand(3, 480, 640)])
    assert seen["size"] == input_scale(480, 640, 256, 342) == (256, 341)
    assert torch.equal(seen["anchors"][0], layout.anchors(256, 341))


def test_explicit_anchors_are_validated():
    assert load_config(None, ["model.anchors.mode=explicit", "model.anchors.lowest_level=2",
                              "model.anchors.sizes=[[8], [16], [32], [64], [128], [256]]",
                              "model.anchors.ratios=[[1], [1], [1], [1], [1], [1]]"]).model.anchors.layout().strides \
        == (4, 8, 16, 32, 64, 128)
    with pytest.raises(ConfigError, match="P3-P7 need 5 lists"):
        load_config(None, ["model.anchors.mode=explicit", "model.anchors.sizes=[[16], [32]]",
                           "model.anchors.ratios=[[1], [1]]"])
    with pytest.raises(ConfigError, match="same number of sizes x ratios"):
        load_config(None, ["model.anchors.mode=explicit", "model.anchors.sizes=[[16], [32], [64], [128], [256, 300]]",
                           "model.anchors.ratios=[[1], [1], [1], [1], [1]]"])
    with pytest.raises(ConfigError, match="model.anchors: ssd300_vgg16 has SSD's default boxes"):
        load_config(None, ["model.arch=ssd300_vgg16", "train.input_size=300", "model.anchors.mode=paper"])
    unfitted = build_model(load_config(None, ["model.anchors.mode=auto"]), 3).anchor_generator.sizes
    assert unfitted == AnchorLayout.paper().sizes


@pytest.fixture(scope="module")
def bccd(tmp_path_factory):
    if not (DATA_ROOT / "bccd" / "BCCD").is_dir():
        pytest.skip("BCCD not in the data root")
    config = config_from_dict({"data": {"root": str(DATA_ROOT), "download": False},
                               "model": {"anchors": {"mode": "paper"}},
                               "run": {"output_dir": str(tmp_path_factory.mktemp("bccd"))}})
    return config.with_prepared(prepare(config, progress=False).directory)


def test_prep_records_box_statistics_per_class(bccd):
    stats = json.loads((Path(bccd.data.prepared) / "manifest.json").read_text())["splits"]["train"]["box_stats"]
    assert {name: value["boxes"] for name, value in stats.items()} == {"RBC": 2381, "WBC": 214, "Platelets": 209}
    low, median, high = stats["Platelets"]["sqrt_area"]
    assert low < median < high < stats["RBC"]["sqrt_area"][1]


def test_auto_anchors_reach_the_platelets_the_paper_s_miss(bccd, capsys):
    paper = anchor_recall(bccd, "train")
    auto_config = dataclasses.replace(bccd, model=dataclasses.replace(
        bccd.model, anchors=dataclasses.replace(bccd.model.anchors, mode="auto")))
    fitted = fit_anchors(auto_config)
    auto = anchor_recall(fitted, "train")
    assert paper["Platelets"].recall < 0.5 < 0.95 < auto["Platelets"].recall
    assert sum(r.recall for r in auto.values()) > sum(r.recall for r in paper.values())
    assert fitted.model.anchors.sizes and fit_anchors(fitted) == fitted  # fitted once, then kept
    assert build_model(fitted, 3).anchor_generator.sizes == tuple(map(tuple, fitted.model.anchors.sizes))

    report_anchor_recall(bccd)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("anchor recall (IoU >= 0.5, P3-P7, paper): RBC 100%, WBC 100%, Platelets ")
    (warning,) = lines[1:]
    assert warning.startswith("warning: class Platelets: only ") and "median box 21x20 px" in warning
    assert warning.endswith("set model.anchors.mode=auto, model.anchors.lowest_level=2 or a larger model.min_size")
    assert recall_lines(auto, fitted)[1:] == []
    # Advice already taken is not given again.
    missed = {"tiny": ClassRecall(0.1, 10, (4.0, 4.0))}
    assert recall_lines(missed, fitted)[1].endswith("set model.anchors.lowest_level=2 or a larger model.min_size")


def test_a_run_s_rerun_takes_its_recorded_anchors_and_refits_for_other_data(tmp_path, monkeypatch):
    # A finished run's rerun spent most of its time refitting the anchors its record holds.
    from pipeline.data.synthetic import coco_settings, write_synthetic_coco
    from pipeline.training import preparation

    write_synthetic_coco(tmp_path / "data", {"train": 4, "val": 2})
    settings = [*coco_settings(tmp_path / 'data'),
                "model.min_size=96", "model.max_size=96", f"run.output_dir={tmp_path / 'runs'}", "run.name=rerun"]
    config = load_config(None, settings)
    prepare(config, progress=False)
    bound, _ = preparation.prepare_training(config)
    assert bound.model.anchors.sizes

    def no_fitting(config):
        raise AssertionError("refitted the anchors the run's record holds")

    monkeypatch.setattr("pipeline.data.anchors.fit_anchors", no_fitting)
    assert preparation.prepare_training(config)[0] == bound
    # Other data under the same run name is fitted afresh (and the record check refuses it).
    other = load_config(None, [*settings, "data.min_box_size=9"])
    prepare(other, progress=False)
    with pytest.raises(AssertionError, match="refitted"):
        preparation.training_data(other)
