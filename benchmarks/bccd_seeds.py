"""AP-loss vs focal loss on BCCD over several seeds: clean AP and robustness (P, mPC, rPC).

Each (loss, seed) is a full single-process run of the default recipe (prep -> train -> eval ->
robustness), tracked in MLflow under its own pipeline run name, and `aploss report` gathers them
into one table (per run, and mean ± std per loss). Outputs: <output>/report/report.md and plots.

    APLOSS_DATA_ROOT=../shared/datasets python benchmarks/bccd_seeds.py --seeds 0 1 2
"""
import argparse
import sys
from pathlib import Path

import mlflow

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import tracking  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.prep import prepare  # noqa: E402
from pipeline.report import collect, markdown, write_report  # noqa: E402
from pipeline.stages import evaluate_stage, robustness_stage, train_stage  # noqa: E402


def run(config) -> None:
    """prep -> train -> evaluate -> robustness in this process, as MLflow child runs."""
    experiment = tracking.configure(config)
    parent = tracking.pipeline_run(config, experiment)
    stages = {"data-prep": lambda: tracking.log_prep(prepare(config, progress=False).manifest,
                                                     config.run.prepared_data(config.data.dataset)),
              "train": lambda: (tracking.log_train_params(config), train_stage(config, progress=False)),
              "evaluate": lambda: tracking.log_evaluation(evaluate_stage(config)),
              "robustness": lambda: tracking.log_robustness(*robustness_stage(config))}
    for stage, action in stages.items():
        run_id, finished = tracking.stage_run(experiment, parent, stage)
        if finished:
            continue
        with mlflow.start_run(run_id=run_id):
            action()
    with mlflow.start_run(run_id=parent):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default="runs/bccd-seeds")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, key=value")
    args = parser.parse_args()
    names = []
    for loss in ("ap", "focal"):
        for seed in args.seeds:
            name = f"bccd-{loss}-seed{seed}"
            run(load_config(None, [f"loss.classification={loss}", f"train.seed={seed}", f"run.name={name}",
                                   f"run.output_dir={args.output}", *args.overrides]))
            names.append(name)
    config = load_config(None, [f"run.output_dir={args.output}", *args.overrides])
    summaries = collect(config, names)
    print(markdown(summaries))
    print(f"report: {write_report(summaries, Path(args.output).resolve() / 'report')}")


if __name__ == "__main__":
    main()
