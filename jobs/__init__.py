"""Ray job entrypoints, `python -m jobs.<stage> [--config FILE] [section.key=value ...]`:
prep, train (Ray Train DDP), evaluate, pipeline (all three, tracked in MLflow), sweep
(Ray Tune), robustness and report. `jobs.submit` sends one to a cluster with the runtime env of `jobs.runtime_env`.

Inside a job, Ray 2.60's job supervisor (`JobSupervisor._get_driver_env_vars`) gives the
entrypoint RAY_ADDRESS (the cluster's GCS host:port), RAY_JOB_CONFIG_JSON_ENV_VAR (the runtime
env, which `ray.init` applies to the job's workers) and PYTHONUNBUFFERED=1; RAY_JOB_ID is only
set for worker processes. RAY_ADDRESS is therefore what tells an entrypoint to join its cluster
(`pipeline.orchestration.run.start_ray`); MLFLOW_TRACKING_URI, passed through by the runtime env, points it
at the tracking server (`Config.tracking_uri`).
"""
import sys
from collections.abc import Callable, Sequence

from pipeline.orchestration import cli


def run_command(command: Sequence[str], argv: Sequence[str] | None = None) -> int:
    """`aploss <command> [--config FILE] [overrides]` with this entrypoint's arguments."""
    return cli.main([*command, *(sys.argv[1:] if argv is None else argv)])


def entrypoint(*command: str) -> Callable[[Sequence[str] | None], int]:
    """The `main(argv=None)` of a job module that runs `aploss <command>`."""
    def main(argv: Sequence[str] | None = None) -> int:
        return run_command(command, argv)
    return main

