"""Training and evaluation batches from the data-prep Parquet shards.

The order of images is a function of (seed, epoch) only: row groups are shuffled, then the rows
inside each, so reads stay within a cached row group while every epoch sees a new order. A
global batch is a run of consecutive images of that order, and a process of a world of W takes
its 1/W slice of each. So the global batches, and the augmentation drawn per image (from
(seed, epoch, index) alone), are the same whatever the number of processes, and a run can resume
at any batch of an epoch. Each image is decoded and augmented in one thread wherever it is made
(in this process or in a loader process): some of torch's CPU kernels (a bilinear resize, the
mean of a contrast change) round differently with the number of threads, and the batches must
not depend on how many loader processes make them.
"""
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from pipeline.data.augment import augment_sample, mosaic
from pipeline.data.shards import ShardReader
from pipeline.errors import DataError
from pipeline.images import DEFAULT_LIMITS, ImageLimits, ImageRefused, decode_rgb

Target = dict[str, Tensor]


def _generator(*seeds: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(seeds)).generate_state(1)[0]))


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class DetectionDataset(Dataset):
    """Item (index, epoch) -> (image [3, H, W] float in [0, 1], target, image id).

    The target holds "boxes" [G, 4] (x1, y1, x2, y2 pixels) and "labels" [G]; crowd (or VOC
    difficult) boxes are left out, as they are neither to be found nor to be penalised.
    Training datasets augment: with probability `mosaic`, the image with three others of its row
    group (`pipeline.data.augment.mosaic`), then `pipeline.data.augment.augment_sample` (`augment`
    "flip" or "ssd", flip probabilities `hflip` and `vflip`, resize to `input_size` squared if
    > 0); the defaults leave images as they are, for evaluation.
    """

    def __init__(self, reader: ShardReader, hflip: float = 0.0, seed: int = 0, augment: str = "flip",
                 input_size: int = 0, limits: ImageLimits = DEFAULT_LIMITS, vflip: float = 0.0,
                 mosaic: float = 0.0) -> None:
        self.reader = reader
        # The shards are files on shared storage: each image passes the gate again when decoded.
        self.limits = limits
        self.hflip, self.vflip, self.mosaic = hflip, vflip, mosaic
        self.row_groups = reader.row_groups() if mosaic else []
        self.seed = seed
        self.augment = augment
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Target, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        generator = _generator(self.seed, epoch, index)
        with _one_thread():
            image, boxes, labels, image_id = self._sample(index)
            sample = image, boxes, labels
            if self.mosaic and torch.rand((), generator=generator).item() < self.mosaic:
                # Partners from the image's own row group, which the reader holds: no extra read.
                rows = self.row_groups[self.reader.row_group_of(index)]
                partners = torch.randint(len(rows), (3,), generator=generator).tolist()
                sample = mosaic([sample] + [self._sample(rows[i])[:3] for i in partners], generator)
            image, boxes, labels = augment_sample(*sample, generator, self.augment, self.hflip,
                                                  self.input_size, self.vflip)
        return image, {"boxes": boxes, "labels": labels}, image_id

    def _sample(self, index: int) -> tuple[Tensor, Tensor, Tensor, int]:
        record = self.reader.read(index)
        keep = ~record.crowd
        boxes = torch.from_numpy(record.boxes[keep]).reshape(-1, 4)
        labels = torch.from_numpy(record.class_ids[keep]).to(torch.int64)
        image = _decoded(record.image, record.image_id, self.limits).float().div_(255)
        return image, boxes, labels, record.image_id


def _decoded(encoded: bytes, image_id: int, limits: ImageLimits) -> Tensor:
    try:
        return decode_rgb(encoded, limits)
    except ImageRefused as refused:
        raise DataError(f"prepared image {image_id}: {refused}; run data-prep again") from None


def collate(items: list[tuple[Tensor, Target, int]]) -> tuple[list[Tensor], list[Target], list[int]]:
    images, targets, image_ids = zip(*items)
    return list(images), list(targets), list(image_ids)


def epoch_order(row_groups: list[range], seed: int, epoch: int) -> list[int]:
    """Every index once: row groups in a shuffled order, rows shuffled inside each."""
    generator = _generator(seed, epoch)
    order = []
    for group in torch.randperm(len(row_groups), generator=generator).tolist():
        rows = row_groups[group]
        order.extend(rows[i] for i in torch.randperm(len(rows), generator=generator).tolist())
    return order


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """This process's share of each global batch of one epoch, from batch `start` on.

    Incomplete last batches are dropped, so that every step ranks a full global batch.
    """

    def __init__(self, row_groups: list[range], global_batch: int, seed: int, epoch: int,
                 rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        if global_batch % world_size:
            raise DataError(f"train.batch_size ({global_batch}) must be a multiple of the number "
                             f"of workers ({world_size})")
        self.order = epoch_order(row_groups, seed, epoch)
        self.global_batch, self.epoch = global_batch, epoch
        self.share = global_batch // world_size
        self.rank, self.start = rank, start

    def __len__(self) -> int:
        return max(len(self.order) // self.global_batch - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in range(self.start, self.start + len(self)):
            first = batch * self.global_batch + self.rank * self.share
            yield [(index, self.epoch) for index in self.order[first:first + self.share]]


class RunBatchSampler(Sampler[list[tuple[int, int]]]):
    """This process's share of the global batches of run steps `start` to `stop`, epoch after
    epoch (`GlobalBatchSampler`'s): one sampler, and so one loader, for the rest of a run."""

    def __init__(self, row_groups: list[range], global_batch: int, seed: int, start: int, stop: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.row_groups, self.global_batch, self.seed = row_groups, global_batch, seed
        self.start, self.stop, self.rank, self.world_size = start, stop, rank, world_size
        self.steps_per_epoch = sum(map(len, row_groups)) // global_batch

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while step < self.stop:
            epoch, within = divmod(step, self.steps_per_epoch)
            for batch in GlobalBatchSampler(self.row_groups, self.global_batch, self.seed, epoch, self.rank,
                                            self.world_size, within):
                if step == self.stop:
                    return
                yield batch
                step += 1
