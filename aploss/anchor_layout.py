"""A RetinaNet anchor layout: the anchor sizes and aspect ratios of each FPN level, from P2
(stride 4) or P3 (stride 8) up to P7. Plain numbers, importable without torch (a config names
one); making its anchors imports torchvision there."""
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor
    from torchvision.models.detection.anchor_utils import AnchorGenerator

HIGHEST_LEVEL = 7  # RetinaNet's P7 (stride 128)
SIZE_DIVISIBLE = 32  # torchvision's GeneralizedRCNNTransform pads batches to multiples of this


@dataclass(frozen=True)
class AnchorLayout:
    sizes: tuple[tuple[float, ...], ...]  # per level from `lowest_level`, pixels at the network input
    ratios: tuple[tuple[float, ...], ...]  # per level, height / width
    lowest_level: int = 3

    def __post_init__(self) -> None:
        if self.lowest_level not in (2, 3):
            raise ValueError(f"lowest_level must be 2 or 3, got {self.lowest_level}")
        levels = HIGHEST_LEVEL - self.lowest_level + 1
        if len(self.sizes) != levels or len(self.ratios) != levels:
            raise ValueError(f"levels P{self.lowest_level}-P{HIGHEST_LEVEL} need {levels} lists of sizes and of "
                             f"ratios, got {len(self.sizes)} and {len(self.ratios)}")
        per_location = {len(sizes) * len(ratios) for sizes, ratios in zip(self.sizes, self.ratios)}
        if len(per_location) != 1:
            raise ValueError("every level needs the same number of sizes x ratios (the head is shared), "
                             f"got {sorted(per_location)}")
        if not all(v > 0 for level in (*self.sizes, *self.ratios) for v in level):
            raise ValueError("anchor sizes and ratios must be > 0")

    @classmethod
    def paper(cls, scales_per_octave: int = 2, lowest_level: int = 3, base: float = 4.0,
              ratios: tuple[float, ...] = (0.5, 1.0, 2.0)) -> "AnchorLayout":
        """RetinaNet's: `base` x stride, `scales_per_octave` sizes per octave, the same ratios on
        every level (base 4, 2 scales and ratios 0.5/1/2: the AP-loss paper's 6 per location)."""
        levels = range(lowest_level, HIGHEST_LEVEL + 1)
        sizes = tuple(tuple(base * 2 ** level * 2 ** (k / scales_per_octave) for k in range(scales_per_octave))
                      for level in levels)
        return cls(sizes, (tuple(ratios),) * len(sizes), lowest_level)

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(2 ** level for level in range(self.lowest_level, HIGHEST_LEVEL + 1))

    @property
    def per_location(self) -> int:
        return len(self.sizes[0]) * len(self.ratios[0])

    def generator(self) -> "AnchorGenerator":
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        return AnchorGenerator(self.sizes, self.ratios)

    def grids(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """Per level (rows, columns, row stride, column stride) of the anchor grid of an image
        resized to height x width: padded to the transform's multiple of 32, with torchvision's
        integer strides (P6 and P7, stride-2 convolutions of P5, can have odd sizes)."""
        padded = [math.ceil(side / SIZE_DIVISIBLE) * SIZE_DIVISIBLE for side in (height, width)]
        shapes = [[side // stride for side in padded] for stride in self.strides if stride <= SIZE_DIVISIBLE]
        while len(shapes) < len(self.strides):
            shapes.append([(side + 1) // 2 for side in shapes[-1]])
        return [(rows, columns, padded[0] // rows, padded[1] // columns) for rows, columns in shapes]

    def anchors(self, height: int, width: int) -> "Tensor":
        """[A, 4] anchors of one image resized to height x width, as the detector makes them."""
        import torch
        from torchvision.models.detection.image_list import ImageList

        padded = [math.ceil(side / SIZE_DIVISIBLE) * SIZE_DIVISIBLE for side in (height, width)]
        batch = ImageList(torch.empty(1, 3, *padded), [(height, width)])
        features = [torch.empty(1, 0, rows, columns) for rows, columns, _, _ in self.grids(height, width)]
        return self.generator()(batch, features)[0]
