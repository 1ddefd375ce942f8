"""Job entrypoint: data-prep -> Ray Train DDP -> evaluate, tracked as one MLflow pipeline run."""
from collections.abc import Sequence

from jobs import run_command


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(["pipeline", "run"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
