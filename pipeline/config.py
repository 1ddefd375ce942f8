"""The one typed configuration of every stage: YAML file, command-line overrides, Ray job
payload and Tune search space all go through `Config`.

A config is a tree of frozen-free dataclasses. `load_config` reads a YAML mapping, applies
`section.key=value` overrides, and validates everything: unknown keys, wrong types and bad
values raise `ConfigError` naming the dotted key (and the file). `config_to_dict` and
`config_from_dict` round-trip it through plain data; `config_record` is that plain data as it
is stored or shipped (MLflow params, checkpoints, Ray payloads), without credentials.
"""
import dataclasses
import hashlib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from aploss.anchor_layout import AnchorLayout
from aploss.catalog import IMAGENET_TRUNKS, Architecture
from aploss.schedules import ChangedDelta, DeltaSchedule, check_changes, schedule_fields, schedule_from_dict
from pipeline import yaml_values
from pipeline.errors import ConfigError
from pipeline.io import write_bytes_atomic
from pipeline.redaction import redact_tree
from pipeline.run_folder import OutputDir, RunFolder
from pipeline.search_space import DEFAULT_SPACE, parse_domain
from pipeline.storage import InputRefused, Location, Where, absolute, is_uri

# model.init (or predict --model) naming a model in MLflow's registry or a run's artifacts.
MLFLOW_URIS = ("models:/", "runs:/")


# Upper bounds on the values that decide what is allocated, checked before anything is built: a
# config may come from a model.pt or a shared run folder, where fpn_channels=32768 would ask for
# 39 GB. Each is well above what a detector is trained with.
MAXIMUMS = {"model.min_size": 4096, "model.max_size": 4096, "model.fpn_channels": 512,
            "model.detections_per_image": 10_000, "model.candidates_per_level": 100_000,
            "model.anchors.scales_per_octave": 8, "train.batch_size": 4096, "train.input_size": 2048,
            "train.loader_workers": 256, "eval.batch_size": 1024, "data.shard_images": 100_000}
MAX_ANCHORS_PER_LEVEL = 16
# Classes a detector may have (LVIS has 1,203): they come from a manifest or a model.pt.
MAX_CLASSES = 4096
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


def check_run_name(name: str, key: str) -> None:
    # A run's name is a folder under output_dir and a value in MLflow's search filters: '..' would
    # put the run's files above it, a quote would end the filter's string.
    _require(RUN_NAME.fullmatch(name) is not None, key,
             f"must be 1 to 200 letters, digits, '.', '_' or '-', not starting with '.', got {name!r}")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass
