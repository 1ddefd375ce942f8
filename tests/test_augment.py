"""SSD-style augmentation: a pure function of (seed, epoch, index), the boxes of each step, the
dataset wiring, and training at a fixed input size with evaluation at the model's sizes."""
import numpy as np
import pytest
import torch
from torchvision.io import encode_png

from pipeline.config import ConfigError, load_config
from pipeline.data import augment
from pipeline.data.augment import (
    MEAN_PIXEL,
    augment_sample,
    expand,
    horizontal_flip,
    mosaic,
    photometric_distort,
    random_crop,
    resize,
    vertical_flip,
)
from pipeline.data.dataset import DetectionDataset, _generator
from pipeline.data.shards import ImageRecord
from tests.test_training import _batch, _tiny_training

HEIGHT, WIDTH = 60, 80
BOXES = torch.tensor([[5.0, 6.0, 30.0, 40.0], [40.0, 10.0, 75.0, 50.0], [20.0, 30.0, 36.0, 58.0]])
LABELS = torch.tensor([2, 0, 1])


def _image() -> torch.Tensor:
    # Channels 0 and 1 hold each pixel's x and y (/ 1000), so a crop's offset can be read back.
    ys, xs = torch.meshgrid(torch.arange(HEIGHT), torch.arange(WIDTH), indexing="ij")
    return torch.stack([xs / 1000, ys / 1000, torch.rand(HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))])


def _key(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _same(first: tuple, second: tuple) -> bool:
    return all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, second))


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    def run(*key: int) -> tuple:
        return augment_sample(_image(), BOXES, LABELS, _generator(*key), "ssd", 0.5, 64)

    first = run(0, 1, 7)
    assert _same(first, run(0, 1, 7))
    assert not _same(first, run(0, 2, 7)) and not _same(first, run(0, 1, 8))


def test_flip_pipeline_draws_the_flip_as_before():
    image = _image()
    for index in range(8):
        flipped = torch.rand((), generator=_generator(3, 0, index)) < 0.5
        out, boxes, _ = augment_sample(image, BOXES, LABELS, _generator(3, 0, index), "flip", 0.5, 0)
        assert torch.equal(out, image.flip(-1) if flipped else image)


def test_flip_mirrors_x():
    image, boxes, labels = horizontal_flip(_image(), BOXES, LABELS, _key(0), p=1.0)
    assert torch.equal(image, _image().flip(-1)) and torch.equal(labels, LABELS)
    assert torch.equal(boxes, torch.stack([WIDTH - BOXES[:, 2], BOXES[:, 1], WIDTH - BOXES[:, 0], BOXES[:, 3]], 1))
    generator = _key(0)
    assert horizontal_flip(_image(), BOXES, LABELS, generator, p=0.0)[1] is BOXES
    assert torch.equal(generator.get_state(), _key(0).get_state())  # p = 0 draws nothing


def test_vertical_flip_mirrors_y_and_the_pixels_stay_under_their_boxes():
    image, boxes, labels = vertical_flip(_image(), BOXES, LABELS, _key(0), p=1.0)
    assert torch.equal(image, _image().flip(-2)) and torch.equal(labels, LABELS)
    assert torch.equal(boxes, torch.tensor([[5.0, 20.0, 30.0, 54.0], [40.0, 10.0, 75.0, 50.0],
                                            [20.0, 2.0, 36.0, 30.0]]))
    # Channel 1 holds each pixel's y: the flipped box's top row (20) is the original box's bottom row (39).
    assert image[1, 20, 5].item() == pytest.approx(39 / 1000)
    generator = _key(0)
    assert vertical_flip(_image(), BOXES, LABELS, generator, p=0.0)[1] is BOXES
    assert torch.equal(generator.get_state(), _key(0).get_state())  # p = 0 draws nothing


def test_flips_in_both_directions_are_drawn_in_turn():
    image = _image()
    for index in range(8):
        generator = _generator(3, 0, index)
        left_right, top_bottom = (torch.rand((), generator=generator) < 0.5 for _ in range(2))
        out, _, _ = augment_sample(image, BOXES, LABELS, _generator(3, 0, index), "flip", 0.5, 0, vflip=0.5)
        expected = image.flip(-1) if left_right else image
        assert torch.equal(out, expected.flip(-2) if top_bottom else expected)


