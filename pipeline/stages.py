"""The train and evaluate stages in one process (CPU or one GPU), on the data-prep output.

Outputs go under the run directory (`run.output_dir/run.name`): checkpoints/, train/metrics.jsonl,
model.pt (the best weights by validation AP with the config and class names), eval/. Rerunning
a stage with the same run name resumes training from the latest checkpoint.
"""
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from aploss.detector import OneStageDetector
from pipeline import checkpoints
from pipeline.checkpoints import CheckpointStore
from pipeline.config import Config, config_from_dict, config_to_dict
from pipeline.dataset import DetectionDataset
from pipeline.evaluate import Evaluation, evaluate_split, predict
from pipeline.coco_metrics import evaluate_detections
from pipeline.shards import ShardReader, read_manifest
from pipeline.sources import PASCAL_VOC
from pipeline.train import Training, build_model, fit, resolve_device, seed_everything, total_steps


def _split_dir(config: Config, split: str) -> Path:
    return config.run.prepared_data(config.data.dataset) / split


def _classes(config: Config) -> list[str]:
    return read_manifest(config.run.prepared_data(config.data.dataset))["classes"]


def validation_ap(model, config: Config, device: torch.device) -> float:
    """COCO AP of `model` on the validation split."""
    split = _split_dir(config, config.data.val_split)
    detections = predict(model, DetectionDataset(ShardReader(split)), config.eval.batch_size, device)
    return evaluate_detections(split / "ground_truth.json", detections).metrics["AP"]


def due(step: int, every: int, steps_per_epoch: int, last: int) -> bool:
    return step == last or step % (every or steps_per_epoch) == 0


class LocalHooks:
    """Progress bar, a metrics log line every `log_every` steps, validation and checkpoints."""

    def __init__(self, config: Config, store: CheckpointStore, extra_state: dict, steps_per_epoch: int,
                 progress: bool) -> None:
        self.config, self.store, self.extra_state = config, store, extra_state
        self.steps_per_epoch = steps_per_epoch
        self.metrics_path = config.run.directory() / "train" / "metrics.jsonl"
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.bar: tqdm | None = None
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.last_metrics: dict[str, float] = {}

    def after_step(self, training: Training, metrics: dict[str, float]) -> None:
        if self.bar is None:
            self.bar = tqdm(total=training.total_steps, initial=training.step - 1, desc="train",
                            disable=not self.progress, unit="step")
        self.bar.update(1)
        self.window_steps += 1
        step, last, train = training.step, training.total_steps, self.config.train
        if step % train.log_every == 0 or step == last:
            elapsed = time.perf_counter() - self.window_start
            metrics["images_per_s"] = self.window_steps * train.batch_size / elapsed
            metrics["skipped"] = training.skipped
            self.window_start, self.window_steps = time.perf_counter(), 0
            with self.metrics_path.open("a") as log:
                log.write(json.dumps({"step": step, **metrics}) + "\n")
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", cls=f"{metrics['cls_loss']:.3f}",
                                 box=f"{metrics['box_loss']:.3f}", lr=f"{metrics['lr']:.2g}",
                                 img_s=f"{metrics['images_per_s']:.1f}")
        self.last_metrics = metrics
        if due(step, train.checkpoint_every, self.steps_per_epoch, last) or \
                due(step, train.eval_every, self.steps_per_epoch, last):
            score = None
            if due(step, train.eval_every, self.steps_per_epoch, last):
                score = validation_ap(training.detector, self.config, training.device)
                with self.metrics_path.open("a") as log:
                    log.write(json.dumps({"step": step, "val_ap": score}) + "\n")
            self.store.save(step, {**training.state_dict(), **self.extra_state}, score)
        if step == last:
            self.bar.close()


@dataclass
class TrainSummary:
    model_path: Path
    steps: int
    skipped: int
    last_metrics: dict[str, float]


def _check_resumable(saved: dict, config: Config, path: Path) -> None:
    saved_model = config_from_dict(saved["config"]).model
    if saved_model != config.model:
        raise ValueError(f"{path}: run '{config.run.name}' was trained with a different model config "
                         f"({saved_model}); choose another run.name to start afresh")


