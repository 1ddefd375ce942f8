"""The runtime environment of every job, declared once. As JSON for the Ray CLI:

    ray job submit --runtime-env-json "$(python -m jobs.runtime_env)" -- python -m jobs.pipeline ...
"""
import argparse
import json
import os
import tomllib
from collections.abc import Sequence
from pathlib import Path

# The project root, so the upload does not depend on the submitter's working directory.
PROJECT = Path(__file__).resolve().parents[1]
# Local outputs and the environment: large, and rebuilt or written on the cluster.
EXCLUDES = [".venv/", "runs/", "mlruns/", "mlflow.db", ".git/", "benchmarks/results/", "*.egg-info"]
# Where the job tracks and reads data, and the credentials of an S3 artifact store.
PASSED_ENV = ["MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "APLOSS_DATA_ROOT", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"]


def runtime_env(pip: bool = False) -> dict:
    """The project as working_dir, the submitter's settings of PASSED_ENV and, with `pip`, the
    project's dependencies installed per job (off: the cluster image should have them)."""
    env = {"working_dir": str(PROJECT), "excludes": list(EXCLUDES),
           "env_vars": {name: os.environ[name] for name in PASSED_ENV if os.environ.get(name)}}
    if pip:
        env["pip"] = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["dependencies"]
    return env


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.runtime_env", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pip", action="store_true", help="install pyproject's dependencies in the job")
    print(json.dumps(runtime_env(parser.parse_args(argv).pip)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
