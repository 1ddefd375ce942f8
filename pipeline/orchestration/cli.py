"""`aploss <command>`: the stages, the whole distributed pipeline, sweeps and reports, each on
one config (the defaults, a YAML file and key=value overrides); `aploss --help` lists them."""
import argparse
import os
import re
import sys
import textwrap
from typing import TYPE_CHECKING

from pipeline.config import Config, check_run_name, load_config
from pipeline.errors import TrainingFailed, UserError, one_line
from pipeline.inference.drawing import DRAW_SCORE
from pipeline.model_source import is_registered, model_file
from pipeline.quiet import VERBOSE_VARIABLE, quiet_third_party
from pipeline.redaction import redact
from pipeline.storage import Location

if TYPE_CHECKING:
    from pipeline.data.prep import PrepResult


def _prepared(config: Config) -> "PrepResult":
    """Data-prep of `config` (on Ray with data.prep_workers), or the prepared data it reuses,
    said in a line and a summary per split."""
    from pipeline.data.prep import prepare, summary_lines
    from pipeline.orchestration.run import start_ray

    if config.data.prep_workers:
        start_ray(config)
    result = prepare(config)
    state = "reused" if result.reused else "written"
    print(f"prepared {config.data.dataset} ({state}) in {result.directory}")
    print("\n".join(summary_lines(result)))
    return result


def _prep(config: Config) -> None:
    from pipeline.data.anchors import fit_anchors, report_anchor_recall

    report_anchor_recall(fit_anchors(config.with_prepared(_prepared(config).directory)))


def _training(config: Config) -> Config:
    """`config` bound to its prepared data (prepared first where there is none, as `aploss prep`
    does) with its anchors fitted, whose recall it prints."""
    from pipeline.data.anchors import report_anchor_recall
    from pipeline.training.preparation import prepare_training

    config, _ = prepare_training(config.with_prepared(_prepared(config).directory))
    report_anchor_recall(config)
    return config


def _train(config: Config) -> None:
    from pipeline.training.local import train_stage

    summary = train_stage(_training(config))
    print(f"trained {summary.steps} steps ({summary.skipped} skipped without positives); "
          f"model: {summary.model_path}")


def _eval(config: Config, overrides: list[str]) -> None:
    from pipeline.evaluation.metrics_table import metrics_table
    from pipeline.evaluation.stages import evaluate_stage
    from pipeline.orchestration.run import start_ray

    if config.eval.workers:
        start_ray(config)
    evaluation = evaluate_stage(config, postprocessing=overrides)
    print(metrics_table(evaluation.result.metrics, evaluation.result.per_class_ap,
                        evaluation.result.per_class_ap50))
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


def _report(config: Config, runs: list[str], sweep: str | None = None) -> None:
    from pipeline.orchestration.report import (
        collect,
        markdown,
        sweep_curves,
        sweep_markdown,
        write_report,
        write_sweep_report,
    )

    if sweep is not None:
        curves = sweep_curves(config, sweep)
        print(sweep_markdown(curves))
        print(f"report: {write_sweep_report(curves, config.run.outputs().report, sweep)}")
        return
    summaries = collect(config, runs)
    print(markdown(summaries))
    print(f"report: {write_report(summaries, config.run.outputs().report)}")


def _pipeline_train(config: Config) -> None:
    from pipeline.orchestration.run import start_ray
    from pipeline.training.ray_train import train_distributed

    config = _training(config)
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
    if result.best_config.tune.scheduler == "pbt":
        print(f"{result.trials} trials of population based training; best last val AP {result.best_val_ap:.3f}\n"
              f"its schedule: {result.best_config_path}\n"
              f"replay it: aploss pipeline run --config {result.best_config_path}")
        return
    print(f"{result.trials} trials, {result.stopped_early} stopped early by ASHA; best val AP "
          f"{result.best_val_ap:.3f}\nbest config: {result.best_config_path}\n"
          f"train it: aploss pipeline run --config {result.best_config_path}")


def _model_file(spec: str, config: Config) -> Location:
    """The model.pt `--model` names: a run's, a file, or an MLflow model URI's (fetched first)."""
    if is_registered(spec):
        from pipeline.orchestration.tracking.registry import fetch_source

        fetch_source(spec, config, "--model")
    return model_file(spec, config.run.outputs(), "--model")


