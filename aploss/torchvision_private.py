"""The pieces of torchvision's detection models this package uses that torchvision does not make
public: the one place to look when a torchvision release moves them (pyproject.toml pins the
range they were checked against).

- `BoxCoder` encodes and decodes box deltas against anchors (torchvision's RetinaNet and SSD).
- `BackboneWithFPN` wraps a ResNet trunk with a feature pyramid, as RetinaNet's backbone
  (torchvision's own builder of it fixes the pyramid at 256 channels).
- `vgg_extractor` wraps a VGG trunk with SSD's extra layers.
"""
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.ssd import _vgg_extractor as vgg_extractor

__all__ = ["BackboneWithFPN", "BoxCoder", "vgg_extractor"]
