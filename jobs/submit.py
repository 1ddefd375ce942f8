"""Submit an entrypoint to a Ray cluster, print its logs as they come, exit 0 if it succeeded:

    python -m jobs.submit --address http://127.0.0.1:8265 [--pip] [--submission-id ID] -- \\
        python -m jobs.pipeline --config FILE [section.key=value ...]

The entrypoint runs on the cluster with the raylet's PATH: a bare `python` is the one Ray was
started with, so start Ray from the project's venv (or image), or name the interpreter.
"""
import argparse
import asyncio
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

from jobs.runtime_env import CredentialsInJob, check_entrypoint, runtime_env


def auth_headers() -> dict[str, str]:
    """The cluster token as a bearer header, when RAY_AUTH_MODE is unset and a token exists.

    Since Ray 2.59 `ray start --head` turns token auth on whenever a token exists (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), but the job client sends it only under
    RAY_AUTH_MODE=token, read when ray is imported: "Missing authentication token" otherwise.
    With RAY_AUTH_MODE set, Ray's own client handles (or the user disabled) authentication.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and path.is_file():
        token = path.read_text()
    return {"Authorization": f"Bearer {token.strip()}"} if token.strip() else {}


async def _print_logs(client: JobSubmissionClient, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def submit(entrypoint: list[str], address: str, pip: bool = False, submission_id: str | None = None) -> int:
    """Run `entrypoint` as a job with the project's runtime env; 0 if it SUCCEEDED, else 1."""
    check_entrypoint(entrypoint)
    client = JobSubmissionClient(address, headers=auth_headers())
    job_id = client.submit_job(entrypoint=shlex.join(entrypoint), runtime_env=runtime_env(pip),
                               submission_id=submission_id)
    print(f"submitted job {job_id} to {address}", flush=True)
    asyncio.run(_print_logs(client, job_id))
    # The log stream can close a moment before the job's status turns terminal.
    while not client.get_job_status(job_id).is_terminal():
        time.sleep(0.5)
    info = client.get_job_info(job_id)
    print(f"job {job_id} {info.status.value}: {info.message}", flush=True)
    return 0 if info.status == JobStatus.SUCCEEDED else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="http://127.0.0.1:8265", help="the cluster's dashboard URL")
    parser.add_argument("--pip", action="store_true", help="install pyproject's dependencies in the job")
    parser.add_argument("--submission-id", help="the job's id (default: Ray picks one)")
    args = list(sys.argv[1:] if argv is None else argv)
    # Everything after `--` is the entrypoint, whose own options argparse must not read.
    split = args.index("--") if "--" in args else len(args)
    options, entrypoint = parser.parse_args(args[:split]), args[split + 1:]
    if not entrypoint:
        parser.error("give the entrypoint after --, e.g. -- python -m jobs.pipeline --config FILE")
    try:
        return submit(entrypoint, options.address, options.pip, options.submission_id)
    except CredentialsInJob as error:
        print(f"jobs.submit: error: {error}", file=sys.stderr)
        return 2
    except (AuthenticationError, ConnectionError, RuntimeError) as error:
        print(f"jobs.submit: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
