"""The detector a config describes: built untrained, started from `model.init`'s weights, or
loaded from a run's model.pt.

`model.init` sources load as data only (weights_only), from a file, an http(s) URL (downloaded
once into aploss's own cache), torchvision's ImageNet weights or an earlier run; an MLflow model URI is fetched
into a file by the orchestration layer first (`tracking.registry.fetch_source`); `model_source.py` resolves
every source that names a file."""
import dataclasses
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from aploss.architectures import IMAGENET_WEIGHTS, WeightsMismatch, build_detector, load_detector_weights
from aploss.detection_loss import DetectionLoss
from aploss.detector import OneStageDetector
from aploss.engine import LocalBatch
from pipeline import checkpoints
from pipeline.config import MAX_CLASSES, Config, check_bounded, config_from_dict
from pipeline.errors import ConfigError, DataError, MissingInput, UserError
from pipeline.model_source import model_file
from pipeline.redaction import redact


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def build_model(config: Config, num_classes: int, batch: LocalBatch | None = None,
                backbone_weights: dict[str, Tensor] | None = None) -> OneStageDetector:
    """The detector of `config.model`, trained with the loss of `config.loss` over `batch` (this
    process's, or a process group's). Its δ starts at the schedule's first value; the δ hook of
    training (`pipeline.training.hooks.DeltaScheduling`) sets it at every step."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise DataError(f"{num_classes} classes: a detector has 1 to {MAX_CLASSES}")
    model, loss = config.model, config.loss
    criterion = DetectionLoss(num_classes, classification=loss.classification, interpolate=loss.interpolate,
                              fg_iou=model.fg_iou, bg_iou=model.bg_iou, focal_alpha=loss.focal_alpha,
                              focal_gamma=loss.focal_gamma, box_beta=loss.box_beta, box_weight=loss.box_weight,
                              batch=batch, self_balance_initial=loss.self_balance_initial,
                              delta=loss.delta.build()(0.0), box_loss=loss.box_loss)
    return build_detector(
        model.arch, num_classes, norm=_norm(config), min_size=model.min_size, max_size=model.max_size,
        anchors=model.anchors.layout() if model.arch.startswith("retinanet") else None,
        fpn_channels=model.fpn_channels, score_thresh=model.score_thresh, nms_thresh=model.nms_thresh,
        detections_per_image=model.detections_per_image, candidates_per_level=model.candidates_per_level,
        train_input_size=config.train.input_size, criterion=criterion, backbone_weights=backbone_weights)


class TrainedModel(NamedTuple):
    detector: OneStageDetector
    classes: list[str]
    config: Config  # the config it was trained with
    # The dataset's category id of each class, saved in the model.pt: a model file names no data
    # to read them from (its config's data.prepared could send requests anywhere).
    category_ids: list[int]


def load_model(path: Path, device: torch.device) -> TrainedModel:
    """A trained detector with its class names, config and category ids, from a model.pt of the
    train stage; a model.pt from before category ids were saved numbers its classes 1..K."""
    saved = checkpoints.load(path, device)
    if not isinstance(saved, dict) or not {"config", "classes", "model"} <= set(saved):
        raise DataError(f"{path}: not a model.pt (it has no config, classes and model)")
    classes = saved["classes"]
    check_bounded(classes, f"{path}: classes", max_values=MAX_CLASSES + 1, max_depth=1)
    if not isinstance(classes, list) or not all(isinstance(name, str) and len(name) <= 256 for name in classes):
        raise DataError(f"{path}: classes must be a list of names")
    ids = saved.get("category_ids", list(range(1, len(classes) + 1)))
    if not (isinstance(ids, list) and len(ids) == len(classes) and all(type(i) is int for i in ids)):
        raise DataError(f"{path}: category_ids must be one integer per class")
    try:
        config = config_from_dict(saved["config"])
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    model = build_model(config, len(classes)).to(device)
    model.load_state_dict(saved["model"])
    return TrainedModel(model, classes, config, ids)


def _norm(config: Config) -> str:
    """model.norm, `auto` taken as `bind_init` would for a source other than a whole detector."""
    norm = config.model.norm
    return norm if norm != "auto" else "group" if config.model.init == "none" else "frozen_bn"


def init_weights(config: Config) -> dict:
    """What model.init names, as loaded: a state dict (a trunk's or a detector's), or one of
    this project's checkpoint or model.pt dicts. Nothing in it is executed."""
    init = config.model.init
    if init != "imagenet" and not init.startswith(("http://", "https://")):
        return checkpoints.load(model_file(init, config.run.outputs(), "model.init"))
    try:
        if init == "imagenet":
            return IMAGENET_WEIGHTS[config.model.arch].get_state_dict(progress=True, check_hash=True,
                                                                      weights_only=True)
        path = _downloaded(init)
    except (urllib.error.URLError, OSError) as error:
        raise MissingInput(f"model.init={redact(init)}: cannot download its weights ({redact(str(error))}); "
                           "download the file elsewhere and give its path") from None
    return checkpoints.load(path)


