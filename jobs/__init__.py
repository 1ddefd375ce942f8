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
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from jobs.runtime_env import SUBMIT_DIR
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.orchestration import cli


def run_command(command: Sequence[str], argv: Sequence[str] | None = None) -> int:
    """`aploss <command> [--config FILE] [overrides]` with this entrypoint's arguments, relative
    paths taken from the submitter's working directory (`jobs.runtime_env.SUBMIT_DIR`) where this
    node sees it, and refused where it does not."""
    arguments = [*command, *(sys.argv[1:] if argv is None else argv)]
    submitted_from = os.environ.get(SUBMIT_DIR)
    if submitted_from:
        if Path(submitted_from).is_dir():
            os.chdir(submitted_from)
        elif relative := _relative_paths(arguments):
            print(f"jobs: error: {', '.join(relative)} relative to {submitted_from} on the submitting machine, "
                  "which this cluster's node does not see: give absolute paths on storage the cluster shares "
                  "(or an object-store URI)", file=sys.stderr)
            return 2
    return cli.main(arguments)


def _relative_paths(arguments: list[str]) -> list[str]:
    """The settings the job would run with (its config file, overrides and environment) that
    name a relative local path."""
    parsed, _ = cli.parser()[0].parse_known_args(arguments)
    paths = {"APLOSS_DATA_ROOT": os.environ.get("APLOSS_DATA_ROOT", ""), "--config": parsed.config or ""}
    if not _relative(paths["--config"]):
        try:
            config = load_config(parsed.config, parsed.overrides)
        except UserError:
            config = None  # the command itself says what is wrong with it
        if config is not None:
            paths |= {"run.output_dir": config.run.output_dir, "data.root": config.data.root,
                      "data.prepared": config.data.prepared}
    return [f"{key}={value}" for key, value in paths.items() if _relative(value)]


def _relative(path: str) -> bool:
    return bool(path) and "://" not in path and not os.path.isabs(os.path.expanduser(path))


def entrypoint(*command: str) -> Callable[[Sequence[str] | None], int]:
    """The `main(argv=None)` of a job module that runs `aploss <command>`."""
    def main(argv: Sequence[str] | None = None) -> int:
        return run_command(command, argv)
    return main

