"""Validation and evaluation on several workers give the single-process numbers exactly: the
slices, validation gathered from 2 and 3 gloo processes, the evaluate and robustness stages on
Ray tasks, and validation inside a Ray Train run.

Every comparison runs both sides at one torch thread: CPU kernels round differently with the
thread count. Every other validation image is wider than it is tall, so a batch's padding, which
GroupNorm sees, depends on its company: slices that broke the single-process batches would show.
"""
import contextlib
import dataclasses
import json
from collections.abc import Iterator
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torchvision.io import read_image, write_png

from pipeline.config import Config, load_config
from pipeline.data.prep import prepare
from pipeline.data.synthetic import coco_settings, write_synthetic_coco
from pipeline.evaluation import evaluate
from pipeline.evaluation.evaluate import validation_ap
from pipeline.inference.detection import detection_slices, pack_detections, unpack_detections
from pipeline.model import load_model
from pipeline.training.preparation import training_data
from tests.distributed_worker import spawn_group
from tests.process_environment import environment

CPU = torch.device("cpu")


def test_slices_are_whole_single_process_batches_in_order():
    def batch(*indices):
        return list(indices)

    assert detection_slices(7, 2, 3) == [[batch(0, 1), batch(2, 3)], [batch(4, 5)], [batch(6)]]
    assert detection_slices(10, 3, 2) == [[batch(0, 1, 2), batch(3, 4, 5)], [batch(6, 7, 8), batch(9)]]
    assert detection_slices(5, 4, 3) == [[batch(0, 1, 2, 3)], [batch(4)], []]  # fewer batches than workers
    assert detection_slices(4, 2, 1) == [[batch(0, 1), batch(2, 3)]]
    for images in range(12):
        for batch_size in range(1, 5):
            (single,) = detection_slices(images, batch_size, 1)
            for workers in range(1, 6):
                slices = detection_slices(images, batch_size, workers)
                assert len(slices) == workers
                assert [b for part in slices for b in part] == single  # the same batches, in order
                sizes = [len(part) for part in slices]
                assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1


def test_packed_detections_unpack_to_the_same_dicts():
    detections = [{"image_id": 1003, "category_id": 7, "bbox": [1.5, 2.25, 30.125, 0.1], "score": 0.7},
                  {"image_id": 12, "category_id": 1, "bbox": [0.0, 0.0, 1.0, 2.0], "score": 0.05}]
    detections = [{**d, "bbox": torch.tensor(d["bbox"]).tolist(), "score": torch.tensor(d["score"]).item()}
                  for d in detections]  # float32 values, as the detector makes them
    unpacked = unpack_detections(pack_detections(detections))
    assert json.dumps(unpacked) == json.dumps(detections)
    assert unpack_detections(pack_detections([])) == []


def _widen_every_other(json_path, image_dir) -> None:
    """Every other image half as wide again (dark on the right), boxes unchanged."""
    coco = json.loads(json_path.read_text())
    for image in coco["images"][1::2]:
        path = image_dir / image["file_name"]
        pixels = read_image(str(path))
        write_png(torch.cat([pixels, torch.zeros_like(pixels)[:, :, :pixels.shape[2] // 2]], dim=2), str(path))
        image["width"] = pixels.shape[2] * 3 // 2
    json_path.write_text(json.dumps(coco))


def _config(root, name: str, *overrides: str) -> Config:
    return load_config(None, [
        *coco_settings(root / 'data'), "model.min_size=96", "model.max_size=96",
        # An all but untrained model: every candidate counts, so there is something to compare; at
        # the pyramid width and lr its two steps were sized with, which leave some boxes found (AP > 0).
        "model.score_thresh=0.0", "model.detections_per_image=20", "train.batch_size=4", "train.epochs=100",
        "train.max_steps=2", "optim.warmup_steps=2", "model.fpn_channels=128", "optim.lr=0.01",
        "train.eval_every=1000", "eval.batch_size=2",
        "eval.sample_images=1", "ray.workers=2", f"run.output_dir={root / 'runs'}", f"run.name={name}", *overrides])


def _with(config: Config, **sections: dict) -> Config:
    """`config` with some settings of some sections changed."""
    return dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name), **settings)
                                          for name, settings in sections.items()})


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """8 training and 7 validation images, prepared."""
    root = tmp_path_factory.mktemp("distributed_eval")
    layout = write_synthetic_coco(root / "data", {"train": 8, "val": 7})
    _widen_every_other(*layout["val"])
    prepare(_config(root, "data"), progress=False)
    return root


@pytest.fixture(scope="module")
def trained(data_root):
    """A config bound to the prepared data, and a model trained two steps on it in this process,
    with BatchNorm, whose statistics can differ between ranks."""
    from pipeline.training.local import train_stage

    config = _config(data_root, "trained", "model.norm=batch")
    model_path = train_stage(config, progress=False).model_path
    return training_data(config)[0], model_path


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # "local": an instance of its own, even beside a cluster that runs on this machine. A local
    # ray.init() sets RAY_AUTH_MODE=token in this process for good: restored after, or later
    # tests' job clients would leave their token to the one Ray cached here.
    with environment({}):
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        yield
        ray.shutdown()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def _scored() -> Iterator[list[list[dict]]]:
    """The detections validation scores, as it scores them (rank 0's gathered ones in a group)."""
    scored, original = [], evaluate.evaluate_detections

    def capture(ground_truth, detections):
        scored.append(detections)
        return original(ground_truth, detections)

    evaluate.evaluate_detections = capture
    try:
        yield scored
    finally:
        evaluate.evaluate_detections = original


