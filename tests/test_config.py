import pytest

from aploss.schedules import CosineDelta, StepDelta
from pipeline.config import Config, ConfigError, config_from_dict, config_to_dict, flatten, load_config, save_config


def test_defaults_are_valid_and_round_trip(tmp_path):
    config = load_config()
    assert config == Config()
    path = tmp_path / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config
    assert config_from_dict(config_to_dict(config)) == config


def test_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.05\nloss:\n  delta: {kind: step, start: 1.0, end: 0.25}\n")
    config = load_config(path, ["optim.lr=0.02", "train.batch_size=4", "optim.milestones=[0.5, 0.9]"])
    assert config.optim.lr == 0.02 and config.train.batch_size == 4 and config.optim.milestones == [0.5, 0.9]
    assert config.loss.delta.build() == StepDelta(1.0, 0.25, (0.5, 0.75))
    assert load_config(None, ["loss.delta.kind=cosine", "loss.delta.end=0.1"]).loss.delta.build() == \
        CosineDelta(1.0, 0.1, 0.0, 1.0)


def test_exponent_numbers_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  weight_decay: 5E-5\n")
    config = load_config(path, ["loss.delta.end=2e-1"])
    assert (config.optim.lr, config.optim.weight_decay, config.loss.delta.end) == (1e-3, 5e-5, 0.2)


def test_flatten_uses_dotted_keys():
    flat = flatten(Config())
    assert flat["optim.lr"] == 0.02 and flat["loss.delta.kind"] == "constant" and flat["data.annotations"] == {}


@pytest.mark.parametrize("overrides, message", [
    (["optim.lr=-1"], "optim.lr: must be > 0"),
    (["optim.foo=1"], r"unknown key\(s\) \['optim.foo'\]"),
    (["nosection.x=1"], r"unknown key\(s\) \['nosection'\]"),
    (["model.arch=yolo"], "model.arch: must be one of"),
    (["train.epochs=1.5"], "train.epochs: must be an integer"),
    (["train.amp=maybe"], "train.amp: must be true or false"),
    (["model.fg_iou=0.3"], "model.fg_iou: need 0 < bg_iou <= fg_iou"),
    (["loss.delta.kind=step", "loss.delta.milestones=[]"], "loss.delta: .*at least one milestone"),
    (["optim.milestones=[0.9, 0.5]"], "optim.milestones: must be increasing"),
    (["loss.classification=lrp"], "loss.classification: must be one of"),
    (["loss.self_balance_period=-1"], r"loss.self_balance_period: must be >= 0 \(0: once per epoch\)"),
    (["loss.self_balance_initial=0"], "loss.self_balance_initial: must be > 0"),
    (["data.dataset=coco"],
     "data.annotations: dataset 'coco' \\(your own COCO instances json\\) needs one json per split"),
    (["optim.lr"], "must look like section.key=value"),
    (["run.name=.."], r"run.name: must be 1 to 200 letters, digits, '.', '_' or '-', not starting with '.', got '..'"),
    (["run.name=it's"], "run.name: must be 1 to 200 letters"),
    (["run.name=a/b"], "run.name: must be 1 to 200 letters"),
    (["run.name="], "run.name: must be 1 to 200 letters"),
    ([f"run.name={'r' * 201}"], "run.name: must be 1 to 200 letters"),
    (["model.arch=ssd300_vgg16", "train.input_size=512"], "train.input_size: ssd300_vgg16 takes 300x300 inputs"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        load_config(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: the config must be a YAML mapping"):
        load_config(listing)
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key\(s\) \['optim.learning_rate'\]"):
        load_config(typo)


def test_a_config_extends_another_and_changes_its_keys(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {lr: 0.02, momentum: 0.8}\ntrain: {epochs: 3}\n")
    (tmp_path / "twin.yaml").write_text("extends: base.yaml\noptim: {lr: 0.05}\n")
    config = load_config(tmp_path / "twin.yaml", ["train.epochs=5"])
    assert (config.optim.lr, config.optim.momentum, config.train.epochs) == (0.05, 0.8, 5)
    (tmp_path / "base.yaml").write_text("extends: twin.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "twin.yaml")


def test_box_loss_and_weight_average_are_checked_and_agree_with_the_library():
    import typing

    from aploss.detection_loss import BOX_LOSSES
    from pipeline.config import LossConfig

    assert typing.get_args(typing.get_type_hints(LossConfig)["box_loss"]) == BOX_LOSSES
    assert load_config(None, ["loss.box_loss=giou", "train.ema_decay=0.99"]).loss.box_loss == "giou"
    with pytest.raises(ConfigError, match="loss.box_loss: is for ap and focal: alrp has its own GIoU term"):
        load_config(None, ["loss.classification=alrp", "loss.box_loss=giou"])
    with pytest.raises(ConfigError, match=r"train.ema_decay: must be in \[0, 1\) \(0: off\), got 1.0"):
        load_config(None, ["train.ema_decay=1.0"])