def _export(config: Config, arguments: argparse.Namespace, overrides: list[str]) -> None:
    from pipeline.inference.export import export_detector

    model_path = _model_file(arguments.model, config)
    print(f"TorchScript program: {export_detector(model_path, Location(arguments.out), overrides)}")


def _predict(config: Config, arguments: argparse.Namespace, inputs: list[str], overrides: list[str]) -> None:
    from pipeline.inference.predict import predict_stage

    # Beside the runs (run.output_dir, which .gitignore covers), not in the working directory.
    out = Location(arguments.out or config.run.outputs().predictions / (
        "detections" if arguments.ray else "detections.json"))
    draw = Location(arguments.draw) if arguments.draw else None
    if not 0 <= arguments.draw_score <= 1:
        raise UserError(f"predict: --draw-score must be in [0, 1], got {arguments.draw_score}")
    if arguments.split and (inputs or arguments.ray or draw):
        raise UserError("predict: --split labels a prepared split in this process; leave out the images"
                        + (", --ray" if arguments.ray else "") + (", --draw" if draw else ""))
    if not inputs and not arguments.split:
        raise UserError("predict: give the images: files, folders, globs or an object-store URI (or --split SPLIT "
                        "for a split of the prepared data)")
    if arguments.ray and draw:
        raise UserError("predict: --draw is for a single process; leave out --ray to draw the detections")
    model_path = _model_file(arguments.model, config)
    if arguments.split:
        from pipeline.inference.predict import predict_split

        detections = predict_split(config, model_path, arguments.split, overrides, out)
        print(f"{len(detections['annotations'])} detections on {len(detections['images'])} images of the "
              f"{arguments.split} split: {out}")
        return
    if arguments.ray:
        from pipeline.inference.batch_predict import predict_on_ray
        from pipeline.orchestration.run import start_ray

        start_ray(config)
        print(f"detections of {predict_on_ray(config, model_path, inputs, overrides, out)} images: {out}")
        return
    detections = predict_stage(config, model_path, inputs, overrides, out, draw, draw_score=arguments.draw_score)
    print(f"{len(detections['annotations'])} detections on {len(detections['images'])} images: {out}"
          + (f"; drawn: {draw}" if draw else ""))


def _config_show(config: Config) -> None:
    import yaml

    from pipeline.config import config_record

    print(yaml.safe_dump(config_record(config), sort_keys=False), end="")


_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")
COMMANDS = {"prep": _prep, "train": _train, "eval": _eval, "pipeline run": _pipeline,
            "pipeline train": _pipeline_train, "tune": _tune, "robustness": _robustness, "report": _report,
            "predict": _predict, "export": _export, "config show": _config_show}
