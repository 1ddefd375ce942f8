"""model.init: each form loads what it names (weights equal the file's), a class-count change
re-initialises only the classification outputs, and whatever does not fit is named."""
import contextlib
import functools
import http.server
import math
import threading
import zipfile
from collections.abc import Iterator

import pytest
import torch
from torchvision.models import resnet18
from torchvision.ops import FrozenBatchNorm2d

from aploss.architectures import IMAGENET_WEIGHTS, classification_outputs
from pipeline import checkpoints
from pipeline.config import config_record, load_config
from pipeline.data.synthetic import coco_settings, write_synthetic_coco
from pipeline.errors import DataError, MissingInput
from pipeline.model import bind_init, build_model, initial_model
from pipeline.orchestration.cli import main
from pipeline.orchestration.tracking import connection, pipeline_runs, registry

SMALL = ["model.arch=retinanet_r18", "model.min_size=96", "model.max_size=96"]


def _config(tmp_path, *overrides):
    return load_config(None, [*SMALL, f"run.output_dir={tmp_path / 'runs'}", *overrides])


def _trunk_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision ResNet-18 state dict as a classification checkpoint holds it, BN statistics
    included, every value distinct from an untrained model's."""
    torch.manual_seed(seed)
    trunk = resnet18()
    for value in trunk.state_dict().values():
        if value.is_floating_point():
            value.copy_(torch.rand_like(value) + 0.5)
    return trunk.state_dict()


def _assert_trunk_loaded(model, weights):
    state = model.state_dict()
    for name, value in weights.items():
        if not name.startswith("fc.") and not name.endswith("num_batches_tracked"):
            assert torch.equal(state[f"backbone.body.{name}"], value), name


def test_imagenet_loads_torchvision_s_weights_through_its_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = _trunk_weights()
    cached = tmp_path / "torch" / "hub" / "checkpoints" / IMAGENET_WEIGHTS["retinanet_r18"].url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.save(weights, cached)
    config = bind_init(_config(tmp_path, "model.init=imagenet"))
    assert config.model.norm == "frozen_bn"  # the field's practice with ImageNet statistics
    model = initial_model(config, 3)
    _assert_trunk_loaded(model, weights)
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)


