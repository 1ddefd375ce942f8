"""Job entrypoint: Data-prep: the dataset to Parquet shards, COCO ground truth and a manifest."""
from jobs import entrypoint

main = entrypoint("prep")

if __name__ == "__main__":
    raise SystemExit(main())
