"""Data-prep on Ray Data: images/s with 1 and 2 Ray Data workers beside one process, and peak
memory as the dataset grows, on the synthetic COCO-scale set (`synthetic_coco.py`).

The images are COCO's typical 640 x 480 (--size), so that decoding costs what it costs on COCO.
Speed: each mode prepares the --images set (train, plus a val split a tenth of it) into a fresh
output directory, --repeats rounds interleaved, median taken; a Ray instance of as many logical
CPUs as `aploss prep data.prep_workers=2` starts (4 logical CPUs on the 2 cores) is
started once, before any timing. Where the time goes: data-prep's process waiting
on each Ray pass (checking the images, then writing the shards), and its own work (listing,
hashing and parsing the annotations, handing out the images and taking in their records, the
ground truth and manifest); and the check pass alone, on Ray Data and as plain Ray tasks over
the same batches, 1 and 2 at a time, which tells Ray Data's own cost from the machine's.
Memory: the peak PSS of one process's prep, and with 2 workers of data-prep's process and of the
Ray workers summed (sampled every 50 ms; PSS counts the pages they share once), at each of
--sizes. Prints markdown tables and writes benchmarks/results/prep_scaling.json.

    .venv/bin/python benchmarks/prep_scaling.py                                  # benchmarks/README.md
    .venv/bin/python benchmarks/prep_scaling.py --images 500 --sizes 500 1000 --repeats 1   # a quick look
"""
import argparse
import collections
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.data import prep_on_ray  # noqa: E402
from pipeline.data.prep import prepare  # noqa: E402
from pipeline.data.sources import open_source  # noqa: E402
from pipeline.images import ImageLimits  # noqa: E402
from pipeline.io import write_json_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
_spec = importlib.util.spec_from_file_location("synthetic_coco", Path(__file__).with_name("synthetic_coco.py"))
synthetic_coco = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synthetic_coco)


def dataset(images: int, size: tuple[int, int]) -> Path:
    """The synthetic set of `images` training images (and a tenth as many for val), made once."""
    root = RESULTS / "synthetic_coco" / f"{images}-{size[0]}x{size[1]}"
    if not (root / "annotations" / "instances_val.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        synthetic_coco.write_synthetic_coco_scale(root, {"train": images, "val": max(images // 10, 1)}, size=size)
    return root


def config(root: Path, output: Path, workers: int) -> Config:
    return load_config(None, [
        "data.dataset=coco", f"data.root={root}", "data.download=false", "data.test_split=val",
        "data.annotations={train: annotations/instances_train.json, val: annotations/instances_val.json}",
        "data.images={train: train, val: val}", f"data.prep_workers={workers}", f"run.output_dir={output}"])


class PassTimer:
    """Seconds data-prep's process waits on each Ray pass for its items, summed over calls."""

    def __init__(self) -> None:
        self.seconds = {"check": 0.0, "write": 0.0}
        self._real = {"check": prep_on_ray.check_images, "write": prep_on_ray.write_shards}
        prep_on_ray.check_images = self._timed("check")
        prep_on_ray.write_shards = self._timed("write")

    def _timed(self, name: str):
        def timed(*args, **kwargs):
            items = self._real[name](*args, **kwargs)
            while True:
                started = time.perf_counter()
                try:
                    item = next(items)
                except StopIteration:
                    return
                self.seconds[name] += time.perf_counter() - started
                yield item
        return timed

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)


def pss(pid: int | str) -> int:
    """A process's proportional share of resident memory in bytes (0 once it is gone): pages it
    shares (torch's libraries in every Ray worker, the object store) count once over all."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def ray_workers() -> list[str]:
    """The pids of Ray's worker processes (their command line reads ray::...)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::"):
                pids.append(entry.name)
        except OSError:
            continue
    return pids


class MemorySampler:
    """Peak PSS of this process, and peak of the Ray workers' PSS summed, while it runs."""

    def __init__(self) -> None:
        self.driver = self.workers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.driver = max(self.driver, pss(os.getpid()))
            self.workers = max(self.workers, sum(pss(pid) for pid in ray_workers()))
            time.sleep(0.05)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


def timed_prep(root: Path, workers: int, timer: PassTimer) -> dict:
    with tempfile.TemporaryDirectory(prefix="prep-scaling-") as output:
        timer.reset()
        started = time.perf_counter()
        result = prepare(config(root, Path(output), workers), progress=False)
        seconds = time.perf_counter() - started
    images = sum(split["images"] for split in result.manifest["splits"].values())
    return {"images": images, "seconds": seconds, **{f"{name}_s": s for name, s in timer.seconds.items()}}


