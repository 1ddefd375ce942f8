"""Distributed training with Ray Train: `TorchTrainer` workers in DDP, one global batch.

Every worker runs the same `Training` and `fit` as a single process, on its slice of each
global batch, with the AP-loss ranking the pairs of all workers together
(`ProcessGroupBatch`) and every loss term scaled so that, after DDP averages gradients,
the parameter update equals one process holding the whole batch. Checkpoints go through
`ray.train.report`, so a failed worker group restarts from the latest one (FailureConfig) and
a rerun with the same run name resumes where the run stopped.
"""
import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import ray.train
import ray.train.collective
import ray.train.torch
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    CheckpointUploadMode,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchConfig, TorchTrainer

from aploss.distributed import ProcessGroupBatch
from pipeline import checkpoints
from pipeline.config import Config, config_from_dict, config_record
from pipeline.data.bindings import prepared_category_ids
from pipeline.errors import NoSpace, TrainingDiverged, TrainingFailed, UserError, WorkerRefused, one_line
from pipeline.io import write_json_atomic
from pipeline.model import build_model, initial_model
from pipeline.quiet import quiet_third_party, ray_log_level
from pipeline.storage import Location
from pipeline.training.hooks import say, training_hooks
from pipeline.training.loop import (
    HookBase,
    StepSchedule,
    Training,
    fit,
    loader_processes,
    seed_everything,
    training_dataset,
)
from pipeline.training.preparation import prepare_training

STATE_FILE = "state.pt"
SCORE = "score"


class RaySink:
    """Checkpoints through `ray.train.report`, which every rank calls (it is a barrier). Ray keeps
    the best by `score`, which must be a number in every report (its saved state turns NaN into
    null, which a resumed run cannot compare): validation AP, or -1, below any AP, for
    checkpoints kept for resuming only.

    Rank 0 writes each checkpoint into Ray's run folder itself, atomically, and Ray registers it
    as it is: Ray's own upload copies in place, which a full disk or a kill cut short into a
    folder that looked like a checkpoint. When rank 0's disk is full, every rank stops at that
    checkpoint (`StoppedTogether`) rather than Ray restarting the group to fill it again."""

    def __init__(self, run_folder: Location) -> None:
        self.run_folder = run_folder

    def save(self, step: int, state: dict | None, val_ap: float | None) -> None:
        report = {"step": step, SCORE: -1.0 if val_ap is None else val_ap}
        if val_ap is not None:
            report["val_ap"] = val_ap
        name = checkpoint_name(step)
        checkpoint, full = None, None
        if state is not None:
            try:
                checkpoints.save_atomic(state, self.run_folder / name / STATE_FILE)
                storage = ray.train.get_context().get_storage()
                checkpoint = Checkpoint(f"{storage.experiment_fs_path}/{name}", storage.storage_filesystem)
            except NoSpace as error:
                (self.run_folder / name).delete_tree()
                full = error.where
        if (full := ray.train.collective.broadcast_from_rank_zero(full)) is not None:
            raise StoppedTogether({"no_space": full})
        ray.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=name,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def checkpoint_name(step: int) -> str:
    """The folder of a run's checkpoint of `step` in Ray Train's storage."""
    return f"checkpoint_{step:07d}"


def state_at(config: Config, run_name: str, step: int) -> Location:
    """The training state that run `run_name` checkpointed at `step`."""
    return storage_path(config) / run_name / checkpoint_name(step) / STATE_FILE


class StoppedTogether(Exception):
    """Every rank stops at the same step, for a reason (`record`) that restarting cannot mend."""

    def __init__(self, record: dict) -> None:
        super().__init__(record)
        self.record = record


# A hook of a worker's beside the run's own (a test's, a benchmark's), made there from the config and the rank.
ExtraHook = Callable[[Config, int], HookBase]


def run_worker(payload: dict) -> None:
    """One Ray Train worker: DDP model, its share of every global batch, resumed if Ray hands
    it a checkpoint. A failure is one line here (Ray's own logs of it are quieted): Ray Train
    restarts the workers, or the driver ends the run with the error."""
    quiet_third_party()
    try:
        _work(payload)
    except Exception as error:
        say(f"training worker {ray.train.get_context().get_world_rank()} failed: {one_line(error)} (Ray Train "
            "restarts the workers from their latest checkpoint, up to ray.max_failures times)")
        raise


