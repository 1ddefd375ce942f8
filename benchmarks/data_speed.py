"""How fast the data path makes training batches, beside how fast the training step takes them:
how many CPU cores a training process needs for its data to keep up.

The data path alone, as training runs it (`training_batches`: Parquet shards read, JPEG decode,
`flip` or `ssd` augmentation, resize to --size x --size, batching), with 0, 1 and 2 loader
processes; then the training step of the same recipe (the defaults' RetinaNet-R18 at
train.input_size=--size) on this machine's CPU, on batches of the `ssd` path. A data path's
images/s are counted after its first batches (two per loader process, which carry the loaders'
start, paid once a run) and are the median of --repeats interleaved rounds. Prints a markdown
table and writes benchmarks/results/data_speed.json, every round included.

    APLOSS_DATA_ROOT=../shared/datasets python benchmarks/data_speed.py            # the README's numbers
    APLOSS_DATA_ROOT=../shared/datasets python benchmarks/data_speed.py --batches 6 --steps 1   # a quick look
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.data.bindings import split_dir
from pipeline.data.dataset import DetectionDataset, RunBatchSampler  # noqa: E402
from pipeline.data.prep import prepare  # noqa: E402
from pipeline.data.shards import ShardReader  # noqa: E402
from pipeline.io import write_json_atomic  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.training.loop import Training, seed_everything, training_batches  # noqa: E402
from pipeline.training.preparation import training_data  # noqa: E402

AUGMENTATIONS = ("flip", "ssd")
WARM_BATCHES = 2  # per loader process, its first: they carry its start


def data_path(config: Config, augment: str, loaders: int, start: int, stop: int):
    """The training batches of steps `start` to `stop` through the data path with `augment`."""
    train = config.train
    dataset = DetectionDataset(ShardReader(split_dir(config, config.data.train_split)), hflip=train.hflip,
                               seed=train.seed, augment=augment, input_size=train.input_size)
    sampler = RunBatchSampler(dataset.reader.row_groups(), train.batch_size, train.seed, start, stop)
    return training_batches(dataset, sampler, loaders, pin_memory=False)


def data_speed(config: Config, augment: str, loaders: int, count: int) -> dict:
    """Seconds of the first batches, and images/s of `count` batches after them."""
    warm = WARM_BATCHES * max(loaders, 1)
    started = time.perf_counter()
    made = iter(data_path(config, augment, loaders, 0, warm + count))
    for _ in range(warm):
        next(made)
    warmed = time.perf_counter()
    for _ in made:
        pass
    return {"first_batches_s": warmed - started,
            "images_per_s": count * config.train.batch_size / (time.perf_counter() - warmed)}


def step_images_per_s(config: Config, classes: list[str], steps: int) -> float:
    """Images/s of the training step (the median of `steps` after one to warm up) on `ssd` batches."""
    seed_everything(config.train.seed)
    training = Training(config, build_model(config, len(classes)), torch.device("cpu"), steps=steps + 1)
    seconds = []
    for images, targets, _ in data_path(config, "ssd", 0, 0, steps + 1):
        started = time.perf_counter()
        training.train_step(images, targets)
        seconds.append(time.perf_counter() - started)
    return config.train.batch_size / statistics.median(seconds[1:])


def table(results: dict) -> str:
    step = results["train_step_images_per_s"]
    lines = ["| path | loader processes | images/s | rounds' range | × the training step's |",
             "|---|---:|---:|---:|---:|"]
    for row in results["data_path"]:
        rounds = [r["images_per_s"] for r in row["rounds"]]
        lines.append(f"| {row['augment']}: read, decode, augment to {results['size']} px | {row['loaders']} | "
                     f"{row['images_per_s']:.1f} | {min(rounds):.1f}–{max(rounds):.1f} | "
                     f"{row['images_per_s'] / step:.0f}x |")
    lines.append(f"| training step: {results['arch']} at {results['size']} px, batch {results['batch']}, CPU, "
                 f"{results['torch_threads']} threads | – | {step:.2f} | – | 1x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="base YAML config (default: the built-in defaults)")
    parser.add_argument("--size", type=int, default=512, help="train.input_size: the square training input")
    parser.add_argument("--batches", type=int, default=24, help="timed batches of each data path (BCCD train: 25)")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the data paths")
    parser.add_argument("--loaders", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default="runs", help="run.output_dir, where the prepared data goes")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, key=value")
    args = parser.parse_args()
    config = load_config(args.config, [f"train.input_size={args.size}", f"run.output_dir={args.output}",
                                       *args.overrides])
    prepare(config, progress=False)
    config, classes = training_data(config)
    results: dict = {"size": args.size, "batch": config.train.batch_size, "arch": config.model.arch,
                     "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads()}
    paths = [(augment, loaders) for augment in AUGMENTATIONS for loaders in args.loaders]
    rounds = [[data_speed(config, *path, args.batches) for path in paths] for _ in range(args.repeats)]
    results["data_path"] = [{"augment": augment, "loaders": loaders,
                             "images_per_s": statistics.median(r[i]["images_per_s"] for r in rounds),
                             "rounds": [r[i] for r in rounds]} for i, (augment, loaders) in enumerate(paths)]
    results["train_step_images_per_s"] = step_images_per_s(config, classes, args.steps)
    print(table(results))
    print(f"\n{results['cores']} CPU cores; torch {torch.__version__}")
    write_json_atomic(results, Path(__file__).parent / "results" / "data_speed.json")


if __name__ == "__main__":
    main()
