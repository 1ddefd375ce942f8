"""The AP-loss recipe against the detector a user would otherwise pick, at equal training compute:
Ultralytics YOLOv8n trained from scratch on the same BCCD splits, given the CPU-seconds our runs took.

1. Data-prep (the project's own) prepares BCCD; its train, val and test splits are exported to a
   YOLO dataset folder (images as files named by their image id, one labels .txt per image, data.yaml).
2. Our recipes train in this process: the main job's defaults (1x) and the longer recipe
   (`--longer-config`, default configs/bccd_long.yaml: issue 32's 2.4x), each timed in CPU-seconds
   (user + system of this process and all its descendants, the loader processes included) over
   `train_stage` alone (after an untimed one-step warm-up), and is evaluated on the test split by the
   evaluate stage.
3. YOLOv8n (`yolov8n.yaml`: no pretrained weights) trains at 320 px, batch 16, Ultralytics' defaults
   otherwise, once per budget, stopped at the end of the epoch in which its CPU-seconds reach that
   budget. Its epoch count is fitted to the budget first (`--yolo-epochs 0`, the default): two
   calibration epochs measure an epoch's CPU-seconds (the second's) and the run's fixed cost (the
   rest, the first epoch's extra included), and the run gets the epoch count that comes nearest
   the budget, so that its LR schedule and close_mosaic end where the budget
   does, as a user fitting a schedule to a budget would set them (within half an epoch of it).
   `--yolo-epochs 100` (Ultralytics' default) instead cuts a 100-epoch schedule at the budget.
   Ultralytics trains on the CPU with all-but-one cores' torch threads and no loader process (its
   defaults); our runs with this process's threads and their loader processes. Each row records its
   threads; CPU-seconds, not wall time, are what is held equal.
4. Each YOLO model predicts the test images (conf 0.001, at most 100 boxes per image, as COCO's
   evaluation wants), and the project's COCO evaluator scores the boxes against the same
   test ground_truth.json, in the dataset's own category ids.
5. One markdown table (run, budget as x of our 1x training CPU-seconds, CPU-seconds, images seen,
   AP, AP50, AP50 per class); all numbers, wall times and the refused network calls in
   <output>/peer_yolo.json.

Nothing is downloaded at run time: no pretrained weights, plots=False (its font download),
amp=False, every Ultralytics integration and its analytics off (settings kept in <output>, not the
user's), YOLO_OFFLINE=1, and while Ultralytics runs every name lookup or connection off this
machine is refused and reported.

Ultralytics is not a dependency of aploss: it gets an environment of its own, .venv-peer, which
reuses .venv's packages (torch, torchvision, the project) through a .pth file and installs only
what Ultralytics adds, pinned to .venv's versions so that pip replaces nothing. From the repository
root, after the project's own setup (.venv):

    python3 -m venv .venv-peer
    PURELIB='import sysconfig; print(sysconfig.get_path("purelib"))'
    echo "import site; site.addsitedir('$(.venv/bin/python -c "$PURELIB")')" \\
        > "$(.venv-peer/bin/python -c "$PURELIB")/aploss-venv.pth"
    .venv/bin/pip freeze --exclude-editable | grep '==' > .venv-peer/constraints.txt
    .venv-peer/bin/pip install -c .venv-peer/constraints.txt ultralytics==8.4.190

(`site.addsitedir`, not a plain path line, so that .venv's own .pth files, the project's editable
install among them, are read too.) Then:

    APLOSS_DATA_ROOT=../shared/datasets .venv-peer/bin/python benchmarks/peer_yolo.py
    APLOSS_DATA_ROOT=../shared/datasets .venv-peer/bin/python benchmarks/peer_yolo.py train.max_steps=4 \\
        --longer train.max_steps=8 --output runs/peer-yolo-smoke              # a smoke test of minutes
    ... peer_yolo.py --no-longer                                              # the 1x budget alone
    ... peer_yolo.py --ours-from runs/peer-yolo/peer_yolo.json --output runs/peer-yolo2   # YOLO alone, again
"""
import argparse
import contextlib
import errno
import importlib.util
import io
import ipaddress
import json
import math
import os
import resource
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.data.bindings import split_dir  # noqa: E402
from pipeline.data.prep import prepare  # noqa: E402
from pipeline.data.shards import ImageRecord, ShardReader, read_manifest  # noqa: E402
from pipeline.evaluation.coco_metrics import CocoResult, evaluate_detections  # noqa: E402
from pipeline.evaluation.stages import evaluate_stage  # noqa: E402
from pipeline.io import write_json_atomic  # noqa: E402
from pipeline.storage import Location, Where  # noqa: E402
from pipeline.training.local import train_stage  # noqa: E402

