"""Anchor-to-ground-truth assignment and the anchor-class pair labels the AP-loss ranks.

IoU >= fg_iou: positive, regressing to its best ground truth; IoU < bg_iou: negative; between:
ignored. Each ground truth also claims the anchors of its highest IoU, so that no object goes
unmatched for lack of a well-placed anchor. A ground truth that overlaps no anchor at all has a
highest IoU of zero: it claims nothing, where a plain "best IoU wins" rule would turn every
zero-IoU anchor into its positive.
"""
import torch
from torch import Tensor
from torchvision.ops import box_iou

NEGATIVE = -1
IGNORED = -2


def assign_anchors(anchors: Tensor, gt_boxes: Tensor, fg_iou: float = 0.5, bg_iou: float = 0.4) -> Tensor:
    """The matched ground-truth index of each anchor, or NEGATIVE / IGNORED.

    Args:
        anchors: [A, 4] boxes (x1, y1, x2, y2).
        gt_boxes: [G, 4] boxes in the same coordinates.

    Returns:
        [A] int64: index into gt_boxes for positives, NEGATIVE or IGNORED otherwise.
    """
    if gt_boxes.numel() == 0:
        return torch.full((anchors.shape[0],), NEGATIVE, dtype=torch.int64, device=anchors.device)
    iou = box_iou(gt_boxes, anchors)  # [G, A]
    best_iou, best_gt = iou.max(dim=0)
    matched = torch.where(best_iou >= fg_iou, best_gt,
                          torch.where(best_iou < bg_iou, NEGATIVE, IGNORED))
    # Ties included, as in the released code: every anchor reaching a ground truth's best IoU.
    gt_best_iou = iou.max(dim=1, keepdim=True).values
    claims = (iou == gt_best_iou) & (gt_best_iou > 0)
    claimed = claims.any(dim=0)
    claimant = torch.where(claims, iou, -1.0).argmax(dim=0)
    return torch.where(claimed, claimant, matched)


def pair_labels(matched: Tensor, gt_classes: Tensor, num_classes: int) -> Tensor:
    """[A, C] int8 labels: 1 for (positive anchor, its class), -1 for every class of an ignored
    anchor, 0 for everything else."""
    labels = torch.zeros((matched.shape[0], num_classes), dtype=torch.int8, device=matched.device)
    positive = matched >= 0
    labels[positive, gt_classes[matched[positive]]] = 1
    labels[matched == IGNORED] = -1
    return labels