def train_stage(config: Config, progress: bool = True) -> TrainSummary:
    """Train in this process, resuming the run's latest checkpoint if there is one."""
    seed_everything(config.train.seed)
    device = resolve_device(config.train.device)
    classes = _classes(config)
    dataset = DetectionDataset(ShardReader(_split_dir(config, config.data.train_split)), hflip=config.train.hflip,
                               seed=config.train.seed, augment=config.train.augment,
                               input_size=config.train.input_size)
    model = build_model(config, len(classes)).to(device)
    training = Training(config, model, device, total_steps(config, len(dataset)))
    run_dir = config.run.directory()
    store = CheckpointStore(run_dir / "checkpoints", config.train.keep_checkpoints)
    extra_state = {"config": config_to_dict(config), "classes": classes}
    if (latest := store.latest()) is not None:
        state = checkpoints.load(latest, device)
        _check_resumable(state, config, latest)
        training.load_state_dict(state)
    hooks = LocalHooks(config, store, extra_state, len(dataset) // config.train.batch_size, progress)
    fit(training, dataset, hooks)
    best = checkpoints.load(store.best(), device)
    model_path = run_dir / "model.pt"
    checkpoints.save_atomic({"model": best["model"], **extra_state}, model_path)
    return TrainSummary(model_path, training.step, training.skipped, hooks.last_metrics)


def load_model(path: Path, device: torch.device) -> tuple[OneStageDetector, list[str], Config]:
    """A trained detector, its class names and the config it was trained with, from a model.pt
    of the train stage."""
    saved = checkpoints.load(path, device)
    config = config_from_dict(saved["config"])
    model = build_model(config, len(saved["classes"])).to(device)
    model.load_state_dict(saved["model"])
    return model, saved["classes"], config


def evaluate_stage(config: Config, model_path: Path | None = None) -> Evaluation:
    """COCO evaluation of the run's model on the evaluation split, written under the run's eval/."""
    device = resolve_device(config.train.device)
    model_path = model_path or config.run.directory() / "model.pt"
    if not model_path.exists():
        raise FileNotFoundError(f"{model_path}: no trained model; run the train stage first")
    model, classes, _ = load_model(model_path, device)
    split = _split_dir(config, config.eval_split())
    # VOC runs also get the VOC07 11-point and area mAP beside the COCO metrics.
    voc = config.data.dataset in PASCAL_VOC
    return evaluate_split(model, DetectionDataset(ShardReader(split)), split / "ground_truth.json", classes,
                          config.run.directory() / "eval", config.eval.batch_size, device, config.eval.sample_images,
                          voc=voc)


def robustness_stage(config: Config, names: list[str] | None = None, progress: bool = True) -> dict[str, tuple]:
    """AP of the models of runs `names` (default: run.name, all under run.output_dir) under
    occlusion, noise and COCO-C on the evaluation split, in one pass over the perturbed images:
    name -> (RobustnessResult, files written under that run's robustness/)."""
    from pipeline.robustness import evaluate_robustness, settings, write_result

    device = resolve_device(config.train.device)
    split = _split_dir(config, config.eval_split())
    classes = _classes(config)
    models, trained_with = {}, {}
    for name in names or [config.run.name]:
        path = config.for_run(name).run.directory() / "model.pt"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no trained model for run '{name}'; run its train stage first")
        models[name], trained_on, trained_config = load_model(path, device)
        trained_with[name] = config_to_dict(trained_config)
        if trained_on != classes:
            raise ValueError(f"{path}: run '{name}' was trained on classes {trained_on}, but {split} has {classes}")
    chosen, unavailable = settings(config.robustness)
    results = evaluate_robustness(models, DetectionDataset(ShardReader(split)), split / "ground_truth.json", chosen,
                                  config.eval.batch_size, device, config.robustness.seed, unavailable,
                                  config.robustness.workers, progress)
    results = {name: dataclasses.replace(result, trained_with=trained_with[name]) for name, result in results.items()}
    return {name: (result, write_result(result, config.for_run(name).run.directory() / "robustness"))
            for name, result in results.items()}