SETUP = ("python3 -m venv .venv-peer, a .pth file pointing at .venv's site-packages, then "
         ".venv-peer/bin/pip install -c .venv-peer/constraints.txt ultralytics==8.4.190 "
         "(the exact commands: benchmarks/peer_yolo.py's docstring)")
# Ultralytics' integrations, each of which reports to a service or a local tracker when on; `hub` is
# the older versions' name, `sync` the anonymous usage analytics.
ULTRALYTICS_INTEGRATIONS = ("wandb", "mlflow", "comet", "clearml", "tensorboard", "dvc", "raytune", "hub", "sync")
# The formats Ultralytics reads, by Pillow's name; anything else is re-encoded as PNG.
YOLO_IMAGE_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}
EXIF_ORIENTATION = 0x0112
LABEL_DECIMALS = 6


# --- the YOLO dataset -------------------------------------------------------------------------

def export_yolo_dataset(prepared: Where, splits: Mapping[str, str], destination: Path) -> Path:
    """Write the prepared splits as a YOLO dataset under `destination` (replacing what was there):
    `splits` maps YOLO's roles (train, val, test) to prepared split names. Images go to
    images/<split>/<image id><suffix>, their boxes to labels/<split>/<image id>.txt as
    `class cx cy w h`, normalised, class indices in the prepared data's class order. Returns data.yaml."""
    classes = read_manifest(prepared)["classes"]
    shutil.rmtree(destination, ignore_errors=True)  # no stale image or Ultralytics label cache survives
    for split in dict.fromkeys(splits.values()):
        reader = ShardReader(Location(prepared) / split)
        images, labels = destination / "images" / split, destination / "labels" / split
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for index in range(len(reader)):
            record = reader.read(index)
            encoded, suffix = yolo_readable_image(record.image)
            # Named by image id: unique within a split whatever the source's folders, and how a
            # prediction finds its ground truth again.
            (images / f"{record.image_id}{suffix}").write_bytes(encoded)
            (labels / f"{record.image_id}.txt").write_text("".join(f"{line}\n" for line in yolo_labels(record)))
    data = {"path": str(destination.resolve()), **{role: f"images/{split}" for role, split in splits.items()},
            "names": dict(enumerate(classes))}
    data_yaml = destination / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    return data_yaml


def yolo_readable_image(encoded: bytes) -> tuple[bytes, str]:
    """The image file as Ultralytics should read it, and its suffix: the original bytes, unless
    OpenCV would rotate it by its EXIF orientation (the project's boxes are on the stored pixels,
    as its decoder leaves them) or Ultralytics cannot read its format; then a PNG of its pixels."""
    with Image.open(io.BytesIO(encoded)) as image:
        suffix = YOLO_IMAGE_SUFFIXES.get(image.format or "")
        if suffix and image.getexif().get(EXIF_ORIENTATION, 1) == 1:
            return encoded, suffix
        png = io.BytesIO()
        image.convert("RGB").save(png, format="PNG")
        return png.getvalue(), ".png"


def yolo_labels(record: ImageRecord) -> list[str]:
    """`class cx cy w h` lines of an image's boxes, normalised by its size. Crowd (COCO) and
    difficult (VOC) boxes are left out: they are ignore regions in the evaluation and no target in
    our training, and YOLO has no ignore label."""
    lines = []
    for (x1, y1, x2, y2), class_id, crowd in zip(record.boxes.tolist(), record.class_ids.tolist(),
                                                 record.crowd.tolist()):
        if crowd:
            continue
        values = ((x1 + x2) / 2 / record.width, (y1 + y2) / 2 / record.height,
                  (x2 - x1) / record.width, (y2 - y1) / record.height)
        lines.append(" ".join([str(class_id), *(f"{value:.{LABEL_DECIMALS}f}" for value in values)]))
    return lines


