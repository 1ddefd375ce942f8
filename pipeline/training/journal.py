"""The per-step metrics of a training run, as a JSON-lines journal beside its checkpoints.

The journal is the run's record of its curves: written by the training process (rank 0) as it
goes, and read by `tracking.forwarding.MetricsForwarder`, which sends it to MLflow, so that training never
waits on the tracking server. A resumed run replays the steps after its last checkpoint; the
journal keeps the first record of each step, so every step is recorded once.
"""
import json
import os
import time

from pipeline.errors import naming_full_disk
from pipeline.storage import Location, Where

# The per-step curves of a run, as MLflow shows them (with "val_ap" at validations).
CURVES = ("loss", "cls_loss", "box_loss", "delta", "lr", "images_per_s")
TRAINING = "train"
VALIDATION = "val"


def _kind(record: dict) -> str:
    return VALIDATION if "val_ap" in record else TRAINING


def read_journal(path: Where) -> list[dict]:
    """The complete records of the journal at `path` (a torn last line, left by a killed
    writer, is not one); [] if there is none."""
    try:
        text = Location(path).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


class MetricsJournal:
    """Appends records {"step": N, ...} to `path`, each step of each kind (training metrics,
    validation AP) once. In an object store, which cannot append, each record rewrites the
    journal whole (a few hundred bytes per logged step)."""

    def __init__(self, path: Where) -> None:
        self.path = Location(path)
        records = read_journal(self.path)
        self._text = "".join(json.dumps(record) + "\n" for record in records) if self.path.remote else ""
        if not self.path.remote:
            self.path.local().parent.mkdir(parents=True, exist_ok=True)
            self._truncate_torn_line()
        self.last_step = {TRAINING: 0, VALIDATION: 0}
        for record in records:
            kind = _kind(record)
            self.last_step[kind] = max(self.last_step[kind], record["step"])

    def _truncate_torn_line(self) -> None:
        path = self.path.local()
        if not path.exists():
            return
        data = path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            with open(path, "r+b") as handle:
                handle.truncate(complete)

    def write(self, step: int, metrics: dict[str, float]) -> bool:
        """Append the record unless this step of its kind is recorded already; True if written."""
        record = {"step": step, "time": time.time(), **metrics}
        kind = _kind(record)
        if step <= self.last_step[kind]:
            return False
        line = json.dumps(record) + "\n"
        if self.path.remote:
            self.path.write_text(self._text + line)
            self._text += line
        else:
            with naming_full_disk(self.path), open(self.path.local(), "a") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        self.last_step[kind] = step
        return True