class _Kept:
    """A checkpoint sink that keeps what it is handed."""

    def __init__(self) -> None:
        self.saved = []

    def save(self, step: int, state: dict | None, val_ap: float | None) -> None:
        self.saved.append((step, state is not None, val_ap))


def _validate_in_group(rank: int, world_size: int, config: Config, model_path, init_file: str, out_dir: str) -> None:
    """One process of a group: the training hooks at a validated step."""
    from pipeline.training.hooks import Checkpointing
    from pipeline.training.journal import MetricsJournal
    from pipeline.training.loop import StepSchedule, Training

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    model = load_model(model_path, CPU)[0]
    if rank > 0:  # BatchNorm statistics as each rank's own slice of the last step leaves them
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.add_(0.1 * rank)
    training, sink = Training(config, model, CPU, steps=10), _Kept()
    training.step = 1
    schedule = StepSchedule(steps_per_epoch=10, total_steps=10, log_every=100, eval_every=1, checkpoint_every=100)
    with _scored() as scored:
        journal = MetricsJournal(config.run.folder().journal) if rank == 0 else None
        Checkpointing(config, schedule, sink, {}, journal, rank=rank).after_step(training, {})
    torch.save({"saved": sink.saved, "scored": scored}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # without it, some runs hang in destroy_process_group
    dist.destroy_process_group()


# 7 images in batches of 3 are 3 batches: 2 + 1 for two processes, 1 + 1 + 1 for three.
@pytest.mark.parametrize("world_size", [2, 3])
def test_validation_gathered_from_a_process_group_equals_one_process(trained, one_thread, tmp_path, world_size):
    config, model_path = trained
    config = _with(config.for_run(f"group-{world_size}"), eval={"batch_size": 3})
    spawn_group(_validate_in_group, world_size, (world_size, config, model_path, str(tmp_path / "init"), str(tmp_path)))
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]
    with _scored() as scored:
        expected_ap = validation_ap(load_model(model_path, CPU)[0], config, CPU)
    (expected,) = scored
    assert len(expected) > 7  # something to compare: several detections per image
    assert results[0] == {"saved": [(1, True, expected_ap)], "scored": [expected]}
    assert all(result == {"saved": [(1, False, None)], "scored": []} for result in results[1:])  # rank 0 scores
    journal = (config.run.folder().root / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["val_ap"] for line in journal] == [expected_ap]


def test_evaluation_on_ray_says_that_ray_must_be_started(trained):
    import ray

    if ray.is_initialized():
        pytest.skip("Ray is running in this process already")
    from pipeline.evaluation.stages import evaluate_stage

    config, model_path = trained
    with pytest.raises(RuntimeError, match=r"^eval.workers=2 detects on Ray, which is not initialised: call "
                                           r"pipeline.orchestration.run.start_ray first$"):
        evaluate_stage(_with(config.for_run("no-ray"), eval={"workers": 2}), model_path)


def test_the_evaluate_stage_on_ray_equals_one_process(trained, one_thread, ray_cluster, monkeypatch):
    from pipeline.evaluation import stages

    config, model_path = trained
    on_ray, detect_on_ray = [], stages._detect_on_ray

    def spy(*args):
        on_ray.append(args)
        return detect_on_ray(*args)

    monkeypatch.setattr(stages, "_detect_on_ray", spy)

    def evaluated(workers: int, postprocessing: tuple[str, ...] = ()) -> tuple[str, str]:
        evaluation = stages.evaluate_stage(_with(config.for_run(f"eval-{workers}"), eval={"workers": workers}),
                                           model_path, postprocessing)
        return evaluation.metrics_path.read_text(), evaluation.detections_path.read_text()

    expected = evaluated(0)
    assert not on_ray and len(json.loads(expected[1])) > 7
    # 7 images in batches of 2: 4 batches, then 2 + 2, then 2 + 1 + 1 per worker.
    for workers in (1, 2, 3):
        assert evaluated(workers) == expected, f"eval.workers={workers}"
    assert len(on_ray) == 3
    # The workers' models take the same postprocessing overrides as this process's.
    fewer = ("model.detections_per_image=2",)
    assert evaluated(2, fewer) == evaluated(0, fewer) != expected


def test_robustness_on_ray_equals_one_process(trained, one_thread, ray_cluster):
    from pipeline.evaluation.stages import robustness_stage

    config, _ = trained
    config = _with(config, robustness={"occlusion": [0.5], "noise": [0.1], "corruptions": []})

    def ap(workers: int) -> dict[str, float]:
        ((result, _),) = robustness_stage(_with(config, eval={"workers": workers}), progress=False).values()
        return result.ap

    expected = ap(0)
    assert list(expected) == ["clean", "occlusion@0.5", "noise@0.1"] and expected["clean"] > 0
    assert ap(2) == expected


def test_validation_in_a_ray_train_run_equals_one_process(data_root, one_thread, ray_cluster):
    from pipeline.training.ray_train import train_distributed

    # BatchNorm: each worker's statistics move with its own slice, and validation must use rank
    # 0's, which the checkpoint holds (the AP of this model is too low to tell alone; the process
    # group test compares the detections). 7 images in batches of 3 are 2 + 1 batches per worker.
    config = _config(data_root, "ray-train", "model.norm=batch", "train.eval_every=2", "eval.batch_size=3")
    _, model_path = train_distributed(config)
    journal = (data_root / "runs" / "ray-train" / "train" / "metrics.jsonl").read_text().splitlines()
    (validated,) = [record for record in map(json.loads, journal) if "val_ap" in record]
    assert validated["step"] == 2
    model = load_model(model_path, CPU)[0]
    assert validated["val_ap"] == validation_ap(model, training_data(config)[0], CPU)
