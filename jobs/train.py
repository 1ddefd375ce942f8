"""Job entrypoint: Ray Train DDP on the data `jobs.prep` prepared; writes the run's model.pt."""
from collections.abc import Sequence

from jobs._entry import launch
from pipeline.config import Config
from pipeline.ray_train import train_distributed
from pipeline.run import start_ray
from pipeline.shards import read_manifest


def train(config: Config) -> None:
    prepared = config.run.prepared_data(config.data.dataset)
    try:
        classes = read_manifest(prepared)["classes"]
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no prepared {config.data.dataset!r} data in {prepared}: run `python -m jobs.prep` "
            "with the same config (data.* and run.output_dir) first") from None
    start_ray(config)
    result, model_path = train_distributed(config, classes)
    print(f"trained to step {result.metrics['step']}; model: {model_path}")


def main(argv: Sequence[str] | None = None) -> int:
    return launch("train", train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
