"""The train stage: SGD with warm-up and a multistep or cosine learning rate, gradient
clipping, AMP on CUDA, skipping batches without positives.

`Training` is one process's share of a run (model, optimiser, lr schedule, the step) and
`fit` walks the global batches, calling its hooks (`HookBase`, detectron2's small hooks with
state of their own: the δ schedule, logging, validation and checkpoints, in
`pipeline/training/hooks.py`) around each step. Both are the same in a single process and in
every Ray Train worker; only where the checkpoint hook puts a checkpoint differs.
"""
import functools
import math
import multiprocessing
import os
import random
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from aploss.detector import OneStageDetector
from aploss.schedules import changed_value
from pipeline.config import Config, OptimConfig, TrainConfig
from pipeline.data.bindings import split_dir
from pipeline.data.dataset import DetectionDataset, RunBatchSampler, collate
from pipeline.data.shards import ShardReader
from pipeline.errors import DataError, TrainingDiverged
from pipeline.images import ImageLimits
from pipeline.training.averaging import WeightAverage


@dataclass(frozen=True)
class LearningRateFactor:
    """Multiplier of the base lr at a step: linear warm-up, then multistep or cosine decay, times
    the base lr's changes (`optim.lr_changes`, as multiples of `optim.lr`)."""

    total_steps: int
    warmup_steps: int
    warmup_factor: float
    schedule: str
    milestones: tuple[float, ...]
    gamma: float
    changes: tuple[tuple[float, float], ...] = ()

    @classmethod
    def of(cls, optim: OptimConfig, total_steps: int) -> "LearningRateFactor":
        return cls(total_steps, optim.warmup_steps, optim.warmup_factor, optim.schedule, tuple(optim.milestones),
                   optim.gamma, tuple((fraction, lr / optim.lr) for fraction, lr in optim.lr_changes))

    def __call__(self, step: int) -> float:
        warmup = 1.0
        if step < self.warmup_steps:
            warmup = self.warmup_factor + (1 - self.warmup_factor) * step / self.warmup_steps
        progress = min(step / max(self.total_steps, 1), 1.0)
        base = changed_value(progress, 1.0, self.changes)
        if self.schedule == "cosine":
            return base * warmup * 0.5 * (1 + math.cos(math.pi * progress))
        return base * warmup * self.gamma ** sum(progress >= m for m in self.milestones)


