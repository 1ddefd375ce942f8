"""The evaluate and robustness stages: a run's model on the data it was trained on (or
data.prepared), written under the run directory (eval/, robustness/).

With eval.workers = N the detection runs in N Ray tasks, each loading the models once and
detecting its slice of the split's batches (`detection_slices`); this process puts the slices'
detections back in order, which makes them one process's, and evaluates them as one process does."""
import dataclasses
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from aploss.detector import OneStageDetector
from pipeline.config import Config, config_record
from pipeline.data.bindings import check_split, evaluation_config, split_dir
from pipeline.data.dataset import DetectionDataset
from pipeline.data.shards import ShardReader
from pipeline.data.sources import PASCAL_VOC
from pipeline.errors import DataError, MissingInput
from pipeline.evaluation.coco_metrics import category_ids
from pipeline.evaluation.evaluate import Evaluation, evaluate_split
from pipeline.images import ImageLimits
from pipeline.inference.detection import (
    detect_batches,
    detection_slices,
    pack_detections,
    unpack_detections,
    with_postprocessing,
)
from pipeline.model import load_model, resolve_device
from pipeline.storage import Location, Where


def _worker_models(weights: dict, use_gpu: bool, threads: int, postprocessing: Sequence[str] = ()
                   ) -> tuple[dict[str, OneStageDetector], torch.device]:
    """A Ray worker's models, from the weights in Ray's object store, with `postprocessing`
    overrides (`with_postprocessing`)."""
    import ray

    # As many threads as the worker has CPUs, whatever torch read at import; CPU results differ
    # in the last bits between thread counts.
    torch.set_num_threads(threads)
    device = torch.device("cuda" if use_gpu else "cpu")
    models = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, weights_ref in weights.items():
            path = Path(scratch) / f"{len(models)}.pt"
            path.write_bytes(ray.get(weights_ref))
            model, _, trained, _ = load_model(path, device)
            models[name] = with_postprocessing(model, trained, postprocessing)
    return models, device


def _detect_slice(weights: dict, split: Location, batches: list[list[int]], use_gpu: bool, threads: int,
                  limits: ImageLimits, postprocessing: Sequence[str]) -> dict[str, np.ndarray]:
    """A Ray task: each model's detections of the slice `batches` of `split`, packed."""
    models, device = _worker_models(weights, use_gpu, threads, postprocessing)
    dataset, categories = DetectionDataset(ShardReader(split), limits=limits), category_ids(split / "ground_truth.json")
    return {name: pack_detections(detect_batches(model, dataset, batches, device, categories))
            for name, model in models.items()}


def _perturb_slice(weights: dict, split: Location, batches: list[list[int]], use_gpu: bool, threads: int,
                   limits: ImageLimits, chosen: list, seed: int, workers: int) -> Iterator[dict[str, np.ndarray]]:
    """A Ray task: for each setting of `chosen` in turn, each model's detections of the slice
    under it, packed."""
    from pipeline.evaluation.robustness import perturbed_detections

    models, device = _worker_models(weights, use_gpu, threads)
    dataset, categories = DetectionDataset(ShardReader(split), limits=limits), category_ids(split / "ground_truth.json")
    for setting in chosen:
        found = perturbed_detections(models, dataset, setting, batches, device, categories, seed, workers)
        yield {name: pack_detections(detections) for name, detections in found.items()}


def _on_ray(config: Config, task: Callable, model_paths: dict[str, Where], split: Location, *args,
            **options) -> list:
    """`task` on every non-empty slice of the split for eval.workers (`detection_slices`), one
    Ray task each, with every model: their results in slice order. Ray must be initialised
    (`pipeline.orchestration.run.start_ray`)."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError(f"eval.workers={config.eval.workers} detects on Ray, which is not initialised: "
                           "call pipeline.orchestration.run.start_ray first")
    # The weights travel through Ray's object store, once: a path here means nothing on another node.
    weights = {name: ray.put(Location(path).read_bytes()) for name, path in model_paths.items()}
    slices = detection_slices(len(ShardReader(split)), config.eval.batch_size, config.eval.workers)
    remote = ray.remote(task).options(num_cpus=config.ray.cpus_per_worker, num_gpus=1 if config.ray.use_gpu else 0,
                                      **options)
    threads = max(1, int(config.ray.cpus_per_worker))
    limits = ImageLimits.of(config.data)
    return [remote.remote(weights, split, batches, config.ray.use_gpu, threads, limits, *args)
            for batches in slices if batches]


def _in_order(parts: list[dict[str, np.ndarray]], names: list[str]) -> dict[str, list[dict]]:
    """Each model's detections of the whole split from the slices' packed ones, in slice order:
    one process's detections."""
    return {name: [found for part in parts for found in unpack_detections(part[name])] for name in names}


