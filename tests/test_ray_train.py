"""Ray Train: 2 gloo workers on the global batch equal one process; a killed worker resumes."""
import json

import pytest
import ray
import torch

from pipeline.config import load_config
from pipeline.data.prep import prepare
from pipeline.data.synthetic import coco_settings, write_synthetic_coco
from pipeline.errors import TrainingDiverged, TrainingFailed, UserError, WorkerRefused
from pipeline.orchestration.cli import _met_outside
from pipeline.training.local import train_stage
from pipeline.training.ray_train import train_distributed
from tests import ray_workers


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(ray_workers)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_data")
    write_synthetic_coco(root, {"train": 8, "val": 2})
    return root


def _config(data_root, output, name, *overrides):
    config = load_config(None, [
        *coco_settings(data_root), "model.min_size=96", "model.max_size=96",
        "train.batch_size=4", "train.epochs=100", "optim.warmup_steps=2", "train.eval_every=1000",
        f"run.output_dir={output}", f"run.name={name}", *overrides])
    prepare(config, progress=False)
    return config


def _weights(path):
    return torch.load(path, weights_only=False)["model"]


def _assert_same_weights(left, right):
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=1e-4, atol=2e-6, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("classification", ["ap", "focal", "alrp", pytest.param("rs", marks=pytest.mark.slow)])
def test_two_workers_take_the_single_process_step(ray_cluster, data_root, tmp_path, classification):
    overrides = ["train.max_steps=1", f"loss.classification={classification}", "ray.workers=2"]
    distributed = _config(data_root, tmp_path, "ddp", *overrides)
    _, model_path = train_distributed(distributed)
    single = train_stage(_config(data_root, tmp_path, "single", *overrides), progress=False)
    _assert_same_weights(_weights(model_path), _weights(single.model_path))
    untrained = _config(data_root, tmp_path, "untrained", *overrides)
    from pipeline.model import build_model
    from pipeline.training.loop import seed_everything
    seed_everything(untrained.train.seed)
    initial = build_model(untrained, 2).state_dict()
    moved = [k for k in initial if not torch.equal(initial[k], _weights(model_path)[k])]
    assert len(moved) > len(initial) // 2  # the step did change the weights


def test_relative_paths_mean_the_driver_s_directories(ray_cluster, data_root, monkeypatch):
    # The main job's defaults: run.output_dir "runs" and the data root from $APLOSS_DATA_ROOT, both
    # relative to the driver; Ray Train workers start in Ray's session directory.
    monkeypatch.setenv("APLOSS_DATA_ROOT", data_root.name)
    monkeypatch.chdir(data_root.parent)
    config = _config("", "runs", "relative", "train.max_steps=1", "ray.workers=2")
    _, model_path = train_distributed(config)
    assert model_path == data_root.parent / "runs" / "relative" / "model.pt" and model_path.exists()


def test_killed_worker_resumes_from_the_latest_checkpoint(ray_cluster, data_root, tmp_path):
    overrides = ["train.max_steps=6", "train.checkpoint_every=2", "ray.workers=2", "ray.max_failures=1"]
    (tmp_path / "kill_at").write_text("5")
    config = _config(data_root, tmp_path, "flaky", *overrides)
    result, model_path = train_distributed(config, extra_hooks=[ray_workers.FlakyHooks])
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    first = [s["step"] for s in steps if s["attempt"] == 1]
    second = [s["step"] for s in steps if s["attempt"] == 2]
    assert first == [1, 2, 3, 4, 5]
    assert second == [5, 6]  # resumed after the step-4 checkpoint: step 5 (never saved) reruns
    assert result.metrics["step"] == 6
    # The same 2-worker run without the failure (same reduction order, so a rounding-level match):
    # no step was lost or repeated. Against one process, float differences of the summation
    # order grow over several steps, which the first-step test covers instead.
    _, clean_path = train_distributed(_config(data_root, tmp_path / "clean", "clean", *overrides))
    _assert_same_weights(_weights(model_path), _weights(clean_path))


def test_divergence_on_the_workers_stops_the_run_at_once(ray_cluster, data_root, tmp_path):
    # Workers return rather than raise: Ray would restart the group to diverge again, max_failures times.
    config = _config(data_root, tmp_path, "diverging", "train.max_steps=20", "train.checkpoint_every=1",
                     "train.log_every=1", "ray.workers=2", "ray.max_failures=2", "optim.lr=1e6", "optim.grad_clip=0",
                     "optim.warmup_steps=0")
    with pytest.raises(TrainingDiverged) as error:
        train_distributed(config)
    assert "training diverged at step" in str(error.value)
    assert not (tmp_path / "diverging" / "model.pt").exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "diverging" / "train" / "metrics.jsonl").open()]
    # One attempt, each step once, stopped at the diverging step.
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] <= error.value.step


def test_a_run_that_keeps_failing_ends_as_one_line_naming_the_cause(ray_cluster, data_root, tmp_path):
    config = _config(data_root, tmp_path, "broken", "train.max_steps=2", "ray.workers=2", "ray.max_failures=1")
    with pytest.raises(TrainingFailed) as error:
        train_distributed(config, extra_hooks=[ray_workers.BrokenDevice])
    message = str(error.value)
    assert message.startswith("distributed training of run 'broken' failed after 1 restart(s): ")
    assert message.endswith("OSError: the GPU fell off the bus") and "\n" not in message
    # Met outside the project (a device, a node): one line at the CLI, --debug for the traceback.
    assert not isinstance(error.value, UserError) and _met_outside(error.value)


def test_a_bug_on_a_worker_keeps_its_traceback(ray_cluster, data_root, tmp_path):
    config = _config(data_root, tmp_path, "buggy", "train.max_steps=2", "ray.max_failures=0")
    with pytest.raises(TrainingFailed) as error:
        train_distributed(config, extra_hooks=[ray_workers.Bug])
    assert str(error.value).endswith("KeyError: 'positives'")
    assert {type(cause) for cause in error.value.causes} == {KeyError}  # each worker's, as raised
    assert not _met_outside(error.value)  # so the CLI lets it through with its traceback


def test_a_user_error_on_a_worker_is_one_line_for_the_user(ray_cluster, data_root, tmp_path):
    config = _config(data_root, tmp_path, "refused", "train.max_steps=2", "ray.max_failures=0")
    with pytest.raises(WorkerRefused) as error:
        train_distributed(config, extra_hooks=[ray_workers.BadInput])
    assert isinstance(error.value, UserError)
    assert str(error.value) == ("distributed training of run 'refused' failed after 0 restart(s): "
                                "shard.parquet: row group 3 is not this project's")
