"""Evaluation and validation on 1 and 2 workers, on the synthetic COCO-scale validation split
(`synthetic_coco.py`, COCO's 80 classes, 640 x 480 images).

The model is the default recipe's detector (RetinaNet-R18) for 80 classes, untrained, keeping
COCO's standard 100 detections per image (model.score_thresh=0), so that the COCO metric, which
one process computes whatever the workers, weighs what it weighs on COCO. Evaluation: the
evaluate stage's detection in this process (eval.workers=0) and in 1 and 2 Ray tasks, then the
COCO metric of the detections; validation: `validation_ap` as the training hooks call it, in
process groups of 1 and 2 (gloo). Every process has one thread; Ray is started with this
machine's 2 cores. Median of --repeats; prints a markdown table and writes
benchmarks/results/eval_scaling.json.

    .venv/bin/python benchmarks/eval_scaling.py                     # benchmarks/README.md
    .venv/bin/python benchmarks/eval_scaling.py --images 100 --repeats 1   # a quick look
"""
import argparse
import dataclasses
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import ray
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import checkpoints  # noqa: E402
from pipeline.config import Config, config_record, load_config  # noqa: E402
from pipeline.data.bindings import split_dir
from pipeline.data.dataset import DetectionDataset  # noqa: E402
from pipeline.data.prep import prepare  # noqa: E402
from pipeline.data.shards import ShardReader  # noqa: E402
from pipeline.evaluation import stages  # noqa: E402
from pipeline.evaluation.coco_metrics import category_ids, evaluate_detections  # noqa: E402
from pipeline.evaluation.evaluate import validation_ap  # noqa: E402
from pipeline.inference.detection import detect_split  # noqa: E402
from pipeline.io import write_json_atomic  # noqa: E402
from pipeline.model import build_model, load_model  # noqa: E402
from pipeline.training.preparation import training_data  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
_spec = importlib.util.spec_from_file_location("synthetic_coco", Path(__file__).with_name("synthetic_coco.py"))
synthetic_coco = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synthetic_coco)
CPU = torch.device("cpu")


def bound_config(images: int, output: Path, workers: int = 0) -> Config:
    root = RESULTS / "synthetic_coco" / f"val-{images}"
    if not (root / "annotations" / "instances_val.json").is_file():
        synthetic_coco.write_synthetic_coco_scale(root, {"train": 16, "val": images}, size=(640, 480))
    config = load_config(None, [
        "data.dataset=coco", f"data.root={root}", "data.download=false", "data.test_split=val",
        "data.annotations={train: annotations/instances_train.json, val: annotations/instances_val.json}",
        "data.images={train: train, val: val}", "model.score_thresh=0.0", "model.detections_per_image=100",
        "eval.batch_size=8", f"eval.workers={workers}", "ray.cpus_per_worker=1", f"run.output_dir={output}"])
    prepare(config, progress=False)
    return training_data(config)[0]


def model_file(config: Config, classes: int, path: Path) -> Path:
    torch.manual_seed(0)
    state = {"model": build_model(config, classes).state_dict(), "config": config_record(config),
             "classes": [str(i) for i in range(classes)]}
    return checkpoints.export_model(state, list(range(1, classes + 1)), path)


def evaluation_times(config: Config, model_path: Path, workers: int) -> dict:
    split = split_dir(config, config.data.val_split)
    ground_truth = split / "ground_truth.json"
    started = time.perf_counter()
    if workers:
        config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, workers=workers))
        detections = stages._detect_on_ray(config, model_path, split)
    else:
        model = load_model(model_path, CPU)[0]
        detections = detect_split(model, DetectionDataset(ShardReader(split)), config.eval.batch_size, CPU,
                             category_ids(ground_truth))
    detected = time.perf_counter()
    evaluate_detections(ground_truth, detections)
    return {"detect_s": detected - started, "metric_s": time.perf_counter() - detected,
            "detections": len(detections)}


def _validate(rank: int, world_size: int, store: str, config: Config, model_path: Path, seconds) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=600))
    model = load_model(model_path, CPU)[0]
    dist.barrier()
    started = time.perf_counter()
    validation_ap(model, config, CPU)
    dist.barrier()  # rank 0 scores: the others wait for it, as at a checkpoint
    if rank == 0:
        seconds.put(time.perf_counter() - started)
    dist.destroy_process_group()


def validation_seconds(config: Config, model_path: Path, world_size: int) -> float:
    context = mp.get_context("spawn")
    seconds = context.Queue()
    with tempfile.TemporaryDirectory() as scratch:
        processes = [context.Process(target=_validate, args=(rank, world_size, f"{scratch}/store", config,
                                                             model_path, seconds)) for rank in range(world_size)]
        for process in processes:
            process.start()
        result = seconds.get(timeout=1800)
        for process in processes:
            process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="validation images")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    output = RESULTS / "eval_scaling"
    config = bound_config(args.images, output)
    model_path = model_file(config, 80, output / "model.pt")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    for label, workers in (("evaluate, this process", 0), ("evaluate, 1 Ray worker", 1),
                           ("evaluate, 2 Ray workers", 2)):
        runs = [evaluation_times(config, model_path, workers) for _ in range(args.repeats)]
        rows.append({"what": label, "detect_s": statistics.median(r["detect_s"] for r in runs),
                     "metric_s": statistics.median(r["metric_s"] for r in runs), "detections": runs[0]["detections"]})
    ray.shutdown()
    for world_size in (1, 2):
        times = [validation_seconds(config, model_path, world_size) for _ in range(args.repeats)]
        rows.append({"what": f"validation, {world_size} training worker{'s' * (world_size > 1)}",
                     "total_s": statistics.median(times)})
    for row in rows:
        row.setdefault("total_s", row.get("detect_s", 0) + row.get("metric_s", 0))
    images = len(ShardReader(split_dir(config, config.data.val_split)))
    print(f"\n{images} validation images, {rows[0]['detections']:,} detections, median of {args.repeats}\n")
    print("| what | detection s | COCO metric s | total s | images/s | speed-up over 1 worker |")
    print("|---|---:|---:|---:|---:|---:|")
    baselines = {"evaluate": rows[1]["total_s"], "validation": rows[3]["total_s"]}
    for row in rows:
        kind = row["what"].split(",")[0]
        detect = f"{row['detect_s']:.1f}" if "detect_s" in row else "–"
        metric = f"{row['metric_s']:.1f}" if "metric_s" in row else "–"
        print(f"| {row['what']} | {detect} | {metric} | {row['total_s']:.1f} | {images / row['total_s']:.1f} | "
              f"{baselines[kind] / row['total_s']:.2f}x |")
    write_json_atomic({"images": images, "rows": rows}, RESULTS / "eval_scaling.json")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
