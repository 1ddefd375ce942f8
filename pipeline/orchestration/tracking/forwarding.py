"""A training run's metrics journal sent to its MLflow run by a thread of the driver: training
never waits on the tracking server, and never fails because of it."""
import threading

import mlflow
from mlflow.entities import Metric

from pipeline.errors import one_line
from pipeline.orchestration.tracking.connection import connect
from pipeline.orchestration.tracking.records import MAX_METRICS_PER_BATCH
from pipeline.redaction import redact
from pipeline.storage import Location, Where
from pipeline.training.journal import CURVES, read_journal


class MetricsForwarder:
    """Sends a training run's metrics journal to its MLflow run from a background thread, so
    that training never waits on the tracking server and never fails because of it.

    What MLflow already holds is asked once per key (the highest step logged), so a resumed or
    rerun stage sends each step once, including what an earlier attempt could not send. While
    the server is away, sending is retried with a growing pause; `close` makes a last attempt
    within `flush_seconds` and says what stayed behind in the journal.
    """

    def __init__(self, journal: Where, run_id: str, tracking_uri: str, interval: float = 2.0,
                 flush_seconds: float = 15.0, keys: tuple[str, ...] = (*CURVES, "val_ap")) -> None:
        self.journal, self.run_id, self.tracking_uri = Location(journal), run_id, connect(tracking_uri)
        self.interval, self.flush_seconds, self.keys = interval, flush_seconds, keys
        self.sent_through: dict[str, int] | None = None  # key -> highest step MLflow holds
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)

    def __enter__(self) -> "MetricsForwarder":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _run(self) -> None:
        pause = self.interval
        while True:
            stopping = self._stop.is_set()
            try:
                self.send()
                self.error, pause = None, self.interval
            except Exception as error:  # noqa: BLE001 -- whatever the server or network does, training goes on
                self.error, pause = error, min(pause * 2, 30.0)
            if stopping:
                return
            self._stop.wait(pause)

    def pending(self) -> list[Metric]:
        """The journal's values MLflow does not hold yet."""
        client = mlflow.MlflowClient(self.tracking_uri)
        if self.sent_through is None:
            self.sent_through = {key: max((m.step for m in client.get_metric_history(self.run_id, key)), default=0)
                                 for key in self.keys}
        return [Metric(key, float(record[key]), int(record.get("time", 0) * 1000), record["step"])
                for record in read_journal(self.journal) for key in self.keys
                if key in record and record["step"] > self.sent_through[key]]

    def send(self) -> None:
        metrics = self.pending()
        client = mlflow.MlflowClient(self.tracking_uri)
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            batch = metrics[start:start + MAX_METRICS_PER_BATCH]
            client.log_batch(self.run_id, metrics=batch)
            for metric in batch:
                self.sent_through[metric.key] = max(self.sent_through[metric.key], metric.step)

    def close(self) -> None:
        """One last attempt, then a note of whatever could not be sent."""
        self._stop.set()
        self._thread.join(self.flush_seconds)
        if self.error is not None or self._thread.is_alive():
            reason = one_line(self.error) if self.error is not None else "no answer"
            print(f"warning: MLflow at {redact(self.tracking_uri)} did not take every training metric ({reason}); "
                  f"they are kept in {self.journal}, and the next run of this stage sends what is missing",
                  flush=True)