class DataConfig:
    # bccd | voc2007 | voc2012 | voc0712 | coco2017 | coco (instances jsons of your own, by path) | voc (a
    # VOC-layout folder of your own at data.root)
    dataset: str = "bccd"
    root: str = ""  # data root; empty means $APLOSS_DATA_ROOT, else ./data
    annotations: dict[str, str] = field(default_factory=dict)  # coco: split -> instances json
    images: dict[str, str] = field(default_factory=dict)  # coco: split -> image folder
    classes: list[str] = field(default_factory=list)  # voc: the class names, their category ids 1..K in this order
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    skip_bad: bool = False  # skip (and report) unreadable images and malformed annotations
    download: bool = True  # fetch a named dataset missing from the data root
    shard_images: int = 256  # images per Parquet shard
    # 0: data-prep decodes and checks the images in this process. N: on Ray Data, N tasks at a
    # time across the cluster (ray.address), the images read where they are (a local folder every
    # node sees, or the object store of an s3:// data root); the output is the same either way.
    prep_workers: int = 0
    min_box_size: float = 1.0  # boxes narrower or shorter than this (pixels, after clipping) are dropped
    # Bounds on what an image may cost, checked before it is decoded by data-prep, training,
    # predict and the served model alike (pipeline.images): its file's size, its header's declared
    # width x height, and the time reading it may take (a stalled store). Images of one frame only.
    max_image_pixels: int = 64_000_000
    max_image_mb: float = 128.0
    image_read_timeout_s: float = 60.0
    # Annotation files (COCO json, VOC XML and listings) larger than this are refused unread.
    # COCO train's json is 448 MB, LVIS's 1.1 GB.
    max_annotation_mb: float = 2048.0
    # A prepared-data directory (what data-prep prints) to use as it is. Empty: training uses the
    # one data-prep makes of the settings above; eval and robustness use the data the run trained on.
    prepared: str = ""

    def validate(self) -> None:
        named = ("bccd", "voc2007", "voc2012", "voc0712", "coco2017", "coco", "voc")
        _require(self.dataset in named, "data.dataset", f"must be one of {list(named)}, got {self.dataset!r}")
        if self.dataset == "voc":
            _require(bool(self.classes), "data.classes",
                     "dataset 'voc' (a VOC-layout folder of your own at data.root) needs its class names, as the "
                     "XML files name them, e.g. data.classes='[cat, dog]' (see the README's 'Your own data')")
            _require(len(set(self.classes)) == len(self.classes) and all(self.classes), "data.classes",
                     f"must be distinct, non-empty names, got {self.classes}")
        else:
            _require(not self.classes, "data.classes",
                     f"is for dataset 'voc' only: {self.dataset!r} names its own classes")
        if self.dataset == "coco":
            _require(bool(self.annotations), "data.annotations",
                     "dataset 'coco' (your own COCO instances json) needs one json per split, relative to "
                     "data.root, e.g. data.annotations='{train: train.json, val: val.json}' with "
                     "data.images='{train: train_images, val: val_images}' (see the README's 'Your own data')")
        _require(self.shard_images >= 1, "data.shard_images", f"must be >= 1, got {self.shard_images}")
        _require(self.prep_workers >= 0, "data.prep_workers", f"must be >= 0, got {self.prep_workers}")
        _require(self.min_box_size >= 0, "data.min_box_size", f"must be >= 0, got {self.min_box_size}")
        _require(self.max_image_pixels >= 1, "data.max_image_pixels", f"must be >= 1, got {self.max_image_pixels}")
        _require(self.max_image_mb > 0, "data.max_image_mb", f"must be > 0, got {self.max_image_mb}")
        _require(self.image_read_timeout_s > 0, "data.image_read_timeout_s",
                 f"must be > 0, got {self.image_read_timeout_s}")
        _require(self.max_annotation_mb > 0, "data.max_annotation_mb", f"must be > 0, got {self.max_annotation_mb}")

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys([self.train_split, self.val_split, self.test_split]))

    def root_location(self) -> str:
        """data.root, else $APLOSS_DATA_ROOT, else ./data: a local path made absolute, or an
        object-store URI."""
        return absolute(self.root or os.environ.get("APLOSS_DATA_ROOT") or "data")

    def resolved_root(self) -> Path:
        """Where the dataset's files are read: the data root, or for one in an object store this
        machine's copy of it, which data-prep makes (`pipeline.data.fetch`)."""
        root = self.root_location()
        if not is_uri(root):
            return Path(root)
        cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
        return cache / "aploss" / "data" / hashlib.sha256(root.encode()).hexdigest()[:16]


Augmentation = Literal["flip", "ssd"]  # pipeline.data.augment
AUGMENTATIONS: tuple[str, ...] = typing.get_args(Augmentation)

# SSD models see one input size, fixed by their default boxes.
FIXED_INPUT_SIZES = {"ssd300_vgg16": 300, "ssd512_vgg16": 512, "ssdlite_mobilenet_v3": 320}


@dataclass
class AnchorConfig:
    """RetinaNet's anchors (SSD keeps its default boxes). `auto` is fitted to the training split
    when training starts and its sizes, ratios and lowest level are then filled in, so the run's
    recorded config, checkpoints and model.pt hold the anchors it trained with; a model built
    from an `auto` config not fitted yet has the paper's."""

    mode: Literal["paper", "auto", "explicit"] = "auto"
    scales_per_octave: int = 2  # paper: sizes per octave at 4 x stride; 2 gives the paper's 6 per location
    lowest_level: int = 3  # paper, explicit: 3 (P3, stride 8) or 2 (P2, stride 4: objects of ~16 px and less)
    sizes: list[list[float]] = field(default_factory=list)  # per level up to P7, pixels at the network input
    ratios: list[list[float]] = field(default_factory=list)  # per level, height / width

    def layout(self) -> AnchorLayout:
        if not self.sizes:
            return AnchorLayout.paper(self.scales_per_octave, self.lowest_level)
        try:
            return AnchorLayout(tuple(map(tuple, self.sizes)), tuple(map(tuple, self.ratios)), self.lowest_level)
        except ValueError as error:
            raise ConfigError(f"model.anchors: {error}") from None

    def validate(self) -> None:
        _require(self.scales_per_octave >= 1, "model.anchors.scales_per_octave",
                 f"must be >= 1, got {self.scales_per_octave}")
        _require(self.lowest_level in (2, 3), "model.anchors.lowest_level", f"must be 2 or 3, got {self.lowest_level}")
        _require(self.mode != "paper" or not (self.sizes or self.ratios), "model.anchors.sizes",
                 "sizes and ratios are for mode 'explicit' (or filled by 'auto'), not 'paper'")
        _require(self.mode != "explicit" or bool(self.sizes), "model.anchors.sizes",
                 "mode 'explicit' needs sizes and ratios per level")
        _require(all(len(level) <= MAX_ANCHORS_PER_LEVEL for level in [*self.sizes, *self.ratios]),
                 "model.anchors.sizes", f"at most {MAX_ANCHORS_PER_LEVEL} sizes and ratios per level")
        if self.sizes:
            self.layout()