def _detect_on_ray(config: Config, model_path: Where, split: Location, postprocessing: Sequence[str]) -> list[dict]:
    import ray

    parts = ray.get(_on_ray(config, _detect_slice, {"model": model_path}, split, list(postprocessing)))
    return _in_order(parts, ["model"])["model"]


def _perturbed_on_ray(config: Config, model_paths: dict[str, Where], split: Location, chosen: list
                      ) -> Iterator[tuple]:
    """(setting, each model's detections of the split under it) for each setting of `chosen`."""
    import ray

    # Tasks rather than actors, which would hold their CPUs or GPU to the end: with fewer free than
    # eval.workers, the slices queue instead of waiting for each other. The tasks stream a
    # setting's detections as they make them, and run ahead while this process evaluates.
    streams = _on_ray(config, _perturb_slice, model_paths, split, chosen, config.robustness.seed,
                      config.robustness.workers, num_returns="streaming")
    for setting in chosen:
        yield setting, _in_order(ray.get([next(stream) for stream in streams]), list(model_paths))


def evaluate_stage(config: Config, model_path: Location | None = None, postprocessing: Sequence[str] = ()
                   ) -> Evaluation:
    """COCO evaluation of the run's model on the evaluation split of the data it was trained on
    (or data.prepared), written under the run's eval/; detected in this process, or in
    eval.workers Ray tasks. The model keeps the score threshold, NMS IoU and detections per image
    it was trained with unless the `postprocessing` overrides (`model.nms_thresh=0.6`) say others."""
    device = resolve_device(config.train.device)
    model_path = model_path or config.run.folder().model
    if not model_path.exists():
        raise MissingInput(f"{model_path}: no trained model; run the train stage first")
    model, classes, trained, _ = load_model(model_path, device)
    model = with_postprocessing(model, trained, postprocessing)
    config = evaluation_config(config, trained)
    check_split(config, config.eval_split(), "eval.split", classes, f"{model_path}: run '{config.run.name}'")
    split = split_dir(config, config.eval_split())
    # Ray workers start in directories of their own.
    detections = (_detect_on_ray(config, model_path, split_dir(config.with_absolute_paths(), config.eval_split()),
                                 postprocessing) if config.eval.workers else None)
    # VOC runs also get the VOC07 11-point and area mAP beside the COCO metrics.
    voc = config.data.dataset in PASCAL_VOC
    dataset = DetectionDataset(ShardReader(split), limits=ImageLimits.of(config.data))
    return evaluate_split(model, dataset, split / "ground_truth.json", classes,
                          config.run.folder().evaluation, config.eval.batch_size, device, config.eval.sample_images,
                          voc=voc, detections=detections)


def robustness_stage(config: Config, names: list[str] | None = None, progress: bool = True) -> dict[str, tuple]:
    """AP of the models of runs `names` (default: run.name, all under run.output_dir) under
    occlusion, noise and COCO-C on the evaluation split, in one pass over the perturbed images
    (in this process, or in eval.workers Ray tasks, each perturbing its slice):
    name -> (RobustnessResult, files written under that run's robustness/)."""
    from pipeline.evaluation.robustness import evaluate_robustness, robustness_results, settings, write_result

    device = resolve_device(config.train.device)
    models, paths, trained_with, bound = {}, {}, {}, {}
    for name in names or [config.run.name]:
        path = paths[name] = config.run.outputs().run(name).model
        if not path.exists():
            raise MissingInput(f"{path}: no trained model for run '{name}'; run its train stage first")
        models[name], classes, trained_config, _ = load_model(path, device)
        trained_with[name] = config_record(trained_config)
        bound[name] = evaluation_config(config, trained_config)
        check_split(bound[name], bound[name].eval_split(), "eval.split", classes, f"{path}: run '{name}'")
    first, *others = bound.values()
    for name, other in zip(list(bound)[1:], others):
        if (other.data.prepared, other.eval_split()) != (first.data.prepared, first.eval_split()):
            raise DataError(f"run '{name}' was trained on {other.data.prepared}, run '{next(iter(bound))}' on "
                            f"{first.data.prepared}: set data.prepared to evaluate all of them on the same data")
    config = first
    split = split_dir(config, config.eval_split())
    ground_truth = split / "ground_truth.json"
    chosen, unavailable = settings(config.robustness)
    if config.eval.workers:
        detections = _perturbed_on_ray(config, paths, split_dir(config.with_absolute_paths(), config.eval_split()),
                                       chosen)
        results = robustness_results(list(models), detections, ground_truth, chosen, unavailable, progress)
    else:
        dataset = DetectionDataset(ShardReader(split), limits=ImageLimits.of(config.data))
        results = evaluate_robustness(models, dataset, ground_truth, chosen,
                                      config.eval.batch_size, device, config.robustness.seed, unavailable,
                                      config.robustness.workers, progress)
    results = {name: dataclasses.replace(result, trained_with=trained_with[name]) for name, result in results.items()}
    return {name: (result, write_result(result, config.run.outputs().run(name).robustness))
            for name, result in results.items()}
