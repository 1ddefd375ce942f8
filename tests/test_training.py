import copy
import math
import re
import warnings

import pytest
import torch

from pipeline.checkpoints import CheckpointStore, save_atomic
from pipeline.data.dataset import GlobalBatchSampler, RunBatchSampler, epoch_order
from pipeline.errors import DataError, NoSpace
from pipeline.training.loop import LearningRateFactor

GROUPS = [range(0, 4), range(4, 8), range(8, 11)]


def test_epoch_order_is_a_permutation_that_keeps_row_groups_together():
    order = epoch_order(GROUPS, seed=3, epoch=0)
    assert sorted(order) == list(range(11))
    starts = [i for i in range(11) if i == 0 or not any(order[i - 1] in g and order[i] in g for g in GROUPS)]
    assert len(starts) == 3  # each row group is read as one contiguous run
    assert epoch_order(GROUPS, 3, 0) == order and epoch_order(GROUPS, 3, 1) != order


def test_global_batches_do_not_depend_on_the_number_of_processes():
    single = list(GlobalBatchSampler(GROUPS, global_batch=4, seed=1, epoch=2))
    shares = [list(GlobalBatchSampler(GROUPS, 4, 1, 2, rank=r, world_size=2)) for r in range(2)]
    assert len(single) == 2  # 11 images: the incomplete last batch is dropped
    for step, batch in enumerate(single):
        assert shares[0][step] + shares[1][step] == batch
        assert all(epoch == 2 for _, epoch in batch)
    resumed = list(GlobalBatchSampler(GROUPS, 4, 1, 2, start=1))
    assert resumed == single[1:]


def test_a_run_takes_the_epochs_batches_in_turn_and_resumes_at_any_step():
    epochs = [batch for epoch in range(3) for batch in GlobalBatchSampler(GROUPS, 4, 1, epoch, rank=1, world_size=2)]
    run = RunBatchSampler(GROUPS, 4, 1, start=0, stop=5, rank=1, world_size=2)
    assert len(run) == 5 and list(run) == epochs[:5]
    for start in range(5):
        assert list(RunBatchSampler(GROUPS, 4, 1, start=start, stop=5, rank=1, world_size=2)) == epochs[start:5]


def test_batch_must_split_evenly_over_processes():
    with pytest.raises(ValueError, match="multiple of the number of workers"):
        GlobalBatchSampler(GROUPS, global_batch=5, seed=0, epoch=0, world_size=2)


