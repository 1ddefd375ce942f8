"""Which prepared data a run trains on and is evaluated on.

A config is bound to its data by `data.prepared` (an absolute prepared-data directory), which
then travels with it: in Ray payloads, checkpoints, model.pt and MLflow params. A run records
the model and data it trains in its directory, and refuses to resume with others.
"""
import dataclasses
import json
from pathlib import Path

from pipeline.config import Config, DataConfig, config_from_dict, config_to_dict
from pipeline.data.prep import locate_prepared
from pipeline.data.shards import read_manifest
from pipeline.errors import ConfigError, DataError
from pipeline.io import write_json_atomic
from pipeline.redaction import redact_tree
from pipeline.storage import InputRefused, Location


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


# A run's record is a few KB; the run folder is shared storage anyone may write.
MAX_RECORD_BYTES, RECORD_READ_TIMEOUT_S = 1 << 20, 60.0


def training_data(config: Config) -> tuple[Config, list[str]]:
    """`config` as it trains: bound to its prepared data, `auto` anchors fitted to it and an
    `auto` norm made concrete (`bind_init`), or as the run's record has them bound to the same
    data (a rerun recomputes nothing, and loads no torch); and the class names. Refuses splits
    that leave nothing to learn from or to validate against."""
    config = config.with_prepared(locate_prepared(config))
    manifest = read_manifest(config.data.prepared)
    for split, use in ((config.data.train_split, "train on"), (config.data.val_split, "validate against")):
        summary = manifest["splits"][split]
        if summary["boxes"] == summary["crowd_boxes"]:
            raise DataError(f"{split_dir(config, split)}: split {split!r} has no ground-truth boxes to {use}")
    recorded = _recorded_binding(config)
    if recorded is not None:
        return recorded, manifest["classes"]
    from pipeline.data.anchors import fit_anchors  # torch's, as binding a model is
    from pipeline.model import bind_init

    return bind_init(fit_anchors(config)), manifest["classes"]


def _recorded_binding(config: Config) -> Config | None:
    """`config` with the model config its run's record holds, where the record is of the same
    prepared data and differs from `config` only in what binding fills in (`auto` anchors'
    sizes, ratios and lowest level, an `auto` norm); None otherwise. Fitting and binding are
    deterministic: the record holds what they would give again."""
    path = config.run.folder().record
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_bounded(MAX_RECORD_BYTES, RECORD_READ_TIMEOUT_S, ("", "")))
        if saved["prepared"] != config.data.prepared:
            return None
        model = dataclasses.asdict(config.model)
        recorded = saved["model"]
        if model["anchors"]["mode"] == "auto" and not model["anchors"]["sizes"]:
            model["anchors"] |= {key: recorded["anchors"][key] for key in ("sizes", "ratios", "lowest_level")}
        if model["norm"] == "auto":
            model["norm"] = recorded["norm"]
        if redact_tree(model) != recorded:
            return None
        return config_from_dict({**config_to_dict(config), "model": model})
    except (InputRefused, ValueError, KeyError, TypeError):
        return None  # not a record of this project's: bound afresh, and the record check names it


def record_training_run(config: Config) -> None:
    """Remember, in the run directory, the model and the prepared data the run trains; a later
    start of the same run (a resume) with another model or other data is refused, since it would
    mix two trainings in one set of weights."""
    path = config.run.folder().record
    # As written: a record never holds credentials (a presigned model.init URL's signature).
    record = redact_tree({"model": dataclasses.asdict(config.model), "prepared": config.data.prepared})
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["model"] != record["model"]:
            changed = ", ".join(f"model.{key}: {before!r} -> {after!r}"
                                for key, before, after in _differences(saved["model"], record["model"]))
            raise ConfigError(f"{path}: run '{config.run.name}' was trained with another model config ({changed}); "
                              "choose another run.name to start afresh")
        if saved["prepared"] != record["prepared"]:
            raise DataError(f"{path}: run '{config.run.name}' was trained on the prepared data {saved['prepared']}, "
                            f"but these data.* settings give {record['prepared']}; choose another run.name, "
                            f"or set data.prepared={saved['prepared']} to go on with its data")
        return
    write_json_atomic(record, path)


def _differences(before: dict, after: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """The dotted keys whose values differ between two nested dicts, with both values."""
    found = []
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append((f"{prefix}{key}", old, new))
    return found


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
