
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou, sigmoid_focal_loss

from aploss import ap_loss
from aploss.anchor_assignment import IGNORED, NEGATIVE, assign_anchors, pair_labels
from aploss.architectures import ARCHITECTURES, build_detector
from aploss.detection_loss import DetectionLoss
from aploss.ranking_reference import alrp_reference, rs_reference
from aploss.reference import reference_ap_loss
from aploss.torchvision_private import BoxCoder


def box(x, y, w, h):
    return [x, y, x + w, y + h]


def test_assignment_thresholds_and_forced_best():
    gt = torch.tensor([box(0, 0, 10, 10)], dtype=torch.float32)
    anchors = torch.tensor([
        box(0, 0, 10, 10),   # IoU 1     -> positive
        box(0, 0, 10, 18),   # IoU 0.556 -> positive
        box(0, 0, 10, 22),   # IoU 0.455 -> ignored
        box(0, 0, 10, 30),   # IoU 0.333 -> negative
        box(50, 50, 10, 10),  # IoU 0    -> negative
    ], dtype=torch.float32)
    matched = assign_anchors(anchors, gt)
    assert matched.tolist() == [0, 0, IGNORED, NEGATIVE, NEGATIVE]


def test_each_ground_truth_claims_its_best_anchors_even_below_threshold():
    gt = torch.tensor([box(0, 0, 10, 10), box(100, 100, 10, 10)], dtype=torch.float32)
    anchors = torch.tensor([box(0, 0, 10, 30), box(0, 0, 10, 40), box(100, 100, 10, 30),
                            box(100, 100, 30, 10)], dtype=torch.float32)
    matched = assign_anchors(anchors, gt)
    # gt 0's best (IoU 1/3) becomes positive; gt 1 has two anchors tied at 1/3: both claimed.
    assert matched.tolist() == [0, NEGATIVE, 1, 1]


def test_ground_truth_overlapping_no_anchor_claims_nothing():
    gt = torch.tensor([box(0, 0, 10, 10), box(500, 500, 4, 4)], dtype=torch.float32)
    anchors = torch.tensor([box(0, 0, 10, 10), box(200, 200, 10, 10), box(300, 0, 10, 10)], dtype=torch.float32)
    assert assign_anchors(anchors, gt).tolist() == [0, NEGATIVE, NEGATIVE]


def test_image_without_ground_truth_is_all_negative():
    anchors = torch.tensor([box(0, 0, 10, 10)] * 3, dtype=torch.float32)
    assert assign_anchors(anchors, torch.zeros(0, 4)).tolist() == [NEGATIVE] * 3


def test_pair_labels():
    matched = torch.tensor([1, NEGATIVE, IGNORED, 0])
    labels = pair_labels(matched, torch.tensor([2, 0]), num_classes=3)
    assert labels.tolist() == [[1, 0, 0], [0, 0, 0], [-1, -1, -1], [0, 0, 1]]


def _batch(seed=0, num_images=3, num_anchors=60, num_classes=4):
    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand(num_images, num_anchors, 2, generator=generator) * 80
    wh = 8 + torch.rand(num_images, num_anchors, 2, generator=generator) * 30
    anchors = [torch.cat([p, p + s], 1) for p, s in zip(xy, wh)]
    targets = []
    for image in range(num_images):
        chosen = anchors[image][torch.randperm(num_anchors, generator=generator)[:3]]
        jitter = torch.randn(chosen.shape, generator=generator)
        targets.append({"boxes": chosen + jitter,
                        "labels": torch.randint(num_classes, (3,), generator=generator)})
    logits = torch.randn(num_images, num_anchors, num_classes, generator=generator, requires_grad=True)
    deltas = torch.randn(num_images, num_anchors, 4, generator=generator, requires_grad=True)
    return logits, deltas, anchors, targets


def _labels_and_box_targets(anchors, targets, num_classes, coder):
    labels, positive_deltas = [], []
    for a, t in zip(anchors, targets):
        matched = assign_anchors(a, t["boxes"])
        labels.append(pair_labels(matched, t["labels"], num_classes))
        positive_deltas.append(coder.encode_single(t["boxes"][matched[matched >= 0]], a[matched >= 0]))
    return torch.stack(labels), torch.cat(positive_deltas)