def test_learning_rate_warmup_and_decay():
    multistep = LearningRateFactor(100, warmup_steps=10, warmup_factor=0.25, schedule="multistep",
                                   milestones=(0.5, 0.8), gamma=0.1)
    assert multistep(0) == pytest.approx(0.25)
    assert multistep(5) == pytest.approx(0.25 + 0.75 * 0.5)
    assert [multistep(s) for s in (10, 49, 50, 79, 80, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = LearningRateFactor(100, 0, 1.0, "cosine", (), 0.1)
    assert [cosine(s) for s in (0, 50, 100)] == pytest.approx([1, 0.5, 0])
    assert cosine(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_checkpoint_store_keeps_latest_and_best(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    for step, score in [(1, 0.1), (2, 0.5), (3, None), (4, 0.3), (5, 0.2)]:
        store.save(step, {"step": step}, score)
    kept = sorted(p.name for p in tmp_path.glob("*.pt"))
    assert kept == ["step-0000002.pt", "step-0000004.pt", "step-0000005.pt"]  # keep=3 keeps 3
    assert store.latest().name == "step-0000005.pt" and store.best().name == "step-0000002.pt"
    assert torch.load(store.best())["step"] == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_a_checkpoint_that_does_not_fit_names_its_path_and_leaves_the_store_as_it_was(small_disk):
    store = CheckpointStore(small_disk / "checkpoints", keep=2)
    store.save(1, {"weights": torch.zeros(1000)}, None)
    with pytest.raises(NoSpace, match=f"^no space left on {small_disk}/checkpoints/step-0000002.pt: "):
        store.save(2, {"weights": torch.zeros(10_000_000)}, None)  # 40 MB on a 30 MB disk
    assert sorted(path.name for path in (small_disk / "checkpoints").iterdir()) == ["index.json", "step-0000001.pt"]
    assert store.latest().name == "step-0000001.pt"


def test_what_a_crash_cut_short_is_removed_on_the_next_start(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    store.save(1, {"step": 1}, 0.5)
    (tmp_path / ".step-0000002.pt.0f0f.tmp").write_bytes(b"PK")  # killed while writing
    save_atomic({"step": 3}, tmp_path / "step-0000003.pt")  # killed before the index named it
    store.remove_partials()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index.json", "step-0000001.pt"]
    assert store.best().name == "step-0000001.pt"


def _tiny_training(*overrides, steps_per_epoch=None):
    from pipeline.config import load_config
    from pipeline.model import build_model
    from pipeline.training.loop import Training, seed_everything

    config = load_config(None, ["model.min_size=64", "model.max_size=64", "optim.warmup_steps=2",
                                "optim.warmup_factor=0.5", "optim.grad_clip=0", *overrides])
    seed_everything(0)
    return Training(config, build_model(config, num_classes=2), torch.device("cpu"), steps=4,
                    steps_per_epoch=steps_per_epoch)


def _batch(with_boxes: bool):
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    boxes = torch.tensor([[8.0, 8.0, 40.0, 40.0]]) if with_boxes else torch.zeros(0, 4)
    labels = torch.tensor([1]) if with_boxes else torch.zeros(0, dtype=torch.int64)
    return images, [{"boxes": boxes, "labels": labels} for _ in images]


def _step(training, hook):
    hook.before_step(training)
    return training.train_step(*_batch(True))


def test_training_steps_follow_the_delta_and_lr_schedules():
    from pipeline.training.hooks import DeltaScheduling

    training = _tiny_training("loss.delta.kind=linear", "loss.delta.start=1.0", "loss.delta.end=0.2")
    assert training.detector.criterion.delta == 1.0  # the schedule's start, before any hook
    hook = DeltaScheduling(training.config.loss.delta.build(), training.total_steps)
    seen = [_step(training, hook) for _ in range(4)]
    assert [m["delta"] for m in seen] == pytest.approx([1.0, 0.8, 0.6, 0.4])
    # warm-up from half the base lr over 2 steps, then x0.1 past 67 % of the 4 steps
    base = training.config.optim.lr
    assert [m["lr"] for m in seen] == pytest.approx([0.5 * base, 0.75 * base, base, 0.1 * base])
    assert training.step == 4 and training.skipped == 0


def test_batches_without_positives_are_skipped_and_counted():
    training = _tiny_training()
    before = {k: v.clone() for k, v in training.detector.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning the user cannot act on (the scheduler's)
        metrics = training.train_step(*_batch(False))
    assert metrics["positives"] == 0 and training.skipped == 1 and training.step == 1
    assert all(torch.equal(before[k], v) for k, v in training.detector.state_dict().items())
    training.train_step(*_batch(True))
    assert any(not torch.equal(before[k], v) for k, v in training.detector.state_dict().items())


def test_alrp_self_balance_updates_once_per_epoch_and_resumes():
    training = _tiny_training("loss.classification=alrp", steps_per_epoch=2)
    balance = training.detector.criterion.self_balance
    assert balance.period == 2 and balance.weight.item() == 50.0
    first = training.train_step(*_batch(True))
    assert balance.weight.item() == 50.0  # the first step of the epoch keeps the initial weight
    second = training.train_step(*_batch(True))
    # The box term is the weighted localisation loss: 50 L_loc in both steps.
    localisation = [first["box_loss"] / 50, second["box_loss"] / 50]
    classification = [first["cls_loss"], second["cls_loss"]]
    assert balance.weight.item() == pytest.approx((sum(classification) + sum(localisation)) / sum(localisation))
    state = training.state_dict()
    resumed = _tiny_training("loss.classification=alrp", steps_per_epoch=2)
    resumed.load_state_dict(state)
    assert resumed.detector.criterion.self_balance.weight.item() == balance.weight.item()
    assert _tiny_training("loss.classification=alrp", "loss.self_balance_period=3").detector.criterion \
        .self_balance.period == 3


@pytest.mark.parametrize("classification", ["alrp", "rs"])
def test_ranking_family_trains(classification):
    training = _tiny_training(f"loss.classification={classification}", "loss.delta.start=0.5")
    before = {k: v.clone() for k, v in training.detector.state_dict().items()}
    metrics = training.train_step(*_batch(True))
    assert metrics["positives"] > 0 and math.isfinite(metrics["loss"]) and metrics["box_loss"] > 0
    moved = [k for k, v in training.detector.state_dict().items() if not torch.equal(before[k], v)]
    assert any("classification_head" in k for k in moved) and any("regression_head" in k for k in moved)


def test_cpu_amp_runs_the_trunk_in_bfloat16_and_ranks_float32_logits():
    torch.manual_seed(1)
    images, targets = _batch(True)
    seen, losses = {}, {}
    for cpu_amp in (False, True):
        training = _tiny_training(f"train.cpu_amp={str(cpu_amp).lower()}")
        detector = training.detector
        detector.backbone.body.register_forward_hook(
            lambda module, inputs, output, amp=cpu_amp: seen.__setitem__(("trunk", amp), output["0"].dtype))
        detector.backbone.fpn.register_forward_hook(
            lambda module, inputs, output, amp=cpu_amp: seen.__setitem__(("pyramid", amp), output["0"].dtype))
        detector.criterion.register_forward_pre_hook(
            lambda module, inputs, amp=cpu_amp: seen.__setitem__(("logits", amp), inputs[0].dtype))
        losses[cpu_amp] = training.train_step(images, targets)
    assert seen == {("trunk", False): torch.float32, ("pyramid", False): torch.float32,
                    ("logits", False): torch.float32, ("trunk", True): torch.bfloat16,
                    ("pyramid", True): torch.float32, ("logits", True): torch.float32}
    # The same objective from the same weights and batch, to bfloat16's rounding of the features.
    assert losses[True]["cls_loss"] == pytest.approx(losses[False]["cls_loss"], rel=0.02)
    assert losses[True]["box_loss"] == pytest.approx(losses[False]["box_loss"], rel=0.05)


def test_cpu_amp_runs_an_ssd_trunk_and_its_extras_in_bfloat16_and_its_head_in_float32():
    torch.manual_seed(1)
    images = [torch.rand(3, 320, 320) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[40.0, 40.0, 200.0, 200.0]]), "labels": torch.tensor([1])} for _ in images]
    seen, losses = {}, {}
    for cpu_amp in (False, True):
        training = _tiny_training("model.arch=ssdlite_mobilenet_v3", "model.min_size=320", "model.max_size=320",
                                  "train.input_size=320", f"train.cpu_amp={str(cpu_amp).lower()}")
        detector = training.detector
        detector.backbone.register_forward_hook(lambda module, inputs, output, amp=cpu_amp: seen.__setitem__(
            ("trunk", amp), {feature.dtype for feature in output.values()}))
        detector.head.register_forward_pre_hook(lambda module, inputs, amp=cpu_amp: seen.__setitem__(
            ("head", amp), {feature.dtype for feature in inputs[0]}))
        detector.criterion.register_forward_pre_hook(
            lambda module, inputs, amp=cpu_amp: seen.__setitem__(("logits", amp), inputs[0].dtype))
        losses[cpu_amp] = training.train_step(images, targets)
        gradients = [p.grad for p in detector.parameters() if p.grad is not None]
        assert gradients and all(torch.isfinite(gradient).all() for gradient in gradients)
    assert seen == {("trunk", False): {torch.float32}, ("head", False): {torch.float32},
                    ("logits", False): torch.float32, ("trunk", True): {torch.bfloat16},
                    ("head", True): {torch.float32}, ("logits", True): torch.float32}
    assert losses[True]["cls_loss"] == pytest.approx(losses[False]["cls_loss"], rel=0.02)
    assert losses[True]["box_loss"] == pytest.approx(losses[False]["box_loss"], rel=0.05)


def test_training_state_round_trips():
    training = _tiny_training()
    training.train_step(*_batch(True))
    state = training.state_dict()
    resumed = _tiny_training()
    resumed.load_state_dict(state)
    assert resumed.step == 1 and resumed.scheduler.last_epoch == training.scheduler.last_epoch
    batch = _batch(True)
    after_original = training.train_step(*batch)
    after_resumed = resumed.train_step(*batch)
    assert after_resumed["loss"] == pytest.approx(after_original["loss"], rel=1e-6)


def test_log_lines_carry_the_step_time_and_eta(tmp_path, capsys):
    from pipeline.training.hooks import training_hooks
    from pipeline.training.loop import StepSchedule

    training = _tiny_training(f"run.output_dir={tmp_path}")
    schedule = StepSchedule(steps_per_epoch=4, total_steps=4, log_every=2, eval_every=100, checkpoint_every=100)
    hooks = training_hooks(training.config, schedule, sink=None, extra_state={}, progress=False)
    for hook in hooks:
        hook.before_train(training)
    for _ in range(2):
        for hook in hooks:
            hook.before_step(training)
        metrics = training.train_step(*_batch(True)) | {"batch_seconds": 0.5}
        for hook in hooks:
            hook.after_step(training, metrics)
    # Two global batches in 1 s of batches and steps, the hooks' own time left out.
    assert metrics["images_per_s"] == pytest.approx(2 * training.config.train.batch_size / (2 * 0.5))
    (line,) = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"step 2/4 loss=\S+ cls_loss=\S+ box_loss=\S+ .*images_per_s=\S+ \| "
                        r"\d+\.\d\d s/step, ETA 00:\d\d", line), line


def test_weight_average_follows_its_recurrence_and_is_applied_and_removed():
    from pipeline.training.averaging import WeightAverage

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average = WeightAverage(model, decay=0.9)
    expected = 1.0
    for n, value in enumerate([3.0, -2.0, 5.0, 0.5, 7.0, 4.0, -1.0, 2.0, 6.0, 3.0, 1.0, 8.0, 9.0, 2.0], start=1):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update(model)
        keep = min(0.9, (1 + n) / (10 + n))  # the ramp reaches 0.9 at the 80th update, so never here
        expected = keep * expected + (1 - keep) * value
    assert average.weights["weight"].item() == pytest.approx(expected, rel=1e-6)
    assert average.decay_at(80) == pytest.approx(0.9) and average.decay_at(1000) == 0.9
    with average.applied(model):
        assert model.weight.item() == pytest.approx(expected, rel=1e-6)
    assert model.weight.item() == 2.0
    with pytest.raises(ValueError, match="decay must be in"):
        WeightAverage(model, decay=1.0)


def test_the_average_resumes_as_if_never_stopped_and_is_what_is_validated_and_exported(tmp_path):
    from pipeline.checkpoints import export_model, load

    training = _tiny_training("train.ema_decay=0.5")
    training.train_step(*_batch(True))
    state = copy.deepcopy(training.state_dict())  # as saved: the live state shares the momentum buffers
    resumed = _tiny_training("train.ema_decay=0.5")
    resumed.load_state_dict(state)
    batch = _batch(True)
    for run in (training, resumed):
        run.train_step(*batch)
    own = {k: v.clone() for k, v in training.detector.state_dict().items()}
    averaged = training.average.weights
    for name, value in resumed.average.weights.items():
        torch.testing.assert_close(value, averaged[name], rtol=1e-6, atol=1e-7)
    moved = [k for k in averaged if not torch.equal(averaged[k], own[k])]
    assert moved  # two steps in, the average trails the weights
    with training.evaluated_weights():
        assert all(torch.equal(training.detector.state_dict()[k], averaged[k]) for k in moved)
    assert all(torch.equal(training.detector.state_dict()[k], own[k]) for k in own)
    exported = load(export_model({**training.state_dict(), "config": {}, "classes": ["a", "b"]}, [1, 2],
                                 tmp_path / "model.pt"))
    assert all(torch.equal(exported["model"][k], averaged[k]) for k in averaged)
    assert "average" not in exported and set(exported["model"]) == set(own)
    with pytest.raises(DataError, match="no weight average: it was saved with train.ema_decay=0"):
        _tiny_training("train.ema_decay=0.5").load_state_dict(_tiny_training().state_dict())