# command: (one line for the command list, what it does, examples)
HELP = {
    "prep": ("data-prep: a dataset to Parquet shards, ground truth and manifest",
             "Reads a named dataset (bccd, voc2007, voc2012, voc0712, coco2017; fetched into the data root when "
             "missing) or a COCO json of your own, and writes per split Parquet shards, a COCO ground-truth json and "
             "a manifest under run.output_dir/data/<dataset>-<input hash>. Rerunning with the same inputs reuses "
             "them. Prints the share of each class's boxes that the anchors reach. data.prep_workers=N checks the "
             "images in N Ray Data tasks across the cluster (ray.address), the same output.",
             ["aploss prep", "aploss prep data.dataset=voc2007 data.root=/data/voc",
              "aploss prep data.dataset=coco2017 data.root=s3://team/datasets data.prep_workers=32 ray.address=auto"]),
    "train": ("train in this process (CPU or one GPU)",
              "Trains on the prepared data (prepared first if needed) in this process, checkpointing under "
              "run.output_dir/run.name; the best weights by validation AP become its model.pt. Rerunning resumes "
              "from the latest checkpoint.",
              ["aploss train train.epochs=2 run.name=quick", "aploss train loss.classification=focal run.name=focal",
               "aploss train loss.classification=rs loss.delta.start=0.5 run.name=rank-sort"]),
    "eval": ("COCO evaluation of a run's model",
             "Evaluates run.name's model.pt on eval.split (the test split by default): COCO metrics per class, PR "
             "curves, drawn samples and a detections json under the run's eval/ folder. eval.workers=N detects in N "
             "Ray workers, the same metrics. model.score_thresh, model.nms_thresh and model.detections_per_image "
             "are the model's own unless overridden.",
             ["aploss eval run.name=quick", "aploss eval run.name=quick eval.split=val model.nms_thresh=0.6",
              "aploss eval run.name=quick eval.workers=4 ray.use_gpu=true ray.address=auto"]),
    "pipeline run": ("the main job: prep -> Ray Train DDP -> evaluate, tracked in MLflow",
                     "Runs data-prep, distributed training on Ray Train (ray.workers processes, one AP-loss ranking "
                     "over the global batch) and evaluation, each as a child run of one MLflow run named run.name, "
                     "and registers the model. Rerunning skips the finished stages and resumes an interrupted "
                     "training.",
                     ["aploss pipeline run", "aploss pipeline run ray.workers=4 run.name=bccd-4-workers",
                      "aploss pipeline run --config configs/retinanet500_voc0712_ap.yaml"]),
    "pipeline train": ("the Ray Train stage alone (writes the run's model.pt)",
                       "Distributed training on Ray Train on the prepared data, without MLflow's pipeline run.",
                       ["aploss pipeline train ray.workers=2 run.name=ddp-only"]),
    "tune": ("Ray Tune sweep over tune.space, ASHA on validation AP",
             "Each trial is a Ray Train run of the config with the searched keys sampled from tune.space (dotted "
             "key -> choice(...), grid(...), uniform(a, b), loguniform(a, b) or randint(a, b)); ASHA stops the "
             "trials that trail on validation AP. Writes the best trial's config as a YAML that --config takes; "
             "one MLflow run with a child run per trial.",
             ["aploss tune --config configs/bccd_sweep.yaml",
              "aploss tune --samples 8 'tune.space={optim.lr: \"loguniform(1e-3, 3e-2)\"}'"]),
    "robustness": ("AP under occlusion, noise and COCO-C (P, mPC, rPC) of one or more runs",
                   "Evaluates the models of the given runs on perturbed test images (occlusion, Gaussian noise, the "
                   "15 COCO-C corruptions at robustness.severities), all in one pass, and logs P, mPC and rPC to "
                   "each run's MLflow record.",
                   ["aploss robustness --run bccd-ap --run bccd-focal 'robustness.severities=[3]'"]),
    "report": ("one table and plots from the MLflow runs of a comparison",
               "Gathers the pipeline runs' test AP and robustness from MLflow into one markdown table (per run, and "
               "mean +- std per loss) with plots under run.output_dir/report; with --sweep, a sweep's trials with "
               "the lr and δ schedules they followed (a PBT trial's discovered one) drawn against the step.",
               ["aploss report", "aploss report --run bccd-ap-seed0 --run bccd-focal-seed0",
                "aploss report --sweep bccd-pbt"]),
    "predict": ("apply a trained detector to images: COCO-format detections json",
                "Runs the model (a run's name, a model.pt or checkpoint, or an MLflow model URI such as "
                "models:/aploss-bccd@champion) on image files, folders, globs or an object-store URI, and writes "
                "their detections as a COCO json in the dataset's own category ids and names (bbox x, y, w, h in "
                "pixels, with a score) to run.output_dir/predict/detections.json unless --out says where; images are "
                "numbered 1..N and named by their file names. --draw DIR also writes each image with its detections "
                f"scoring at least --draw-score ({DRAW_SCORE}), each class in a colour of its own, captioned with its "
                "name and score. With --split SPLIT it labels that split of the configured dataset's "
                "prepared data instead, with the dataset's own image ids and file names (it scores against the "
                "split's ground truth as it is), and refuses a model trained on other classes. model.score_thresh, "
                "model.nms_thresh and model.detections_per_image are the model's own unless overridden.",
                ["aploss predict --model bccd-ap images/ --out detections.json",
                 "aploss predict --model bccd-ap --split test --out test-detections.json",
                 "aploss predict --ray --model run:bccd-ap s3://bucket/photos/ --out s3://bucket/detections "
                 "ray.workers=8 ray.use_gpu=true",
                 "aploss predict --model models:/aploss-bccd@champion 'photos/*.jpg' --draw drawn/ "
                 "model.score_thresh=0.3"]),
    "export": ("write a trained detector as one TorchScript file that runs with torch and torchvision alone",
               "The program takes a list of RGB float [3, H, W] images in [0, 1] of any sizes and returns per image "
               "boxes (x1, y1, x2, y2 in its pixels), scores and labels, as aploss predict finds them; its classes "
               "attribute names the labels. Load it with `import torch, torchvision; torch.jit.load(FILE)`. "
               "model.score_thresh, model.nms_thresh and model.detections_per_image are the model's own unless "
               "overridden.",
               ["aploss export --model bccd-ap --out detector.pt",
                "aploss export --model models:/aploss-bccd@champion --out s3://bucket/detector.pt "
                "model.score_thresh=0.3"]),
    "config show": ("print the effective config (defaults, file and overrides)",
                    "Prints the config a command would run with: the defaults, the --config file and the overrides "
                    "merged and validated, as YAML that --config takes.",
                    ["aploss config show",
                     "aploss config show --config configs/ssd300_voc0712_ap.yaml train.epochs=1"]),
}