def _downloaded(url: str) -> Path:
    """The file at `url`, downloaded once into aploss's own cache under the URL's hash, at most
    checkpoints.MAX_CHECKPOINT_BYTES and never unpacked. Not torch.hub's cache: it unpacks zips
    there, and a file named like torchvision's weights would then be what model.init=imagenet
    loads. The line printed names the URL without its credentials (a presigned signature)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "aploss" / "init"
    target = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.pt"
    if target.is_file():
        return target
    print(f"downloading model.init {redact(url)}", file=sys.stderr, flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=60) as response, \
            tempfile.NamedTemporaryFile(dir=cache, suffix=".part", delete=False) as part:
        received = 0
        try:
            while chunk := response.read(1 << 20):
                received += len(chunk)
                if received > checkpoints.MAX_CHECKPOINT_BYTES:
                    raise DataError(f"model.init={redact(url)}: larger than the limit for checkpoints "
                                    f"({checkpoints.MAX_CHECKPOINT_BYTES} bytes)")
                part.write(chunk)
        except BaseException:
            Path(part.name).unlink()
            raise
    os.replace(part.name, target)
    return target


def _state_dict(loaded: dict) -> dict[str, Tensor]:
    """The tensors of a loaded file: this project's files keep them under "model", training
    scripts often under "state_dict"."""
    for key in ("model", "state_dict"):
        if isinstance(loaded.get(key), dict):
            return loaded[key]
    return loaded


def _is_detector(weights: dict[str, Tensor]) -> bool:
    return any(key.startswith(("backbone.", "head.")) for key in weights)


def bind_init(config: Config) -> Config:
    """`config` with model.norm made concrete: `auto` is group from scratch, frozen BN for a
    pretrained trunk, and a whole detector's own norm (this project's files record it;
    torchvision's detectors use frozen BN). Recorded with the run, so evaluation builds the same."""
    if config.model.norm != "auto":
        return config
    norm = _norm(config)
    if config.model.init not in ("none", "imagenet"):
        loaded = init_weights(config)
        if _is_detector(_state_dict(loaded)):
            norm = _norm(config_from_dict(loaded["config"])) if isinstance(loaded.get("config"), dict) else "frozen_bn"
    return dataclasses.replace(config, model=dataclasses.replace(config.model, norm=norm))


def initial_model(config: Config, num_classes: int, batch: LocalBatch | None = None) -> OneStageDetector:
    """The detector training starts from: untrained, or with model.init's weights (a trunk's
    into the backbone; a whole detector's everywhere, the classification outputs re-initialised
    when the class count differs, anything else that does not fit an error naming it)."""
    if config.model.init == "none":
        return build_model(config, num_classes, batch)
    config = bind_init(config)
    weights = _state_dict(init_weights(config))
    try:
        if not _is_detector(weights):
            return build_model(config, num_classes, batch, backbone_weights=weights)
        model = build_model(config, num_classes, batch)
        reinitialised = load_detector_weights(model, weights)
    except (WeightsMismatch, ValueError) as error:
        raise DataError(f"model.init={config.model.init}: {error}") from None
    if reinitialised:
        print(f"model.init: {', '.join(reinitialised)} re-initialised for {num_classes} classes", flush=True)
    return model
