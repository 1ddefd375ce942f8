"""A one-stage detector (RetinaNet, SSD) whose classification loss ranks the whole batch.

torchvision's RetinaNet and SSD compute their classification loss per image (and SSD with a
softmax over a background class). Here the parts torchvision builds (input transform,
backbone, head, anchors, box coder) are kept and the loss and post-processing are replaced:
every anchor-class pair is a sigmoid score, training hands all pairs of the batch to one
`DetectionLoss`, and inference keeps the top-scoring pairs per feature level, then NMS per class.
"""
import copy

import torch
from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms, clip_boxes_to_image

from aploss.detection_loss import DetectionLoss, DetectionLosses
from aploss.torchvision_private import BoxCoder


class OneStageDetector(nn.Module):
    """images (list of [3, H, W] floats in [0, 1]) -> losses in training, detections in eval.

    Detections are dicts of "boxes" [D, 4] (x1, y1, x2, y2 in input-image pixels), "scores"
    (sigmoid) and "labels" (0-based classes), best first.

    `detect` (what eval-mode `forward` runs) compiles with `torch.jit.script`; the loss is plain
    Python, so scripting leaves out the training path and the parts only it uses.
    """

    __jit_ignored_attributes__ = ["criterion", "train_transform"]
    __jit_unused_properties__ = ["train_input_size"]

    def __init__(self, transform: GeneralizedRCNNTransform, backbone: nn.Module, head: nn.Module,
                 anchor_generator: nn.Module, criterion: DetectionLoss, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_image: int = 100,
                 candidates_per_level: int = 1000, train_input_size: int = 0) -> None:
        super().__init__()
        self.transform = transform
        self.train_input_size = train_input_size
        self.backbone = backbone
        self.head = head
        self.anchor_generator = anchor_generator
        self.criterion = criterion
        self.box_coder: BoxCoder = criterion.box_coder  # an attribute, not a property: scripting needs its type
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        self.candidates_per_level = candidates_per_level

    @property
    def train_input_size(self) -> int:
        """Square training inputs of this size are taken as they are (0: resized like evaluation
        inputs): augmentation made them, and resizing them to the evaluation sizes would undo it."""
        return self._train_input_size

    @train_input_size.setter
    def train_input_size(self, size: int) -> None:
        self._train_input_size = size
        self.train_transform = self.transform
        if size:
            self.train_transform = copy.copy(self.transform)  # no parameters: a shallow copy is enough
            self.train_transform.fixed_size = (size, size)

    @torch.jit.unused
    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> DetectionLosses | list[dict[str, Tensor]]:
        if not self.training:
            return self.detect(images)
        if targets is None:
            raise ValueError("OneStageDetector: training needs targets (boxes and labels per image)")
        batch, targets = self.train_transform(images, targets)
        features, outputs = self._features_and_outputs(batch.tensors)
        anchors = self.anchor_generator(batch, features)
        return self.criterion(outputs["cls_logits"], outputs["bbox_regression"], anchors, targets)

    @torch.jit.unused
    def _features_and_outputs(self, images: Tensor) -> tuple[list[Tensor], dict[str, Tensor]]:
        device = images.device.type
        if not (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16):
            features = list(self.backbone(images).values())
            return features, self.head(features)
        # bfloat16 keeps 8 significant bits: logits rounded to them tie by the hundreds, and the
        # ranking losses would rank the ties rather than the scores. Under bfloat16 autocast only
        # the trunk, where the FLOPs are, runs in it; the pyramid (whose P6/P7 convolutions on 1x1
        # maps get non-finite bfloat16 weight gradients from oneDNN) and the head run in float32.
        if isinstance(self.backbone, BackboneWithFPN):
            trunk = {name: feature.float() for name, feature in self.backbone.body(images).items()}
            with torch.autocast(device, enabled=False):
                features = list(self.backbone.fpn(trunk).values())
                return features, self.head(features)
        features = [feature.float() for feature in self.backbone(images).values()]
        with torch.autocast(device, enabled=False):
            return features, self.head(features)

    @torch.jit.export
    def detect(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections of each image, in its own pixels."""
        original_sizes: list[tuple[int, int]] = [(image.shape[-2], image.shape[-1]) for image in images]
        batch, _ = self.transform(images, None)
        features = list(self.backbone(batch.tensors).values())
        outputs = self.head(features)
        anchors = self.anchor_generator(batch, features)
        # nn.Module's __getattr__ types the generator's method as a Tensor, for the type checker.
        level_sizes = [f.shape[-2] * f.shape[-1] * n for f, n in
                       zip(features, self.anchor_generator.num_anchors_per_location())]  # type: ignore[operator]
        detections = [self._detect(logits.split(level_sizes), deltas.split(level_sizes),
                                   image_anchors.split(level_sizes), size)
                      for logits, deltas, image_anchors, size in
                      zip(outputs["cls_logits"], outputs["bbox_regression"], anchors, batch.image_sizes)]
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def _detect(self, logits: list[Tensor], deltas: list[Tensor], anchors: list[Tensor],
                image_size: tuple[int, int]) -> dict[str, Tensor]:
        boxes: list[Tensor] = []
        scores: list[Tensor] = []
        labels: list[Tensor] = []
        for level_logits, level_deltas, level_anchors in zip(logits, deltas, anchors):
            num_classes = level_logits.shape[-1]
            level_scores = torch.sigmoid(level_logits.float()).flatten()
            candidates = torch.nonzero(level_scores > self.score_thresh).squeeze(1)
            top_scores, top = level_scores[candidates].topk(min(self.candidates_per_level, candidates.numel()))
            candidates = candidates[top]
            anchor_index = torch.div(candidates, num_classes, rounding_mode="floor")
            decoded = self.box_coder.decode_single(level_deltas[anchor_index].float(), level_anchors[anchor_index])
            boxes.append(clip_boxes_to_image(decoded, image_size))
            scores.append(top_scores)
            labels.append(candidates % num_classes)
        all_boxes, all_scores, all_labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        keep = batched_nms(all_boxes, all_scores, all_labels, self.nms_thresh)[:self.detections_per_image]
        return {"boxes": all_boxes[keep], "scores": all_scores[keep], "labels": all_labels[keep]}
