"""SSD-style training augmentation, the AP-loss recipe: photometric distortion, zoom-out, random
crop, horizontal flip, then a resize to a fixed square input with a random interpolation; and
YOLO's four-image mosaic, which the dataset applies before them.

Every step maps (image [3, H, W] float in [0, 1], boxes [N, 4] xyxy pixels, labels [N]) and a
`torch.Generator` to the same triple, so a pipeline is a pure function of the generator's seed:
the dataset seeds it from (seed, epoch, index), and an image is augmented alike whatever the
number of processes or loader workers. The random steps are written here rather than taken from
torchvision.transforms.v2, whose transforms draw from the global RNG (seeding it per image would
disturb every other user of it) and whose IoU crop retries without bound; the pixel operations
are torchvision's.
"""
import torch
import torchvision.transforms.v2.functional as F
from torch import Tensor
from torchvision.ops import box_iou

from pipeline.config import AUGMENTATIONS

Sample = tuple[Tensor, Tensor, Tensor]

# The ImageNet mean pixel, which the detectors' input transform subtracts: zoom-out pads with
# zero input, as SSD pads with its mean pixel.
MEAN_PIXEL = (0.485, 0.456, 0.406)
# SSD's crop options: the whole image (None), a crop with IoU >= t with some box, any crop (0).
CROP_MIN_IOU = (None, 0.1, 0.3, 0.7, 0.9, 0.0)
# SSD draws among OpenCV's interpolations; these are the ones torch has.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area")
# torchvision's RandomPhotometricDistort ranges (its port of SSD's distortion).
_COLOUR = {"brightness": (F.adjust_brightness, 0.875, 1.125), "contrast": (F.adjust_contrast, 0.5, 1.5),
           "saturation": (F.adjust_saturation, 0.5, 1.5), "hue": (F.adjust_hue, -0.05, 0.05)}


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _chance(generator: torch.Generator, p: float) -> bool:
    return torch.rand((), generator=generator).item() < p


def _choice(generator: torch.Generator, options: tuple):
    return options[int(torch.randint(len(options), (), generator=generator))]


def photometric_distort(image: Tensor, boxes: Tensor, labels: Tensor, generator: torch.Generator,
                        p: float = 0.5) -> Sample:
    """Brightness, saturation and hue, and contrast before or after those, each with probability
    `p`, then a random channel order with probability `p` (torchvision's RandomPhotometricDistort)."""
    factors = {name: _uniform(generator, low, high) if _chance(generator, p) else None
               for name, (_, low, high) in _COLOUR.items()}
    contrast_first = _chance(generator, 0.5)
    order = torch.randperm(3, generator=generator) if _chance(generator, p) else None
    names = ("brightness", "contrast", "saturation", "hue") if contrast_first else \
        ("brightness", "saturation", "hue", "contrast")
    for name in names:
        if factors[name] is not None:
            image = _COLOUR[name][0](image, factors[name])
    return (image if order is None else image[order]), boxes, labels


def expand(image: Tensor, boxes: Tensor, labels: Tensor, generator: torch.Generator, max_ratio: float = 4.0,
           p: float = 0.5, fill: tuple[float, float, float] = MEAN_PIXEL) -> Sample:
    """Zoom out with probability `p`: the image at a random place of a canvas 1 to `max_ratio`
    times its size filled with `fill`, so that objects also appear small."""
    if not _chance(generator, p):
        return image, boxes, labels
    ratio = _uniform(generator, 1.0, max_ratio)
    height, width = image.shape[-2:]
    canvas_height, canvas_width = int(height * ratio), int(width * ratio)
    top = int(_uniform(generator, 0, canvas_height - height))
    left = int(_uniform(generator, 0, canvas_width - width))
    canvas = image.new_tensor(fill)[:, None, None].expand(-1, canvas_height, canvas_width).clone()
    canvas[:, top:top + height, left:left + width] = image
    return canvas, boxes + boxes.new_tensor([left, top, left, top]), labels


def random_crop(image: Tensor, boxes: Tensor, labels: Tensor, generator: torch.Generator,
                trials: int = 50) -> Sample:
    """SSD's crop: one option of CROP_MIN_IOU, then up to `trials` crops with sides 0.3 to 1 of
    the image and an aspect ratio of 0.5 to 2 until one meets it and holds a box centre.

    Boxes whose centre is outside the crop are dropped with their labels, the others clipped to
    it. If no trial succeeds the image stays whole (as SSD's sampler does), so a crop never
    leaves an image with boxes without any.
    """
    min_iou = _choice(generator, CROP_MIN_IOU)
    if min_iou is None:
        return image, boxes, labels
    height, width = image.shape[-2:]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    for _ in range(trials):
        crop_width = _uniform(generator, 0.3 * width, width)
        crop_height = _uniform(generator, 0.3 * height, height)
        if not 0.5 <= crop_height / crop_width <= 2:
            continue
        left = int(_uniform(generator, 0, width - crop_width))
        top = int(_uniform(generator, 0, height - crop_height))
        right, bottom = left + max(int(crop_width), 1), top + max(int(crop_height), 1)
        crop = boxes.new_tensor([left, top, right, bottom])
        inside = (centres > crop[:2]).all(1) & (centres < crop[2:]).all(1)
        if len(boxes) and not inside.any():
            continue
        if min_iou and not (box_iou(boxes, crop[None]) >= min_iou).any():
            continue
        kept = boxes[inside] - crop[:2].repeat(2)
        kept[:, 0::2] = kept[:, 0::2].clamp(0, right - left)
        kept[:, 1::2] = kept[:, 1::2].clamp(0, bottom - top)
        # A copy: a view would keep (and send from a loader worker) the whole image.
        return image[:, top:bottom, left:right].contiguous(), kept, labels[inside]
    return image, boxes, labels


