"""Loader processes change how fast batches come, never which: the same batches, and the same
weights after training, interrupted and resumed or not, with 0 and 2 of them; and they end with
the training process, however it ends."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aploss import kernels
from pipeline.config import ConfigError, TrainConfig, load_config
from pipeline.data.bindings import split_dir
from pipeline.data.dataset import DetectionDataset, RunBatchSampler
from pipeline.data.prep import prepare
from pipeline.data.shards import ShardReader
from pipeline.data.synthetic import coco_settings, write_synthetic_coco
from pipeline.training.local import train_stage
from pipeline.training.loop import Training, loader_processes, training_batches


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader_data")
    # 256 px: large enough for torch to split a resize or a contrast's mean over threads, which
    # rounds differently from one thread (a loader process's).
    write_synthetic_coco(root, {"train": 12, "val": 2}, size=256)
    return root


def _config(data_root, output, name, *overrides):
    config = load_config(None, [
        *coco_settings(data_root), "model.min_size=64", "model.max_size=64",
        "train.augment=ssd", "train.input_size=64", "train.batch_size=4", "train.epochs=2", "train.eval_every=1000",
        "train.checkpoint_every=1", "optim.warmup_steps=2", f"run.output_dir={output}", f"run.name={name}",
        *overrides])
    return config.with_prepared(prepare(config, progress=False).directory)


def _batches(config, loaders: int) -> list:
    dataset = DetectionDataset(ShardReader(split_dir(config, "train")), hflip=0.5, seed=3, augment="ssd",
                               input_size=96)
    sampler = RunBatchSampler(dataset.reader.row_groups(), global_batch=4, seed=3, start=0, stop=6)
    return list(training_batches(dataset, sampler, loaders, pin_memory=False))


def test_the_batches_of_two_epochs_are_the_same_with_and_without_loader_processes(data_root, tmp_path):
    config = _config(data_root, tmp_path, "batches")
    alone, loaded = _batches(config, 0), _batches(config, 2)
    assert len(alone) == len(loaded) == 6  # 12 images, 3 global batches an epoch
    for (images, targets, ids), (images_2, targets_2, ids_2) in zip(alone, loaded):
        assert ids == ids_2
        assert all(torch.equal(a, b) for a, b in zip(images, images_2, strict=True))
        for target, target_2 in zip(targets, targets_2, strict=True):
            assert torch.equal(target["boxes"], target_2["boxes"]) and torch.equal(target["labels"], target_2["labels"])


class _Interrupted(Exception):
    pass


def _weights(summary) -> dict:
    return torch.load(summary.model_path, weights_only=True)["model"]


def _same(weights: dict, others: dict) -> bool:
    return weights.keys() == others.keys() and all(torch.equal(weights[key], others[key]) for key in weights)


def test_training_takes_the_same_steps_with_loader_processes_and_through_a_resume(data_root, tmp_path,
                                                                                  monkeypatch):
    alone = _weights(train_stage(_config(data_root, tmp_path, "alone", "train.loader_workers=0"), progress=False))
    loaded = _config(data_root, tmp_path, "loaded", "train.loader_workers=2")
    assert _same(alone, _weights(train_stage(loaded, progress=False)))
    step = Training.train_step

    def interrupted(training, images, targets):
        if training.step == 4:  # the resume starts at the second epoch's second batch
            raise _Interrupted
        return step(training, images, targets)

    resumed = _config(data_root, tmp_path, "resumed", "train.loader_workers=2")
    with monkeypatch.context() as patch:
        patch.setattr(Training, "train_step", interrupted)
        with pytest.raises(_Interrupted):
            train_stage(resumed, progress=False)
    summary = train_stage(resumed, progress=False)
    assert summary.steps == 6 and _same(alone, _weights(summary))


def test_auto_loader_processes_take_the_cpus_beyond_the_training_step():
    auto = TrainConfig()
    assert auto.loader_workers == -1
    assert [loader_processes(auto, cpus) for cpus in (0.5, 1, 2.5, 8)] == [0, 0, 1, 7]
    assert loader_processes(auto, 64, most=4) == 4
    assert loader_processes(TrainConfig(loader_workers=3), 1) == 3
    with pytest.raises(ConfigError, match=r"train.loader_workers: must be >= 0, or -1 \(auto\), got -2"):
        load_config(None, ["train.loader_workers=-2"])


def _processes() -> dict[int, tuple[int, str]]:
    """Every live process: its parent and its command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            state, parent = stat[stat.rindex(")") + 2:].split()[:2]
            if state != "Z":
                found[int(entry.name)] = (int(parent), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError):
            continue
    return found


def _multiprocessing_descendants(pid: int) -> set[int]:
    """The forkserver, the loader processes it forked and the resource tracker under `pid`."""
    processes, found = _processes(), {pid}
    while grown := {child for child, (parent, _) in processes.items() if parent in found} - found:
        found |= grown
    return {child for child in found - {pid} if "multiprocessing" in processes[child][1]}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGTERM])
def test_loader_processes_end_with_a_killed_training(data_root, tmp_path, signal_number):
    # They used to outlive `aploss train` (about 1.3 GB each), one pair 88 minutes later.
    kernels.loaded()  # compiled here first, so the killed process is not compiling it
    overrides = [
        *coco_settings(data_root), "model.min_size=64", "model.max_size=64",
        "train.batch_size=4", "train.max_steps=100000", "train.eval_every=100000", "train.loader_workers=2",
        f"run.output_dir={tmp_path}", "run.name=killed"]
    command = [sys.executable, "-m", "pipeline.orchestration.cli"]
    subprocess.run([*command, "prep", *overrides], check=True, capture_output=True)
    training = subprocess.Popen([*command, "train", *overrides], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(helpers := _multiprocessing_descendants(training.pid)) < 4:  # forkserver, 2 loaders, tracker
        assert training.poll() is None and time.monotonic() < deadline, "training never started its loaders"
        time.sleep(0.5)
    os.kill(training.pid, signal_number)
    training.wait()
    deadline = time.monotonic() + 15
    while (left := helpers & set(_processes())) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == set()