def _work(payload: dict) -> None:
    config = config_from_dict(payload["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    seed_everything(config.train.seed)
    device = ray.train.torch.get_device()
    batch = ProcessGroupBatch() if world_size > 1 else None
    checkpoint, seed = ray.train.get_checkpoint(), payload["seed"]
    # DDP hands every rank rank 0's weights when it wraps the model: only rank 0 reads model.init.
    start = initial_model if checkpoint is None and seed is None and rank == 0 else build_model
    model = ray.train.torch.prepare_model(start(config, len(payload["classes"]), batch))
    dataset = training_dataset(config)
    schedule = StepSchedule.of(config.train, len(dataset))
    training = Training(config, model, device, schedule.total_steps, schedule.steps_per_epoch)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            training.load_state_dict(checkpoints.load(Path(directory) / STATE_FILE, device))
        if rank == 0:
            say(f"resumed at step {training.step}")
    elif seed is not None:
        training.load_state_dict(checkpoints.load(seed, device))
        if rank == 0:
            say(f"started from {seed} at step {training.step}")
    hooks = [make(config, rank) for make in payload["extra_hooks"]] + training_hooks(
        config, schedule, RaySink(storage_path(config) / config.run.name),
        {"config": payload["config"], "classes": payload["classes"]}, rank=rank)
    try:
        try:
            fit(training, dataset, schedule, hooks, rank, world_size,
                loader_processes(config.train, config.ray.cpus_per_worker), payload["until"])
        except TrainingDiverged as error:
            # Every rank sees the same global values, so all stop at this step.
            raise StoppedTogether({"step": error.step, "term": error.term, "value": error.value}) from None
    except StoppedTogether as stop:
        # Returning rather than raising keeps Ray from restarting the group into the same end;
        # the driver reads why.
        if rank == 0:
            write_json_atomic(stop.record, _stopped_path(config))


def _stopped_path(config: Config) -> Location:
    return config.run.folder().stopped


def storage_path(config: Config) -> Location:
    """Ray Train's checkpoints and state, beside the run's other outputs (Ray opens an object
    store's URI with pyarrow.fs, as this project does)."""
    return config.run.outputs().ray


class QuietController(ray.train.UserCallback):
    """Quiets Ray Train's controller as the driver and the workers are: the controller unpickles
    its callbacks, the one place where this project's code runs in it."""

    def __reduce__(self) -> tuple:
        return _quiet_controller, ()


def _quiet_controller() -> QuietController:
    quiet_third_party()
    return QuietController()


def build_trainer(config: Config, classes: list[str], extra_hooks: Sequence[ExtraHook] = (),
                  callbacks: list | None = None, seed: Location | None = None,
                  until: int | None = None) -> TorchTrainer:
    """The Ray Train run of `config`, which must be prepared for training (`prepare_training`);
    `extra_hooks` (each made on a worker from the config and the rank) run before the run's own.
    A run that has no checkpoint of its own starts from the training state `seed` if given (a
    PBT segment's), and one given `until` stops after that step."""
    # Workers need no credentials (the driver talks to MLflow), and Ray keeps what it is handed.
    payload = {"config": config_record(config.with_absolute_paths()), "classes": classes,
               "extra_hooks": list(extra_hooks), "seed": None if seed is None else str(seed), "until": until}
    ray_config = config.ray
    return TorchTrainer(
        run_worker, train_loop_config=payload,
        scaling_config=ScalingConfig(num_workers=ray_config.workers, use_gpu=ray_config.use_gpu,
                                     resources_per_worker={"CPU": ray_config.cpus_per_worker},
                                     placement_strategy=ray_config.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if ray_config.use_gpu else "gloo"),
        run_config=RunConfig(
            name=config.run.name, storage_path=str(storage_path(config)),
            callbacks=[*(callbacks or []), QuietController()],
            failure_config=FailureConfig(max_failures=ray_config.max_failures),
            # Ray Train's controller configures its own loggers (resource requests, worker group).
            logging_config=LoggingConfig(log_level=ray_log_level()),
            # Ray keeps the latest beside the best num_to_keep.
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints - 1,
                                               checkpoint_score_attribute=SCORE, checkpoint_score_order="max")))


def ray_checkpoints(result: ray.train.Result) -> list[tuple[int, float | None, str]]:
    """(step, validation AP, path) of the checkpoints Ray Train kept, as `TrainSummary.checkpoints`."""
    return sorted((metrics["step"], metrics.get("val_ap"), checkpoint.path)
                  for checkpoint, metrics in result.best_checkpoints)


def best_state(result: ray.train.Result) -> dict:
    """The state of the checkpoint `checkpoints.best` picks among those Ray kept."""
    kept = sorted(result.best_checkpoints, key=lambda pair: pair[1]["step"])
    checkpoint = checkpoints.best([(metrics.get("val_ap"), checkpoint) for checkpoint, metrics in kept])
    if checkpoint is None:
        raise RuntimeError(f"training run '{result.path}' produced no checkpoint")
    with checkpoint.as_directory() as directory:
        return checkpoints.load(Path(directory) / STATE_FILE)


def _failed(config: Config, error: BaseException) -> TrainingFailed | WorkerRefused:
    """The error of a run that failed after its restarts: the workers' own errors as Ray hands
    them back (`WorkerGroupError.worker_failures`), else Ray's (a lost controller)."""
    causes = tuple(error.worker_failures.values()) if isinstance(error, ray.train.WorkerGroupError) else ()
    refused = [cause for cause in causes if isinstance(cause, UserError)]
    detail = str(refused[0]) if refused else one_line((causes or (error,))[0])
    message = f"distributed training of run '{config.run.name}' failed after {config.ray.max_failures} restart(s): "
    return WorkerRefused(message + detail) if refused else TrainingFailed(message + detail, causes)


def _fit_interruptibly(trainer: TorchTrainer) -> ray.train.Result:
    """`trainer.fit()` in a thread of its own, so that Ctrl-C reaches the driver as
    KeyboardInterrupt (the run ends KILLED, and the same command resumes it): in the main thread,
    Ray Train installs its own SIGINT handler, which aborts the run and exits the process with
    status 1, no message, and the MLflow runs FAILED."""
    outcome: dict[str, object] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 -- handed to the driver's thread as it is
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        # The controller and workers are this driver's: they end with its Ray connection.
        ray.shutdown()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def fit_run(config: Config, trainer: TorchTrainer) -> ray.train.Result:
    """`trainer.fit()`, with TrainingFailed (the workers' error in one line) for a run that
    failed after its restarts, TrainingDiverged (with its best validated checkpoint) or NoSpace
    for one its workers stopped."""
    _stopped_path(config).delete()
    checkpoints.remove_partials(storage_path(config) / config.run.name)
    try:
        result = _fit_interruptibly(trainer)
    except ray.train.TrainingFailedError as error:
        raise _failed(config, error) from error
    if result.error is not None:
        raise _failed(config, result.error) from result.error
    if not (stopped := _stopped_path(config)).exists():
        return result
    info = json.loads(stopped.read_text())
    if "no_space" in info:
        raise NoSpace(info["no_space"])
    kept = sorted(result.best_checkpoints, key=lambda pair: pair[1]["step"])
    sound = checkpoints.sound([(metrics.get("val_ap"), checkpoint) for checkpoint, metrics in kept])
    raise TrainingDiverged(info["step"], info["term"], info["value"],
                           f"{sound.path}/{STATE_FILE}" if sound is not None else None, config.run.name,
                           config.optim.lr)


def train_distributed(config: Config, extra_hooks: Sequence[ExtraHook] = ()) -> tuple[ray.train.Result, Location]:
    """Fit on Ray Train and write the best weights as the run's model.pt (as `train_stage` does)."""
    config, classes = prepare_training(config)
    result = fit_run(config, build_trainer(config, classes, extra_hooks))
    model_path = config.run.folder().model
    return result, checkpoints.export_model(best_state(result), prepared_category_ids(config), model_path)
