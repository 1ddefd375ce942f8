"""Job entrypoint: COCO evaluation of the run's trained model."""
from collections.abc import Sequence

from jobs import run_command


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(["eval"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
