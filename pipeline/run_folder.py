"""Where a run's outputs lie, spelled once: the output dir the runs share (`run.output_dir`) and
each run's folder in it (`run.output_dir/run.name`), a local path or an object store alike.
Every stage, the driver and the workers find a file of a run only through these two."""
import hashlib
from dataclasses import dataclass

from pipeline.storage import Location


@dataclass(frozen=True)
class RunFolder:
    """One run's outputs: what training, evaluation and robustness write, and what a rerun or
    another command reads back."""
    root: Location

    @property
    def model(self) -> Location:
        """The trained detector: the best weights with their config, classes and category ids."""
        return self.root / "model.pt"

    @property
    def checkpoints(self) -> Location:
        """A run trained in one process keeps its checkpoints here (Ray Train, under OutputDir.ray)."""
        return self.root / "checkpoints"

    @property
    def journal(self) -> Location:
        """The training curves, one line per step (`training/journal.py`)."""
        return self.root / "train" / "metrics.jsonl"

    @property
    def record(self) -> Location:
        """The model and prepared data the run trains, checked on every resume."""
        return self.root / "train" / "run.json"

    @property
    def stopped(self) -> Location:
        """Why Ray workers stopped on purpose (a divergence, a full disk), for the driver."""
        return self.root / "train" / "stopped.json"

    @property
    def evaluation(self) -> Location:
        return self.root / "eval"

    @property
    def eval_metrics(self) -> Location:
        return self.evaluation / "metrics.json"

    @property
    def robustness(self) -> Location:
        return self.root / "robustness"


@dataclass(frozen=True)
class OutputDir:
    """What the runs under one `run.output_dir` share: prepared data, Ray Train's storage, fetched
    models, the default MLflow store, reports and predictions."""
    root: Location

    def run(self, name: str) -> RunFolder:
        return RunFolder(self.root / name)

    @property
    def prepared(self) -> Location:
        """Data-prep's output, one directory per dataset and content."""
        return self.root / "data"

    @property
    def ray(self) -> Location:
        """Ray Train's checkpoints and state (`storage_path`)."""
        return self.root / "ray"

    @property
    def report(self) -> Location:
        return self.root / "report"

    @property
    def predictions(self) -> Location:
        return self.root / "predict"

    @property
    def mlflow_store(self) -> Location:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Location:
        return self.root / "mlartifacts"

    def fetched_model(self, uri: str) -> Location:
        """Where an MLflow model URI's model.pt is put before training, one file per URI, which a
        sweep's trials share."""
        return self.root / "init" / hashlib.sha256(uri.encode()).hexdigest()[:16] / "model.pt"

    def best_config(self, sweep: str) -> Location:
        """The config of a sweep's best trial, ready to train."""
        return self.root / f"{sweep}-best.yaml"