# --- CPU-seconds ------------------------------------------------------------------------------

def cpu_seconds() -> tuple[float, float]:
    """(user + system CPU-seconds of this process and every descendant, the same by getrusage alone).
    getrusage's RUSAGE_CHILDREN counts only children that ended and were waited for: neither the
    loader processes of a training still running nor those the forkserver (their parent) reaped,
    so live descendants are read from /proc (psutil), with what each of them reaped."""
    import psutil  # Ultralytics' dependency, in .venv-peer; not the project's

    own, ended = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    by_getrusage = own.ru_utime + own.ru_stime + ended.ru_utime + ended.ru_stime
    descendants = 0.0
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = process.cpu_times()
            descendants += times.user + times.system + times.children_user + times.children_system
    return by_getrusage + descendants, by_getrusage


@dataclass
class Spent:
    cpu_s: float
    cpu_s_getrusage: float  # this process and its ended, waited-for children only
    wall_s: float


class Stopwatch:
    """CPU-seconds and wall seconds since it was made."""

    def __init__(self) -> None:
        self.cpu_s, self.cpu_s_getrusage = cpu_seconds()
        self.wall = time.perf_counter()

    def spent(self) -> Spent:
        cpu_s, cpu_s_getrusage = cpu_seconds()
        return Spent(cpu_s - self.cpu_s, cpu_s_getrusage - self.cpu_s_getrusage, time.perf_counter() - self.wall)


# --- our recipe -------------------------------------------------------------------------------

def aploss_config(args: argparse.Namespace, name: str, extra: Sequence[str] = (), recipe: str | None = None
                  ) -> Config:
    # On the CPU whatever the machine has: the budgets are CPU-seconds.
    return load_config(recipe or args.config, ["train.device=cpu", f"run.output_dir={args.output}",
                                               f"run.name={name}", *args.overrides, *extra])


def train_aploss(config: Config, label: str) -> dict:
    """Train the run afresh (a finished run's rerun would resume at its end, in no time), time
    train_stage alone, and evaluate it on the test split."""
    shutil.rmtree(config.run.folder().root.local(), ignore_errors=True)
    stopwatch = Stopwatch()
    summary = train_stage(config)
    spent = stopwatch.spent()
    evaluation = evaluate_stage(config)
    return row(label, spent, summary.steps * config.train.batch_size, evaluation.result, steps=summary.steps,
               torch_threads=torch.get_num_threads())


def warm_up(args: argparse.Namespace) -> None:
    """One untimed training step first, so that what this process does once (the loaders'
    forkserver, first-use imports, loading the fused kernels) lands in no budget, as Ultralytics'
    lands in its calibration epochs rather than in a timed run."""
    config = aploss_config(args, "aploss-warm-up", ["train.max_steps=1"])
    shutil.rmtree(config.run.folder().root.local(), ignore_errors=True)
    train_stage(config, progress=False)


def earlier_rows(path: Path) -> list[dict]:
    """Our rows of an earlier run's peer_yolo.json, to give YOLO the budgets they measured."""
    try:
        rows = [r for r in json.loads(path.read_text())["rows"] if "steps" in r]  # YOLO's rows have epochs
        if not rows or not all(isinstance(r["cpu_s"], float) and r["cpu_s"] > 0 and r["per_class_ap50"]
                               for r in rows):
            raise ValueError("no rows of ours with their CPU-seconds and scores")
    except (OSError, ValueError, KeyError, TypeError) as error:
        sys.exit(f"peer_yolo: --ours-from {path}: not a peer_yolo.json of ours ({error})")
    return rows


