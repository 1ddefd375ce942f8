"""Job entrypoint: A Ray Tune sweep over tune.space, ASHA on validation AP."""
from collections.abc import Sequence

from jobs import run_command


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(["tune"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