def test_ap_classification_ranks_all_images_together():
    logits, deltas, anchors, targets = _batch()
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    criterion = DetectionLoss(4, coder, "ap", delta=0.5)
    losses = criterion(logits, deltas, anchors, targets)
    labels, _ = _labels_and_box_targets(anchors, targets, 4, coder)
    expected_loss, expected_update = reference_ap_loss(logits.detach().double(), labels, delta=0.5)
    assert losses.positives.item() == (labels == 1).sum().item()
    assert losses.classification.item() == pytest.approx(expected_loss.item(), abs=1e-6)
    losses.classification.backward()
    torch.testing.assert_close(logits.grad.double(), expected_update, atol=1e-6, rtol=1e-5)
    per_image = sum(ap_loss(logits[i].detach(), labels[i], 0.5).item() for i in range(3)) / 3
    assert abs(per_image - expected_loss.item()) > 1e-3  # a batch ranking is not a mean of per-image ones


def test_focal_and_box_terms_match_their_definitions():
    logits, deltas, anchors, targets = _batch(seed=1)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    losses = DetectionLoss(4, coder, "focal", box_beta=0.5)(logits, deltas, anchors, targets)
    labels, box_targets = _labels_and_box_targets(anchors, targets, 4, coder)
    positives = (labels == 1).sum()
    valid = labels >= 0
    focal = sigmoid_focal_loss(logits[valid], labels[valid].float(), 0.25, 2.0, reduction="sum") / positives
    positive_anchors = (labels == 1).any(2)
    smooth = F.smooth_l1_loss(deltas[positive_anchors], box_targets, beta=0.5, reduction="sum") / (4 * positives)
    assert losses.classification.item() == pytest.approx(focal.item(), rel=1e-6)
    assert losses.box_regression.item() == pytest.approx(smooth.item(), rel=1e-6)


def test_giou_box_term_is_the_mean_giou_loss_of_the_decoded_positives():
    logits, deltas, anchors, targets = _batch(seed=3)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    losses = DetectionLoss(4, coder, "ap", box_loss="giou", box_weight=2.0)(logits, deltas, anchors, targets)
    predicted, matched = _predicted_and_matched(deltas.detach(), anchors, targets, coder)
    expected = 2.0 * (1 - torch.diag(generalized_box_iou(predicted, matched))).mean()
    assert losses.box_regression.item() == pytest.approx(expected.item(), rel=1e-6)


def test_giou_box_term_of_a_known_pair():
    # Anchor (0, 0, 10, 10) predicted as it is, ground truth (5, 5, 15, 15): IoU 25/175 and an
    # enclosing box of 225 with 50 outside the union, so 1 - GIoU = 1 - 1/7 + 50/225.
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 50.0, 50.0]])]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 15.0, 15.0]]), "labels": torch.tensor([0])}]
    losses = DetectionLoss(2, classification="focal", box_loss="giou")(torch.zeros(1, 2, 2), torch.zeros(1, 2, 4),
                                                                       anchors, targets)
    assert losses.positives.item() == 1
    assert losses.box_regression.item() == pytest.approx(1 - 1 / 7 + 50 / 225, rel=1e-6)


def test_unknown_box_loss_is_rejected():
    with pytest.raises(ValueError, match="box loss must be one of smooth_l1, giou"):
        DetectionLoss(2, box_loss="l1")


def test_batch_without_positives_has_zero_losses():
    logits, deltas, anchors, targets = _batch(seed=2)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in targets]
    losses = DetectionLoss(4, BoxCoder((10.0, 10.0, 5.0, 5.0)), "ap")(logits, deltas, anchors, empty)
    assert losses.positives.item() == 0
    assert losses.classification.item() == 0 and losses.box_regression.item() == 0


def _predicted_and_matched(deltas, anchors, targets, coder):
    """Each positive anchor's decoded box and its ground truth, in (image, anchor) order."""
    predicted, matched_boxes = [], []
    for image, (a, t) in enumerate(zip(anchors, targets)):
        matched = assign_anchors(a, t["boxes"])
        positive = matched >= 0
        predicted.append(coder.decode_single(deltas[image][positive], a[positive]))
        matched_boxes.append(t["boxes"][matched[positive]])
    return torch.cat(predicted), torch.cat(matched_boxes)