@dataclass
class ModelConfig:
    arch: Architecture = "retinanet_r18"
    # Where training starts: none (from scratch), imagenet (torchvision's weights of the trunk),
    # a path or http(s) URL of a trunk's or a whole detector's state dict, run:NAME (that run's
    # model.pt), or an MLflow model URI (models:/aploss-bccd@champion, runs:/...).
    init: str = "none"
    # auto: group from scratch, frozen BN for a pretrained trunk (ImageNet statistics: batches of
    # a few images cannot re-estimate them), a whole detector's own; made concrete when training starts.
    norm: Literal["auto", "group", "frozen_bn", "batch"] = "auto"
    min_size: int = 256  # shorter side at training and test (RetinaNet); SSD uses its fixed size
    max_size: int = 342
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    # RetinaNet's pyramid and head width (the paper's 256); the head's convolutions cost its
    # square: 64 makes a CPU step of the default recipe 27 % cheaper than 128, and 46 % of 256's.
    fpn_channels: int = 64
    fg_iou: float = 0.5
    bg_iou: float = 0.4
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_image: int = 100
    candidates_per_level: int = 1000

    def validate(self) -> None:
        _require(self.min_size >= 32, "model.min_size", f"must be >= 32, got {self.min_size}")
        _require(self.max_size >= self.min_size, "model.max_size",
                 f"must be >= model.min_size ({self.min_size}), got {self.max_size}")
        self.anchors.validate()
        _require(self.fpn_channels >= 32 and self.fpn_channels % 32 == 0, "model.fpn_channels",
                 f"must be a multiple of 32 (GroupNorm's groups), got {self.fpn_channels}")
        _require(bool(self.init.strip()), "model.init", "must not be empty ('none' trains from scratch)")
        _require(self.init != "run:" and not (self.init.startswith("run:") and "/" in self.init), "model.init",
                 f"run:NAME names a run under run.output_dir, got {self.init!r}")
        _require(self.init != "imagenet" or self.arch in IMAGENET_TRUNKS, "model.init",
                 f"no ImageNet weights for {self.arch}'s trunk; choose one of {sorted(IMAGENET_TRUNKS)}")
        _require(self.arch.startswith("retinanet") or self.anchors == AnchorConfig(), "model.anchors",
                 f"{self.arch} has SSD's default boxes: leave model.anchors at its defaults")
        _require(0 < self.bg_iou <= self.fg_iou <= 1, "model.fg_iou",
                 f"need 0 < bg_iou <= fg_iou <= 1, got bg_iou={self.bg_iou}, fg_iou={self.fg_iou}")
        _require(0 <= self.score_thresh < 1, "model.score_thresh", f"must be in [0, 1), got {self.score_thresh}")
        _require(0 < self.nms_thresh <= 1, "model.nms_thresh", f"must be in (0, 1], got {self.nms_thresh}")
        _require(self.detections_per_image >= 1, "model.detections_per_image", "must be >= 1")
        _require(self.candidates_per_level >= 1, "model.candidates_per_level", "must be >= 1")


@dataclass
class DeltaConfig:
    """The step half-width schedule (aploss.schedules); `start` is the constant's value."""

    kind: Literal["constant", "linear", "cosine", "step"] = "constant"
    start: float = 1.0
    end: float = 1.0
    narrow_from: float = 0.0
    narrow_until: float = 1.0
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    # [[training fraction, delta], ...]: from each fraction on, delta is that value (what a PBT
    # sweep set as the trial went; its written config replays them)
    changes: list[list[float]] = field(default_factory=list)

    def build(self) -> DeltaSchedule | ChangedDelta:
        """The schedule, through the library's one dict format (`start` is a constant's value)."""
        values = {"value": self.start, "start": self.start, "end": self.end, "narrow_from": self.narrow_from,
                  "narrow_until": self.narrow_until, "milestones": tuple(self.milestones)}
        try:
            taken = schedule_fields(self.kind)
            schedule = schedule_from_dict({"kind": self.kind, **{key: values[key] for key in taken}})
            return ChangedDelta(schedule, tuple(map(tuple, self.changes))) if self.changes else schedule
        except ValueError as error:
            raise ConfigError(f"loss.delta: {error}") from None

    def validate(self) -> None:
        self.build()


