"""Job entrypoint: COCO evaluation of the run's trained model (prints the metrics table)."""
from collections.abc import Sequence

from jobs._entry import launch
from pipeline.cli import COMMANDS


def main(argv: Sequence[str] | None = None) -> int:
    return launch("evaluate", COMMANDS["eval"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
