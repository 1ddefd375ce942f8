"""Where a trained detector comes from, as a user names it in `model.init` or `--model`: a run
(`run:NAME`, or a run's bare name under run.output_dir), a model.pt or checkpoint file, a run's
folder (local or in an object store), or an MLflow model URI. One resolver for every command;
an MLflow URI's file is fetched first by the orchestration layer (`tracking.registry.fetch_source`) to
the place named here, since workers read files, not the registry."""
from pipeline.config import MLFLOW_URIS
from pipeline.errors import MissingInput
from pipeline.run_folder import OutputDir, RunFolder
from pipeline.storage import Location

NAMING = "give a run name, a model.pt or checkpoint, or an MLflow model URI"


def is_registered(spec: str) -> bool:
    """Whether `spec` names a model in MLflow (its registry or a run's artifacts)."""
    return spec.startswith(MLFLOW_URIS)


def model_file(spec: str, outputs: OutputDir, setting: str) -> Location:
    """The model.pt or checkpoint `spec` names, which must exist; errors name the `setting`
    that gave it."""
    if is_registered(spec):
        fetched = outputs.fetched_model(spec)
        if not fetched.is_file():
            raise MissingInput(f"{setting}={spec}: {fetched} does not exist (an MLflow model URI is fetched by the "
                               "aploss commands)")
        return fetched
    name = spec.removeprefix("run:")
    run_model = outputs.run(name).model if name and "/" not in name else None
    if spec.startswith("run:") or (run_model is not None and run_model.is_file()):
        if run_model is None or not run_model.is_file():
            raise MissingInput(f"{setting}={spec}: run {name!r} has no model.pt under run.output_dir ({run_model})")
        return run_model
    location = Location(spec)
    if location.is_dir():
        location = RunFolder(location).model
    if not location.is_file():
        raise MissingInput(f"{setting}={spec}: no such model file ({NAMING})")
    return location
