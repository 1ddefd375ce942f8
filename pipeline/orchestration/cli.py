"""`aploss prep | train | eval | pipeline run`: the stages, or the whole distributed pipeline,
on one config (a YAML file plus key=value overrides)."""
import argparse
import sys
from pathlib import Path

from pipeline.config import Config, load_config
from pipeline.errors import UserError, one_line
from pipeline.redaction import redact


def _prep(config: Config) -> None:
    from pipeline.data.anchors import fit_anchors, report_anchor_recall
    from pipeline.data.prep import prepare

    result = prepare(config)
    state = "reused" if result.reused else "written"
    print(f"prepared {config.data.dataset} ({state}) in {result.directory}")
    for split, summary in result.manifest["splits"].items():
        print(f"  {split}: {summary['images']} images, {summary['boxes']} boxes, "
              f"{len(summary['dropped'])} dropped, {len(summary['skipped'])} skipped")
    report_anchor_recall(fit_anchors(config.with_prepared(result.directory)))


def _train(config: Config) -> None:
    from pipeline.training.local import train_stage

    summary = train_stage(config)
    print(f"trained {summary.steps} steps ({summary.skipped} skipped without positives); "
          f"model: {summary.model_path}")


def _eval(config: Config) -> None:
    from pipeline.evaluation.evaluate import metrics_table
    from pipeline.evaluation.stages import evaluate_stage

    evaluation = evaluate_stage(config)
    print(metrics_table(evaluation.result))
    print(f"detections: {evaluation.detections_path}\nmetrics: {evaluation.metrics_path}")


def _pipeline(config: Config) -> None:
    from pipeline.orchestration.run import run_pipeline, summary

    print(summary(config, run_pipeline(config)))


def _robustness(config: Config, runs: list[str]) -> None:
    from pipeline.orchestration.run import run_robustness

    for name, (result, paths) in run_robustness(config, runs or [config.run.name]).items():
        print(f"== {name}\n{result.table()}")
        for corruption, reason in result.unavailable.items():
            print(f"not run: {corruption}: {reason}")
        print(f"written: {', '.join(str(p) for p in paths)}")


def _report(config: Config, runs: list[str]) -> None:
    from pipeline.orchestration.report import collect, markdown, write_report

    summaries = collect(config, runs)
    print(markdown(summaries))
    print(f"report: {write_report(summaries, Path(config.run.output_dir).expanduser().resolve() / 'report')}")


def _pipeline_train(config: Config) -> None:
    from pipeline.data.bindings import training_data
    from pipeline.orchestration.run import start_ray
    from pipeline.training.ray_train import train_distributed

    config, _ = training_data(config)  # before Ray starts: missing data is the likelier mistake
    start_ray(config)
    result, model_path = train_distributed(config)
    print(f"trained to step {result.metrics['step']}; model: {model_path}")


def _tune(config: Config) -> None:
    import ray

    from pipeline.orchestration.run import start_ray
    from pipeline.orchestration.tune import run_sweep

    start_ray(config, extra_cpus=config.tune.max_concurrent)
    try:
        result = run_sweep(config)
    finally:
        ray.shutdown()
    print(f"{result.trials} trials, {result.stopped_early} stopped early by ASHA; best val AP "
          f"{result.best_val_ap:.3f}\nbest config: {result.best_config_path}\n"
          f"train it: aploss pipeline run --config {result.best_config_path}")


COMMANDS = {"prep": _prep, "train": _train, "eval": _eval, "pipeline run": _pipeline,
            "pipeline train": _pipeline_train, "tune": _tune, "robustness": _robustness, "report": _report}
HELP = {"prep": "data-prep: a dataset to Parquet shards, ground truth and manifest",
        "train": "train in this process (CPU or one GPU)", "eval": "COCO evaluation of the trained model",
        "pipeline run": "prep -> Ray Train DDP -> evaluate, tracked in MLflow",
        "pipeline train": "Ray Train DDP on prepared data (writes the run's model.pt)",
        "tune": "Ray Tune sweep (ASHA on validation AP) over tune.space",
        "robustness": "AP under occlusion, Gaussian noise and COCO-C (P, mPC, rPC) of one or more runs, logged to MLflow",
        "report": "one markdown table and plots from the MLflow runs of a comparison"}


def _add_config_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", help="YAML config file (defaults apply to missing keys)")
    command.add_argument("--debug", action="store_true", help="show the traceback of an error")
    command.add_argument("overrides", nargs="*", metavar="section.key=value",
                         help="config overrides, e.g. optim.lr=0.02 train.epochs=3")


def _add_runs_argument(command: argparse.ArgumentParser, help: str) -> None:
    # Repeated rather than nargs="+", which would swallow the positional overrides.
    command.add_argument("--run", action="append", default=[], dest="runs", metavar="RUN_NAME", help=help)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="aploss", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    for name in ("prep", "train", "eval"):
        _add_config_arguments(commands.add_parser(name, help=HELP[name]))
    robustness = commands.add_parser("robustness", help=HELP["robustness"])
    _add_runs_argument(robustness, "a run whose model to evaluate, repeated: all in one pass over the perturbed "
                                   "images (default: run.name)")
    _add_config_arguments(robustness)
    sweep = commands.add_parser("tune", help=HELP["tune"])
    sweep.add_argument("--samples", type=int, help="number of trials (tune.samples)")
    _add_config_arguments(sweep)
    report = commands.add_parser("report", help=HELP["report"])
    _add_runs_argument(report, "a pipeline run to compare, repeated (default: every pipeline run of the experiment)")
    _add_config_arguments(report)
    actions = commands.add_parser("pipeline", help=HELP["pipeline run"]).add_subparsers(dest="action", required=True)
    for action in ("run", "train"):
        _add_config_arguments(actions.add_parser(action, help=HELP[f"pipeline {action}"]))
    return root


def main(argv: list[str] | None = None) -> int:
    arguments = parser().parse_args(argv)
    command = " ".join(filter(None, [arguments.command, getattr(arguments, "action", None)]))
    from mlflow.exceptions import MlflowException
    from ray.exceptions import RayError
    from ray.train import TrainingFailedError
    from ray.tune.error import TuneError

    try:
        overrides = list(arguments.overrides)
        if getattr(arguments, "samples", None) is not None:
            overrides.append(f"tune.samples={arguments.samples}")
        config = load_config(arguments.config, overrides)
        if command in ("train", "pipeline run", "pipeline train", "tune"):
            from pipeline.orchestration.tracking import fetch_init

            fetch_init(config)
        if command in ("report", "robustness"):
            COMMANDS[command](config, arguments.runs)
        else:
            COMMANDS[command](config)
    except UserError as error:
        if arguments.debug:
            raise
        print(f"aploss {command}: error: {redact(str(error))}", file=sys.stderr)
        return 2
    except (OSError, MlflowException, RayError, TrainingFailedError, TuneError) as error:
        # What the user meets rather than causes (disk full, a server gone): one line, and
        # --debug for the traceback. Anything else is a bug and keeps its traceback.
        if arguments.debug:
            raise
        print(f"aploss {command}: error: {redact(one_line(error))} (--debug shows the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"aploss {command}: interrupted; rerunning the same command resumes", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
