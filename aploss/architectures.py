"""RetinaNet (ResNet-18/34/50 + FPN) and SSD (SSD300-VGG16, SSDlite-MobileNetV3) built from
torchvision's parts, untrained, with the normalisation that trains them from scratch."""
import math
from functools import partial
from typing import Callable, Literal

from torch import nn
from torchvision.models import resnet, vgg16_bn
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from aploss.detection_loss import DetectionLoss
from aploss.detector import OneStageDetector
from aploss.torchvision_private import resnet_fpn_extractor, vgg_extractor

Norm = Literal["group", "frozen_bn", "batch"]
ARCHITECTURES = ("retinanet_r18", "retinanet_r34", "retinanet_r50", "retinanet_r101", "ssd300_vgg16",
                 "ssd512_vgg16", "ssdlite_mobilenet_v3")
_RESNETS = {"retinanet_r18": resnet.resnet18, "retinanet_r34": resnet.resnet34, "retinanet_r50": resnet.resnet50,
            "retinanet_r101": resnet.resnet101}
# SSD300 and SSD512 default boxes (Liu et al.): aspect ratios per feature map, box scales
# relative to the input side, feature-map strides.
_SSD_BOXES = {
    300: ([[2], [2, 3], [2, 3], [2, 3], [2], [2]], [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], [8, 16, 32, 64, 100, 300]),
    512: ([[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]], [0.07, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.05],
          [8, 16, 32, 64, 128, 256, 512]),
}
_PRIOR_PROBABILITY = 0.01


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _norm_layer(norm: Norm) -> Callable[[int], nn.Module]:
    """GroupNorm trains from scratch at a few images per process; frozen BN only makes sense
    with pretrained statistics; BatchNorm is torchvision's default."""
    layers = {"group": _group_norm, "frozen_bn": FrozenBatchNorm2d, "batch": nn.BatchNorm2d}
    if norm not in layers:
        raise ValueError(f"norm must be one of {sorted(layers)}, got {norm!r}")
    return layers[norm]


def _replace_batch_norm(module: nn.Module, norm_layer: Callable[[int], nn.Module]) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, norm_layer(child.num_features))
        else:
            _replace_batch_norm(child, norm_layer)


def _init_classification_outputs(classification_head: nn.Module) -> None:
    """Start every classification output near the prior probability, as RetinaNet does, so that
    the thousands of easy negatives do not dominate the first steps (SSD's Xavier init gives
    untrained logits in the hundreds)."""
    bias = -math.log((1 - _PRIOR_PROBABILITY) / _PRIOR_PROBABILITY)
    for branch in classification_head.module_list:
        last_conv = [m for m in branch.modules() if isinstance(m, nn.Conv2d)][-1]
        nn.init.normal_(last_conv.weight, std=0.01)
        nn.init.constant_(last_conv.bias, bias)


def _retinanet_parts(arch: str, num_classes: int, norm: Norm, min_size: int, max_size: int, anchor_scales: int):
    norm_layer = _norm_layer(norm)
    trunk = _RESNETS[arch](weights=None, norm_layer=norm_layer)
    fpn_norm = norm_layer if norm == "group" else None
    backbone = resnet_fpn_extractor(trunk, trainable_layers=5, returned_layers=[2, 3, 4],
                                     extra_blocks=LastLevelP6P7(256, 256), norm_layer=fpn_norm)
    # Levels P3-P7 (strides 8-128), base side 4 x stride, `anchor_scales` sizes per octave.
    sizes = tuple(tuple(32 * 2 ** level * 2 ** (k / anchor_scales) for k in range(anchor_scales))
                  for level in range(5))
    anchor_generator = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    head = RetinaNetHead(backbone.out_channels, anchor_generator.num_anchors_per_location()[0], num_classes,
                         norm_layer=partial(nn.GroupNorm, 32) if norm == "group" else None)
    transform = GeneralizedRCNNTransform(min_size, max_size, image_mean=[0.485, 0.456, 0.406],
                                         image_std=[0.229, 0.224, 0.225])
    return transform, backbone, head, anchor_generator


def _ssd_vgg(size: int, num_classes: int, norm: Norm) -> SSD:
    # Plain VGG16's activations grow layer by layer from a random init; its normalised variant
    # (same layers, a norm after each conv) trains from scratch.
    trunk = vgg16_bn(weights=None)
    _replace_batch_norm(trunk.features, _norm_layer(norm))
    backbone = vgg_extractor(trunk, highres=size == 512, trainable_layers=5)
    ratios, scales, steps = _SSD_BOXES[size]
    return SSD(backbone, DefaultBoxGenerator(ratios, scales=scales, steps=steps), (size, size), num_classes,
               image_mean=[0.48235, 0.45882, 0.40784], image_std=[1 / 255] * 3)


def _ssd_parts(arch: str, num_classes: int, norm: Norm):
    if arch in ("ssd300_vgg16", "ssd512_vgg16"):
        model = _ssd_vgg(int(arch[3:6]), num_classes, norm)
    else:
        model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes,
                                              norm_layer=_norm_layer(norm))
    _init_classification_outputs(model.head.classification_head)
    return model.transform, model.backbone, model.head, model.anchor_generator


def build_detector(arch: str, num_classes: int, *, norm: Norm = "group", min_size: int = 512,
                   max_size: int = 833, anchor_scales: int = 2, score_thresh: float = 0.05,
                   nms_thresh: float = 0.5, detections_per_image: int = 100, candidates_per_level: int = 1000,
                   train_input_size: int = 0, criterion: DetectionLoss | None = None) -> OneStageDetector:
    """An untrained detector of `arch` for `num_classes` classes (no background class), trained
    with `criterion` (default: the AP-loss over a batch held by this process).

    `min_size`/`max_size` and `anchor_scales` apply to RetinaNet; SSD keeps its fixed input
    size and default boxes. `train_input_size` > 0: training inputs are that square size as
    given (made by augmentation), evaluation inputs are resized as above.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {list(ARCHITECTURES)}, got {arch!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if arch.startswith("retinanet"):
        parts = _retinanet_parts(arch, num_classes, norm, min_size, max_size, anchor_scales)
    else:
        parts = _ssd_parts(arch, num_classes, norm)
    criterion = criterion or DetectionLoss(num_classes)
    if criterion.num_classes != num_classes:
        raise ValueError(f"criterion is for {criterion.num_classes} classes, the detector for {num_classes}")
    return OneStageDetector(*parts, criterion, score_thresh=score_thresh, nms_thresh=nms_thresh,
                            detections_per_image=detections_per_image, candidates_per_level=candidates_per_level,
                            train_input_size=train_input_size)
