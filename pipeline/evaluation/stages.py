"""The evaluate and robustness stages: a run's model on the data it was trained on (or
data.prepared), written under the run directory (eval/, robustness/)."""
import dataclasses
from pathlib import Path

from pipeline.config import Config, config_record
from pipeline.data.bindings import evaluation_config, split_dir
from pipeline.data.dataset import DetectionDataset
from pipeline.data.shards import ShardReader, read_manifest
from pipeline.data.sources import PASCAL_VOC
from pipeline.errors import DataError, MissingInput
from pipeline.evaluation.evaluate import Evaluation, evaluate_split
from pipeline.model import load_model, resolve_device


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
    from pipeline.evaluation.robustness import evaluate_robustness, settings, write_result

    device = resolve_device(config.train.device)
    models, trained_with, bound = {}, {}, {}
    for name in names or [config.run.name]:
        path = config.for_run(name).run.directory() / "model.pt"
        if not path.exists():
            raise MissingInput(f"{path}: no trained model for run '{name}'; run its train stage first")
        models[name], classes, trained_config = load_model(path, device)
        trained_with[name] = config_record(trained_config)
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
