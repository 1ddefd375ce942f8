"""Job entrypoint: the MLflow runs of a comparison (`--run NAME`, repeated) as one markdown report."""
from jobs import entrypoint

main = entrypoint("report")

if __name__ == "__main__":
    raise SystemExit(main())
