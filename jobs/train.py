"""Job entrypoint: Ray Train DDP on the data `jobs.prep` prepared; writes the run's model.pt."""
from jobs import entrypoint

main = entrypoint("pipeline", "train")

if __name__ == "__main__":
    raise SystemExit(main())
