"""The model registry: the trained detector registered as a pyfunc model logged from code, its
versions tagged with their test AP and the best one aliased `champion`; and a registered model
fetched back as a file (`model.init`, `--model`)."""
import hashlib
import importlib.metadata
import io
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
from PIL import Image

import aploss
import pipeline
from pipeline.config import Config
from pipeline.data.shards import read_manifest
from pipeline.errors import DataError, MissingInput, one_line
from pipeline.model_source import is_registered
from pipeline.orchestration.tracking.connection import connect
from pipeline.orchestration.tracking.records import _local_copy
from pipeline.storage import Location, Where

# The registered model carries this project's code, to load where aploss is not installed.
_PACKAGE_CODE = [str(Path(package.__file__).resolve().parent) for package in (aploss, pipeline)]


# Not imported here: MLflow runs it when it loads the model.
_REGISTERED_MODEL_CODE = str(Path(__file__).resolve().with_name("registered_model.py"))


# What the registered model takes and gives (registered_model.py): encoded images in, per image
# the boxes (xyxy pixels), scores, 0-based labels and class names out.
MODEL_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.binary, "image")]),
    outputs=Schema([ColSpec(Array(Array(DataType.double)), "boxes"), ColSpec(Array(DataType.double), "scores"),
                    ColSpec(Array(DataType.long), "labels"), ColSpec(Array(DataType.string), "names")]))


# The version with the best test AP; the newest is MLflow's own models:/NAME/latest (an alias
# may not be called `latest`).
CHAMPION = "champion"


TEST_AP_TAG = "test_AP"


def _input_example() -> pd.DataFrame:
    """One small encoded image, as a request carries it."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 96, 160)).save(buffer, format="png")
    return pd.DataFrame({"image": [buffer.getvalue()]})


def registered_name(config: Config) -> str:
    """`tracking.registered_model`, or by default one registered model per dataset, so that a
    dataset's `champion` is always a detector of its classes: aploss-<dataset> for a named one,
    aploss-<coco|voc>-<8 hex of its class names> for data of your own."""
    if config.tracking.registered_model:
        return config.tracking.registered_model
    if config.data.dataset not in ("coco", "voc"):
        return f"aploss-{config.data.dataset}"
    classes = "\n".join(read_manifest(config.data.prepared)["classes"])
    return f"aploss-{config.data.dataset}-{hashlib.sha256(classes.encode()).hexdigest()[:8]}"


def log_model(model_path: Where, config: Config) -> None:
    """The trained detector (a run's model.pt) registered in the model registry as a pyfunc
    model logged from code: its weights load without unpickling code, and the package's source
    travels with it, so it serves where aploss is not installed. `config` is bound to the
    prepared data it trained on."""
    with _local_copy(model_path) as weights:
        mlflow.pyfunc.log_model(name="model", python_model=_REGISTERED_MODEL_CODE, artifacts={"detector": weights},
                                code_paths=_PACKAGE_CODE, pip_requirements=_requirements(),
                                signature=MODEL_SIGNATURE, input_example=_input_example(),
                                registered_model_name=registered_name(config))


def promote(config: Config, train_run_id: str, test_ap: float) -> None:
    """Record the test AP of the versions a training run registered, and point `champion` at
    the version with the best test AP of the registered model."""
    client, name = mlflow.MlflowClient(), registered_name(config)
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{train_run_id}'"):
        client.set_model_version_tag(name, version.version, TEST_AP_TAG, str(test_ap))
    scored = [(float(version.tags[TEST_AP_TAG]), int(version.version))
              for version in client.search_model_versions(f"name = '{name}'") if TEST_AP_TAG in version.tags]
    if scored:
        client.set_registered_model_alias(name, CHAMPION, str(max(scored)[1]))


def _requirements() -> list[str]:
    """What the served model imports, pinned to this environment (stated rather than inferred:
    inference loads the model in a subprocess, seconds of work at every registration)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in ("mlflow", "torch", "torchvision", "pyyaml")]


def fetch_model(uri: str, tracking_uri: str, target: Where, setting: str) -> None:
    """The model.pt a registered model of this project holds (models:/NAME@ALIAS, runs:/...),
    downloaded to `target`; errors name the `setting` that gave the URI."""
    mlflow.set_tracking_uri(connect(tracking_uri))
    with tempfile.TemporaryDirectory() as scratch:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=scratch))
        except MlflowException as error:
            raise MissingInput(f"{setting}={uri}: {one_line(error)}") from None
        weights = local / "artifacts" / "model.pt"  # the registered model's artifact (log_model)
        if not weights.is_file():
            raise DataError(f"{setting}={uri}: not a model of this project (no artifacts/model.pt)")
        Location(target).write_bytes(weights.read_bytes())


def fetch_source(spec: str, config: Config, setting: str) -> None:
    """When `spec` (what `setting` gave) is an MLflow model URI, download the model.pt it holds
    to where `model_source.model_file` finds it: workers read files, not the registry, and the
    config keeps the URI it was given. Fetched every time: an alias moves."""
    if is_registered(spec):
        fetch_model(spec, config.tracking_uri(), config.run.outputs().fetched_model(spec), setting)