# What a PBT trial may change during its run, each from a step on (`DeltaConfig.changes`, `OptimConfig.lr_changes`).
PERTURBABLE = ("optim.lr", "loss.delta.start")


# What each classification loss's release sets beyond the shared defaults, as overrides: RS's H is
# half as wide (benchmarks and recipes compare the losses at their own settings).
RELEASED_SETTINGS = {"rs": ("loss.delta.start=0.5",)}


@dataclass
class LossConfig:
    # ap: AP-loss; focal: focal loss; alrp: aLRP loss; rs: Rank & Sort (aploss.detection_loss).
    # The released deltas: 1 for ap and alrp, 0.5 for rs (set loss.delta.start=0.5).
    classification: Literal["ap", "focal", "alrp", "rs"] = "ap"
    delta: DeltaConfig = field(default_factory=DeltaConfig)
    interpolate: bool = True  # ap only
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # ap and focal: smooth-L1 on the encoded deltas (the released code's) or GIoU on the decoded boxes
    box_loss: Literal["smooth_l1", "giou"] = "smooth_l1"
    box_beta: float = 1.0  # smooth-L1 transition on encoded deltas (1 in the released code)
    box_weight: float = 1.0  # ap and focal; alrp and rs balance their GIoU terms themselves
    self_balance_initial: float = 50.0  # alrp: the localisation loss's weight until the first update
    self_balance_period: int = 0  # alrp: steps between updates of that weight; 0 means once per epoch

    def validate(self) -> None:
        self.delta.validate()
        _require(self.self_balance_initial > 0, "loss.self_balance_initial",
                 f"must be > 0, got {self.self_balance_initial}")
        _require(self.self_balance_period >= 0, "loss.self_balance_period",
                 f"must be >= 0 (0: once per epoch), got {self.self_balance_period}")
        _require(0 <= self.focal_alpha <= 1, "loss.focal_alpha", f"must be in [0, 1], got {self.focal_alpha}")
        _require(self.focal_gamma >= 0, "loss.focal_gamma", f"must be >= 0, got {self.focal_gamma}")
        _require(self.box_beta >= 0, "loss.box_beta", f"must be >= 0, got {self.box_beta}")
        _require(self.box_loss == "smooth_l1" or self.classification in ("ap", "focal"), "loss.box_loss",
                 f"is for ap and focal: {self.classification} has its own GIoU term")
        _require(self.box_weight >= 0, "loss.box_weight", f"must be >= 0, got {self.box_weight}")


