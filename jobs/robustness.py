"""Job entrypoint: AP of one or more runs' models under occlusion, noise and COCO-C (`--run NAME`,
repeated, evaluates them together), logged to each run in MLflow."""
from jobs import entrypoint

main = entrypoint("robustness")

if __name__ == "__main__":
    raise SystemExit(main())
