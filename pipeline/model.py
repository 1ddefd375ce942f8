"""The detector a config describes, built untrained or loaded from a run's model.pt."""
from pathlib import Path

import torch

from aploss.architectures import build_detector
from aploss.detection_loss import DetectionLoss
from aploss.detector import OneStageDetector
from aploss.engine import LocalBatch
from pipeline import checkpoints
from pipeline.config import Config, config_from_dict
from pipeline.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def build_model(config: Config, num_classes: int, batch: LocalBatch | None = None) -> OneStageDetector:
    """The detector of `config.model`, trained with the loss of `config.loss` over `batch` (this
    process's, or a process group's). Its δ is set by `Training` at every step, from the schedule."""
    model, loss = config.model, config.loss
    criterion = DetectionLoss(num_classes, classification=loss.classification, interpolate=loss.interpolate,
                              fg_iou=model.fg_iou, bg_iou=model.bg_iou, focal_alpha=loss.focal_alpha,
                              focal_gamma=loss.focal_gamma, box_beta=loss.box_beta, box_weight=loss.box_weight,
                              batch=batch)
    return build_detector(
        model.arch, num_classes, norm=model.norm, min_size=model.min_size, max_size=model.max_size,
        anchor_scales=model.anchor_scales, score_thresh=model.score_thresh, nms_thresh=model.nms_thresh,
        detections_per_image=model.detections_per_image, candidates_per_level=model.candidates_per_level,
        train_input_size=config.train.input_size, criterion=criterion)


def load_model(path: Path, device: torch.device) -> tuple[OneStageDetector, list[str], Config]:
    """A trained detector, its class names and the config it was trained with, from a model.pt
    of the train stage."""
    saved = checkpoints.load(path, device)
    config = config_from_dict(saved["config"])
    model = build_model(config, len(saved["classes"])).to(device)
    model.load_state_dict(saved["model"])
    return model, saved["classes"], config