def check_pass_seconds(root: Path, workers: int, plain: bool) -> float:
    """The check pass over the training split's images alone: as data-prep runs it on Ray Data,
    or the same batches as plain Ray tasks, `workers` in flight at a time."""
    data = config(root, Path(tempfile.gettempdir()), workers).data
    source = open_source(data)
    jobs = [(source.load("train", entry), str(entry.image_path)) for entry in source.entries("train")]
    started = time.perf_counter()
    if not plain:
        for _ in prep_on_ray.check_images(jobs, data.min_box_size, ImageLimits.of(data), workers):
            pass
        return time.perf_counter() - started
    check = ray.remote(num_cpus=1)(prep_on_ray._check_batch)
    rows = [json.dumps(prep_on_ray._image_job(image, where)) for image, where in jobs]
    in_flight = collections.deque()
    for start in range(0, len(rows), 128):  # data-prep's block of images
        in_flight.append(check.remote({"job": rows[start:start + 128]}, data.min_box_size, ImageLimits.of(data)))
        if len(in_flight) == workers:
            ray.get(in_flight.popleft())
    ray.get(list(in_flight))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="training images of the speed runs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 20000], help="of the memory runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("WIDTH", "HEIGHT"))
    args = parser.parse_args()
    # As `aploss prep data.prep_workers=2` starts it: a CPU for each task and 2 beside them.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    timer = PassTimer()
    root = dataset(args.images, tuple(args.size))
    modes = {"one process": 0, "Ray Data, 1 worker": 1, "Ray Data, 2 workers": 2}
    timed_prep(root, 2, timer)  # Ray's worker processes started, its first dataset planned
    rounds = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode, workers in modes.items():
            rounds[mode].append(timed_prep(root, workers, timer))
    speed = []
    for mode, runs in rounds.items():
        median = sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2]
        speed.append({"mode": mode, **median, "images_per_s": median["images"] / median["seconds"],
                      "all_seconds": [run["seconds"] for run in runs]})
    one_worker = speed[1]["images_per_s"]
    print(f"\nprep speed, {speed[0]['images']} images (median of {args.repeats})\n")
    print("| mode | seconds | images/s | vs 1 worker | waiting on checks s | waiting on shards s | data-prep's own s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in speed:
        rest = row["seconds"] - row["check_s"] - row["write_s"]
        print(f"| {row['mode']} | {row['seconds']:.1f} | {row['images_per_s']:.0f} | "
              f"{row['images_per_s'] / one_worker:.2f}x | {row['check_s']:.1f} | {row['write_s']:.1f} | {rest:.1f} |")

    passes = []
    for label, plain in (("Ray Data, as data-prep runs it", False), ("plain Ray tasks, same batches", True)):
        seconds = {workers: statistics.median(check_pass_seconds(root, workers, plain) for _ in range(args.repeats))
                   for workers in (1, 2)}
        passes.append({"how": label, **{f"{workers}_worker_s": s for workers, s in seconds.items()}})
    print(f"\nthe check pass alone, {args.images} training images (median of {args.repeats})\n")
    print("| how | 1 at a time s | 2 at a time s | speed-up |")
    print("|---|---:|---:|---:|")
    for row in passes:
        print(f"| {row['how']} | {row['1_worker_s']:.1f} | {row['2_worker_s']:.1f} | "
              f"{row['1_worker_s'] / row['2_worker_s']:.2f}x |")

    memory = []
    for size in args.sizes:
        data = dataset(size, tuple(args.size))
        row = {"train_images": size}
        for workers, key in ((0, "one_process"), (2, "ray")):
            with MemorySampler() as sampler:
                run = timed_prep(data, workers, timer)
            row[key] = {**run, "driver_peak_mb": sampler.driver / 2**20, "workers_peak_mb": sampler.workers / 2**20}
        memory.append(row)
    print("\nprep peak memory (PSS MB): one process, and Ray Data with 2 workers\n")
    print("| train images | one process | Ray: data-prep's process | Ray: its workers, summed | Ray images/s |")
    print("|---:|---:|---:|---:|---:|")
    for row in memory:
        ray_run = row["ray"]
        print(f"| {row['train_images']:,} | {row['one_process']['driver_peak_mb']:.0f} | "
              f"{ray_run['driver_peak_mb']:.0f} | {ray_run['workers_peak_mb']:.0f} | "
              f"{ray_run['images'] / ray_run['seconds']:.0f} |")
    write_json_atomic({"speed": speed, "check_pass": passes, "memory": memory}, RESULTS / "prep_scaling.json")
    ray.shutdown()


if __name__ == "__main__":
    main()
