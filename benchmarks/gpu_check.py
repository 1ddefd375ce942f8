"""One command on a machine with one NVIDIA GPU: is the project right and how fast is it there?

  1. the engine's losses (AP-loss, aLRP, Rank & Sort) on the device against their O(P*N)
     references, in float64: outputs and update (what backward hands autograd), on random,
     tie-heavy and detection-shaped inputs;
  2. each of them vs focal loss, forward + backward, N = 8M pairs, P = 2000, early and late training;
  3. AMP training steps of RetinaNet-R50 with each of the four losses on one repeated batch
     (`Training.train_step`): loss finite and falling, step time, images/s, peak GPU memory;
  4. the project's Ray Train path (`train_distributed`) with one GPU worker over nccl, which
     first runs `global_ap_loss`'s collectives on that process group.

Prints one markdown table and writes benchmarks/results/gpu_check.json; sized for under 5 minutes
on one GPU (not yet run on one).
Exits 2 without a CUDA GPU, 1 if a check failed.

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --device cpu --small   # every section's code on CPU, ~45 s
"""
import argparse
import datetime
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import ray
import torch
import torch.distributed as dist
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aploss.engine as engine  # noqa: E402
from aploss import alrp_loss, ap_loss, rs_loss  # noqa: E402
from aploss.distributed import ProcessGroupBatch, global_ap_loss  # noqa: E402
from aploss.ranking_reference import alrp_reference, rs_reference  # noqa: E402
from aploss.reference import reference_ap_loss  # noqa: E402
from benchmarks.loss_speed import LOSSES as TIMED_LOSSES  # noqa: E402
from benchmarks.loss_speed import detection_batch, measure_time, timed  # noqa: E402
from pipeline.config import RELEASED_SETTINGS, Config, load_config  # noqa: E402
from pipeline.data.bindings import split_dir
from pipeline.data.dataset import DetectionDataset, collate  # noqa: E402
from pipeline.data.prep import prepare  # noqa: E402
from pipeline.data.shards import ShardReader  # noqa: E402
from pipeline.data.synthetic import coco_settings, write_synthetic_coco  # noqa: E402
from pipeline.io import write_json_atomic  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.orchestration.run import start_ray  # noqa: E402
from pipeline.quiet import quiet_third_party  # noqa: E402
from pipeline.training.journal import read_journal  # noqa: E402
from pipeline.training.loop import HookBase, Training, seed_everything  # noqa: E402
from pipeline.training.preparation import training_data  # noqa: E402
from pipeline.training.ray_train import train_distributed  # noqa: E402

NO_GPU = ("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); "
          "run it on a machine with an NVIDIA GPU")
TOLERANCE = 1e-6  # float64 engine vs reference: both are exact, so only rounding may differ
COLLECTIVES_FILE = "gpu_check_collectives.json"
LOSSES = ("ap", "focal", "alrp", "rs")
FAMILY = {"alrp": (alrp_loss, alrp_reference), "rs": (rs_loss, rs_reference)}


@dataclass(frozen=True)
class Scale:
    reference_pairs: int
    detection_shape: tuple[int, int, int]  # images, anchors, classes
    speed_pairs: int
    speed_positives: int
    repeats: int
    arch: str
    image_size: int
    batch_size: int
    train_steps: int
    ray_steps: int


# The paper's RetinaNet-500 setting at one GPU's share: 512 px, 8 images a step.
FULL = Scale(200_000, (4, 20_000, 20), 8_000_000, 2000, 10, "retinanet_r50", 512, 8, 20, 6)
# Every code path of FULL, at sizes a 2-core CPU runs in under a minute.
SMALL = Scale(20_000, (2, 3000, 4), 200_000, 200, 3, "retinanet_r18", 128, 2, 12, 3)


class Check(NamedTuple):
    case: str
    result: str
    passed: bool | None  # None: measured, nothing to pass
    numbers: dict | None = None  # what the result says, unrounded, for the json


@dataclass
class Row:
    section: str
    case: str
    result: str
    passed: bool | None
    numbers: dict | None = None

    def markdown(self) -> str:
        verdict = "-" if self.passed is None else "pass" if self.passed else "**FAIL**"
        return f"| {self.section} | {self.case} | {self.result} | {verdict} |"