@dataclass
class OptimConfig:
    lr: float = 0.02  # for the global batch (the main job's recipe: 8 images from scratch)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    warmup_factor: float = 1 / 3
    schedule: Literal["multistep", "cosine"] = "multistep"
    milestones: list[float] = field(default_factory=lambda: [0.67, 0.89])  # training fractions
    gamma: float = 0.1
    grad_clip: float = 10.0  # max gradient norm; 0 disables clipping
    # [[training fraction, lr], ...]: from each fraction on, the base lr (before warm-up and decay)
    # is that value (what a PBT sweep set as the trial went; its written config replays them)
    lr_changes: list[list[float]] = field(default_factory=list)

    def validate(self) -> None:
        _require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _require(0 <= self.momentum < 1, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        _require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(0 < self.warmup_factor <= 1, "optim.warmup_factor",
                 f"must be in (0, 1], got {self.warmup_factor}")
        _require(all(0 < m < 1 for m in self.milestones) and self.milestones == sorted(self.milestones),
                 "optim.milestones", f"must be increasing training fractions in (0, 1), got {self.milestones}")
        _require(0 < self.gamma <= 1, "optim.gamma", f"must be in (0, 1], got {self.gamma}")
        _require(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.grad_clip}")
        try:
            check_changes(tuple(map(tuple, self.lr_changes)))
        except ValueError as error:
            raise ConfigError(f"optim.lr_changes: {error}") from None
        _require(all(lr > 0 for _, lr in self.lr_changes), "optim.lr_changes", "every lr must be > 0")


@dataclass
class TrainConfig:
    batch_size: int = 8  # global: all workers together
    epochs: int = 11
    max_steps: int = 0  # stop after this many steps if > 0 (a budget shorter than the epochs)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # mixed precision (float16) on CUDA
    # bfloat16 autocast of the trunk on CPU (aploss.detector: the pyramid and head stay float32):
    # 1.5x faster steps on a CPU with AVX512-BF16 or AMX, with rounding that moves the third digit.
    cpu_amp: bool = False
    hflip: float = 0.5  # horizontal-flip probability (in either augmentation)
    vflip: float = 0.0  # vertical-flip probability, for images without an up (cells, aerial views)
    mosaic: float = 0.0  # probability of a 4-image mosaic (pipeline.data.augment.mosaic) before the rest
    # Validation and the model.pt use an exponential moving average of the weights with this
    # decay (pipeline.training.averaging); 0: the last step's weights.
    ema_decay: float = 0.0
    augment: Augmentation = "flip"  # flip | ssd: distortion, zoom-out, crop, flip (pipeline.data.augment)
    input_size: int = 0  # square training input after augmentation; 0: model.min_size/max_size resize
    # Processes decoding and augmenting beside each training process; -1 (auto): one per whole CPU
    # beyond the step's own, of ray.cpus_per_worker on Ray workers, of this machine's (at most 4)
    # for a local run. The batches are the same whatever the number.
    loader_workers: int = -1
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 means once per epoch
    eval_every: int = 100  # steps between validation AP; 0 means once per epoch
    keep_checkpoints: int = 2  # kept in all: the latest (to resume) and the best by validation AP

    def validate(self) -> None:
        _require(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        _require(self.max_steps >= 0, "train.max_steps", f"must be >= 0, got {self.max_steps}")
        _require(0 <= self.hflip <= 1, "train.hflip", f"must be in [0, 1], got {self.hflip}")
        _require(0 <= self.vflip <= 1, "train.vflip", f"must be in [0, 1], got {self.vflip}")
        _require(0 <= self.mosaic <= 1, "train.mosaic", f"must be in [0, 1], got {self.mosaic}")
        _require(0 <= self.ema_decay < 1, "train.ema_decay", f"must be in [0, 1) (0: off), got {self.ema_decay}")
        _require(self.input_size == 0 or self.input_size >= 32, "train.input_size",
                 f"must be 0 (the model's sizes) or >= 32, got {self.input_size}")
        _require(self.loader_workers >= -1, "train.loader_workers",
                 f"must be >= 0, or -1 (auto), got {self.loader_workers}")
        _require(self.log_every >= 1, "train.log_every", f"must be >= 1, got {self.log_every}")
        _require(self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
        _require(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        _require(self.keep_checkpoints >= 2, "train.keep_checkpoints",
                 f"must be >= 2 (the latest, to resume, and the best), got {self.keep_checkpoints}")


@dataclass
class EvalConfig:
    split: str = ""  # the split evaluated; empty means data.test_split
    batch_size: int = 8
    sample_images: int = 4  # test images drawn with their detections
    # 0: evaluation and robustness detect in this process. N: N Ray workers (ray.cpus_per_worker
    # CPUs, or a GPU with ray.use_gpu, each) detect a slice each; the metrics are the same.
    workers: int = 0

    def validate(self) -> None:
        _require(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.workers >= 0, "eval.workers", f"must be >= 0, got {self.workers}")
        _require(self.sample_images >= 0, "eval.sample_images", "must be >= 0")


@dataclass
class RayConfig:
    address: str = ""  # a cluster ("auto", "ray://..."); empty: the job's cluster ($RAY_ADDRESS) or a local one
    workers: int = 2
    use_gpu: bool = False  # one GPU per worker and nccl; CPU workers use gloo
    cpus_per_worker: float = 1.0
    # Where the workers go (Ray's placement strategies): PACK fills a node first (NCCL within a
    # node), SPREAD puts them on different nodes where it can, so one node lost loses fewer.
    placement_strategy: str = "PACK"
    max_failures: int = 2  # worker-group restarts from the latest checkpoint before giving up
    local_cpus: int = 0  # logical CPUs of a local instance; 0 means workers + 2 (driver, data)

    def validate(self) -> None:
        _require(self.workers >= 1, "ray.workers", f"must be >= 1, got {self.workers}")
        _require(self.cpus_per_worker > 0, "ray.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        strategies = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
        _require(self.placement_strategy in strategies, "ray.placement_strategy",
                 f"must be one of {list(strategies)}, got {self.placement_strategy!r}")
        _require(self.max_failures >= 0, "ray.max_failures", f"must be >= 0, got {self.max_failures}")
        _require(self.local_cpus >= 0, "ray.local_cpus", f"must be >= 0, got {self.local_cpus}")


@dataclass
class TrackingConfig:
    uri: str = ""  # MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else sqlite:///<run.output_dir>/mlflow.db
    experiment: str = "aploss"
    # The model registry's name for the run's detector; empty: one per dataset (`registered_name`).
    registered_model: str = ""

    def validate(self) -> None:
        _require(bool(self.experiment), "tracking.experiment", "must not be empty")


@dataclass
class RobustnessConfig:
    occlusion: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # covered fraction of each box
    noise: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])  # Gaussian sigma on [0, 1] pixels
    corruptions: list[str] = field(default_factory=lambda: ["all"])  # COCO-C names, "all" or none ([])
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    # Seeds the perturbations, apart from train.seed: models of different training seeds are
    # compared on the same perturbed images.
    seed: int = 0
    # Processes perturbing images while the models run (0: in the main process): COCO-C is
    # single-threaded NumPy, and glass blur alone takes seconds per image.
    workers: int = 1

    def validate(self) -> None:
        _require(self.workers >= 0, "robustness.workers", f"must be >= 0, got {self.workers}")
        _require(all(0 < f <= 1 for f in self.occlusion), "robustness.occlusion",
                 f"fractions must be in (0, 1], got {self.occlusion}")
        _require(all(s > 0 for s in self.noise), "robustness.noise", f"sigmas must be > 0, got {self.noise}")
        _require(all(1 <= s <= 5 for s in self.severities), "robustness.severities",
                 f"COCO-C severities are 1-5, got {self.severities}")


@dataclass
class TuneConfig:
    samples: int = 8  # trials (times each grid combination)
    search: Literal["random", "optuna"] = "random"
    max_concurrent: int = 1  # trials training at once (a pbt population starts whole, and takes turns)
    grace_period: int = 1  # validations before ASHA may stop a trial
    reduction_factor: int = 2
    space: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SPACE))  # dotted key -> domain
    # asha: stops the trials that trail (grace_period, reduction_factor); pbt: Population Based
    # Training, whose trials take a better trial's state and perturb its lr and delta as they go
    scheduler: Literal["asha", "pbt"] = "asha"
    perturbation_interval: int = 0  # pbt: steps between perturbations, a multiple of train.eval_every; 0: eval_every
    quantile_fraction: float = 0.25  # pbt: the share of trials that take a donor's state, and that donate
    resample_probability: float = 0.25  # pbt: chance that a value is drawn afresh from its domain
    perturbation_factors: list[float] = field(default_factory=lambda: [1.2, 0.8])  # pbt: else multiplied by one

    def validate(self) -> None:
        _require(self.samples >= 1, "tune.samples", f"must be >= 1, got {self.samples}")
        _require(self.max_concurrent >= 1, "tune.max_concurrent", "must be >= 1")
        _require(self.grace_period >= 1, "tune.grace_period", "must be >= 1")
        _require(self.reduction_factor >= 2, "tune.reduction_factor", "must be >= 2")
        _require(self.perturbation_interval >= 0, "tune.perturbation_interval", "must be >= 0")
        _require(0 < self.quantile_fraction <= 0.5, "tune.quantile_fraction",
                 f"must be in (0, 0.5], got {self.quantile_fraction}")
        _require(0 <= self.resample_probability <= 1, "tune.resample_probability",
                 f"must be in [0, 1], got {self.resample_probability}")
        _require(bool(self.perturbation_factors) and all(f > 0 for f in self.perturbation_factors),
                 "tune.perturbation_factors", f"must be numbers > 0, got {self.perturbation_factors}")
        for key, spec in self.space.items():
            try:
                domain = parse_domain(spec)
            except ValueError as error:
                raise ConfigError(f"tune.space.{key}: {error}") from None
            if self.scheduler == "pbt":
                _require(key in PERTURBABLE, f"tune.space.{key}",
                         f"PBT changes values during a run, which it can for {sorted(PERTURBABLE)} only, e.g. "
                         "tune.space='{optim.lr: \"loguniform(0.003, 0.03)\", "
                         "loss.delta.start: \"uniform(0.25, 2)\"}'; search the others with tune.scheduler=asha")
                _require(domain.kind != "randint" and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in domain.values),
                    f"tune.space.{key}",
                    f"PBT perturbs numbers: uniform, loguniform, choice or grid of them, got {spec}")
        if self.scheduler == "pbt":
            _require(self.search == "random", "tune.search",
                     "PBT starts its population from the planned values (random); optuna does not apply")


