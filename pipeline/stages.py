"""The train and evaluate stages in one process (CPU or one GPU), on the data-prep output.

Outputs go under the run directory (`run.output_dir/run.name`): checkpoints/, train/metrics.jsonl,
model.pt (the best weights by validation AP with the config and class names), eval/. Rerunning
a stage with the same run name resumes training from the latest checkpoint.
"""
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from aploss.detector import OneStageDetector
from pipeline import checkpoints
from pipeline.bindings import evaluation_config, record_training_run, split_dir, training_data
from pipeline.checkpoints import CheckpointStore
from pipeline.config import Config, config_from_dict, config_to_dict
from pipeline.dataset import DetectionDataset
from pipeline.errors import DataError, MissingInput, TrainingDiverged
from pipeline.evaluate import Evaluation, evaluate_split
from pipeline.hooks import LocalSink, TrainingHooks
from pipeline.shards import ShardReader, read_manifest
from pipeline.sources import PASCAL_VOC
from pipeline.train import StepSchedule, Training, build_model, fit, resolve_device, seed_everything


@dataclass
class TrainSummary:
    model_path: Path
    steps: int
    skipped: int
    last_metrics: dict[str, float]


def train_stage(config: Config, progress: bool = True) -> TrainSummary:
    """Train in this process, resuming the run's latest checkpoint if there is one."""
    config, classes = training_data(config)
    record_training_run(config)
    seed_everything(config.train.seed)
    device = resolve_device(config.train.device)
    dataset = DetectionDataset(ShardReader(split_dir(config, config.data.train_split)), hflip=config.train.hflip,
                               seed=config.train.seed, augment=config.train.augment,
                               input_size=config.train.input_size)
    schedule = StepSchedule.of(config.train, len(dataset))
    training = Training(config, build_model(config, len(classes)).to(device), device, schedule.total_steps)
    store = CheckpointStore(config.run.directory() / "checkpoints", config.train.keep_checkpoints)
    if (latest := store.latest()) is not None:
        training.load_state_dict(checkpoints.load(latest, device))
    hooks = TrainingHooks(config, schedule, LocalSink(store), {"config": config_to_dict(config), "classes": classes},
                          progress=progress)
    try:
        fit(training, dataset, schedule, hooks)
    except TrainingDiverged as error:
        latest = store.latest()
        raise TrainingDiverged(error.step, error.term, error.value, str(latest) if latest else None) from None
    model_path = checkpoints.export_model(checkpoints.load(store.best(), device), config.run.directory() / "model.pt")
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
    """COCO evaluation of the run's model on the evaluation split of the data it was trained on
    (or data.prepared), written under the run's eval/."""
    device = resolve_device(config.train.device)
    model_path = model_path or config.run.directory() / "model.pt"
    if not model_path.exists():
        raise MissingInput(f"{model_path}: no trained model; run the train stage first")
    model, classes, trained = load_model(model_path, device)
    config = evaluation_config(config, trained)
    _check_classes(config, classes, model_path, config.run.name)
    split = split_dir(config, config.eval_split())
    # VOC runs also get the VOC07 11-point and area mAP beside the COCO metrics.
    voc = config.data.dataset in PASCAL_VOC
    return evaluate_split(model, DetectionDataset(ShardReader(split)), split / "ground_truth.json", classes,
                          config.run.directory() / "eval", config.eval.batch_size, device, config.eval.sample_images,
                          voc=voc)


def _check_classes(config: Config, classes: list[str], model_path: Path, name: str) -> None:
    """The prepared data has the split to evaluate, with the classes the model was trained on."""
    manifest = read_manifest(config.data.prepared)
    if config.eval_split() not in manifest["splits"]:
        raise DataError(f"{config.data.prepared} has no split {config.eval_split()!r} (it has "
                        f"{', '.join(manifest['splits'])}): set eval.split")
    prepared = manifest["classes"]
    if classes != prepared:
        raise DataError(f"{model_path}: run '{name}' was trained on classes {classes}, but "
                        f"{config.data.prepared} has {prepared}")


def robustness_stage(config: Config, names: list[str] | None = None, progress: bool = True) -> dict[str, tuple]:
    """AP of the models of runs `names` (default: run.name, all under run.output_dir) under
    occlusion, noise and COCO-C on the evaluation split, in one pass over the perturbed images:
    name -> (RobustnessResult, files written under that run's robustness/)."""
    from pipeline.robustness import evaluate_robustness, settings, write_result

    device = resolve_device(config.train.device)
    models, trained_with, bound = {}, {}, {}
    for name in names or [config.run.name]:
        path = config.for_run(name).run.directory() / "model.pt"
        if not path.exists():
            raise MissingInput(f"{path}: no trained model for run '{name}'; run its train stage first")
        models[name], classes, trained_config = load_model(path, device)
        trained_with[name] = config_to_dict(trained_config)
        bound[name] = evaluation_config(config, trained_config)
        _check_classes(bound[name], classes, path, name)
    first, *others = bound.values()
    for name, other in zip(list(bound)[1:], others):
        if (other.data.prepared, other.eval_split()) != (first.data.prepared, first.eval_split()):
            raise DataError(f"run '{name}' was trained on {other.data.prepared}, run '{next(iter(bound))}' on "
                            f"{first.data.prepared}: set data.prepared to evaluate all of them on the same data")
    config = first
    split = split_dir(config, config.eval_split())
    chosen, unavailable = settings(config.robustness)
    results = evaluate_robustness(models, DetectionDataset(ShardReader(split)), split / "ground_truth.json", chosen,
                                  config.eval.batch_size, device, config.robustness.seed, unavailable,
                                  config.robustness.workers, progress)
    results = {name: dataclasses.replace(result, trained_with=trained_with[name]) for name, result in results.items()}
    return {name: (result, write_result(result, config.for_run(name).run.directory() / "robustness"))
            for name, result in results.items()}
