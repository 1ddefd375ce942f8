"""Which prepared data a run trains on and is evaluated on.

A config is bound to its data by `data.prepared` (an absolute prepared-data directory), which
then travels with it: in Ray payloads, checkpoints, model.pt and MLflow params. Binding a config
for training (anchors, norm, the run's record) is `pipeline.training.preparation`'s.
"""
import dataclasses
from pathlib import Path

from pipeline.config import Config, DataConfig
from pipeline.data.prep import locate_prepared
from pipeline.data.shards import read_manifest
from pipeline.errors import ConfigError, DataError
from pipeline.storage import Location


def split_dir(config: Config, split: str) -> Location:
    """A split of the prepared data `config` is bound to (`data.prepared`)."""
    return Location(config.data.prepared) / split


def check_split(config: Config, split: str, setting: str, classes: list[str], model: str) -> None:
    """The prepared data `config` is bound to has `split` (which `setting` chose), with the
    `classes` that `model` (its file, and its run where it has one) was trained on, in their
    order: the model's class indices are the data's."""
    manifest = read_manifest(config.data.prepared)
    if split not in manifest["splits"]:
        raise DataError(f"{config.data.prepared} has no split {split!r} (it has {', '.join(manifest['splits'])}): "
                        f"set {setting}")
    if classes != manifest["classes"]:
        raise DataError(f"{model} was trained on classes {classes}, but {config.data.prepared} has "
                        f"{manifest['classes']}: give a model trained on this data")


def prepared_category_ids(config: Config) -> list[int]:
    """The dataset's category id of each class of the prepared data `config` is bound to."""
    return read_manifest(config.data.prepared)["category_ids"]


# The data.* keys that choose which images an evaluation scores.
_CHOOSING_DATA = ("dataset", "root", "annotations", "images", "classes", "test_split")


def _same(key: str, given, used) -> bool:
    if key == "root":  # relative where given, absolute where recorded
        return bool(used) and Path(given).expanduser().resolve() == Path(used).expanduser().resolve()
    return given == used


def evaluation_config(config: Config, trained: Config) -> Config:
    """`config` bound to the data a model was trained on (its data.* settings and prepared data),
    unless data.prepared names other prepared data. A data.* key set to choose other data is
    refused rather than ignored: other data is evaluated through data.prepared."""
    if not config.data.prepared and trained.data.prepared:
        for key in _CHOOSING_DATA:
            given, used = getattr(config.data, key), getattr(trained.data, key)
            if given == getattr(DataConfig(), key) or _same(key, given, used):
                continue
            raise ConfigError(f"data.{key}: {given!r} is not the data run '{config.run.name}' was trained on "
                              f"({used!r}); evaluation uses the run's own data. To evaluate on other data, prepare "
                              "it (aploss prep with those data.* settings) and set data.prepared to the directory "
                              "it prints")
        config = dataclasses.replace(config, data=trained.data)
    return config.with_prepared(locate_prepared(config))
