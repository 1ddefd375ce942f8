"""Configs and model.pt files are bounded before they are walked or built: a few bytes of
references shared many times over, a YAML alias bomb, values that would allocate tens of
gigabytes, a million classes. Each is refused with one line, in well under a second."""
import contextlib
import os
import time
from collections.abc import Iterator

import pytest
import torch

from pipeline.config import MAX_CONFIG_VALUES, load_config
from pipeline.errors import ConfigError, DataError
from pipeline.model import load_model
from pipeline.orchestration.cli import main

CPU = torch.device("cpu")


def shared_lists(levels: int) -> list:
    """A list reaching 8**levels others through shared references: a few KB as a pickle."""
    nested: list = []
    for _ in range(levels):
        nested = [nested] * 8
    return nested


def alias_bomb(levels: int) -> str:
    """YAML whose aliases reach 9**levels strings: some 400 bytes."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for level in range(1, levels + 1):
        lines.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def quickly() -> Iterator[None]:
    started = time.monotonic()
    yield
    assert time.monotonic() - started < 2


def test_a_model_file_of_shared_references_is_refused_quickly(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"config": {"data": {"annotations": shared_lists(12)}}, "classes": ["a"], "model": {}}, path)
    assert path.stat().st_size < 8192
    with pytest.raises(ConfigError, match="nested more than 32 deep"):
        torch.save({"config": {"data": shared_lists(40)}, "classes": ["a"], "model": {}}, tmp_path / "deep.pt")
        load_model(tmp_path / "deep.pt", CPU)
    with quickly(), pytest.raises(ConfigError) as error:
        load_model(path, CPU)
    assert str(error.value) == (f"{path}: config: more than {MAX_CONFIG_VALUES} values (a value reached again "
                                "through a shared reference counts again)")


def test_a_model_file_of_a_million_classes_is_refused_unbuilt(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"config": {}, "classes": [str(index) for index in range(10**6)], "model": {}}, path)
    with quickly(), pytest.raises(DataError, match=r"model.pt: its pickle is \d+ bytes, above the limit of 4194304"):
        load_model(path, CPU)
    torch.save({"config": {}, "classes": [str(index) for index in range(10**5)], "model": {}}, path)
    with quickly(), pytest.raises(ConfigError, match=r"classes: more than 4097 values"):
        load_model(path, CPU)


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(9))
    assert path.stat().st_size < 1024
    with quickly(), pytest.raises(ConfigError, match=f"{path}: more than {MAX_CONFIG_VALUES} values"):
        load_config(path)
    assert main(["config", "show", "--config", str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{path}: more than {MAX_CONFIG_VALUES} values" in line


@pytest.mark.parametrize(("override", "problem"), [
    ("model.fpn_channels=32768", "model.fpn_channels: must be <= 512, got 32768"),
    ("model.max_size=100000", "model.max_size: must be <= 4096, got 100000"),
    ("eval.batch_size=100000", "eval.batch_size: must be <= 1024, got 100000"),
    ("model.anchors.scales_per_octave=1000", "model.anchors.scales_per_octave: must be <= 8, got 1000"),
])
def test_values_that_decide_allocations_have_maximums(override, problem):
    with quickly(), pytest.raises(ConfigError, match=problem):
        load_config(None, [override])


def test_a_model_file_with_an_allocating_config_is_refused_unbuilt(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"config": {"model": {"fpn_channels": 32768}}, "classes": ["a"], "model": {}}, path)
    with quickly(), pytest.raises(ConfigError, match=f"{path}: model.fpn_channels: must be <= 512"):
        load_model(path, CPU)


def test_a_model_file_of_something_else_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(DataError, match=f"{path}: not a model.pt"):
        load_model(path, CPU)


def test_extends_naming_the_file_itself_through_dotdot_is_a_loop(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "c.yaml").write_text("extends: ../cfg/c.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "cfg" / "c.yaml")


def test_config_files_are_bounded_and_regular(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)
    with pytest.raises(ConfigError, match=r"big.yaml: \d+ bytes, above the limit for config files"):
        load_config(big)
    os.mkfifo(tmp_path / "fifo.yaml")
    with pytest.raises(ConfigError, match="fifo.yaml: not a regular file"):
        load_config(tmp_path / "fifo.yaml")
