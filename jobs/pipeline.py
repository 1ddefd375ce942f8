"""Job entrypoint: data-prep -> Ray Train DDP -> evaluate, tracked as one MLflow pipeline run."""
from jobs import entrypoint

main = entrypoint("pipeline", "run")

if __name__ == "__main__":
    raise SystemExit(main())