@dataclass(frozen=True)
class StepSchedule:
    """When a run logs, validates and checkpoints, decided once from the config and the size of
    the training split; the same for one process and for every Ray Train worker."""

    steps_per_epoch: int
    total_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int

    @classmethod
    def of(cls, train: TrainConfig, num_images: int) -> "StepSchedule":
        per_epoch = num_images // train.batch_size
        if per_epoch == 0:
            raise DataError(f"train.batch_size ({train.batch_size}) is larger than the training split "
                            f"({num_images} images)")
        steps = per_epoch * train.epochs
        steps = min(steps, train.max_steps) if train.max_steps else steps
        # 0 means once per epoch.
        return cls(per_epoch, steps, train.log_every, train.eval_every or per_epoch,
                   train.checkpoint_every or per_epoch)

    def logs(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total_steps

    def validates(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.total_steps

    def checkpoints(self, step: int) -> bool:
        """A validated step is always checkpointed: its score belongs to a checkpoint."""
        return self.validates(step) or step % self.checkpoint_every == 0

    @property
    def validations(self) -> int:
        return math.ceil(self.total_steps / self.eval_every)


def training_dataset(config: Config) -> DetectionDataset:
    """The training split as `config.train` augments it, the same in one process and on every Ray worker."""
    train = config.train
    return DetectionDataset(ShardReader(split_dir(config, config.data.train_split)), hflip=train.hflip,
                            seed=train.seed, augment=train.augment, input_size=train.input_size,
                            limits=ImageLimits.of(config.data), vflip=train.vflip, mosaic=train.mosaic)


def _to_device(images: list[Tensor], targets: list[dict[str, Tensor]], device: torch.device):
    return ([image.to(device, non_blocking=True) for image in images],
            [{key: value.to(device, non_blocking=True) for key, value in target.items()} for target in targets])


class Training:
    """One process's model (DDP-wrapped or not), optimiser, schedules and step counter.
    `steps_per_epoch` (the whole run if not given) times what the config counts in epochs."""

    def __init__(self, config: Config, model: nn.Module, device: torch.device, steps: int,
                 steps_per_epoch: int | None = None) -> None:
        self.config, self.model, self.device, self.total_steps = config, model, device, steps
        self.detector: OneStageDetector = getattr(model, "module", model)
        self.detector.criterion.set_balance_period(config.loss.self_balance_period or steps_per_epoch or steps)
        optim = config.optim
        self.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=optim.lr,
                                         momentum=optim.momentum, weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, LearningRateFactor.of(optim, steps))
        self.amp = config.train.amp and device.type == "cuda"
        self.cpu_amp = config.train.cpu_amp and device.type == "cpu"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp)  # bfloat16 has float32's range: no scaling
        decay = config.train.ema_decay
        self.average = WeightAverage(self.detector, decay) if decay else None
        self.step = 0
        self.skipped = 0

    def train_step(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, float]:
        """One optimiser step on this process's share of the global batch."""
        self.model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        images, targets = _to_device(images, targets, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16 if self.cpu_amp else None,
                            enabled=self.amp or self.cpu_amp):
            losses = self.model(images, targets)
        terms = _global_mean(torch.stack([losses.classification.detach(), losses.box_regression.detach()]))
        for name, value in zip(("classification loss", "box regression loss"), terms.tolist()):
            if not math.isfinite(value):
                raise TrainingDiverged(self.step + 1, name, value)
        if losses.positives.item() == 0:
            # No positive anywhere in the global batch: nothing to rank, and every process agrees.
            self.skipped += 1
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(losses.total()).backward()
            self.scaler.unscale_(self.optimizer)
            norm = _gradient_norm(self.model, self.config.optim.grad_clip)
            # DDP has averaged the gradients, so every process sees the same norm. Under AMP an
            # overflow is the scaler's business: it skips the step and lowers the scale.
            if not self.amp and not math.isfinite(norm):
                raise TrainingDiverged(self.step + 1, "gradient norm", norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.average is not None:
                self.average.update(self.detector)
        with warnings.catch_warnings():
            # The schedule follows steps, skipped ones included: PyTorch's warning about a
            # scheduler stepping before its optimizer tells the user nothing to act on.
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
            self.scheduler.step()
        self.step += 1
        cls_loss, box_loss = terms.tolist()
        return {"loss": cls_loss + box_loss, "cls_loss": cls_loss, "box_loss": box_loss,
                "positives": losses.positives.item(), "delta": self.detector.criterion.delta, "lr": lr}

    def check_weights(self) -> None:
        """TrainingDiverged if a weight is not finite: a checkpoint is never replaced by a broken one."""
        for name, value in self.detector.state_dict().items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise TrainingDiverged(self.step, f"weight {name}", float("nan"))

    @contextmanager
    def evaluated_weights(self) -> Iterator[None]:
        """The detector holds the weights that are validated and exported inside the block: the
        average with `train.ema_decay`, else its own."""
        with self.average.applied(self.detector) if self.average is not None else nullcontext():
            yield

    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.detector.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "step": self.step, "skipped": self.skipped, "rng": _rng_state()}
        if self.average is not None:
            state["average"] = self.average.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state["model"])
        if self.average is not None:
            if "average" not in state:
                raise DataError("the checkpoint holds no weight average: it was saved with train.ema_decay=0")
            self.average.load_state_dict(state["average"])
        self.optimizer.load_state_dict(state["optimizer"])
        # The schedule is this config's, not the checkpoint's (LambdaLR saves its factor's fields):
        # a PBT trial goes on from its donor's state with a changed lr, from this step on.
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None]})
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.skipped = state["step"], state["skipped"]
        _set_rng_state(state["rng"])


