"""Job entrypoint: Ray Tune sweep (ASHA on validation AP) over tune.space."""
from collections.abc import Sequence

from jobs._entry import launch
from pipeline.cli import COMMANDS


def main(argv: Sequence[str] | None = None) -> int:
    return launch("sweep", COMMANDS["tune"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
