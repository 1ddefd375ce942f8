"""Job entrypoint: Ray Train DDP on the data `jobs.prep` prepared; writes the run's model.pt."""
from collections.abc import Sequence

from jobs import run_command


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(["pipeline", "train"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
