"""Job entrypoint: AP of one or more runs' models under occlusion, noise and COCO-C (`--run NAME`,
repeated, evaluates them together), logged to each run in MLflow."""
from collections.abc import Sequence

from jobs import run_command


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(["robustness"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