@dataclass
class RunConfig:
    # prepared data, checkpoints, evaluation outputs, the default MLflow store: a local (on a
    # cluster, shared) path or an object-store URI (s3://bucket/prefix, any pyarrow.fs URI)
    output_dir: str = "runs"
    name: str = "default"

    def validate(self) -> None:
        check_run_name(self.name, "run.name")

    def folder(self) -> RunFolder:
        """This run's outputs: checkpoints, journal, model, evaluation."""
        return self.outputs().run(self.name)

    def outputs(self) -> OutputDir:
        """What the runs under output_dir share: prepared data, Ray's storage, fetched models."""
        return OutputDir(Location(self.output_dir))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)

    def validate(self, search_space: bool = True) -> None:
        flat = flatten(self)
        for key, maximum in MAXIMUMS.items():
            value = flat[key]
            _require(not isinstance(value, (int, float)) or value <= maximum, key, f"must be <= {maximum}, got {value}")
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        _require(self.train.batch_size % self.ray.workers == 0, "train.batch_size",
                 f"the global batch ({self.train.batch_size}) must split evenly over ray.workers ({self.ray.workers})")
        fixed = FIXED_INPUT_SIZES.get(self.model.arch)
        _require(fixed is None or self.train.input_size in (0, fixed), "train.input_size",
                 f"{self.model.arch} takes {fixed}x{fixed} inputs: set 0 or {fixed}, got {self.train.input_size}")
        _require(self.tune.scheduler != "pbt" or "loss.delta.start" not in self.tune.space
                 or self.loss.delta.kind == "constant", "loss.delta.kind",
                 "PBT sets delta as a constant it changes during the run: set 'constant', "
                 f"got {self.loss.delta.kind!r}")
        if search_space:
            self._validate_search_space()

    def _validate_search_space(self) -> None:
        """Every searched key exists and every value its domain can take makes a valid config."""
        keys = flatten(self)
        for key, spec in self.tune.space.items():
            _require(key in keys and not key.startswith("tune."), f"tune.space.{key}",
                     "not a config key that a trial can set")
            for value in parse_domain(spec).candidates():
                data = config_to_dict(self)
                apply_override(data, key, value)
                try:
                    _build(Config, data, "").validate(search_space=False)
                except ConfigError as error:
                    raise ConfigError(f"tune.space.{key}: value {value!r} gives an invalid config: {error}") from None

    def eval_split(self) -> str:
        return self.eval.split or self.data.test_split

    def with_absolute_paths(self) -> "Config":
        """This config with run.output_dir and data.root resolved here (data.root from
        $APLOSS_DATA_ROOT too), for a process that starts elsewhere: Ray Train workers and Tune
        trials run in Ray's own directories, without this process's variables."""
        prepared = absolute(self.data.prepared) if self.data.prepared else ""
        return dataclasses.replace(
            self, data=dataclasses.replace(self.data, root=self.data.root_location(), prepared=prepared),
            run=dataclasses.replace(self.run, output_dir=absolute(self.run.output_dir)))

    def with_prepared(self, directory: Where) -> "Config":
        """This config bound to the prepared data in `directory` (recorded with the run's model)."""
        return dataclasses.replace(self, data=dataclasses.replace(self.data, prepared=str(Location(directory))))

    def for_run(self, name: str) -> "Config":
        """This config for another run under the same output_dir (a run of a comparison)."""
        return dataclasses.replace(self, run=dataclasses.replace(self.run, name=name))

    def tracking_uri(self) -> str:
        """tracking.uri, else MLflow's own $MLFLOW_TRACKING_URI (how a job submitter passes its
        server), else a local store under run.output_dir."""
        uri = self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return uri
        if is_uri(self.run.output_dir):
            raise ConfigError(f"tracking.uri: run.output_dir is an object store ({self.run.output_dir}), which "
                              "cannot hold MLflow's sqlite store; set tracking.uri or $MLFLOW_TRACKING_URI to a "
                              "tracking server")
        return f"sqlite:///{self.run.outputs().mlflow_store}"