def _command_parser(commands, name: str) -> argparse.ArgumentParser:
    """`name`'s parser under `commands` (`pipeline run` as `run` under `pipeline`), with its
    description, examples and the config arguments every command takes."""
    summary, description, examples = HELP[name]
    command = commands.add_parser(name.split()[-1], help=summary,
                                  description=textwrap.fill(f"{summary[0].upper()}{summary[1:]}. {description}", 88),
                                  epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    command.add_argument("--config", help="YAML config file (defaults apply to missing keys)")
    command.add_argument("--debug", action="store_true", help="show the traceback of an error")
    command.add_argument("overrides", nargs="*", metavar="section.key=value",
                         help="config overrides, e.g. optim.lr=0.02 train.epochs=3 ('aploss config show' lists "
                              "every key with its value)")
    return command


def _add_runs_argument(command: argparse.ArgumentParser, help: str) -> None:
    # Repeated rather than nargs="+", which would swallow the positional overrides.
    command.add_argument("--run", action="append", default=[], dest="runs", metavar="RUN_NAME", help=help)


def parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The CLI's parser, and each command's own (to report a mistake with that command's usage)."""
    root = argparse.ArgumentParser(
        prog="aploss", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill("Train one-stage detectors (RetinaNet, SSD) with the AP-loss, as a Ray + MLflow "
                                  "pipeline. Every command takes one config: the defaults, a YAML file (--config) "
                                  "and section.key=value overrides.", 88),
        epilog="examples:\n  aploss pipeline run                       # the main job on BCCD\n"
               "  aploss config show train.epochs=2          # the effective config\n"
               "  aploss <command> --help                   # what a command does, with examples")
    root.add_argument("-v", "--verbose", action="store_true",
                      help="show third-party notices and warnings that are hidden by default")
    commands = root.add_subparsers(dest="command", required=True, metavar="<command>")
    groups, parsers = {}, {}
    for name in HELP:  # `pipeline run` and `pipeline train` as actions of a `pipeline` group
        group, _, action = name.partition(" ")
        if action and group not in groups:
            summary = "; ".join(f"{other.split()[-1]}: {HELP[other][0]}" for other in HELP
                                if other.startswith(f"{group} "))
            groups[group] = commands.add_parser(group, help=summary).add_subparsers(
                dest="action", required=True, metavar="<action>")
        parsers[name] = _command_parser(groups[group] if action else commands, name)
    parsers["tune"].add_argument("--samples", type=int, help="number of trials (tune.samples)")
    _add_runs_argument(parsers["robustness"], "a run whose model to evaluate, repeated: all in one pass over the "
                                              "perturbed images (default: run.name)")
    predict = parsers["predict"]
    predict.add_argument("--model", required=True, help="a run name, a model.pt or checkpoint, or an MLflow model URI")
    predict.add_argument("--out", help="the detections json (default: run.output_dir/predict/detections.json), or "
                                       "with --ray the folder of Parquet shards (default: run.output_dir/predict/"
                                       "detections)")
    predict.add_argument("--draw", metavar="DIR", help="also write each image with its detections here, a colour per "
                                                       "class, captioned with class and score")
    predict.add_argument("--draw-score", type=float, default=DRAW_SCORE, metavar="S",
                         help=f"draw the detections scoring at least S (default: {DRAW_SCORE})")
    predict.add_argument("--split", help="label this split of the prepared data of the data.* settings, keeping the "
                                         "dataset's image ids, instead of image files")
    predict.add_argument("--ray", action="store_true",
                         help="run on Ray: Ray Data reads the images, ray.workers actors detect (one GPU each with "
                              "ray.use_gpu), Parquet shards out")
    predict.usage = ("aploss predict --model MODEL [--out PATH] [--draw DIR | --ray] (IMAGES... | --split SPLIT) "
                     "[section.key=value ...]")
    parsers["export"].add_argument("--model", required=True, help="a run name, a model.pt, or an MLflow model URI")
    parsers["export"].add_argument("--out", required=True, help="the program file (local or object-store URI)")
    _add_runs_argument(parsers["report"], "a pipeline run to compare, repeated (default: every pipeline run of the "
                                          "experiment)")
    parsers["report"].add_argument("--sweep", metavar="NAME",
                                   help="instead: the trials of the sweep NAME (the run.name of `aploss tune`), "
                                        "with the lr and δ schedules they followed, drawn")
    return root, parsers


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, str]:
    root, parsers = parser()
    arguments, unknown = root.parse_known_args(argv)
    if arguments.verbose:
        os.environ[VERBOSE_VARIABLE] = "1"
    quiet_third_party()
    command = " ".join(filter(None, [arguments.command, getattr(arguments, "action", None)]))
    if command == "predict":  # images and overrides after an option are positionals all the same
        arguments.overrides += [item for item in unknown if not item.startswith("-")]
        unknown = [item for item in unknown if item.startswith("-")]
    if unknown:  # with the command's own usage, not the top-level one
        parsers[command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return arguments, command


# The errors of MLflow and Ray that a user meets rather than causes (a server gone, a cluster
# lost), named by module: a command that never loaded MLflow or Ray cannot meet them, and need not
# import them to tell (help and `config show` stay light).
_MET_OUTSIDE = (("mlflow.exceptions", "MlflowException"), ("ray.exceptions", "RayError"),
                ("ray.train", "TrainingFailedError"), ("ray.tune.error", "TuneError"))


def _met_outside(error: BaseException) -> bool:
    if isinstance(error, TrainingFailed):  # the workers' errors say whose it is
        return all(_met_outside(cause) for cause in error.causes)
    kinds = (getattr(sys.modules.get(module), name, None) for module, name in _MET_OUTSIDE)
    return isinstance(error, OSError) or any(kind is not None and isinstance(error, kind) for kind in kinds)


def main(argv: list[str] | None = None) -> int:
    arguments, command = _parse(argv)
    try:
        overrides = list(arguments.overrides)
        inputs = []
        if command == "predict":  # the images and the overrides share the positional arguments
            inputs = [item for item in overrides if not _OVERRIDE.match(item)]
            overrides = [item for item in overrides if _OVERRIDE.match(item)]
        if getattr(arguments, "samples", None) is not None:
            overrides.append(f"tune.samples={arguments.samples}")
        config = load_config(arguments.config, overrides)
        if command in ("train", "pipeline run", "pipeline train", "tune"):
            from pipeline.orchestration.tracking.registry import fetch_source

            fetch_source(config.model.init, config, "model.init")
        for name in getattr(arguments, "runs", []):
            check_run_name(name, "--run")
        if getattr(arguments, "sweep", None) is not None:
            check_run_name(arguments.sweep, "--sweep")
        if command == "report":
            COMMANDS[command](config, arguments.runs, arguments.sweep)
        elif command == "robustness":
            COMMANDS[command](config, arguments.runs)
        elif command == "predict":
            _predict(config, arguments, inputs, overrides)
        elif command == "export":
            _export(config, arguments, overrides)
        elif command == "eval":
            _eval(config, overrides)
        else:
            COMMANDS[command](config)
    except UserError as error:
        if arguments.debug:
            raise
        print(f"aploss {command}: error: {redact(str(error))}", file=sys.stderr)
        return 2
    except Exception as error:
        # What the user meets rather than causes (disk full, a server gone): one line, and
        # --debug for the traceback. Anything else is a bug and keeps its traceback.
        if arguments.debug or not _met_outside(error):
            raise
        print(f"aploss {command}: error: {redact(one_line(error))} (--debug shows the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"aploss {command}: interrupted; rerunning the same command resumes", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
