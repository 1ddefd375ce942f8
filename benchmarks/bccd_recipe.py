"""RetinaNet-R18 on BCCD with the AP-loss and with focal loss: same seed, schedule and budget.

Trains both from scratch on the train split at a CPU-sized resolution, evaluates on the test
split, and prints one markdown table: AP, AP50, per-class AP, training images/s, the share of
a step spent in the detection loss, and the step time of each loss on the same batches
(interleaved, so both see the same machine state). Results also go to
benchmarks/results/bccd_recipe.json.

    python benchmarks/bccd_recipe.py                 # the README's numbers
    python benchmarks/bccd_recipe.py --steps 40      # a quick look
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.data.dataset import DetectionDataset, collate  # noqa: E402
from pipeline.data.prep import locate_prepared, prepare  # noqa: E402
from pipeline.data.shards import ShardReader, read_manifest  # noqa: E402
from pipeline.evaluation.stages import evaluate_stage  # noqa: E402
from pipeline.io import write_json_atomic  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.training.local import train_stage  # noqa: E402
from pipeline.training.loop import Training, seed_everything  # noqa: E402

LOSSES = ("ap", "focal")


def recipe(args: argparse.Namespace, loss: str) -> Config:
    return load_config(args.config, [
        f"loss.classification={loss}", f"run.name=bccd-recipe-{loss}-{args.steps}", f"run.output_dir={args.output}",
        f"train.max_steps={args.steps}", f"train.batch_size={args.batch}", f"model.min_size={args.min_size}",
        f"model.max_size={args.max_size}", "train.epochs=1000", f"train.eval_every={args.steps}",
        f"train.checkpoint_every={args.steps}", *args.overrides])


def step_times(config: Config, batches: int) -> dict[str, float]:
    """Median train-step seconds of each loss on the same batches, from the same weights,
    interleaved; and the median share of a step spent in the loss (forward and backward)."""
    prepared = locate_prepared(config)
    seed_everything(0)
    dataset = DetectionDataset(ShardReader(prepared / config.data.train_split))
    base = build_model(config, len(read_manifest(prepared)["classes"]))
    times = {loss: [] for loss in LOSSES}
    shares = {loss: [] for loss in LOSSES}
    for batch in range(batches + 1):  # the first round warms up
        items = [dataset[(batch * config.train.batch_size + i) % len(dataset)] for i in range(config.train.batch_size)]
        images, targets, _ = collate(items)
        for loss in LOSSES:
            model = copy.deepcopy(base)
            model.criterion.classification = loss
            training = Training(config, model, torch.device("cpu"), steps=100)
            captured: list = []
            hook = model.criterion.register_forward_pre_hook(
                lambda _, inputs, captured=captured: captured.append(inputs))
            started = time.perf_counter()
            training.train_step(images, targets)
            step = time.perf_counter() - started
            hook.remove()
            logits, deltas, anchors, step_targets = captured[0]
            logits, deltas = logits.detach().requires_grad_(), deltas.detach().requires_grad_()
            started = time.perf_counter()
            losses = model.criterion(logits, deltas, anchors, step_targets)
            losses.total().backward()
            in_loss = time.perf_counter() - started
            if batch:
                times[loss].append(step)
                shares[loss].append(in_loss / step)
    return {**{f"step_s_{loss}": statistics.median(times[loss]) for loss in LOSSES},
            **{f"loss_share_{loss}": statistics.median(shares[loss]) for loss in LOSSES}}


def table(results: dict) -> str:
    classes = list(results["ap"]["per_class_ap"])
    header = ["loss", "AP", "AP50", *[f"AP {name}" for name in classes], "train img/s", "loss share of step",
              "step s (same batch)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for loss in LOSSES:
        r = results[loss]
        cells = [loss, f"{r['metrics']['AP']:.3f}", f"{r['metrics']['AP50']:.3f}",
                 *[f"{r['per_class_ap'][name]:.3f}" for name in classes], f"{r['images_per_s']:.2f}",
                 f"{results['timing'][f'loss_share_{loss}']:.1%}", f"{results['timing'][f'step_s_{loss}']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    ratio = results["timing"]["step_s_ap"] / results["timing"]["step_s_focal"]
    lines.append(f"\nstep time ap / focal on the same batches: {ratio:.3f}x (target <= 1.10x)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="base YAML config (default: the built-in defaults)")
    parser.add_argument("--steps", type=int, default=150, help="6 epochs of BCCD train (the main job trains 4)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--min-size", type=int, default=256)
    parser.add_argument("--max-size", type=int, default=342)
    parser.add_argument("--timing-batches", type=int, default=5)
    parser.add_argument("--output", default="runs")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, key=value")
    args = parser.parse_args()
    results: dict = {"steps": args.steps, "batch": args.batch, "min_size": args.min_size}
    prepare(recipe(args, "ap"))
    for loss in LOSSES:
        config = recipe(args, loss)
        summary = train_stage(config)
        evaluation = evaluate_stage(config)
        results[loss] = {"metrics": evaluation.result.metrics, "per_class_ap": evaluation.result.per_class_ap,
                         "images_per_s": summary.last_metrics["images_per_s"], "skipped": summary.skipped}
    results["timing"] = step_times(recipe(args, "ap"), args.timing_batches)
    print(table(results))
    write_json_atomic(results, Path(__file__).parent / "results" / "bccd_recipe.json")


if __name__ == "__main__":
    main()
