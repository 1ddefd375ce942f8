"""RetinaNet (ResNet-18/34/50/101 + FPN, anchors from an `AnchorLayout`) and SSD (SSD300/512-
VGG16, SSDlite-MobileNetV3) built from torchvision's parts: untrained (with a normalisation that
trains from scratch), from a trunk's pretrained weights, or with a whole detector's loaded."""
import math
from collections.abc import Callable, Collection, Mapping
from functools import partial
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import (
    ResNet18_Weights,
    ResNet34_Weights,
    ResNet50_Weights,
    ResNet101_Weights,
    VGG16_BN_Weights,
    resnet,
    vgg16_bn,
)
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from aploss.anchor_layout import AnchorLayout
from aploss.catalog import ARCHITECTURES, IMAGENET_TRUNKS
from aploss.detection_loss import DetectionLoss
from aploss.detector import OneStageDetector
from aploss.torchvision_private import BackboneWithFPN, vgg_extractor

Norm = Literal["group", "frozen_bn", "batch"]
_RESNETS = {"retinanet_r18": resnet.resnet18, "retinanet_r34": resnet.resnet34, "retinanet_r50": resnet.resnet50,
            "retinanet_r101": resnet.resnet101}
# SSD300 and SSD512 default boxes (Liu et al.): aspect ratios per feature map, box scales
# relative to the input side, feature-map strides.
_SSD_BOXES = {
    300: ([[2], [2, 3], [2, 3], [2, 3], [2], [2]], [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
          [8, 16, 32, 64, 100, 300]),
    512: ([[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]], [0.07, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.05],
          [8, 16, 32, 64, 128, 256, 512]),
}
_PRIOR_PROBABILITY = 0.01
# The trunks' ImageNet weights (torchvision's Weights API). SSDlite is left out: torchvision's
# builder gives a pretrained MobileNetV3 trunk another tail, and builds it internally.
IMAGENET_WEIGHTS = {"retinanet_r18": ResNet18_Weights.IMAGENET1K_V1, "retinanet_r34": ResNet34_Weights.IMAGENET1K_V1,
                    "retinanet_r50": ResNet50_Weights.IMAGENET1K_V1, "retinanet_r101": ResNet101_Weights.IMAGENET1K_V1,
                    "ssd300_vgg16": VGG16_BN_Weights.IMAGENET1K_V1, "ssd512_vgg16": VGG16_BN_Weights.IMAGENET1K_V1}
assert tuple(IMAGENET_WEIGHTS) == IMAGENET_TRUNKS
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
Weights = Mapping[str, Tensor]
# A detector's transform, backbone, head and anchor generator.
DetectorParts = tuple[GeneralizedRCNNTransform, nn.Module, nn.Module, nn.Module]


class WeightsMismatch(ValueError):
    """Weights whose names or shapes do not fit the model; the message names them."""

    def __init__(self, what: str, missing: list[str], unexpected: list[str], wrong: list[str]):
        parts = [f"{label} {_listed(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)) if keys]
        super().__init__(f"{what}: {'; '.join(parts)}")


class ResizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform, its resize scale computed in float64 scripted as in eager Python:
    torchvision's own scripted resize computes it in float32, which makes some images a pixel
    smaller than eager does (101 x 67 to 95 x 63 rather than 96 x 63), and the detections differ.
    Otherwise torchvision's resize, for targets of boxes (no masks or keypoints)."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None
               ) -> tuple[Tensor, dict[str, Tensor] | None]:
        height, width = image.shape[-2], image.shape[-1]
        if self.training:
            if self._skip_resize:
                return image, target
            shorter = self.torch_choice(self.min_size)  # drawn even for a fixed size: the same random stream
        else:
            shorter = self.min_size[-1]
        size: list[int] | None = None
        scale: float | None = None
        if self.fixed_size is not None:
            size = [self.fixed_size[1], self.fixed_size[0]]
        else:
            scale = min(shorter / min(height, width), self.max_size / max(height, width))
        resized = F.interpolate(image[None], size=size, scale_factor=scale, mode="bilinear",
                                recompute_scale_factor=scale is not None, align_corners=False)[0]
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (height, width), (resized.shape[-2], resized.shape[-1]))
        return resized, target


