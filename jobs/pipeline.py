"""Job entrypoint: data-prep -> Ray Train DDP -> evaluate, tracked as one MLflow pipeline run."""
from collections.abc import Sequence

from jobs._entry import launch
from pipeline.cli import COMMANDS


def main(argv: Sequence[str] | None = None) -> int:
    return launch("pipeline", COMMANDS["pipeline run"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
