"""Job entrypoint: COCO evaluation of the run's trained model."""
from jobs import entrypoint

main = entrypoint("eval")

if __name__ == "__main__":
    raise SystemExit(main())