def _listed(keys: list[str], shown: int = 5) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def _check_fit(what: str, own: Weights, given: Weights, ignored: Collection[str] = frozenset()) -> None:
    """WeightsMismatch unless `given` has exactly `own`'s names (but `ignored`) and shapes."""
    def counted(keys):
        return {key for key in keys if not key.endswith("num_batches_tracked") and key not in ignored}
    own_keys, given_keys = counted(own), counted(given)
    missing, unexpected = sorted(own_keys - given_keys), sorted(given_keys - own_keys)
    wrong = sorted(key for key in own_keys & given_keys if own[key].shape != given[key].shape)
    if missing or unexpected or wrong:
        raise WeightsMismatch(what, missing, unexpected, wrong)


def _load_trunk(trunk: nn.Module, weights: Weights, arch: str, norm: Norm) -> None:
    """Pretrained classification weights into the trunk before it becomes a backbone (as
    torchvision does for its detectors), the classifier left out."""
    classifier = "fc." if arch.startswith("retinanet") else "classifier."
    given = {key: value for key, value in weights.items() if not key.startswith(classifier)}
    own = {key: value for key, value in trunk.state_dict().items() if not key.startswith(classifier)}
    _check_fit(f"backbone weights do not fit {arch} with norm {norm!r}", own, given)
    trunk.load_state_dict(given, strict=False)


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
    for branch in classification_head.get_submodule("module_list").children():
        last_conv = [m for m in branch.modules() if isinstance(m, nn.Conv2d)][-1]
        assert last_conv.bias is not None  # torchvision's heads give their outputs a bias
        nn.init.normal_(last_conv.weight, std=0.01)
        nn.init.constant_(last_conv.bias, bias)


