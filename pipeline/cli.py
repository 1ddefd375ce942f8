"""`aploss prep | train | eval`: each stage on one config (a YAML file plus key=value overrides)."""
import argparse
import sys

from pipeline.config import Config, ConfigError, load_config


def _prep(config: Config) -> None:
    from pipeline.prep import prepare

    result = prepare(config)
    state = "reused" if result.reused else "written"
    print(f"prepared {config.data.dataset} ({state}) in {result.directory}")
    for split, summary in result.manifest["splits"].items():
        print(f"  {split}: {summary['images']} images, {summary['boxes']} boxes, "
              f"{len(summary['dropped'])} dropped, {len(summary['skipped'])} skipped")


def _train(config: Config) -> None:
    from pipeline.stages import train_stage

    summary = train_stage(config)
    print(f"trained {summary.steps} steps ({summary.skipped} skipped without positives); "
          f"model: {summary.model_path}")


def _eval(config: Config) -> None:
    from pipeline.evaluate import metrics_table
    from pipeline.stages import evaluate_stage

    evaluation = evaluate_stage(config)
    print(metrics_table(evaluation.result))
    print(f"detections: {evaluation.detections_path}\nmetrics: {evaluation.metrics_path}")


COMMANDS = {"prep": _prep, "train": _train, "eval": _eval}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="aploss", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    for name, function in COMMANDS.items():
        command = commands.add_parser(name, help=function.__name__.strip("_") + " stage")
        command.add_argument("--config", help="YAML config file (defaults apply to missing keys)")
        command.add_argument("overrides", nargs="*", metavar="section.key=value",
                             help="config overrides, e.g. optim.lr=0.02 train.epochs=3")
    return root


def main(argv: list[str] | None = None) -> int:
    arguments = parser().parse_args(argv)
    try:
        config = load_config(arguments.config, arguments.overrides)
        COMMANDS[arguments.command](config)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"aploss {arguments.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