def test_alrp_terms_match_their_definitions():
    logits, deltas, anchors, targets = _batch(seed=3)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    criterion = DetectionLoss(4, coder, "alrp", delta=1.0, self_balance_period=2)
    losses = criterion(logits, deltas, anchors, targets)
    labels, _ = _labels_and_box_targets(anchors, targets, 4, coder)
    predicted, matched = _predicted_and_matched(deltas, anchors, targets, coder)
    loc_errors = (1 - generalized_box_iou(predicted, matched).diagonal()) / 2
    cls, loc, update = alrp_reference(logits.detach().double(), labels, loc_errors.detach().double(), 1.0)
    assert losses.classification.item() == pytest.approx(cls.item(), abs=1e-6)
    assert losses.box_regression.item() == pytest.approx(50 * loc.item(), rel=1e-5)  # the initial weight
    losses.total().backward()
    torch.testing.assert_close(logits.grad.double(), update, atol=1e-6, rtol=1e-5)
    # The localisation loss is linear in the errors with the ranks fixed: its coefficients are the
    # reference's loss at each unit vector, and its gradient reaches the boxes through the GIoU.
    coefficients = torch.stack([alrp_reference(logits.detach().double(), labels, e, 1.0)[1]
                                for e in torch.eye(loc_errors.numel(), dtype=torch.float64)])
    expected = torch.autograd.grad(50 * (loc_errors.double() * coefficients).sum(), deltas)[0]
    torch.testing.assert_close(deltas.grad, expected.float(), atol=1e-6, rtol=1e-4)
    # After a period of two steps the weight is (mean L_loc + mean L_cls) / mean L_loc.
    assert criterion.self_balance.weight.item() == 50.0
    criterion(logits, deltas, anchors, targets)
    assert criterion.self_balance.weight.item() == pytest.approx((cls + loc).item() / loc.item(), rel=1e-5)
    assert "self_balance.weight" in criterion.state_dict()


def test_rank_and_sort_terms_match_their_definitions():
    logits, deltas, anchors, targets = _batch(seed=4)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    labels, _ = _labels_and_box_targets(anchors, targets, 4, coder)
    with torch.no_grad():  # one box moved five widths away: it misses its object
        deltas[0, (labels[0] == 1).any(1).nonzero()[0]] = torch.tensor([50.0, 50.0, 0.0, 0.0])
    losses = DetectionLoss(4, coder, "rs", delta=0.5)(logits, deltas, anchors, targets)
    predicted, matched = _predicted_and_matched(deltas, anchors, targets, coder)
    iou = box_iou(predicted, matched).diagonal().detach().double()
    missed = torch.zeros_like(labels, dtype=torch.bool)
    missed[labels == 1] = iou == 0
    assert missed.sum() == 1  # the moved box's pair is ranked as a negative
    ranking, sorting, update = rs_reference(logits.detach().double(), labels.masked_fill(missed, 0), iou[iou > 0], 0.5)
    assert losses.classification.item() == pytest.approx((ranking + sorting).item(), abs=1e-6)
    # Self-balance: the box term is worth the two ranking terms; its gradient is the weighted GIoU's.
    assert losses.box_regression.item() == pytest.approx((ranking + sorting).item(), rel=1e-5)
    losses.total().backward()
    torch.testing.assert_close(logits.grad.double(), update, atol=1e-6, rtol=1e-5)
    positive_anchors = (labels == 1).any(2)
    weight = logits.detach()[positive_anchors].max(1).values.sigmoid()
    giou_loss = 1 - generalized_box_iou(predicted, matched).diagonal()
    box = (weight * giou_loss).sum() / weight.sum()
    expected = torch.autograd.grad((ranking + sorting).item() / box.item() * box, deltas)[0]
    torch.testing.assert_close(deltas.grad, expected, atol=1e-6, rtol=1e-4)


def test_unknown_classification_loss_is_rejected():
    with pytest.raises(ValueError, match="ap, focal, alrp, rs"):
        DetectionLoss(3, BoxCoder((1.0, 1.0, 1.0, 1.0)), "softmax")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_trains_and_detects(arch):
    torch.manual_seed(0)
    model = build_detector(arch, num_classes=3, min_size=128, max_size=160)
    images = [torch.rand(3, 120, 160), torch.rand(3, 100, 140)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 70.0, 80.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model(images, targets)
    assert losses.positives.item() > 0
    losses.total().backward()
    assert all(p.grad is not None for p in model.head.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        batch, _ = model.transform(images)
        logits = model.head(list(model.backbone(batch.tensors).values()))["cls_logits"]
        detections = model(images)
    assert 0.005 < torch.sigmoid(logits).mean().item() < 0.02  # the 0.01 prior of every output
    for detection, image in zip(detections, images):
        assert detection["boxes"].shape[1] == 4 and len(detection["scores"]) == len(detection["labels"])
        if len(detection["boxes"]):
            assert detection["boxes"][:, 2].max() <= image.shape[2] and detection["boxes"][:, 3].max() <= image.shape[1]


def test_unknown_architecture_is_rejected():
    with pytest.raises(ValueError, match="arch must be one of"):
        build_detector("yolo", 3)