def _global_mean(values: Tensor) -> Tensor:
    """`values` averaged over the processes of the run (a non-finite one on any process stays
    non-finite), so that every process takes the same decision on them."""
    values = values.to(torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values.cpu()


def _gradient_norm(model: nn.Module, clip: float) -> float:
    """The total gradient norm, clipped to `clip` when it is set."""
    parameters = [p for p in model.parameters() if p.grad is not None]
    if clip:
        return nn.utils.clip_grad_norm_(parameters, clip).item()
    return nn.utils.get_total_norm([p.grad for p in parameters]).item() if parameters else 0.0


def _rng_state() -> dict[str, Any]:
    # NumPy's state as a tensor and numbers: checkpoints load with weights_only, which takes no arrays.
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class HookBase:
    """One concern around the steps, with state of its own. `fit` calls every hook, in order,
    before the first step, before and after each step (with the step's metrics), and after the
    last step or a failure."""

    def before_train(self, training: Training) -> None:
        pass

    def before_step(self, training: Training) -> None:
        pass

    def after_step(self, training: Training, metrics: dict[str, float]) -> None:
        pass

    def after_train(self, training: Training) -> None:
        pass


def loader_processes(train: TrainConfig, cpus: float, most: int | None = None) -> int:
    """`train.loader_workers`, or for -1 (auto) one loader process per whole CPU of the `cpus` a
    training process has beyond the one its step runs on, at most `most`."""
    if train.loader_workers >= 0:
        return train.loader_workers
    auto = max(0, math.floor(cpus) - 1)
    return auto if most is None else min(auto, most)


# Each loader process keeps this many batches made ahead: enough to hide an image that takes
# longer (an SSD crop's retries), while a batch of 8 images at 512 px is 25 MB of shared memory.
PREFETCH_BATCHES = 2


def training_batches(dataset: DetectionDataset, sampler: RunBatchSampler, loaders: int, pin_memory: bool
                     ) -> DataLoader:
    """The batches of `sampler`, made by `loaders` processes (0: by this one), in its order."""
    if not loaders:
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, pin_memory=pin_memory)
    # Not fork: a child forked from a process with other threads (a Ray worker's gRPC, torch's
    # pools) may wait forever on a lock one of them held, and Ray's docs ask for forkserver. The
    # server imports the main module and the data path once and forks every loader from it.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", DetectionDataset.__module__])
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, pin_memory=pin_memory, num_workers=loaders,
                      multiprocessing_context=context, prefetch_factor=PREFETCH_BATCHES,
                      worker_init_fn=functools.partial(_end_with, os.getpid()))


# How often a loader process looks for the training process it serves.
WATCH_SECONDS = 1.0


def _end_with(training_pid: int, worker_id: int) -> None:
    """Ends this loader process once the training process is gone, however it went (SIGKILL
    included). The forkserver is its parent, not the training process, so torch's own watchdog
    (which compares the parent's pid) and a parent-death signal never see it go."""
    def watch() -> None:
        while _running(training_pid):
            time.sleep(WATCH_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-training", daemon=True).start()


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, killed but not yet reaped, is not)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): signal 0 only asks whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat[stat.rindex(")") + 2] != "Z"


def fit(training: Training, dataset: DetectionDataset, schedule: StepSchedule, hooks: Sequence[HookBase],
        rank: int = 0, world_size: int = 1, loaders: int = 0, until: int | None = None) -> dict[str, float]:
    """Train from `training.step` to its last step (or to step `until`, one segment of a PBT
    trial, the schedules unchanged), and return that step's metrics; the data position follows
    from the step. One loader serves every remaining epoch, so its processes
    start once. A step's metrics time the step itself (`step_seconds`) and, beside it, the wait
    for its batch (`batch_seconds`); the hooks' own time is in neither."""
    config = training.config.train
    stop = schedule.total_steps if until is None else min(until, schedule.total_steps)
    sampler = RunBatchSampler(dataset.reader.row_groups(), config.batch_size, config.seed, training.step, stop,
                              rank, world_size)
    metrics: dict[str, float] = {}
    for hook in hooks:
        hook.before_train(training)
    try:
        ready = time.perf_counter()
        for images, targets, _ in training_batches(dataset, sampler, loaders, training.device.type == "cuda"):
            for hook in hooks:
                hook.before_step(training)
            started = time.perf_counter()
            metrics = training.train_step(images, targets)
            done = time.perf_counter()
            metrics |= {"step_seconds": done - started, "batch_seconds": done - ready}
            for hook in hooks:
                hook.after_step(training, metrics)
            ready = time.perf_counter()
    finally:
        for hook in hooks:
            hook.after_train(training)
    return metrics
