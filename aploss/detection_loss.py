"""The detector's training loss: a classification term over every anchor-class pair of the
batch, ranked together, plus smooth-L1 box regression on the positives.

Every term is normalised by batch-wide counts, and the batch may span several processes: with a
`ProcessGroupBatch` the counts are summed over processes and each process's terms are scaled
by the world size. DDP then averages gradients over processes, which makes the parameter update
exactly that of one process holding the whole (global) batch.
"""
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from aploss.anchor_assignment import assign_anchors, pair_labels
from aploss.distributed import global_ap_loss
from aploss.engine import LocalBatch
from aploss.torchvision_private import BoxCoder

Classification = Literal["ap", "focal"]
# Encoded-delta scales 1 / (0.1, 0.1, 0.2, 0.2), the released code's (and SSD's) box encoding.
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


class DetectionLoss(nn.Module):
    """Classification ("ap": the AP-loss engine; "focal": torchvision's sigmoid focal loss) plus
    box regression.

    `delta` may be changed between steps (a schedule). The returned dict holds the two terms to
    backpropagate and `positives`, the number of positive pairs in the whole batch (a step with
    none has nothing to learn from and is skipped by the trainer).
    """

    def __init__(self, num_classes: int, box_coder: BoxCoder | None = None, classification: Classification = "ap",
                 delta: float = 1.0, interpolate: bool = True, fg_iou: float = 0.5, bg_iou: float = 0.4,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, box_beta: float = 1.0,
                 box_weight: float = 1.0, batch: LocalBatch | None = None) -> None:
        super().__init__()
        if classification not in ("ap", "focal"):
            raise ValueError(f"classification loss must be 'ap' or 'focal', got {classification!r}")
        self.num_classes = num_classes
        self.box_coder = box_coder or BoxCoder(BOX_WEIGHTS)
        self.classification = classification
        self.delta = delta
        self.interpolate = interpolate
        self.fg_iou, self.bg_iou = fg_iou, bg_iou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.box_beta, self.box_weight = box_beta, box_weight
        self.batch = batch or LocalBatch()

    def forward(self, cls_logits: Tensor, box_deltas: Tensor, anchors: list[Tensor],
                targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """cls_logits [B, A, C], box_deltas [B, A, 4], anchors B x [A, 4], targets B dicts with
        "boxes" [G, 4] and "labels" [G] (0-based classes)."""
        labels, box_targets = [], []
        for anchors_per_image, target in zip(anchors, targets):
            matched = assign_anchors(anchors_per_image, target["boxes"], self.fg_iou, self.bg_iou)
            labels.append(pair_labels(matched, target["labels"], self.num_classes))
            positive = matched >= 0
            box_targets.append(self.box_coder.encode_single(target["boxes"][matched[positive]],
                                                            anchors_per_image[positive]))
        labels = torch.stack(labels)
        # A positive anchor has exactly one positive pair, so one count normalises both terms.
        positive_anchors = (labels == 1).any(dim=2)
        positives_total = self.batch.sum_over_processes(positive_anchors.sum().to(torch.float64).reshape(1))[0]
        scale = self.batch.world_size
        return {
            "classification": self._classification(cls_logits, labels, positives_total, scale),
            "box_regression": self._box_regression(box_deltas[positive_anchors], torch.cat(box_targets),
                                                   positives_total, scale),
            "positives": positives_total,
        }

    def _classification(self, logits: Tensor, labels: Tensor, positives_total: Tensor, scale: int) -> Tensor:
        if self.classification == "ap":
            # One ranking over all pairs of all images (and of all processes), as in the paper.
            return global_ap_loss(logits, labels, self.delta, self.interpolate, batch=self.batch,
                                  grad_scale=float(scale))
        valid = labels >= 0
        summed = sigmoid_focal_loss(logits[valid], labels[valid].to(logits.dtype), self.focal_alpha,
                                    self.focal_gamma, reduction="sum")
        return summed * scale / positives_total.clamp(min=1).to(summed.dtype)

    def _box_regression(self, predicted: Tensor, target: Tensor, positives_total: Tensor, scale: int) -> Tensor:
        # Mean over the positives' four coordinates: the gradient the released code applies.
        summed = F.smooth_l1_loss(predicted.float(), target.float(), beta=self.box_beta, reduction="sum")
        return self.box_weight * summed * scale / (4 * positives_total.clamp(min=1).float())

    def extra_repr(self) -> str:
        return f"classification={self.classification}, delta={self.delta}, interpolate={self.interpolate}"
