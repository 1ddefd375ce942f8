"""Ray Train worker functions for the tests (pickled by value: Ray workers cannot import tests/)."""
import json
import os
import signal
import time
from pathlib import Path

from pipeline.training.hooks import TrainingHooks
from pipeline.training.ray_train import run_worker


class FlakyHooks(TrainingHooks):
    """Records each attempt's steps in <output_dir>/steps.jsonl; on the first attempt, rank 1
    kills its own process at the step <output_dir>/kill_at names."""

    def after_step(self, training, metrics):
        output = Path(self.config.run.output_dir)
        killed = output / "killed"
        attempt = 2 if killed.exists() else 1
        if self.rank == 0:
            with (output / "steps.jsonl").open("a") as log:
                log.write(json.dumps({"attempt": attempt, "step": training.step}) + "\n")
        if attempt == 1 and self.rank == 1 and training.step == int((output / "kill_at").read_text()):
            # Ray restarts from the latest checkpoint its controller has registered; give it the
            # moment it takes to collect the last report, as a real failure would.
            time.sleep(3)
            killed.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        super().after_step(training, metrics)


def flaky_worker(payload: dict) -> None:
    run_worker(payload, FlakyHooks)


def broken_worker(payload: dict) -> None:
    """A worker that fails on every attempt, as a bug or a bad node would."""
    raise OSError("the GPU fell off the bus")