def random_labels(generator: torch.Generator, shape: tuple[int, ...], p_pos: float, p_ignore: float) -> Tensor:
    u = torch.rand(shape, generator=generator)
    return torch.where(u < p_pos, 1, torch.where(u < p_pos + p_ignore, -1, 0)).to(torch.int8)


def detection_shaped(generator: torch.Generator, shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """Near the prior-bias init, 1 % of anchors positive for one class, 4 % ignored for all."""
    images, anchors, classes = shape
    logits = -4.6 + 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64)
    labels = torch.zeros(shape, dtype=torch.int8)
    kind = torch.rand(images, anchors, generator=generator)
    positive = kind < 0.01
    labels[(kind >= 0.01) & (kind < 0.05)] = -1
    labels[positive, torch.randint(0, classes, (images, anchors), generator=generator)[positive]] = 1
    return logits, labels


def reference_inputs(scale: Scale, device: torch.device) -> list[tuple[str, float, Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    n = scale.reference_pairs
    random = 2 * torch.randn(n, generator=g, dtype=torch.float64), random_labels(g, (n,), 0.02, 0.1)
    # On a grid of step delta/2, many pairs sit exactly at the kinks s_i -/+ delta and at s_i.
    tied = 0.5 * torch.randint(-6, 6, (n,), generator=g).double(), random_labels(g, (n,), 0.02, 0.1)
    # More pairs than one of the engine's chunks on this device, so that chunks are stitched.
    late_logits, late_labels = detection_batch("late", int(1.25 * engine.chunk_pairs(device)), 50, "cpu")
    return [("random", 1.0, *random), ("random", 0.0, *random), ("ties", 1.0, *tied), ("ties", 0.0, *tied),
            ("detection, early", 1.0, *detection_shaped(g, scale.detection_shape)),
            ("detection, late, > 1 chunk", 1.0, late_logits.double(), late_labels)]


def engine_loss_and_update(logits: Tensor, labels: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    leaf = logits.detach().clone().requires_grad_()
    loss = ap_loss(leaf, labels, delta)
    loss.backward()
    return loss.detach(), leaf.grad


def family_outputs_and_update(loss, logits: Tensor, labels: Tensor, values: Tensor,
                              delta: float) -> tuple[Tensor, Tensor, Tensor]:
    leaf = logits.detach().clone().requires_grad_()
    first, second = loss(leaf, labels, values, delta)
    (first + second).backward()
    return first.detach(), second.detach(), leaf.grad


def compared(case: str, loss_diff: float, update_diff: float) -> Check:
    return Check(case, f"max abs diff: loss {loss_diff:.1e}, update {update_diff:.1e}",
                 loss_diff <= TOLERANCE and update_diff <= TOLERANCE,
                 {"loss_diff": loss_diff, "update_diff": update_diff})


def check_engine(scale: Scale, device: torch.device) -> list[Check]:
    checks = []
    for name, delta, logits, labels in reference_inputs(scale, device):
        logits, labels = logits.to(device), labels.to(device)
        case = f"{name}, N={labels.numel():,}, P={int((labels == 1).sum()):,}, delta={delta:g}"
        loss, update = engine_loss_and_update(logits, labels, delta)
        ref_loss, ref_update = reference_ap_loss(logits, labels, delta)
        checks.append(compared(f"ap, {case}", (loss - ref_loss).abs().item(), (update - ref_update).abs().max().item()))
        # A value per positive on a grid of 1/4 (ties among the targets too), as the pairs are read.
        values = (torch.rand(labels.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 4
                  ).round().div(4).to(device)
        for family, (loss_function, reference) in FAMILY.items():
            first, second, update = family_outputs_and_update(loss_function, logits, labels, values, delta)
            expected = reference(logits, labels, values, delta)
            loss_diff = max((first - expected[0]).abs().item(), (second - expected[1]).abs().item())
            checks.append(compared(f"{family}, {case}", loss_diff, (update - expected[2]).abs().max().item()))
    return checks


def compare_speed(scale: Scale, device: torch.device) -> list[Check]:
    checks = []
    for kind in ("early", "late"):
        times = measure_time(kind, scale.speed_pairs, scale.speed_positives, scale.repeats, device.type)
        ratios = ", ".join(f"{name} {times[f'{name}_ms']:.2f} ms = {times[f'{name}_ms'] / times['focal_ms']:.2f}x"
                           for name in TIMED_LOSSES if name != "focal")
        checks.append(Check(f"{kind}, N={scale.speed_pairs:,}, P={scale.speed_positives:,}",
                            f"focal {times['focal_ms']:.2f} ms; {ratios} (median of {scale.repeats})", None, times))
    return checks


def base_config(scale: Scale, root: Path, device: torch.device, *overrides: str) -> Config:
    return load_config(None, [
        *coco_settings(root / 'data'), f"model.arch={scale.arch}",
        f"model.min_size={scale.image_size}", f"model.max_size={scale.image_size}",
        f"train.batch_size={scale.batch_size}", f"train.device={device.type}", "train.amp=true",
        "optim.warmup_steps=1", "train.log_every=1", "train.eval_every=1000", "train.checkpoint_every=1000",
        f"run.output_dir={root / 'runs'}", *overrides])


def fixed_batch(config: Config) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    dataset = DetectionDataset(ShardReader(split_dir(config, config.data.train_split)))
    images, targets, _ = collate([dataset[i] for i in range(config.train.batch_size)])
    return images, targets


# The term a working step must lower. aLRP's localisation loss is divided by each positive's rank,
# which shrinks as the ranking improves, so its total can rise while both errors fall.
FALLING = {"alrp": "cls_loss"}


def train_fixed_batch(config: Config, num_classes: int, device: torch.device, steps: int) -> dict:
    """`steps` of `Training.train_step` on the same batch: a working step must lower its loss."""
    images, targets = fixed_batch(config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seed_everything(config.train.seed)
    training = Training(config, build_model(config, num_classes).to(device), device, steps)
    falling = FALLING.get(config.loss.classification, "loss")
    losses, seconds = [], []
    for _ in range(steps):
        seconds.append(timed(lambda: losses.append(training.train_step(images, targets)[falling]), device.type))
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"losses": losses, "step_s": statistics.median(seconds[1:]), "peak_bytes": peak, "amp": training.amp}


def check_training(scale: Scale, root: Path, device: torch.device) -> list[Check]:
    checks = []
    for loss in LOSSES:
        config, classes = training_data(base_config(scale, root, device, f"loss.classification={loss}",
                                                    *RELEASED_SETTINGS.get(loss, ())))
        run = train_fixed_batch(config, len(classes), device, scale.train_steps)
        losses = run["losses"]
        # Quarters, not single steps: from scratch a step's loss can jump before the trend shows.
        window = max(len(losses) // 4, 1)
        first, last = statistics.mean(losses[:window]), statistics.mean(losses[-window:])
        finite = all(math.isfinite(value) for value in losses)
        peak = "n/a (CPU)" if run["peak_bytes"] is None else f"{run['peak_bytes'] / 2**30:.2f} GiB"
        checks.append(Check(
            f"{scale.arch}, {loss} loss, AMP {'on' if run['amp'] else 'off'}, batch "
            f"{scale.batch_size} x {scale.image_size}px, {scale.train_steps} steps",
            f"{FALLING.get(loss, 'loss')} {first:.3f} -> {last:.3f} (mean of first/last {window}), "
            f"{run['step_s']:.3f} s/step, "
            f"{scale.batch_size / run['step_s']:.1f} images/s, peak {peak}",
            finite and last < first, run))
    return checks


def collective_check(device: torch.device) -> dict:
    """`global_ap_loss` through this process group's collectives (nccl on GPUs) against `ap_loss`.
    With one worker the global ranking is the local one, so they must agree."""
    g = torch.Generator().manual_seed(0)
    logits = (-4.6 + 0.05 * torch.randn(100_000, generator=g)).to(device)
    labels = (torch.rand(100_000, generator=g) < 0.002).to(torch.int8).to(device)
    batch = ProcessGroupBatch()
    losses = [lambda x: global_ap_loss(x, labels, batch=batch, grad_scale=1.0), lambda x: ap_loss(x, labels)]
    results = []
    for loss_of in losses:
        leaf = logits.clone().requires_grad_()
        loss = loss_of(leaf)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    (global_loss, global_grad), (local_loss, local_grad) = results
    diff = max((global_loss - local_loss).abs().item(), (global_grad - local_grad).abs().max().item())
    return {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "max_abs_diff": diff,
            "bytes_sent": batch.bytes_sent, "finite": bool(torch.isfinite(global_loss))}


class CollectiveCheck(HookBase):
    """Before the project's Ray Train worker trains, `collective_check` on its process group."""

    def __init__(self, config: Config, rank: int) -> None:
        self.config, self.rank = config, rank

    def before_train(self, training) -> None:
        check = collective_check(training.device)
        if self.rank == 0:
            write_json_atomic(check, self.config.run.folder().root / COLLECTIVES_FILE)


def check_ray_train(scale: Scale, root: Path, device: torch.device) -> list[Check]:
    backend = "nccl" if device.type == "cuda" else "gloo"
    config = base_config(scale, root, device, "run.name=gpu-check-ray", "ray.workers=1", "ray.max_failures=0",
                         f"ray.use_gpu={str(device.type == 'cuda').lower()}", f"train.max_steps={scale.ray_steps}")
    start_ray(config)
    try:
        _, model_path = train_distributed(config, extra_hooks=[CollectiveCheck])
    finally:
        ray.shutdown()
    run = config.run.folder()
    losses = [record["loss"] for record in read_journal(run.journal) if "loss" in record]
    collectives = json.loads((run.root / COLLECTIVES_FILE).read_text())
    finite = len(losses) == scale.ray_steps and all(math.isfinite(value) for value in losses)
    collectives_ok = (collectives["backend"] == backend and collectives["finite"]
                      and collectives["max_abs_diff"] <= TOLERANCE)
    exported = model_path.exists()
    return [
        Check(f"1 worker, {collectives['backend']}, global_ap_loss vs ap_loss",
              f"max abs diff {collectives['max_abs_diff']:.1e}, {collectives['bytes_sent']} bytes sent",
              collectives_ok, collectives),
        Check(f"train_distributed, 1 worker, {backend}, {scale.arch}, {scale.ray_steps} steps",
              f"loss {' '.join(f'{value:.3f}' for value in losses)}, model.pt {'written' if exported else 'missing'}",
              finite and exported, {"losses": losses}),
    ]


def header(device: torch.device, small: bool) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (no GPU used)"
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"gpu_check, {date}: {name}, torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}"
            f"{', --small' if small else ''}")


def run_sections(scale: Scale, device: torch.device) -> list[Row]:
    """Every section, each on its own: one that raises is a failed row and the others still run,
    so that one visit to a GPU machine reports everything."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as directory:
        root = Path(directory)
        write_synthetic_coco(root / "data", {"train": 2 * scale.batch_size, "val": 2}, size=scale.image_size)
        prepare(base_config(scale, root, device), progress=False)
        sections = [("1 engine vs reference (float64)", lambda: check_engine(scale, device)),
                    ("2 engine vs focal, fwd+bwd", lambda: compare_speed(scale, device)),
                    ("3 training steps", lambda: check_training(scale, root, device)),
                    ("4 Ray Train", lambda: check_ray_train(scale, root, device))]
        for title, section in sections:
            print(f"gpu_check: {title} ...", flush=True)
            started = time.perf_counter()
            try:
                rows += [Row(title, *check) for check in section()]
            except Exception as error:  # reported as the section's failed row
                traceback.print_exc()
                rows.append(Row(title, "raised", f"{type(error).__name__}: {str(error).splitlines()[0]}", False))
            print(f"gpu_check: {title}: {time.perf_counter() - started:.0f} s", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu runs every section on CPU (gloo, no AMP): a check of this script, not of a GPU")
    parser.add_argument("--small", action="store_true",
                        help="small sizes, ResNet-18, fewer steps (with --device cpu: about a minute)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "gpu_check.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    quiet_third_party()
    device = torch.device(args.device)
    if device.type == "cpu":
        # The CPU mode checks the code, not the speed; on a shared machine, threads waiting on
        # each other's time slices made a 0.3 s step take 20 s.
        torch.set_num_threads(1)
    scale = SMALL if args.small else FULL
    title = header(device, args.small)
    rows = run_sections(scale, device)
    passed = all(row.passed is not False for row in rows)
    print(f"\n{title}\n")
    print("| section | case | result | pass |\n|---|---|---|---|")
    print("\n".join(row.markdown() for row in rows))
    write_json_atomic({"header": title, "device": args.device, "small": args.small, "passed": passed,
                       "rows": [asdict(row) for row in rows]}, args.json)
    print(f"\n{'all checks passed' if passed else 'FAILED'}; written: {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
