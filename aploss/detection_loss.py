"""The detector's training loss: a classification term over every anchor-class pair of the
batch, ranked together, plus box regression on the positives.

  * "ap" (AP-loss) and "focal": smooth-L1 on the encoded box deltas (the released code's), or
    the GIoU loss 1 - GIoU of the decoded boxes (`box_loss="giou"`), each a mean per positive.
  * "alrp": each positive's GIoU localisation error l = (1 - GIoU) / 2 enters the ranking, and the
    box term is aLRP's localisation loss times its self-balancing weight (`SelfBalance`).
  * "rs" (Rank & Sort): each positive's target is the IoU of its predicted box (detached) with its
    ground truth (a positive whose IoU is 0 is ranked as a negative, as in the release); the box
    term is the GIoU loss weighted by the anchor's detached best class score, scaled every step
    to the ranking and sorting losses' value (self-balance).

Every term is normalised by batch-wide counts, and the batch may span several processes: with a
`ProcessGroupBatch` the counts are summed over processes and each process's terms are scaled
by the world size. DDP then averages gradients over processes, which makes the parameter update
exactly that of one process holding the whole (global) batch.
"""
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from aploss.alrp import ALRPRule
from aploss.anchor_assignment import assign_anchors, pair_labels
from aploss.distributed import global_ap_loss
from aploss.engine import LocalBatch, ranked_loss
from aploss.rank_sort import RankSortRule
from aploss.self_balance import SelfBalance
from aploss.torchvision_private import BoxCoder

Classification = Literal["ap", "focal", "alrp", "rs"]
CLASSIFICATIONS = ("ap", "focal", "alrp", "rs")
BoxLoss = Literal["smooth_l1", "giou"]
BOX_LOSSES = ("smooth_l1", "giou")
# Encoded-delta scales 1 / (0.1, 0.1, 0.2, 0.2), the released code's (and SSD's) box encoding.
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


@dataclass
class DetectionLosses:
    """One step's loss terms, and the number of positive pairs in the whole (global) batch: a
    step with none has nothing to learn from, and the trainer skips it."""
    classification: Tensor
    box_regression: Tensor
    positives: Tensor

    def total(self) -> Tensor:
        """What backward runs through."""
        return self.classification + self.box_regression


