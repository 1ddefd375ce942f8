"""The runtime environment of every job, declared once. As JSON for the Ray CLI:

    ray job submit --runtime-env-json "$(python -m jobs.runtime_env)" -- python -m jobs.pipeline ...
"""
import argparse
import json
import os
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import config_record, config_to_dict, load_config
from pipeline.errors import ConfigError
from pipeline.redaction import redact
from pipeline.storage import absolute

# The project root, so the upload does not depend on the submitter's working directory.
PROJECT = Path(__file__).resolve().parents[1]
# Local outputs and the environment: large, and rebuilt or written on the cluster. Anchored at the
# project root: Ray matches them as .gitignore does, and "data/" alone also matched pipeline/data/.
EXCLUDES = ["/.venv/", "/runs/", "/data/", "/mlruns/", "/mlflow.db", "/.git/", "/benchmarks/results/", "*.egg-info"]
# Where the job tracks and reads data. Credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
# MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN, ...) are not passed: Ray keeps a job's runtime env
# and entrypoint in its records (`ray job list`, the dashboard). The cluster's nodes hold them
# (infra/: from Kubernetes Secrets, by name), and every process of a job inherits them.
PASSED_ENV = ["MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
              "AWS_REGION", "AWS_DEFAULT_REGION", "APLOSS_DATA_ROOT"]
# The submitter's working directory: a job resolves relative paths (in its arguments, a config
# file, APLOSS_DATA_ROOT) against it, as the same command would have on the submitting machine,
# rather than against Ray's temporary copy of the project (jobs.run_command).
SUBMIT_DIR = "APLOSS_SUBMIT_DIR"


class CredentialsInJob(ValueError):
    """A value a job would carry holds credentials, which Ray would keep in the job's record."""


_INSTEAD = ("give them to the cluster's nodes as environment variables instead (MLFLOW_TRACKING_USERNAME / "
            "MLFLOW_TRACKING_PASSWORD, the AWS variables)")
# Variables whose value is a credential, set in an entrypoint (`env NAME=... python ...`).
_SECRET_VARIABLE = re.compile(r"(?i)^[A-Z_][A-Z0-9_]*(SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|API_KEY|ACCESS_KEY)"
                              r"[A-Z0-9_]*=")


def check_no_credentials(text: str, where: str) -> None:
    if redact(text) != text:
        raise CredentialsInJob(f"{where} carries credentials in a URI ({redact(text)}), and Ray keeps it in the "
                               f"job's record: {_INSTEAD}")


def check_entrypoint(entrypoint: Sequence[str]) -> None:
    """CredentialsInJob if an argument of `entrypoint` carries credentials: a URI with them, a
    secret variable set for the command, or a --config file holding such a URI (it travels in
    the job's working_dir)."""
    for index, argument in enumerate(entrypoint):
        check_no_credentials(argument, "the entrypoint")
        if _SECRET_VARIABLE.match(argument):
            raise CredentialsInJob(f"the entrypoint sets {argument.partition('=')[0]}, and Ray keeps the entrypoint "
                                   f"in the job's record: {_INSTEAD}")
        config = (argument.partition("=")[2] if argument.startswith("--config=")
                  else entrypoint[index + 1] if argument == "--config" and index + 1 < len(entrypoint) else None)
        if config and Path(config).is_file():
            _check_config_file(Path(config))


def _check_config_file(path: Path) -> None:
    """The config file, with what it extends, as the job will read it; one the job would refuse
    anyway is left to the job to report."""
    try:
        config = load_config(path)
    except ConfigError:
        return
    if config_record(config) != config_to_dict(config):
        raise CredentialsInJob(f"--config {path} carries credentials in a URI, and it travels in the job's "
                               f"working_dir: {_INSTEAD}")


def runtime_env(pip: bool = False) -> dict:
    """The project as working_dir, the submitter's settings of PASSED_ENV and, with `pip`, the
    project's dependencies installed per job (off: the cluster image should have them)."""
    passed = {name: os.environ[name] for name in PASSED_ENV if os.environ.get(name)}
    for name, value in passed.items():
        check_no_credentials(value, f"${name}")
    if "APLOSS_DATA_ROOT" in passed:
        passed["APLOSS_DATA_ROOT"] = absolute(passed["APLOSS_DATA_ROOT"])
    passed[SUBMIT_DIR] = os.getcwd()
    env = {"working_dir": str(PROJECT), "excludes": list(EXCLUDES), "env_vars": passed}
    if pip:
        env["pip"] = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["dependencies"]
    return env


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.runtime_env", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pip", action="store_true", help="install pyproject's dependencies in the job")
    try:
        print(json.dumps(runtime_env(parser.parse_args(argv).pip)))
    except CredentialsInJob as error:
        print(f"jobs.runtime_env: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
