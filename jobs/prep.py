"""Job entrypoint: data-prep, a dataset to Parquet shards, ground truth and manifest."""
from collections.abc import Sequence

from jobs._entry import launch
from pipeline.cli import COMMANDS


def main(argv: Sequence[str] | None = None) -> int:
    return launch("prep", COMMANDS["prep"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