def test_photometric_distortion_changes_pixels_not_boxes():
    changed = 0
    for seed in range(6):
        image, boxes, labels = photometric_distort(_image(), BOXES, LABELS, _key(seed))
        assert image.shape == (3, HEIGHT, WIDTH) and 0 <= image.min() and image.max() <= 1
        assert boxes is BOXES and labels is LABELS
        changed += not torch.equal(image, _image())
    assert changed >= 3


def test_expand_puts_the_image_on_a_mean_canvas_and_shifts_the_boxes():
    image = _image()
    mean = torch.tensor(MEAN_PIXEL)[:, None, None]
    for seed in range(6):
        canvas, boxes, labels = expand(image, BOXES, LABELS, _key(seed), p=1.0)
        ratio = canvas.shape[2] / WIDTH
        assert 1 <= ratio <= 4
        assert abs(canvas.shape[1] / HEIGHT - ratio) < 1 / HEIGHT + 1 / WIDTH
        left, top = (boxes[0, :2] - BOXES[0, :2]).int().tolist()
        assert torch.equal(boxes, BOXES + torch.tensor([left, top, left, top])) and torch.equal(labels, LABELS)
        assert torch.equal(canvas[:, top:top + HEIGHT, left:left + WIDTH], image)
        canvas[:, top:top + HEIGHT, left:left + WIDTH] = mean
        assert torch.equal(canvas, mean.expand_as(canvas))
    assert expand(image, BOXES, LABELS, _key(0), p=0.0)[0] is image


def test_crop_keeps_the_boxes_centred_inside_clipped_with_their_labels():
    image = _image()
    cropped = dropped = 0
    for seed in range(40):
        out, boxes, labels = random_crop(image, BOXES, LABELS, _key(seed))
        assert len(boxes) >= 1 and len(boxes) == len(labels)
        if out.shape == image.shape:
            assert torch.equal(boxes, BOXES) and torch.equal(labels, LABELS)
            continue
        cropped += 1
        height, width = out.shape[1:]
        left, top = round(out[0, 0, 0].item() * 1000), round(out[1, 0, 0].item() * 1000)
        assert torch.equal(out, image[:, top:top + height, left:left + width])
        assert int(0.3 * WIDTH) <= width and int(0.3 * HEIGHT) <= height and 0.5 <= height / width <= 2
        centres = (BOXES[:, :2] + BOXES[:, 2:]) / 2
        inside = ((centres > torch.tensor([left, top])) & (centres < torch.tensor([left + width, top + height]))).all(1)
        expected = BOXES[inside] - torch.tensor([left, top, left, top])
        expected[:, 0::2] = expected[:, 0::2].clamp(0, width)
        expected[:, 1::2] = expected[:, 1::2].clamp(0, height)
        assert torch.equal(boxes, expected) and torch.equal(labels, LABELS[inside])
        dropped += len(boxes) < len(BOXES)
    assert cropped >= 5 and dropped >= 1


def test_crop_falls_back_to_the_whole_image(monkeypatch):
    # No crop of sides >= 0.3 overlaps a 1-pixel box with IoU >= 0.5: every trial fails.
    tiny = torch.tensor([[40.0, 30.0, 41.0, 31.0]])
    monkeypatch.setattr(augment, "CROP_MIN_IOU", (0.5,))
    image, boxes, labels = random_crop(_image(), tiny, LABELS[:1], _key(0))
    assert torch.equal(image, _image()) and torch.equal(boxes, tiny) and torch.equal(labels, LABELS[:1])


def test_crop_of_an_image_without_boxes():
    for seed in range(6):
        image, boxes, labels = random_crop(_image(), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), _key(seed))
        assert boxes.shape == (0, 4) and labels.shape == (0,) and image.shape[0] == 3