class DetectionLoss(nn.Module):
    """Classification ("ap", "alrp", "rs": the ranking engine; "focal": torchvision's sigmoid
    focal loss) plus box regression (module docstring).

    What a trainer may change between steps is `set_delta` (a schedule) and aLRP's
    `set_balance_period`; aLRP's self-balancing weight is a buffer of `self_balance`.
    """

    def __init__(self, num_classes: int, box_coder: BoxCoder | None = None, classification: Classification = "ap",
                 delta: float = 1.0, interpolate: bool = True, fg_iou: float = 0.5, bg_iou: float = 0.4,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, box_beta: float = 1.0,
                 box_weight: float = 1.0, batch: LocalBatch | None = None, self_balance_initial: float = 50.0,
                 self_balance_period: int = 1, box_loss: BoxLoss = "smooth_l1") -> None:
        super().__init__()
        if classification not in CLASSIFICATIONS:
            raise ValueError(f"classification loss must be one of {', '.join(CLASSIFICATIONS)}, got {classification!r}")
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box loss must be one of {', '.join(BOX_LOSSES)}, got {box_loss!r}")
        self.box_loss = box_loss
        self.num_classes = num_classes
        self.box_coder = box_coder or BoxCoder(BOX_WEIGHTS)
        self.classification = classification
        self.delta = delta
        self.interpolate = interpolate
        self.fg_iou, self.bg_iou = fg_iou, bg_iou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.box_beta, self.box_weight = box_beta, box_weight
        self.batch = batch or LocalBatch()
        self.self_balance = SelfBalance(self_balance_initial, self_balance_period) if classification == "alrp" else None

    def forward(self, cls_logits: Tensor, box_deltas: Tensor, anchors: list[Tensor],
                targets: list[dict[str, Tensor]]) -> DetectionLosses:
        """cls_logits [B, A, C], box_deltas [B, A, 4], anchors B x [A, 4], targets B dicts with
        "boxes" [G, 4] and "labels" [G] (0-based classes)."""
        image_labels, matched_boxes, positive_anchors_of = [], [], []
        for anchors_per_image, target in zip(anchors, targets):
            matched = assign_anchors(anchors_per_image, target["boxes"], self.fg_iou, self.bg_iou)
            image_labels.append(pair_labels(matched, target["labels"], self.num_classes))
            positive = matched >= 0
            matched_boxes.append(target["boxes"][matched[positive]])
            positive_anchors_of.append(anchors_per_image[positive])
        labels = torch.stack(image_labels)
        # A positive anchor has exactly one positive pair, so one count normalises both terms, and
        # the positive anchors in (image, anchor) order are the positive pairs in flattened order.
        positive_anchors = (labels == 1).any(dim=2)
        positives_total = self.batch.sum_over_processes(positive_anchors.sum().to(torch.float64).reshape(1))[0]
        scale = self.batch.world_size
        deltas, gt_boxes = box_deltas[positive_anchors], torch.cat(matched_boxes)
        anchor_boxes = torch.cat(positive_anchors_of)
        if self.classification in ("alrp", "rs"):
            predicted = self.box_coder.decode_single(deltas.float(), anchor_boxes)
            giou_loss = generalized_box_iou_loss(predicted, gt_boxes.float())  # 1 - GIoU, in [0, 2]
            if self.classification == "alrp":
                classification, box = self._alrp(cls_logits, labels, giou_loss, positives_total, scale)
            else:
                best_score = cls_logits[positive_anchors].detach().float().max(dim=1).values.sigmoid()
                classification, box = self._rank_sort(cls_logits, labels, predicted.detach(), gt_boxes, giou_loss,
                                                      best_score, scale)
        else:
            classification = self._classification(cls_logits, labels, positives_total, scale)
            box = self._box_regression(deltas, anchor_boxes, gt_boxes, positives_total, scale)
        return DetectionLosses(classification, box, positives_total)

    def set_delta(self, delta: float) -> None:
        """The half-width of the ranking's step function H from the next batch on."""
        if not delta >= 0:
            raise ValueError(f"DetectionLoss: delta must be >= 0, got {delta}")
        self.delta = delta

    def set_balance_period(self, steps: int) -> None:
        """aLRP: training steps between updates of its self-balancing weight (others: none)."""
        if self.self_balance is not None:
            if steps < 1:
                raise ValueError(f"DetectionLoss: the self-balance period must be >= 1 step, got {steps}")
            self.self_balance.period = steps

    def _alrp(self, logits: Tensor, labels: Tensor, giou_loss: Tensor, positives_total: Tensor,
              scale: int) -> tuple[Tensor, Tensor]:
        assert self.self_balance is not None  # made with the criterion for alrp
        loc_errors = (giou_loss / 2).clamp(0.0, 1.0)  # aLRP's normalised error; the clamp removes only rounding
        classification, localisation = ranked_loss(logits, labels, loc_errors, ALRPRule(), self.delta, self.batch,
                                                   float(scale))
        weight = self.self_balance.weight.to(localisation.dtype)
        if self.training and positives_total > 0:  # a skipped step is no step of the period
            self.self_balance.observe(classification, localisation)
        return classification, weight * localisation

    def _rank_sort(self, logits: Tensor, labels: Tensor, predicted: Tensor, gt_boxes: Tensor, giou_loss: Tensor,
                   best_score: Tensor, scale: int) -> tuple[Tensor, Tensor]:
        iou = _paired_iou(predicted, gt_boxes.float()).clamp(0.0, 1.0)
        positive_pairs = labels == 1
        # The release takes a target of 0 as a negative: a box that misses its object has no rank to earn.
        missed = torch.zeros_like(positive_pairs)
        missed[positive_pairs] = iou == 0
        labels = labels.masked_fill(missed, 0)
        targets = iou[iou > 0]
        ranking, sorting = ranked_loss(logits, labels, targets, RankSortRule(), self.delta, self.batch, float(scale))
        weighted = (best_score * giou_loss).sum()
        totals = self.batch.sum_over_processes(torch.stack([weighted.detach().double(), best_score.sum().double()]))
        global_box = totals[0] / totals[1].clamp(min=1e-12)
        # Self-balance: the box term's value is the classification terms' value, every step.
        balance = torch.where(global_box > 0, (ranking + sorting).detach().double() / global_box, 0.0)
        box = balance.to(weighted.dtype) * weighted * scale / totals[1].clamp(min=1e-12).to(weighted.dtype)
        return ranking + sorting, box

    def _classification(self, logits: Tensor, labels: Tensor, positives_total: Tensor, scale: int) -> Tensor:
        if self.classification == "ap":
            # One ranking over all pairs of all images (and of all processes), as in the paper.
            return global_ap_loss(logits, labels, self.delta, self.interpolate, batch=self.batch,
                                  grad_scale=float(scale))
        valid = labels >= 0
        summed = sigmoid_focal_loss(logits[valid], labels[valid].to(logits.dtype), self.focal_alpha,
                                    self.focal_gamma, reduction="sum")
        return summed * scale / positives_total.clamp(min=1).to(summed.dtype)

    def _box_regression(self, deltas: Tensor, anchor_boxes: Tensor, gt_boxes: Tensor, positives_total: Tensor,
                        scale: int) -> Tensor:
        if self.box_loss == "giou":
            predicted = self.box_coder.decode_single(deltas.float(), anchor_boxes)
            summed = generalized_box_iou_loss(predicted, gt_boxes.float(), reduction="sum")
            return self.box_weight * summed * scale / positives_total.clamp(min=1).float()
        # Mean over the positives' four coordinates: the gradient the released code applies.
        target = self.box_coder.encode_single(gt_boxes, anchor_boxes)
        summed = F.smooth_l1_loss(deltas.float(), target.float(), beta=self.box_beta, reduction="sum")
        return self.box_weight * summed * scale / (4 * positives_total.clamp(min=1).float())

    def extra_repr(self) -> str:
        return (f"classification={self.classification}, delta={self.delta}, interpolate={self.interpolate}, "
                f"box_loss={self.box_loss}")


def _paired_iou(boxes: Tensor, others: Tensor) -> Tensor:
    """IoU of each box with the box at the same index (x1, y1, x2, y2)."""
    top_left = torch.maximum(boxes[:, :2], others[:, :2])
    bottom_right = torch.minimum(boxes[:, 2:], others[:, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    union = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1) + (others[:, 2:] - others[:, :2]).prod(dim=1) - intersection
    return intersection / union.clamp(min=torch.finfo(union.dtype).tiny)
