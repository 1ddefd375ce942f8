"""What a training run does around its steps, one small hook per concern, the same in one
process and in every Ray Train worker: the δ schedule, metrics to the run's journal and
console, validation and checkpoints (`training_hooks` lists them in their order).

The two ways of running differ only in where a checkpoint goes (a `CheckpointSink`: files of
the run, or `ray.train.report`); the loss terms are already global means (`Training`), so no
rank needs to reduce them here.
"""
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch.distributed as dist
from tqdm import tqdm

from pipeline.checkpoints import CheckpointStore
from pipeline.config import Config
from pipeline.evaluation.evaluate import validation_ap
from pipeline.redaction import redact
from pipeline.training.journal import CURVES, MetricsJournal
from pipeline.training.loop import HookBase, StepSchedule, Training


class CheckpointSink(Protocol):
    def save(self, step: int, state: dict[str, Any] | None, val_ap: float | None) -> None:
        """Keep `state` (rank 0's; None on other ranks) of `step`, scored by `val_ap` if validated."""


class LocalSink:
    """Checkpoint files of the run (`CheckpointStore`): one process holds the whole run."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store

    def save(self, step: int, state: dict[str, Any] | None, val_ap: float | None) -> None:
        self.store.save(step, state, val_ap)


def say(line: str) -> None:
    # Ray Train 2.60 echoes a worker's print() twice on the driver's console; a plain write once.
    sys.stdout.write(redact(line) + "\n")
    sys.stdout.flush()


class DeltaScheduling(HookBase):
    """Sets the loss's δ before each step from its schedule over the run's progress."""

    def __init__(self, schedule: Callable[[float], float], total_steps: int) -> None:
        self.schedule, self.total_steps = schedule, total_steps

    def before_step(self, training: Training) -> None:
        training.detector.criterion.set_delta(self.schedule(min(training.step / self.total_steps, 1.0)))


class MetricsLogging(HookBase):
    """Rank 0 journals the curves every `log_every` steps, with images/s over the steps since the
    last record (their batches' wait and the steps themselves: no validation or checkpoint), and
    adds it and the skipped count to those steps' metrics; it shows them as a progress bar or as
    lines with the time left at this process's pace (validation and checkpoints included)."""

    def __init__(self, config: Config, schedule: StepSchedule, journal: MetricsJournal | None,
                 progress: bool = False) -> None:
        self.config, self.schedule, self.journal = config, schedule, journal
        self.progress = progress and journal is not None
        self.bar: tqdm | None = None
        self.window_seconds, self.window_steps = 0.0, 0
        self.pace_start, self.pace_steps = time.perf_counter(), 0

    def before_train(self, training: Training) -> None:
        self.pace_start = time.perf_counter()
        if self.progress:
            self.bar = tqdm(total=self.schedule.total_steps, initial=training.step, desc="train", unit="step")

    def after_step(self, training: Training, metrics: dict[str, float]) -> None:
        step = training.step
        self.window_seconds += metrics["batch_seconds"]
        self.window_steps += 1
        self.pace_steps += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.schedule.logs(step):
            metrics |= {"images_per_s": self.window_steps * self.config.train.batch_size / self.window_seconds,
                        "skipped": training.skipped}
            self._log(step, metrics)
            self.window_seconds, self.window_steps = 0.0, 0

    def after_train(self, training: Training) -> None:
        """Ends the progress bar's line, so that what follows (an error) starts a line of its own."""
        if self.bar is not None:
            self.bar.close()

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        if self.journal is None:
            return
        self.journal.write(step, {key: metrics[key] for key in (*CURVES, "skipped")})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", cls=f"{metrics['cls_loss']:.3f}",
                                 box=f"{metrics['box_loss']:.3f}", lr=f"{metrics['lr']:.2g}",
                                 img_s=f"{metrics['images_per_s']:.1f}")
        else:
            seconds_per_step = (time.perf_counter() - self.pace_start) / self.pace_steps
            left = seconds_per_step * (self.schedule.total_steps - step)
            say(f"step {step}/{self.schedule.total_steps} " + " ".join(f"{k}={metrics[k]:.4g}" for k in CURVES)
                + f" | {seconds_per_step:.2f} s/step, ETA {tqdm.format_interval(left)}")


class Checkpointing(HookBase):
    """At a checkpoint every rank checks the weights and, when due, detects its slice of the
    validation split, which rank 0 scores and journals; rank 0 hands the state to the sink."""

    def __init__(self, config: Config, schedule: StepSchedule, sink: CheckpointSink, extra_state: dict[str, Any],
                 journal: MetricsJournal | None, rank: int = 0, progress: bool = False) -> None:
        self.config, self.schedule, self.sink, self.extra_state = config, schedule, sink, extra_state
        self.journal, self.rank, self.progress = journal, rank, progress

    def after_step(self, training: Training, metrics: dict[str, float]) -> None:
        step = training.step
        if not self.schedule.checkpoints(step):
            return
        training.check_weights()  # the same weights on every rank: all of them stop, or none
        val_ap = self._validate(training, step) if self.schedule.validates(step) else None
        state = {**training.state_dict(), **self.extra_state} if self.rank == 0 else None
        self.sink.save(step, state, val_ap)

    def _validate(self, training: Training, step: int) -> float | None:
        """Every rank detects its slice of the validation split (one process: all of it); rank 0
        scores the whole, journals it and returns it, the others None."""
        started = time.perf_counter()
        with training.evaluated_weights():
            if dist.is_initialized() and dist.get_world_size() > 1:
                # Each rank's BatchNorm statistics moved with its own slice of the last step, and DDP
                # hands out rank 0's only at the next forward: validate with rank 0's, the checkpoint's.
                for buffer in training.detector.buffers():
                    dist.broadcast(buffer, src=0)
            val_ap = validation_ap(training.detector, self.config, training.device)
        if self.rank != 0:
            return None
        self.journal.write(step, {"val_ap": val_ap})
        if not self.progress:
            say(f"validation at step {step}: AP {val_ap:.3f} on {self.config.data.val_split} "
                f"({time.perf_counter() - started:.0f} s)")
        return val_ap


def training_hooks(config: Config, schedule: StepSchedule, sink: CheckpointSink, extra_state: dict[str, Any],
                   rank: int = 0, progress: bool = False) -> list[HookBase]:
    """A run's hooks, in their order: the δ for the step, then (after it) its metrics, then the
    checkpoint, whose validation line follows the step's."""
    journal = MetricsJournal(config.run.folder().journal) if rank == 0 else None
    progress = progress and rank == 0
    return [DeltaScheduling(config.loss.delta.build(), schedule.total_steps),
            MetricsLogging(config, schedule, journal, progress),
            Checkpointing(config, schedule, sink, extra_state, journal, rank, progress)]