def test_resize_scales_boxes_and_pipeline_gives_the_input_size():
    image, boxes, _ = resize(_image(), BOXES, LABELS, _key(0), 40, random_interpolation=False)
    assert image.shape == (3, 40, 40)
    assert torch.allclose(boxes, BOXES * torch.tensor([0.5, 40 / HEIGHT, 0.5, 40 / HEIGHT]))
    for seed in range(6):
        image, boxes, labels = augment_sample(_image(), BOXES, LABELS, _key(seed), "ssd", 0.5, 64)
        assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
        assert len(boxes) >= 1 and len(boxes) == len(labels)
        assert (boxes >= 0).all() and (boxes <= 64).all() and (boxes[:, 2:] > boxes[:, :2]).all()


class _Reader:
    """One 60 x 80 PNG with BOXES: what DetectionDataset reads of a ShardReader."""

    def __len__(self) -> int:
        return 1

    def row_groups(self) -> list[range]:
        return [range(1)]

    def row_group_of(self, index: int) -> int:
        return 0

    def read(self, index: int) -> ImageRecord:
        pixels = (_image() * 255).to(torch.uint8)
        return ImageRecord(7, "a.png", WIDTH, HEIGHT, encode_png(pixels).numpy().tobytes(), BOXES.numpy(),
                           LABELS.numpy().astype(np.int64), np.zeros(len(BOXES), dtype=bool))


def test_dataset_augments_training_only():
    plain, target, _ = DetectionDataset(_Reader())[0]
    assert plain.shape == (3, HEIGHT, WIDTH) and torch.equal(target["boxes"], BOXES)
    training = DetectionDataset(_Reader(), hflip=0.5, seed=1, augment="ssd", input_size=48)
    image, target, image_id = training[(0, 3)]
    assert image.shape == (3, 48, 48) and image_id == 7 and len(target["boxes"]) == len(target["labels"]) >= 1
    # Another process (another dataset object) draws the same; another epoch draws anew.
    again = DetectionDataset(_Reader(), hflip=0.5, seed=1, augment="ssd", input_size=48)[(0, 3)]
    assert torch.equal(again[0], image) and torch.equal(again[1]["boxes"], target["boxes"])
    assert not torch.equal(training[(0, 4)][0], image)
    with pytest.raises(ValueError, match="augmentation must be one of"):
        DetectionDataset(_Reader(), augment="mosaic")[0]


