"""The one step every training entry point takes first (one process, Ray Train, a pipeline
run, a Tune trial, the CLI): `config` bound to its prepared data, its model config made concrete
(fitted anchors, the norm `model.init` implies), and recorded in the run, which refuses to resume
with another model or other data.
"""
import dataclasses
import json

from pipeline.config import Config, config_from_dict, config_to_dict
from pipeline.data.bindings import split_dir
from pipeline.data.prep import locate_prepared
from pipeline.data.shards import read_manifest
from pipeline.errors import ConfigError, DataError
from pipeline.io import write_json_atomic
from pipeline.redaction import redact_tree
from pipeline.storage import InputRefused

# A run's record is a few KB; the run folder is shared storage anyone may write.
MAX_RECORD_BYTES, RECORD_READ_TIMEOUT_S = 1 << 20, 60.0


def prepare_training(config: Config) -> tuple[Config, list[str]]:
    """`config` as it trains, and the class names: bound to its prepared data, `auto` anchors
    fitted to it and an `auto` norm made concrete (`bind_init`), or as the run's record has them
    bound to the same data (a rerun recomputes nothing, and loads no torch); recorded in the run
    (`record_training_run`), which refuses a resume with another model or other data. Refuses
    splits that leave nothing to learn from or to validate against. Every training entry point
    calls it; a second call on its result changes nothing."""
    config, classes = training_data(config)
    record_training_run(config)
    return config, classes


def training_data(config: Config) -> tuple[Config, list[str]]:
    """`prepare_training`'s binding without the record: what a run trains with, for a benchmark
    or an evaluation that starts no run."""
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
