"""Synthetic inputs of the engine's tests: logits and labels shaped as a detector's."""

import torch


def detection_pairs(generator: torch.Generator, images: int = 2, anchors: int = 3000, classes: int = 4
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels shaped [images, anchors, classes] as a detector's: near the prior-bias init
    (every negative within delta = 1 of every positive, the pruning-free worst case of early
    training), 1 % of the anchors positive for one class, 4 % ignored for all."""
    logits = -4.6 + 0.1 * torch.randn(images, anchors, classes, generator=generator, dtype=torch.float64)
    labels = torch.zeros(images, anchors, classes, dtype=torch.int64)
    anchor_kind = torch.rand(images, anchors, generator=generator)
    positive = anchor_kind < 0.01
    labels[(anchor_kind >= 0.01) & (anchor_kind < 0.05)] = -1
    gt_class = torch.randint(0, classes, (images, anchors), generator=generator)
    labels[positive, gt_class[positive]] = 1
    return logits, labels