def _convert(value: Any, hint: Any, key: str) -> Any:
    """`value` as type `hint`, or ConfigError naming `key`."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        _require(value in choices, key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        _require(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _require(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
        key_type, value_type = typing.get_args(hint)
        return {_convert(k, key_type, key): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"config schema: unions are not supported ({key})")
    if hint is bool:
        _require(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if hint is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                 f"must be a number, got {value!r}")
        return float(value)
    if hint is str:
        _require(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"config schema: unsupported type {hint!r} ({key})")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "config"
    _require(isinstance(data, dict), where, f"must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        dotted = [f"{prefix}.{k}" if prefix else str(k) for k in unknown]
        raise ConfigError(f"unknown key(s) {dotted}; {where} accepts {sorted(names)}")
    values = {name: _convert(value, hints[name], f"{prefix}.{name}" if prefix else name)
              for name, value in data.items()}
    return cls(**values)


# Bounds on a config as read, before anything walks it whole: a config has a few hundred values,
# and one from a file (a YAML alias bomb, a model.pt of lists sharing references) can reach
# billions through a few bytes, which printing or converting it would each visit.
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_FILE_BYTES = 1 << 20


def check_bounded(data: Any, where: str, max_values: int = MAX_CONFIG_VALUES, max_depth: int = MAX_CONFIG_DEPTH
                  ) -> None:
    """ConfigError unless `data` reaches at most `max_values` values (each time a shared one is
    reached again) at most `max_depth` deep; stops as soon as either is passed."""
    pending, reached = [(data, 0)], 0
    while pending:
        value, depth = pending.pop()
        reached += 1
        if reached > max_values:
            raise ConfigError(f"{where}: more than {max_values} values (a value reached again through a "
                              "shared reference counts again)")
        if depth > max_depth:
            raise ConfigError(f"{where}: nested more than {max_depth} deep")
        if isinstance(value, dict):
            pending += [(item, depth + 1) for pair in value.items() for item in pair]
        elif isinstance(value, (list, tuple)):
            pending += [(item, depth + 1) for item in value]


def config_from_dict(data: dict) -> Config:
    """A validated Config from plain data (missing keys take their defaults)."""
    check_bounded(data, "config")
    config = _build(Config, data, "")
    config.validate()
    return config


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def config_record(config: Config) -> dict:
    """The config as plain data for whatever stores or ships it (checkpoints, model.pt, MLflow,
    Ray payloads, reports, saved YAML): without the credentials a URI in it may carry."""
    return redact_tree(config_to_dict(config))


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Config -> {"optim.lr": 0.01, ...}: the dotted keys MLflow params and Tune use."""
    flat = {}
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if dataclasses.is_dataclass(value):
            flat.update(flatten(value, f"{prefix}{section.name}."))
        else:
            flat[f"{prefix}{section.name}"] = value
    return flat


