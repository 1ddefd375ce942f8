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
from pipeline.coco_metrics import category_ids, evaluate_detections
from pipeline.errors import ConfigError, DataError, MissingInput, TrainingDiverged
from pipeline.io import write_json_atomic
from pipeline.journal import METRICS_FILE, MetricsJournal
from pipeline.prep import locate_prepared
from pipeline.shards import ShardReader, read_manifest
from pipeline.sources import PASCAL_VOC
from pipeline.train import Training, build_model, fit, resolve_device, seed_everything, total_steps


def _split_dir(config: Config, split: str) -> Path:
    """A split of the prepared data `config` is bound to (`data.prepared`)."""
    return Path(config.data.prepared) / split


def training_data(config: Config) -> tuple[Config, list[str]]:
    """`config` bound to the prepared data it trains on, and the class names; refuses splits
    that leave nothing to learn from or to validate against."""
    config = config.with_prepared(locate_prepared(config))
    manifest = read_manifest(config.data.prepared)
    for split, use in ((config.data.train_split, "train on"), (config.data.val_split, "validate against")):
        summary = manifest["splits"][split]
        if summary["boxes"] == summary["crowd_boxes"]:
            raise DataError(f"{_split_dir(config, split)}: split {split!r} has no ground-truth boxes to {use}")
    return config, manifest["classes"]


RUN_RECORD = "run.json"


def record_training_run(config: Config) -> None:
    """Remember, in the run directory, the model and the prepared data the run trains; a later
    start of the same run (a resume) with another model or other data is refused, since it would
    mix two trainings in one set of weights."""
    path = config.run.directory() / "train" / RUN_RECORD
    record = {"model": dataclasses.asdict(config.model), "prepared": config.data.prepared}
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["model"] != record["model"]:
            raise ConfigError(f"{path}: run '{config.run.name}' was trained with a different model config "
                              f"({saved['model']}); choose another run.name to start afresh")
        if saved["prepared"] != record["prepared"]:
            raise DataError(f"{path}: run '{config.run.name}' was trained on the prepared data {saved['prepared']}, "
                            f"but these data.* settings give {record['prepared']}; choose another run.name, "
                            f"or set data.prepared={saved['prepared']} to go on with its data")
        return
    write_json_atomic(record, path)


def evaluation_config(config: Config, trained: Config) -> Config:
    """`config` bound to the data a model was trained on (its data.* settings and prepared data),
    unless data.prepared names other prepared data."""
    if not config.data.prepared and trained.data.prepared:
        config = dataclasses.replace(config, data=trained.data)
    return config.with_prepared(locate_prepared(config))


def validation_ap(model, config: Config, device: torch.device) -> float:
    """COCO AP of `model` on the validation split."""
    split = _split_dir(config, config.data.val_split)
    ground_truth = split / "ground_truth.json"
    detections = predict(model, DetectionDataset(ShardReader(split)), config.eval.batch_size, device,
                         category_ids(ground_truth))
    return evaluate_detections(ground_truth, detections).metrics["AP"]


def due(step: int, every: int, steps_per_epoch: int, last: int) -> bool:
    return step == last or step % (every or steps_per_epoch) == 0


class LocalHooks:
    """Progress bar, a metrics journal record every `log_every` steps, validation and checkpoints."""

    def __init__(self, config: Config, store: CheckpointStore, extra_state: dict, steps_per_epoch: int,
                 progress: bool) -> None:
        self.config, self.store, self.extra_state = config, store, extra_state
        self.steps_per_epoch = steps_per_epoch
        self.journal = MetricsJournal(config.run.directory() / "train" / METRICS_FILE)
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
            self.journal.write(step, metrics)
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", cls=f"{metrics['cls_loss']:.3f}",
                                 box=f"{metrics['box_loss']:.3f}", lr=f"{metrics['lr']:.2g}",
                                 img_s=f"{metrics['images_per_s']:.1f}")
        self.last_metrics = metrics
        evaluate = due(step, train.eval_every, self.steps_per_epoch, last)
        if evaluate or due(step, train.checkpoint_every, self.steps_per_epoch, last):
            training.check_weights()
            score = None
            if evaluate:
                score = validation_ap(training.detector, self.config, training.device)
                self.journal.write(step, {"val_ap": score})
            self.store.save(step, {**training.state_dict(), **self.extra_state}, score)
        if step == last:
            self.bar.close()


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
    dataset = DetectionDataset(ShardReader(_split_dir(config, config.data.train_split)), hflip=config.train.hflip,
                               seed=config.train.seed, augment=config.train.augment,
                               input_size=config.train.input_size)
    model = build_model(config, len(classes)).to(device)
    training = Training(config, model, device, total_steps(config, len(dataset)))
    run_dir = config.run.directory()
    store = CheckpointStore(run_dir / "checkpoints", config.train.keep_checkpoints)
    extra_state = {"config": config_to_dict(config), "classes": classes}
    if (latest := store.latest()) is not None:
        training.load_state_dict(checkpoints.load(latest, device))
    hooks = LocalHooks(config, store, extra_state, len(dataset) // config.train.batch_size, progress)
    try:
        fit(training, dataset, hooks)
    except TrainingDiverged as error:
        latest = store.latest()
        raise TrainingDiverged(error.step, error.term, error.value, str(latest) if latest else None) from None
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
    """COCO evaluation of the run's model on the evaluation split of the data it was trained on
    (or data.prepared), written under the run's eval/."""
    device = resolve_device(config.train.device)
    model_path = model_path or config.run.directory() / "model.pt"
    if not model_path.exists():
        raise MissingInput(f"{model_path}: no trained model; run the train stage first")
    model, classes, trained = load_model(model_path, device)
    config = evaluation_config(config, trained)
    _check_classes(config, classes, model_path, config.run.name)
    split = _split_dir(config, config.eval_split())
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
    split = _split_dir(config, config.eval_split())
    chosen, unavailable = settings(config.robustness)
    results = evaluate_robustness(models, DetectionDataset(ShardReader(split)), split / "ground_truth.json", chosen,
                                  config.eval.batch_size, device, config.robustness.seed, unavailable,
                                  config.robustness.workers, progress)
    results = {name: dataclasses.replace(result, trained_with=trained_with[name]) for name, result in results.items()}
    return {name: (result, write_result(result, config.for_run(name).run.directory() / "robustness"))
            for name, result in results.items()}
