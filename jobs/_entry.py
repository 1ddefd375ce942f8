"""What the `python -m jobs.<stage>` entrypoints share: the arguments, the config with defaults
taken from the job's environment, and config errors as exit status 2."""
import argparse
import os
import sys
from collections.abc import Callable, Sequence

from pipeline.config import Config, ConfigError, load_config


def job_config(path: str | None, overrides: Sequence[str]) -> Config:
    """The config of `path` plus `overrides`; keys they leave empty default from the environment."""
    config = load_config(path, overrides)
    # A job's entrypoint gets RAY_ADDRESS from the job supervisor: an empty ray.address would
    # try to start a second Ray beside the cluster (ray.init with num_cpus, which fails).
    if not config.ray.address and os.environ.get("RAY_ADDRESS"):
        config.ray.address = "auto"
    # Config.tracking_uri() ignores MLflow's variable; a submitter passes its server through it.
    if not config.tracking.uri and os.environ.get("MLFLOW_TRACKING_URI"):
        config.tracking.uri = os.environ["MLFLOW_TRACKING_URI"]
    return config


def launch(stage: str, run: Callable[[Config], None], argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: the command line), run `stage` on its config; the exit status."""
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{stage}")
    parser.add_argument("--config", help="YAML config file (defaults apply to missing keys)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. optim.lr=0.02 ray.address=auto")
    arguments = parser.parse_args(argv)
    try:
        run(job_config(arguments.config, arguments.overrides))
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"jobs.{stage}: error: {error}", file=sys.stderr)
        return 2
    return 0
