"""AP-loss, focal loss, aLRP and Rank & Sort on BCCD over several seeds: clean AP and robustness
(P, mPC, rPC).

Each (loss, seed) is a pipeline run of the default recipe (or `--config`'s), with the loss's released delta
(`config.RELEASED_SETTINGS`): data-prep -> train in this process -> evaluate, under its own run
name in MLflow; then the robustness stage evaluates all the trained
models in one pass over the perturbed test images (each corruption computed once, not once per
model), logged to each run; `aploss report` gathers them into one table (per run, and mean ± std
per loss). Rerunning skips what finished. Outputs: <output>/report/report.md and plots.

    APLOSS_DATA_ROOT=../shared/datasets python benchmarks/bccd_seeds.py --seeds 0 1 2
    APLOSS_DATA_ROOT=../shared/datasets python benchmarks/bccd_seeds.py --losses alrp rs
    APLOSS_DATA_ROOT=../shared/datasets python benchmarks/bccd_seeds.py --config configs/bccd_long.yaml \
        --losses ap --seeds 0 1 2 3 4 --no-robustness --output runs/bccd-long-seeds
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import RELEASED_SETTINGS, load_config  # noqa: E402
from pipeline.orchestration.report import collect, markdown, write_report  # noqa: E402
from pipeline.orchestration.run import run_pipeline, run_robustness  # noqa: E402
from pipeline.orchestration.tracking import connection, pipeline_runs  # noqa: E402

LOSSES = ("ap", "focal", "alrp", "rs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--config", help="the recipe's YAML (default: the built-in defaults, the main job's)")
    parser.add_argument("--no-robustness", action="store_true", help="clean test metrics only")
    parser.add_argument("--output", default="runs/bccd-seeds")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, key=value")
    args = parser.parse_args()
    config = load_config(args.config, [f"run.output_dir={args.output}", *args.overrides])
    runs = {f"bccd-{loss}-seed{seed}": (loss, seed) for loss in args.losses for seed in args.seeds}
    names = list(runs)
    start = time.perf_counter()
    for name, (loss, seed) in runs.items():
        run_pipeline(load_config(args.config, [
            f"loss.classification={loss}", *RELEASED_SETTINGS.get(loss, ()), f"train.seed={seed}", f"run.name={name}",
            f"run.output_dir={args.output}", *args.overrides]), distributed=False)
    trained = time.perf_counter()
    experiment = connection.configure(config)
    pending = [] if args.no_robustness else [name for name in names if not pipeline_runs.stage_run(
        experiment, pipeline_runs.pipeline_run(config.for_run(name), experiment), "robustness")[1]]
    if pending:
        run_robustness(config, pending)
    finished = time.perf_counter()
    summaries = collect(config, names)
    print(markdown(summaries))
    print(f"\nwall time: prep/train/evaluate of the runs not yet done {(trained - start) / 60:.1f} min; "
          f"robustness of {len(pending)} runs in one pass {(finished - trained) / 60:.1f} min")
    print(f"report: {write_report(summaries, Path(args.output).resolve() / 'report')}")


if __name__ == "__main__":
    main()