def mosaic(samples: list[Sample], generator: torch.Generator, min_visible: float = 0.25,
           fill: tuple[float, float, float] = MEAN_PIXEL) -> Sample:
    """Four images around a random centre, cropped to the first one's size (YOLO's mosaic at
    scale 1): every image is seen beside others and cut at new places, at its own scale.

    On a canvas twice the first image's size, the centre is drawn uniformly within half a side
    of the canvas' middle; the first image is the top-left quadrant, ending at the centre, the
    others top-right, bottom-left and bottom-right, each touching the centre with its corner
    nearest it. The output is the canvas' middle window, of the first image's size, so the
    four shares of it vary with the centre. A box is kept,
    clipped, when at least `min_visible` of its area is in the window; areas the images do not
    cover are filled with `fill`.
    """
    image = samples[0][0]
    height, width = image.shape[-2:]
    centre_x = int(_uniform(generator, width / 2, 3 * width / 2))
    centre_y = int(_uniform(generator, height / 2, 3 * height / 2))
    left, top = width // 2, height // 2
    canvas = image.new_tensor(fill)[:, None, None].expand(-1, height, width).clone()
    kept_boxes, kept_labels = [], []
    for quadrant, (part, boxes, labels) in enumerate(samples):
        part_height, part_width = part.shape[-2:]
        # Where the part's top-left corner lands on the canvas, then on the window.
        x = centre_x - part_width if quadrant in (0, 2) else centre_x
        y = centre_y - part_height if quadrant in (0, 1) else centre_y
        x, y = x - left, y - top
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + part_width, width), min(y + part_height, height)
        if x1 <= x0 or y1 <= y0:
            continue
        canvas[:, y0:y1, x0:x1] = part[:, y0 - y:y1 - y, x0 - x:x1 - x]
        shifted = boxes + boxes.new_tensor([x, y, x, y])
        clipped = torch.stack([shifted[:, 0].clamp(x0, x1), shifted[:, 1].clamp(y0, y1),
                               shifted[:, 2].clamp(x0, x1), shifted[:, 3].clamp(y0, y1)], 1)
        visible = _area(clipped) >= min_visible * _area(shifted).clamp(min=1e-6)
        visible &= (clipped[:, 2] - clipped[:, 0] >= 1) & (clipped[:, 3] - clipped[:, 1] >= 1)
        kept_boxes.append(clipped[visible])
        kept_labels.append(labels[visible])
    return canvas, torch.cat(kept_boxes).reshape(-1, 4), torch.cat(kept_labels)


def _area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def horizontal_flip(image: Tensor, boxes: Tensor, labels: Tensor, generator: torch.Generator,
                    p: float = 0.5) -> Sample:
    """Mirror left-right with probability `p` (no draw when `p` is 0)."""
    if not p or not _chance(generator, p):
        return image, boxes, labels
    width = image.shape[-1]
    return image.flip(-1), torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1), labels


def vertical_flip(image: Tensor, boxes: Tensor, labels: Tensor, generator: torch.Generator,
                  p: float = 0.5) -> Sample:
    """Mirror top-bottom with probability `p` (no draw when `p` is 0): for images with no up and
    down, such as microscopy or aerial views."""
    if not p or not _chance(generator, p):
        return image, boxes, labels
    height = image.shape[-2]
    flipped = torch.stack([boxes[:, 0], height - boxes[:, 3], boxes[:, 2], height - boxes[:, 1]], 1)
    return image.flip(-2), flipped, labels


def resize(image: Tensor, boxes: Tensor, labels: Tensor, generator: torch.Generator, size: int,
           random_interpolation: bool = True) -> Sample:
    """To `size` x `size`, with an interpolation drawn from INTERPOLATIONS, else bilinear."""
    mode = _choice(generator, INTERPOLATIONS) if random_interpolation else "bilinear"
    height, width = image.shape[-2:]
    resized = torch.nn.functional.interpolate(image[None], size=(size, size), mode=mode)[0]
    # Bicubic overshoots the [0, 1] range that the model's input transform expects.
    return resized.clamp_(0, 1), boxes * boxes.new_tensor([size / width, size / height] * 2), labels


def augment_sample(image: Tensor, boxes: Tensor, labels: Tensor, generator: torch.Generator, kind: str,
                   hflip: float, input_size: int, vflip: float = 0.0) -> Sample:
    """Training pipeline `kind`: "flip" (the flips alone) or "ssd" (distortion, zoom-out and
    crop, then the flips), flipping left-right with probability `hflip` and top-bottom with
    `vflip`; then, if `input_size`, a resize to `input_size` x `input_size` (with a random
    interpolation for "ssd", as SSD does)."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {list(AUGMENTATIONS)}, got {kind!r}")
    sample = image, boxes, labels
    if kind == "ssd":
        sample = random_crop(*expand(*photometric_distort(*sample, generator), generator), generator)
    sample = vertical_flip(*horizontal_flip(*sample, generator, hflip), generator, vflip)
    if input_size:
        sample = resize(*sample, generator, input_size, random_interpolation=kind == "ssd")
    return sample