def apply_override(data: dict, dotted: str, value: Any) -> None:
    """Set `section.key[.key]` in nested plain data; unknown paths are caught by validation."""
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        _require(isinstance(child, dict), dotted, f"{part!r} is not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=0.02' -> ('optim.lr', 0.02); the value is read as YAML (numbers, lists, bools)."""
    key, sep, raw = text.partition("=")
    _require(bool(sep) and bool(key.strip()), text, "an override must look like section.key=value")
    try:
        value = yaml_values.load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"{key}: cannot read value {raw!r}: {error}") from None
    return key.strip(), value


EXTENDS = "extends"


def _deep_merge(base: dict, changes: dict) -> dict:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The mapping in YAML file `path`; a top-level `extends: other.yaml` (relative to `path`)
    starts from that file's mapping, which this one's keys then change."""
    path = path.resolve()  # `extends: ../here/c.yaml` is c.yaml itself
    if path in chain:
        raise ConfigError(f"{path}: extends itself through {' -> '.join(map(str, chain))}")
    try:
        text = Location(path).read_bounded(MAX_CONFIG_FILE_BYTES, 60, ("the limit for config files",) * 2)
        data = yaml_values.load(text.decode()) or {}
        check_bounded(data, str(path))
    except InputRefused as refused:
        raise ConfigError(f"{path}: {refused}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping, got {type(data).__name__}")
    if EXTENDS not in data:
        return data
    base = data.pop(EXTENDS)
    if not isinstance(base, str):
        raise ConfigError(f"{path}: {EXTENDS} must be the path of another config, got {base!r}")
    return _deep_merge(_read_yaml(path.parent / base, (*chain, path)), data)


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """The config in YAML file `path` (or the defaults) with `key=value` overrides applied."""
    data = _read_yaml(Path(path)) if path is not None else {}
    for text in overrides:
        apply_override(data, *parse_override(text))
    try:
        return config_from_dict(data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}" if path else str(error)) from None


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write `config` as YAML atomically (temp file, then rename)."""
    write_bytes_atomic(yaml.safe_dump(config_record(config), sort_keys=False).encode(), path)
