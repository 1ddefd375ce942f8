"""Ray Train scaling on this machine: 1 vs 2 CPU workers at a fixed per-worker batch.

Prints a markdown table of samples/s (median step of the global batch, after warm-up), the
speed-up over one worker, and the AP-loss's communication per step against the 64 bytes x
global positives budget; writes benchmarks/results/scaling.json. Runs on the default recipe's
data (BCCD) unless a config says otherwise.

    APLOSS_DATA_ROOT=../shared/datasets python benchmarks/scaling.py --steps 12
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import Config, config_from_dict, config_to_dict, load_config  # noqa: E402
from pipeline.data.prep import prepare  # noqa: E402
from pipeline.io import write_json_atomic  # noqa: E402
from pipeline.training.loop import HookBase  # noqa: E402
from pipeline.training.ray_train import build_trainer  # noqa: E402


class TimingHooks(HookBase):
    """Per step: seconds (of the step itself: validation and checkpoints are not in them), global
    positives, bytes this process sent for the AP-loss."""

    def __init__(self, config: Config, rank: int) -> None:
        self.config, self.rank = config, rank

    def after_step(self, training, metrics) -> None:
        exchange = training.detector.criterion.batch
        sent = getattr(exchange, "bytes_sent", 0)
        record = {"step": training.step, "seconds": metrics["step_seconds"], "positives": metrics["positives"],
                  "bytes": sent - getattr(self, "_previous_bytes", 0)}
        self._previous_bytes = sent
        path = Path(self.config.run.output_dir) / f"{self.config.run.name}-rank{self.rank}.jsonl"
        with path.open("a") as log:
            log.write(json.dumps(record) + "\n")


def measure(base: Config, workers: int, per_worker: int, steps: int, output: Path) -> dict:
    name = f"scaling-{workers}w-{int(time.time())}"
    data = config_to_dict(base)
    data["ray"]["workers"], data["train"]["batch_size"] = workers, per_worker * workers
    data["train"]["max_steps"], data["run"]["name"], data["run"]["output_dir"] = steps, name, str(output)
    config = config_from_dict(data)
    prepared = prepare(config, progress=False)
    config = config.with_prepared(prepared.directory)
    build_trainer(config, prepared.manifest["classes"], extra_hooks=[TimingHooks]).fit()
    ranks = [[json.loads(line) for line in (output / f"{name}-rank{r}.jsonl").read_text().splitlines()]
             for r in range(workers)]
    warm = [r for r in ranks[0] if r["step"] > 2]
    median_seconds = statistics.median(r["seconds"] for r in warm)
    bytes_per_step = [sum(rank[i]["bytes"] for rank in ranks) for i in range(len(ranks[0]))]
    per_positive = max(b / max(r["positives"], 1) for b, r in zip(bytes_per_step, ranks[0]))
    return {"workers": workers, "global_batch": config.train.batch_size, "median_step_s": median_seconds,
            "samples_per_s": config.train.batch_size / median_seconds,
            "mean_global_positives": statistics.mean(r["positives"] for r in ranks[0]),
            "max_bytes_per_positive": per_positive, "mean_bytes_per_step": statistics.mean(bytes_per_step)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="base YAML config (default: the built-in defaults)")
    parser.add_argument("--per-worker-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--output", default="runs/scaling")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, key=value")
    args = parser.parse_args()
    base = load_config(args.config, args.overrides)
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows = [measure(base, workers, args.per_worker_batch, args.steps, output) for workers in (1, 2)]
    ray.shutdown()
    single = rows[0]["samples_per_s"]
    lines = ["| workers | global batch | median step s | samples/s | speed-up | global positives/step | "
             "AP-loss bytes/step (all workers) | bytes per positive (max, budget 64) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['workers']} | {row['global_batch']} | {row['median_step_s']:.3f} | "
                     f"{row['samples_per_s']:.2f} | {row['samples_per_s'] / single:.2f}x | "
                     f"{row['mean_global_positives']:.0f} | {row['mean_bytes_per_step']:.0f} | "
                     f"{row['max_bytes_per_positive']:.1f} |")
    print("\n".join(lines))
    write_json_atomic(rows, Path(__file__).parent / "results" / "scaling.json")


if __name__ == "__main__":
    main()