def row(label: str, spent: Spent, images_seen: int, result: CocoResult, **extra: Any) -> dict:
    return {"run": label, "cpu_s": spent.cpu_s, "cpu_s_getrusage": spent.cpu_s_getrusage, "wall_s": spent.wall_s,
            "images_seen": images_seen, **extra, "AP": result.metrics["AP"], "AP50": result.metrics["AP50"],
            "per_class_ap50": result.per_class_ap50, "per_class_ap": result.per_class_ap}


# --- Ultralytics, offline ---------------------------------------------------------------------

def _is_loopback(host: Any) -> bool:
    host = host.decode() if isinstance(host, bytes) else str(host)
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


def _caller() -> str:
    """The innermost Ultralytics frame of the current stack, which asked for the network."""
    for frame in reversed(traceback.extract_stack()):
        if "ultralytics" in frame.filename:
            return f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno} {frame.name}"
    return "outside ultralytics"


class NetworkRefused:
    """While entered: every name lookup and connection off this machine fails at once, as on a
    machine with no network, and each attempt is noted with the code that made it."""

    def __init__(self) -> None:
        self.attempts: list[str] = []
        self._saved = socket.getaddrinfo, socket.socket.connect

    def refuse(self, host: Any) -> NoReturn:
        self.attempts.append(f"{host!r} from {_caller()}")
        raise OSError(errno.ENETUNREACH, f"peer_yolo refuses network access at run time (to {host!r})")

    def __enter__(self) -> "NetworkRefused":
        lookup, connect = self._saved

        def guarded_lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
            if host is None or _is_loopback(host):
                return lookup(host, *args, **kwargs)
            self.refuse(host)

        def guarded_connect(sock: socket.socket, address: Any) -> Any:
            if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
                self.refuse(address[0])
            return connect(sock, address)

        socket.getaddrinfo = guarded_lookup
        socket.socket.connect = guarded_connect
        return self

    def __exit__(self, *_: Any) -> None:
        socket.getaddrinfo, socket.socket.connect = self._saved


def offline_ultralytics(config_dir: Path) -> type:
    """Ultralytics' YOLO class, imported offline: its settings in `config_dir` (not the user's),
    every integration off, no online check, no package auto-install, no Platform key."""
    os.environ.update(YOLO_OFFLINE="1", YOLO_AUTOINSTALL="false", YOLO_CONFIG_DIR=str(config_dir.resolve()))
    os.environ.pop("ULTRALYTICS_API_KEY", None)  # Platform streams a run's metrics and weights when set
    from ultralytics import YOLO, settings

    settings.update({key: False for key in ULTRALYTICS_INTEGRATIONS if key in settings})
    return YOLO


@dataclass
class CpuBudget:
    """Ultralytics callbacks that time each epoch (training and its validation) in CPU-seconds and
    end training with the epoch in which `budget_s` since `started` is reached."""
    budget_s: float
    started: float = field(default_factory=lambda: cpu_seconds()[0])
    epoch_cpu_s: list[float] = field(default_factory=list)
    _epoch_start: float | None = None

    def epoch_started(self, trainer: Any) -> None:
        self._epoch_start = cpu_seconds()[0]

    def epoch_ended(self, trainer: Any) -> None:
        if self._epoch_start is None:  # the final validation of best.pt calls on_fit_epoch_end too
            return
        now = cpu_seconds()[0]
        self.epoch_cpu_s.append(now - self._epoch_start)
        self._epoch_start = None
        if now - self.started >= self.budget_s:
            trainer.stop = True  # the trainer breaks right after on_fit_epoch_end


@dataclass
class YoloRun:
    model: Any  # the trained YOLO, holding best.pt
    spent: Spent
    epochs: int
    epoch_cpu_s: list[float]


def train_yolo(yolo: type, data_yaml: Path, project: Path, name: str, epochs: int, budget_s: float,
               args: argparse.Namespace, **settings: Any) -> YoloRun:
    shutil.rmtree(project / name, ignore_errors=True)  # no weights of an earlier run in its folder
    model = yolo("yolov8n.yaml")  # the architecture alone: weights from scratch
    budget = CpuBudget(budget_s)
    model.add_callback("on_train_epoch_start", budget.epoch_started)
    model.add_callback("on_fit_epoch_end", budget.epoch_ended)
    stopwatch = Stopwatch()
    model.train(data=str(data_yaml), epochs=epochs, imgsz=args.imgsz, batch=args.batch, device="cpu", amp=False,
                pretrained=False, plots=False, project=str(project.resolve()), name=name, exist_ok=True, **settings)
    return YoloRun(model, stopwatch.spent(), len(budget.epoch_cpu_s), budget.epoch_cpu_s)


