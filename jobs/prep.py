"""Job entrypoint: Data-prep: the dataset to Parquet shards, COCO ground truth and a manifest."""
from collections.abc import Sequence

from jobs import run_command


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(["prep"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