def _tile(identity: int, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    # Channels 0 and 1 hold each pixel's x and y (/ 1000), channel 2 the image's identity (/ 10).
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([xs / 1000, ys / 1000, torch.full((height, width), identity / 10)])


def _expected_mosaic_boxes(image: torch.Tensor, samples: list) -> list[tuple[int, list[float]]]:
    """From the pixels alone: where each source shows in the mosaic, and so which of its boxes
    (label, clipped box) are at least a quarter visible."""
    expected = []
    for identity, (_, boxes, labels) in enumerate(samples):
        ys, xs = torch.nonzero(image[2] == identity / 10, as_tuple=True)
        if not len(xs):
            continue
        y0, x0 = int(ys.min()), int(xs.min())
        dx = x0 - round(image[0, y0, x0].item() * 1000)
        dy = y0 - round(image[1, y0, x0].item() * 1000)
        x1, y1 = int(xs.max()) + 1, int(ys.max()) + 1
        for box, label in zip(boxes.tolist(), labels.tolist()):
            shifted = [box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy]
            clipped = [min(max(shifted[0], x0), x1), min(max(shifted[1], y0), y1),
                       min(max(shifted[2], x0), x1), min(max(shifted[3], y0), y1)]
            width, height = clipped[2] - clipped[0], clipped[3] - clipped[1]
            area = (shifted[2] - shifted[0]) * (shifted[3] - shifted[1])
            if width >= 1 and height >= 1 and width * height >= 0.25 * area:
                expected.append((label, clipped))
    return sorted(expected)


def test_mosaic_keeps_the_boxes_a_quarter_visible_over_their_own_pixels():
    samples = [(_tile(identity), BOXES, LABELS + 10 * identity) for identity in range(4)]
    shares = set()
    for seed in range(30):
        image, boxes, labels = mosaic(samples, _key(seed))
        assert image.shape == (3, HEIGHT, WIDTH)
        assert sorted(zip(labels.tolist(), boxes.tolist())) == _expected_mosaic_boxes(image, samples)
        # Each image is at its own scale: one pixel per pixel, offsets whole.
        for identity in range(4):
            ys, xs = torch.nonzero(image[2] == identity / 10, as_tuple=True)
            if len(xs):
                offsets = (image[0, ys, xs] * 1000).round() - xs
                assert (offsets == offsets[0]).all()
        shares.add(round((image[2] == 0).float().mean().item(), 1))
    assert len(shares) >= 4  # the first image's share of the window moves with the centre


def test_mosaic_of_smaller_images_fills_the_rest_and_keeps_an_image_without_boxes():
    none = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    samples = [(_tile(0), BOXES, LABELS)] + [(_tile(identity, 20, 30), *none) for identity in (1, 2, 3)]
    filled = 0
    for seed in range(10):
        image, boxes, labels = mosaic(samples, _key(seed))
        assert image.shape == (3, HEIGHT, WIDTH)
        assert sorted(zip(labels.tolist(), boxes.tolist())) == _expected_mosaic_boxes(image, samples)
        filled += bool((image[2] == MEAN_PIXEL[2]).any())
    assert filled == 10
    image, boxes, labels = mosaic([(_tile(identity), *none) for identity in range(4)], _key(0))
    assert boxes.shape == (0, 4) and labels.shape == (0,)


def test_dataset_mosaic_is_drawn_first_and_not_at_all_at_zero():
    plain = DetectionDataset(_Reader(), hflip=0.5, seed=1, mosaic=0.0)
    decoded = DetectionDataset(_Reader())[0][0]
    for epoch in range(4):
        image, target, _ = plain[(0, epoch)]
        reference = augment_sample(decoded, BOXES, LABELS, _generator(1, epoch, 0), "flip", 0.5, 0)
        assert torch.equal(image, reference[0]) and torch.equal(target["boxes"], reference[1])
    mixed = DetectionDataset(_Reader(), hflip=0.5, seed=1, mosaic=1.0)
    image, target, _ = mixed[(0, 3)]
    assert image.shape == (3, HEIGHT, WIDTH) and len(target["boxes"]) == len(target["labels"])
    assert torch.equal(DetectionDataset(_Reader(), hflip=0.5, seed=1, mosaic=1.0)[(0, 3)][0], image)
    assert not torch.equal(image, plain[(0, 3)][0])


def test_config_validates_augment_and_input_size():
    train = load_config(None, ["train.augment=ssd", "train.input_size=512"]).train
    assert (train.augment, train.input_size) == ("ssd", 512)
    assert (load_config().train.augment, load_config().train.input_size) == ("flip", 0)
    for override, key in [("train.augment=mosaic", "train.augment"), ("train.input_size=16", "train.input_size"),
                          ("train.mosaic=1.5", "train.mosaic"), ("train.mosaic=-0.1", "train.mosaic"),
                          ("train.input_size=-1", "train.input_size")]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, [override])


def test_train_step_at_the_fixed_size_leaves_the_evaluation_sizes():
    training = _tiny_training("model.min_size=96", "model.max_size=128", "train.augment=ssd", "train.input_size=64")
    seen = []
    training.detector.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-2:]))
    samples = [augment_sample(_image(), BOXES, LABELS % 2, _generator(0, 0, i), "ssd", 0.5, 64) for i in range(2)]
    training.train_step([s[0] for s in samples], [{"boxes": s[1], "labels": s[2]} for s in samples])
    transform = training.detector.transform
    assert seen == [(64, 64)]  # not rescaled to model.min_size
    assert (transform.min_size, transform.max_size, transform.fixed_size) == ((96,), 128, None)
    training.detector.eval()
    with torch.no_grad():
        training.detector([_image()])
    assert seen[-1] == (96, 128)  # 60 x 80 at shorter side 96


def test_fixed_size_is_undone_when_a_step_fails():
    training = _tiny_training("train.input_size=64")
    images, targets = _batch(True)
    with pytest.raises(ValueError):
        training.train_step([image[0] for image in images], targets)  # 2-D images: the transform refuses
    assert training.detector.transform.fixed_size is None