def _retinanet_parts(arch: str, num_classes: int, norm: Norm, min_size: int, max_size: int, anchors: AnchorLayout,
                     fpn_channels: int, backbone_weights: Weights | None) -> DetectorParts:
    norm_layer = _norm_layer(norm)
    trunk = _RESNETS[arch](weights=None, norm_layer=norm_layer)
    if backbone_weights is not None:
        _load_trunk(trunk, backbone_weights, arch, norm)
    fpn_norm = norm_layer if norm == "group" else None
    # C2-C5 feed P2-P5 (C3-C5: P3-P5); P6 and P7 are stride-2 convolutions of P5.
    returned = list(range(anchors.lowest_level - 1, 5))
    backbone = BackboneWithFPN(trunk, {f"layer{k}": str(i) for i, k in enumerate(returned)},
                               [trunk.inplanes // 8 * 2 ** (k - 1) for k in returned], fpn_channels,
                               extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels), norm_layer=fpn_norm)
    anchor_generator = anchors.generator()
    head = RetinaNetHead(backbone.out_channels, anchors.per_location, num_classes,
                         norm_layer=partial(nn.GroupNorm, math.gcd(32, fpn_channels)) if norm == "group" else None)
    transform = ResizeTransform(min_size, max_size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    return transform, backbone, head, anchor_generator


def _ssd_vgg(size: int, num_classes: int, norm: Norm, backbone_weights: Weights | None) -> SSD:
    # Plain VGG16's activations grow layer by layer from a random init; its normalised variant
    # (same layers, a norm after each conv) trains from scratch, and has ImageNet weights.
    trunk = vgg16_bn(weights=None)
    _replace_batch_norm(trunk.features, _norm_layer(norm))
    if backbone_weights is not None:
        _load_trunk(trunk, backbone_weights, f"ssd{size}_vgg16", norm)
    backbone = vgg_extractor(trunk, highres=size == 512, trainable_layers=5)
    ratios, scales, steps = _SSD_BOXES[size]
    # ImageNet's normalisation, which vgg16_bn's weights expect (torchvision's SSD300 uses a
    # VGG16 of Caffe's, hence its 0-255 inputs).
    return SSD(backbone, DefaultBoxGenerator(ratios, scales=scales, steps=steps), (size, size), num_classes,
               image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def _ssd_parts(arch: str, num_classes: int, norm: Norm, backbone_weights: Weights | None) -> DetectorParts:
    if arch in ("ssd300_vgg16", "ssd512_vgg16"):
        model = _ssd_vgg(int(arch[3:6]), num_classes, norm, backbone_weights)
    elif backbone_weights is not None:
        raise ValueError(f"{arch}: backbone weights are not supported (torchvision builds its pretrained MobileNetV3 "
                         "trunk with another tail); start from none or from a whole detector")
    else:
        model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes,
                                              norm_layer=_norm_layer(norm))
    _init_classification_outputs(model.head.classification_head)
    return model.transform, model.backbone, model.head, model.anchor_generator


def build_detector(arch: str, num_classes: int, *, norm: Norm = "group", min_size: int = 512,
                   max_size: int = 833, anchors: AnchorLayout | None = None, fpn_channels: int = 256,
                   score_thresh: float = 0.05,
                   nms_thresh: float = 0.5, detections_per_image: int = 100, candidates_per_level: int = 1000,
                   train_input_size: int = 0, criterion: DetectionLoss | None = None,
                   backbone_weights: Weights | None = None) -> OneStageDetector:
    """An untrained detector of `arch` for `num_classes` classes (no background class), trained
    with `criterion` (default: the AP-loss over a batch held by this process).

    `min_size`/`max_size`, `anchors` (default: the paper's, P3-P7 with 6 per location) and
    `fpn_channels` (the pyramid's and the head's width; RetinaNet's 256) apply to RetinaNet; SSD
    keeps its fixed input size and default boxes. `backbone_weights`: a torchvision
    classification state dict of the trunk (ResNet, VGG16-BN), e.g. ImageNet's
    (`IMAGENET_WEIGHTS`), loaded before the trunk becomes the backbone; names or shapes that do
    not fit (a GroupNorm trunk has no BN statistics) raise `WeightsMismatch` naming them.
    `train_input_size` > 0: training inputs are that square size as given (made by
    augmentation), evaluation inputs are resized as above.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {list(ARCHITECTURES)}, got {arch!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if arch.startswith("retinanet"):
        parts = _retinanet_parts(arch, num_classes, norm, min_size, max_size, anchors or AnchorLayout.paper(),
                                 fpn_channels, backbone_weights)
    else:
        parts = _ssd_parts(arch, num_classes, norm, backbone_weights)
    criterion = criterion or DetectionLoss(num_classes)
    if criterion.num_classes != num_classes:
        raise ValueError(f"criterion is for {criterion.num_classes} classes, the detector for {num_classes}")
    return OneStageDetector(*parts, criterion, score_thresh=score_thresh, nms_thresh=nms_thresh,
                            detections_per_image=detections_per_image, candidates_per_level=candidates_per_level,
                            train_input_size=train_input_size)


def classification_outputs(model: OneStageDetector) -> list[str]:
    """State-dict names of the classification output layers (one per class and anchor)."""
    head = model.head.get_submodule("classification_head")
    names = {id(module): name for name, module in head.named_modules()}
    branches = list(head.get_submodule("module_list").children()) if hasattr(head, "module_list") else [head]
    outputs = [[m for m in branch.modules() if isinstance(m, nn.Conv2d)][-1] for branch in branches]
    return [f"head.classification_head.{names[id(conv)]}.{kind}" for conv in outputs for kind in ("weight", "bias")]


def load_detector_weights(model: OneStageDetector, weights: Weights) -> list[str]:
    """A whole detector's weights (of this project or torchvision's) into `model`, for
    fine-tuning. Classification outputs made for another class count keep `model`'s own
    initialisation (at the prior); any other name or shape that does not fit raises
    `WeightsMismatch` naming it. Returns the names left re-initialised."""
    own = model.state_dict()
    reinitialised = [key for key in classification_outputs(model)
                     if key in weights and weights[key].shape != own[key].shape]
    given = {key: value for key, value in weights.items() if key not in reinitialised}
    _check_fit("detector weights do not fit this model", own, given, ignored=set(reinitialised))
    model.load_state_dict(given, strict=False)
    return reinitialised
