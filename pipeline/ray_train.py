"""Distributed training with Ray Train: `TorchTrainer` workers in DDP, one global batch.

Every worker runs the same `Training` and `fit` as a single process, on its slice of each
global batch, with the AP-loss ranking the pairs of all workers together
(`ProcessGroupExchange`) and every loss term scaled so that, after DDP averages gradients,
the parameter update equals one process holding the whole batch. Checkpoints go through
`ray.train.report`, so a failed worker group restarts from the latest one (FailureConfig) and
a rerun with the same run name resumes where the run stopped.
"""
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlflow
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from aploss.distributed import ProcessGroupExchange
from pipeline import checkpoints
from pipeline.config import Config, config_from_dict, config_to_dict
from pipeline.dataset import DetectionDataset
from pipeline.shards import ShardReader
from pipeline.stages import due, validation_ap
from pipeline.train import Training, build_model, fit, seed_everything, total_steps

STATE_FILE = "state.pt"
LOGGED = ("loss", "cls_loss", "box_loss", "delta", "lr", "images_per_s")


def _say(line: str) -> None:
    # Ray Train 2.60 echoes a worker's print() twice on the driver's console; a plain write once.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class RayHooks:
    """Rank-averaged metrics to stdout and MLflow (rank 0), validation and checkpoints through
    `ray.train.report` (every rank calls it: it is a barrier)."""

    def __init__(self, config: Config, payload: dict, rank: int, world_size: int, steps_per_epoch: int) -> None:
        self.config, self.payload = config, payload
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = steps_per_epoch
        self.client = mlflow.MlflowClient(payload["tracking_uri"]) if payload.get("mlflow_run_id") and rank == 0 else None
        self.window_seconds, self.window_steps = 0.0, 0

    def _averaged(self, metrics: dict[str, float]) -> dict[str, float]:
        values = torch.tensor([metrics["loss"], metrics["cls_loss"], metrics["box_loss"]], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(values)
            values /= self.world_size
        return {**metrics, "loss": values[0].item(), "cls_loss": values[1].item(), "box_loss": values[2].item()}

    def after_step(self, training: Training, metrics: dict[str, float]) -> None:
        step, last, train = training.step, training.total_steps, self.config.train
        self.window_seconds += metrics["step_seconds"]
        self.window_steps += 1
        if step % train.log_every == 0 or step == last:
            metrics = self._averaged(metrics)
            metrics["images_per_s"] = self.window_steps * train.batch_size / self.window_seconds
            self.window_seconds, self.window_steps = 0.0, 0
            if self.rank == 0:
                _say(f"step {step}/{last} " + " ".join(f"{k}={metrics[k]:.4g}" for k in LOGGED))
                if self.client:
                    for key in LOGGED:
                        self.client.log_metric(self.payload["mlflow_run_id"], key, metrics[key], step=step)
        checkpoint_due = due(step, train.checkpoint_every, self.steps_per_epoch, last)
        eval_due = due(step, train.eval_every, self.steps_per_epoch, last)
        if checkpoint_due or eval_due:
            self._report(training, step, eval_due)

    def _report(self, training: Training, step: int, evaluate: bool) -> None:
        # NaN ranks below every score in Ray's best-K ordering: checkpoints kept for resuming only.
        report = {"step": step, "skipped": training.skipped, "val_ap": math.nan}
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if self.rank == 0:
                if evaluate:
                    report["val_ap"] = validation_ap(training.detector, self.config, training.device)
                    if self.client:
                        self.client.log_metric(self.payload["mlflow_run_id"], "val_ap", report["val_ap"], step=step)
                state = {**training.state_dict(), "config": self.payload["config"], "classes": self.payload["classes"]}
                checkpoints.save_atomic(state, Path(directory) / STATE_FILE)
                checkpoint = Checkpoint.from_directory(directory)
            ray.train.report(report, checkpoint=checkpoint)


def run_worker(payload: dict, hooks_class: type = RayHooks) -> None:
    """One Ray Train worker: DDP model, its share of every global batch, resumed if Ray hands
    it a checkpoint."""
    config = config_from_dict(payload["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    seed_everything(config.train.seed)
    device = ray.train.torch.get_device()
    exchange = ProcessGroupExchange() if world_size > 1 else None
    model = ray.train.torch.prepare_model(build_model(config, len(payload["classes"]), exchange))
    train_dir = config.run.prepared_data(config.data.dataset) / config.data.train_split
    dataset = DetectionDataset(ShardReader(train_dir), hflip=config.train.hflip, seed=config.train.seed,
                               augment=config.train.augment, input_size=config.train.input_size)
    training = Training(config, model, device, total_steps(config, len(dataset)))
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as directory:
            training.load_state_dict(checkpoints.load(Path(directory) / STATE_FILE, device))
        if rank == 0:
            _say(f"resumed at step {training.step}")
    steps_per_epoch = len(dataset) // config.train.batch_size
    fit(training, dataset, hooks_class(config, payload, rank, world_size, steps_per_epoch), rank, world_size)


def storage_path(config: Config) -> Path:
    return Path(config.run.output_dir).expanduser().resolve() / "ray"


def build_trainer(config: Config, classes: list[str], mlflow_run_id: str | None = None,
                  train_loop: Callable[[dict], None] = run_worker, callbacks: list | None = None) -> TorchTrainer:
    payload = {"config": config_to_dict(config.with_absolute_paths()), "classes": classes, "mlflow_run_id": mlflow_run_id,
               "tracking_uri": config.tracking_uri()}
    ray_config = config.ray
    return TorchTrainer(
        train_loop, train_loop_config=payload,
        scaling_config=ScalingConfig(num_workers=ray_config.workers, use_gpu=ray_config.use_gpu,
                                     resources_per_worker={"CPU": ray_config.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if ray_config.use_gpu else "gloo"),
        run_config=RunConfig(
            name=config.run.name, storage_path=str(storage_path(config)), callbacks=callbacks,
            failure_config=FailureConfig(max_failures=ray_config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints + 1,
                                               checkpoint_score_attribute="val_ap", checkpoint_score_order="max")))


def best_state(result: ray.train.Result) -> dict:
    """The state of the best-validated checkpoint of a finished run (the latest if none was)."""
    scored = [(metrics["val_ap"], checkpoint) for checkpoint, metrics in result.best_checkpoints
              if not math.isnan(metrics.get("val_ap", math.nan))]
    checkpoint = max(scored, key=lambda pair: pair[0])[1] if scored else result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"training run produced no checkpoint: {result.error}")
    with checkpoint.as_directory() as directory:
        return checkpoints.load(Path(directory) / STATE_FILE)


def train_distributed(config: Config, classes: list[str], mlflow_run_id: str | None = None,
                      train_loop: Callable[[dict], None] = run_worker) -> tuple[ray.train.Result, Path]:
    """Fit on Ray Train and write the best weights as the run's model.pt (as `train_stage` does)."""
    result = build_trainer(config, classes, mlflow_run_id, train_loop).fit()
    if result.error is not None:
        raise RuntimeError(f"distributed training failed: {result.error}") from result.error
    state = best_state(result)
    model_path = config.run.directory() / "model.pt"
    checkpoints.save_atomic({"model": state["model"], "config": state["config"], "classes": classes}, model_path)
    return result, model_path
