"""The train stage in one process (CPU or one GPU), on the data-prep output.

Outputs go under the run directory (`run.output_dir/run.name`): checkpoints/, train/metrics.jsonl
and model.pt (the best weights by validation AP with the config and class names). Rerunning with
the same run name resumes from the latest checkpoint.
"""
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline import checkpoints
from pipeline.checkpoints import CheckpointStore
from pipeline.config import Config, config_record
from pipeline.data.bindings import prepared_category_ids
from pipeline.errors import TrainingDiverged
from pipeline.model import build_model, initial_model, resolve_device
from pipeline.training.hooks import LocalSink, training_hooks
from pipeline.training.loop import StepSchedule, Training, fit, loader_processes, seed_everything, training_dataset
from pipeline.training.preparation import prepare_training

# A local run is given no share of the machine, as a Ray worker is: on a large one, a few loader
# processes keep up with one training process, and more would take the step's own threads.
MOST_LOCAL_LOADERS = 4


@dataclass
class TrainSummary:
    model_path: Path
    steps: int
    skipped: int
    last_metrics: dict[str, float]
    checkpoints: list[tuple[int, float | None, str]]  # (step, validation AP, path) of those kept


def train_stage(config: Config, progress: bool = True) -> TrainSummary:
    """Train in this process, resuming the run's latest checkpoint if there is one."""
    config, classes = prepare_training(config)
    seed_everything(config.train.seed)
    device = resolve_device(config.train.device)
    dataset = training_dataset(config)
    schedule = StepSchedule.of(config.train, len(dataset))
    store = CheckpointStore(config.run.folder().checkpoints, config.train.keep_checkpoints)
    store.remove_partials()
    latest = store.latest()
    model = build_model(config, len(classes)) if latest else initial_model(config, len(classes))
    training = Training(config, model.to(device), device, schedule.total_steps, schedule.steps_per_epoch)
    if latest is not None:
        training.load_state_dict(checkpoints.load(latest, device))
    hooks = training_hooks(config, schedule, LocalSink(store), {"config": config_record(config), "classes": classes},
                           progress=progress)
    try:
        last = fit(training, dataset, schedule, hooks,
                   loaders=loader_processes(config.train, _cpus(), MOST_LOCAL_LOADERS))
    except TrainingDiverged as error:
        sound = store.sound()
        raise TrainingDiverged(error.step, error.term, error.value, str(sound) if sound else None, config.run.name,
                               config.optim.lr) from None
    model_path = checkpoints.export_model(checkpoints.load(store.best(), device), prepared_category_ids(config),
                                          config.run.folder().model)
    return TrainSummary(model_path, training.step, training.skipped, last, store.entries())


def _cpus() -> int:
    """The CPUs this process may run on (a container's or taskset's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
