"""The detectors this package builds, by name, and those whose trunks have ImageNet weights:
names only, importable without torch, so that a config is checked before torch loads
(`architectures.py` builds them)."""

from typing import Literal, get_args

Architecture = Literal["retinanet_r18", "retinanet_r34", "retinanet_r50", "retinanet_r101", "ssd300_vgg16",
                       "ssd512_vgg16", "ssdlite_mobilenet_v3"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
IMAGENET_TRUNKS = ("retinanet_r18", "retinanet_r34", "retinanet_r50", "retinanet_r101", "ssd300_vgg16",
                   "ssd512_vgg16")
