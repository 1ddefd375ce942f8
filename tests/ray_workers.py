"""Hooks for the Ray Train workers of the tests (pickled by value: Ray workers cannot import tests/).
Each is made on a worker from the run's config and the worker's rank, and runs before the run's own."""
import json
import os
import signal
import time

from pipeline.errors import DataError
from pipeline.storage import Location
from pipeline.training.loop import HookBase


class WorkerHook(HookBase):
    def __init__(self, config, rank):
        self.config, self.rank = config, rank


class FlakyHooks(WorkerHook):
    """Records each attempt's steps in <output_dir>/steps.jsonl; on the first attempt, rank 1
    kills its own process at the step <output_dir>/kill_at names (before that step's checkpoint)."""

    def after_step(self, training, metrics):
        output = Location(self.config.run.output_dir)  # a local directory or an object store
        killed = output / "killed"
        attempt = 2 if killed.exists() else 1
        if self.rank == 0:
            log = output / "steps.jsonl"
            before = log.read_text() if log.exists() else ""
            log.write_text(before + json.dumps({"attempt": attempt, "step": training.step}) + "\n")
        if attempt == 1 and self.rank == 1 and training.step == int((output / "kill_at").read_text()):
            # Ray restarts from the latest checkpoint its controller has registered; give it the
            # moment it takes to collect the last report, as a real failure would.
            time.sleep(3)
            killed.write_bytes(b"")
            os.kill(os.getpid(), signal.SIGKILL)


class BrokenDevice(WorkerHook):
    """Fails on every attempt, as a bad node would."""

    def before_train(self, training):
        raise OSError("the GPU fell off the bus")


class Bug(WorkerHook):
    """A bug in this project's code."""

    def before_train(self, training):
        raise KeyError("positives")


class BadInput(WorkerHook):
    """Bad input: the user's to fix, on every attempt."""

    def before_train(self, training):
        raise DataError("shard.parquet: row group 3 is not this project's")


class PlacementHooks(WorkerHook):
    """Records, at each attempt's first step, which Ray node each rank runs on, in
    <output_dir>/placement/ (a local directory or an object store)."""

    recorded = False

    def after_step(self, training, metrics):
        if not self.recorded:
            import ray

            node = ray.get_runtime_context().get_node_id()
            where = Location(self.config.run.output_dir) / "placement" / f"{training.step}-{self.rank}-{os.getpid()}"
            where.write_text(json.dumps({"step": training.step, "rank": self.rank, "node": node}))
            self.recorded = True
