"""Job entrypoint: the MLflow runs of a comparison (`--run NAME`, repeated) as one markdown report."""
from collections.abc import Sequence

from jobs import run_command


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(["report"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