CALIBRATION_EPOCHS = 2


def epochs_within(budget_s: float, calibration: YoloRun) -> int:
    """The epoch count whose run comes nearest `budget_s`, from a short run: its last epoch's
    CPU-seconds as every epoch's, and the rest as a fixed cost. A run's first epoch can cost
    a third more than the next ones (2026-12-08: 32.5 CPU-s in a one-epoch calibration, 31.6 and
    22.8 in the two runs fitted from it, 21-26 after), and taken for the steady cost it gave YOLO
    0.74x and 0.70x of the budgets."""
    epoch_s = calibration.epoch_cpu_s[-1]
    fixed_s = calibration.spent.cpu_s - epoch_s * len(calibration.epoch_cpu_s)
    return max(1, round((budget_s - fixed_s) / epoch_s))


def yolo_detections(model: Any, images: Path, category_ids: list[int], imgsz: int) -> list[dict]:
    """COCO result dicts of the model's boxes on every image in `images` (named by image id)."""
    detections = []
    for result in model.predict(source=str(images), imgsz=imgsz, conf=0.001, max_det=100, device="cpu",
                                stream=True, verbose=False):
        image_id = int(Path(result.path).stem)
        boxes = result.boxes
        for (x1, y1, x2, y2), score, class_index in zip(boxes.xyxy.tolist(), boxes.conf.tolist(),
                                                        boxes.cls.tolist()):
            detections.append({"image_id": image_id, "category_id": category_ids[int(class_index)],
                               "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return detections


# --- the comparison ---------------------------------------------------------------------------

def table(rows: list[dict], base_cpu_s: float) -> str:
    classes = list(rows[0]["per_class_ap50"])
    header = ["run", "budget (x our 1x CPU)", "CPU-seconds", "images seen", "AP", "AP50",
              *[f"AP50 {name}" for name in classes]]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in rows:
        cells = [r["run"], f"{r['cpu_s'] / base_cpu_s:.2f}x", f"{r['cpu_s']:,.0f}", f"{r['images_seen']:,}",
                 f"{r['AP']:.3f}", f"{r['AP50']:.3f}", *[f"{r['per_class_ap50'][name]:.3f}" for name in classes]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def announce(what: str) -> None:
    print(f"\n== peer_yolo: {what}", flush=True)


def yolo_at_budgets(args: argparse.Namespace, bound: Config, data_yaml: Path, budgets: list[dict]
                    ) -> tuple[list[dict], dict]:
    """YOLOv8n trained at each budget (a row of ours), each row scored on the test split; and what
    the runs were (calibration, refused network calls)."""
    output, data = Path(args.output), bound.data
    train_images = len(list((data_yaml.parent / "images" / data.train_split).iterdir()))
    ground_truth = split_dir(bound, data.test_split) / "ground_truth.json"
    category_ids = read_manifest(bound.data.prepared)["category_ids"]
    rows, calibration = [], None
    with NetworkRefused() as network:
        yolo = offline_ultralytics(output / "ultralytics-settings")
        if not args.yolo_epochs:
            announce(f"YOLOv8n: {CALIBRATION_EPOCHS} calibration epochs")
            # close_mosaic=0: so short a run would otherwise close mosaic at once, and time the
            # cheaper epochs of a schedule's end.
            calibration = train_yolo(yolo, data_yaml, output / "yolo", "calibration", CALIBRATION_EPOCHS, math.inf,
                                     args, close_mosaic=0)
        for budget in budgets:
            epochs = args.yolo_epochs or epochs_within(budget["cpu_s"], calibration)
            announce(f"YOLOv8n at the budget of {budget['run']}: {budget['cpu_s']:.0f} CPU-s, {epochs} epochs")
            run = train_yolo(yolo, data_yaml, output / "yolo", budget["run"].replace(" ", "-"), epochs,
                             budget["cpu_s"], args)
            detections = yolo_detections(run.model, data_yaml.parent / "images" / data.test_split, category_ids,
                                         args.imgsz)
            rows.append(row(f"yolov8n at {budget['run']}'s budget", run.spent, run.epochs * train_images,
                            evaluate_detections(ground_truth, detections), epochs=run.epochs, epochs_planned=epochs,
                            epoch_cpu_s=run.epoch_cpu_s, torch_threads=torch.get_num_threads()))
    about = {"imgsz": args.imgsz, "batch": args.batch, "epochs": args.yolo_epochs or "fitted to each budget",
             "calibration": calibration and {"cpu_s": calibration.spent.cpu_s, "epoch_cpu_s": calibration.epoch_cpu_s},
             "network_refused": list(dict.fromkeys(network.attempts))}
    return rows, about


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides for each of our runs, key=value")
    parser.add_argument("--config", help="base YAML config of our runs (default: the built-in defaults)")
    parser.add_argument("--longer-config", default="configs/bccd_long.yaml",
                        help="the YAML recipe of our longer run (default: issue 32's 2.4x, configs/bccd_long.yaml)")
    parser.add_argument("--longer", nargs="*", default=[],
                        help="overrides of our longer run; --no-longer: the 1x run only")
    parser.add_argument("--no-longer", action="store_true", help="the 1x run only")
    parser.add_argument("--ours-from", type=Path,
                        help="our rows (budgets and scores) from an earlier run's peer_yolo.json, not trained again: "
                             "YOLO alone, at their budgets (CPU-seconds compare only on the host that measured them)")
    parser.add_argument("--output", default="runs/peer-yolo")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--yolo-epochs", type=int, default=0,
                        help="0: YOLO's schedule fitted to each budget by calibration epochs; N: N epochs cut at it")
    args = parser.parse_args()
    # Checked first: our runs take minutes to hours before Ultralytics is imported.
    if importlib.util.find_spec("ultralytics") is None:
        sys.exit(f"peer_yolo: ultralytics is not importable here; run this with .venv-peer/bin/python, set up by: "
                 f"{SETUP}")
    output = Path(args.output)
    configs = {"aploss 1x": aploss_config(args, "aploss-1x")}
    if not args.no_longer:
        label = " ".join([f"aploss {Path(args.longer_config).name}", *args.longer])
        configs[label] = aploss_config(args, "aploss-longer", args.longer, args.longer_config)

    announce("data-prep and the YOLO dataset")
    first = next(iter(configs.values()))
    bound = first.with_prepared(prepare(first).directory)
    data = bound.data
    data_yaml = export_yolo_dataset(data.prepared, {"train": data.train_split, "val": data.val_split,
                                                    "test": data.test_split}, output / "yolo-data")
    if args.ours_from:
        ours = earlier_rows(args.ours_from)
    else:
        announce("warm-up: one untimed training step")
        warm_up(args)
        ours = []
        for label, config in configs.items():
            announce(f"train and evaluate {label}")
            ours.append(train_aploss(config, label))
    # Ultralytics is imported only now: its import changes process-wide settings (OpenCV's
    # threads, OMP_NUM_THREADS for processes started later) that our runs must not see.
    yolo_rows, about_yolo = yolo_at_budgets(args, bound, data_yaml, ours)

    rows = ours + yolo_rows
    print(table(rows, rows[0]["cpu_s"]))
    if about_yolo["network_refused"]:
        print("network calls refused while Ultralytics ran:\n  " + "\n  ".join(about_yolo["network_refused"]))
    longer = None if args.no_longer else {"config": args.longer_config, "overrides": args.longer}
    write_json_atomic({"rows": rows, "yolo": about_yolo, "aploss_overrides": args.overrides, "longer": longer,
                       "ours_from": args.ours_from and str(args.ours_from)},
                      output / "peer_yolo.json")
    print(f"results: {output / 'peer_yolo.json'}")


if __name__ == "__main__":
    main()