def test_a_backbone_file_and_url_load_as_imagenet_does(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    weights = _trunk_weights(1)
    (tmp_path / "served").mkdir()
    torch.save({"state_dict": weights}, tmp_path / "served" / "trunk.pth")
    _assert_trunk_loaded(initial_model(bind_init(_config(tmp_path, f"model.init={tmp_path / 'served' / 'trunk.pth'}")),
                                       3), weights)

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/trunk.pth"
        _assert_trunk_loaded(initial_model(bind_init(_config(tmp_path, f"model.init={url}")), 3), weights)
    finally:
        server.shutdown()
    assert len(list((tmp_path / "cache" / "aploss" / "init").glob("*.pt"))) == 1  # cached for the next run
    assert not (tmp_path / "torch").exists()  # torch.hub's cache, which model.init=imagenet reads, untouched

    with pytest.raises(DataError, match=r"norm 'group': .*unexpected bn1\.running_mean"):
        initial_model(_config(tmp_path, f"model.init={tmp_path / 'served' / 'trunk.pth'}", "model.norm=group"), 3)
    with pytest.raises(MissingInput, match="nothing.pt: no such model file"):
        initial_model(_config(tmp_path, f"model.init={tmp_path / 'nothing.pt'}"), 3)


@contextlib.contextmanager
def serving(directory) -> Iterator[str]:
    """An HTTP server on loopback for the files in `directory`; its base URL."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # its log holds the URLs, signatures included
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_a_url_is_downloaded_apart_from_torch_hub_and_named_without_its_signature(tmp_path, monkeypatch, capsys):
    """A presigned URL's signature is printed nowhere; a zip is not unpacked where torchvision's
    ImageNet weights are read; a pickle behind the URL is refused in one line."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    served = tmp_path / "served"
    served.mkdir()
    imagenet_name = IMAGENET_WEIGHTS["retinanet_r18"].url.rsplit("/", 1)[1]
    with zipfile.ZipFile(served / "weights.zip", "w") as archive:
        archive.writestr(imagenet_name, b"poisoned")
    torch.save({"model": print}, served / "code.pt")
    signature = "X-Amz-Signature=5ecret5ignature"
    with serving(served) as base:
        with pytest.raises(DataError) as refused:
            initial_model(_config(tmp_path, f"model.init={base}/weights.zip?{signature}"), 3)
        assert len(str(refused.value).splitlines()) == 1
        with pytest.raises(DataError, match="refused: it holds Python objects") as refused:
            initial_model(_config(tmp_path, f"model.init={base}/code.pt?{signature}"), 3)
        assert len(str(refused.value).splitlines()) == 1
    printed = capsys.readouterr()
    assert "5ecret5ignature" not in printed.out + printed.err
    assert f"downloading model.init {base}/weights.zip?X-Amz-Signature=REDACTED" in printed.err
    assert not (tmp_path / "torch").exists()


def _earlier_run(tmp_path, classes: int = 2, *overrides) -> dict[str, torch.Tensor]:
    config = _config(tmp_path, *overrides)
    torch.manual_seed(7)
    model = build_model(config, classes)
    checkpoints.export_model({"model": model.state_dict(), "config": config_record(config),
                              "classes": [f"c{i}" for i in range(classes)]},
                             list(range(1, classes + 1)), tmp_path / "runs" / "earlier" / "model.pt")
    return model.state_dict()


def test_an_earlier_run_fine_tunes_with_another_class_count(tmp_path, capsys):
    earlier = _earlier_run(tmp_path)
    config = bind_init(_config(tmp_path, "model.init=run:earlier"))
    assert config.model.norm == "group"  # the earlier run's own
    model = initial_model(config, 3)
    outputs = classification_outputs(model)
    assert outputs == ["head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"]
    for name, value in model.state_dict().items():
        if name not in outputs:
            assert torch.equal(value, earlier[name]), name
    bias = model.state_dict()[outputs[1]]
    assert bias.shape == (6 * 3,) and torch.allclose(bias, torch.full_like(bias, -math.log(99)))
    assert "cls_logits.weight, head.classification_head.cls_logits.bias re-initialised for 3 classes" in \
        capsys.readouterr().out

    same = initial_model(config, 2)
    assert all(torch.equal(value, earlier[name]) for name, value in same.state_dict().items())

    with pytest.raises(DataError, match=r"do not fit this model: of another shape head\.regression_head\.bbox_reg"):
        initial_model(_config(tmp_path, "model.init=run:earlier", "model.anchors.scales_per_octave=3"), 2)
    with pytest.raises(MissingInput, match="run 'nope' has no model.pt"):
        initial_model(_config(tmp_path, "model.init=run:nope"), 2)


def test_a_registered_model_is_fetched_and_fine_tuned(tmp_path):
    earlier = _earlier_run(tmp_path)
    source = _config(tmp_path)
    experiment = connection.configure(source)
    parent = pipeline_runs.pipeline_run(source, experiment)
    with pipeline_runs.active(pipeline_runs.stage_run(experiment, parent, "train")[0]):
        registry.log_model(tmp_path / "runs" / "earlier" / "model.pt", source)
    config = _config(tmp_path, "model.init=models:/aploss-bccd/1", "run.name=tuned")
    with pytest.raises(MissingInput, match="an MLflow model URI is fetched by the aploss commands"):
        initial_model(config, 2)
    registry.fetch_source(config.model.init, config, "model.init")
    model = initial_model(bind_init(config), 2)
    assert all(torch.equal(value, earlier[name]) for name, value in model.state_dict().items())


def test_training_from_an_earlier_run_on_the_cli(tmp_path, capsys):
    write_synthetic_coco(tmp_path / "data", {"train": 4, "val": 2})
    data = [*coco_settings(tmp_path / "data"), "train.batch_size=2", "train.max_steps=1",
            "train.eval_every=1", *SMALL, f"run.output_dir={tmp_path / 'runs'}"]
    assert main(["prep", *data]) == 0
    assert main(["train", *data, "run.name=first"]) == 0
    assert main(["train", *data, "run.name=second", "model.init=run:first"]) == 0
    saved = torch.load(tmp_path / "runs" / "second" / "model.pt", weights_only=True)
    assert saved["config"]["model"]["init"] == "run:first" and saved["config"]["model"]["norm"] == "group"
    assert main(["train", *data, "run.name=third", "model.init=run:missing"]) == 2
    assert "model.init=run:missing" in capsys.readouterr().err
