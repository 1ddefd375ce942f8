"""`aploss report`: the pipeline runs of a comparison (AP-loss vs focal, delta-schedule ablation,
robustness) gathered from MLflow into one markdown table, a table of means over seeds, and plots;
or a sweep's trials with the lr and δ schedules they followed (`--sweep`).
"""
import io
import math
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mlflow.exceptions import MlflowException

from pipeline.config import Config, config_from_dict, load_config
from pipeline.errors import UserError
from pipeline.evaluation.robustness import RobustnessResult, Setting, plot_robustness, read_result
from pipeline.io import write_bytes_atomic
from pipeline.orchestration.tracking import connection, pipeline_runs, records
from pipeline.training.loop import LearningRateFactor

GROUP_PARAMS = ("loss.classification", "loss.delta.kind", "model.arch")


@dataclass
class RunSummary:
    name: str
    params: dict[str, str]
    metrics: dict[str, float]  # evaluate: AP, AP50, AP_<class>; robustness: P, mPC, rPC
    robustness: RobustnessResult | None = None
    per_class: dict[str, float] = field(default_factory=dict)  # class -> AP
    per_class_ap50: dict[str, float] = field(default_factory=dict)

    @property
    def group(self) -> str:
        return " / ".join(self.params.get(key, "?") for key in GROUP_PARAMS)


def _robustness(record: pipeline_runs.PipelineRecord) -> RobustnessResult:
    with tempfile.TemporaryDirectory() as directory:
        return read_result(record.artifact("robustness", "robustness/robustness.json", directory))


def collect(config: Config, names: list[str]) -> list[RunSummary]:
    """One summary per pipeline run name (all pipeline runs of the experiment if none given)."""
    summaries = []
    for record in pipeline_runs.pipeline_records(connection.configure(config), names):
        stages = record.stages
        metrics = {**(stages["evaluate"].data.metrics if "evaluate" in stages else {}),
                   **(stages["robustness"].data.metrics if "robustness" in stages else {})}
        robust = stages.get("robustness")
        robustness = _robustness(record) if robust and robust.info.status == "FINISHED" else None
        params = _params(stages, robustness)
        per_class = {key[3:]: value for key, value in metrics.items() if key.startswith("AP_")}
        per_class_ap50 = {key[5:]: value for key, value in metrics.items() if key.startswith("AP50_")}
        summaries.append(RunSummary(record.name, params, metrics, robustness, per_class, per_class_ap50))
    return summaries


def _params(stages: dict, robustness: RobustnessResult | None) -> dict[str, str]:
    """The run's training params: its train stage's, else those its robustness stage read from
    the model (trained outside the pipeline, `aploss train`)."""
    if "train" in stages:
        return stages["train"].data.params
    if robustness is not None and robustness.trained_with:
        return records.param_safe(config_from_dict(robustness.trained_with))
    return {}


def _cell(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _spread(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def markdown(summaries: list[RunSummary]) -> str:
    classes = sorted({name for s in summaries for name in s.per_class})
    header = ["run", "loss", "δ schedule", "seed", "AP", "AP50", *[f"AP {c}" for c in classes],
              *[f"AP50 {c}" for c in classes], "P", "mPC", "rPC"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        cells = [s.name, s.params.get("loss.classification", "?"), s.params.get("loss.delta.kind", "?"),
                 s.params.get("train.seed", "?"), _cell(s.metrics.get("AP")), _cell(s.metrics.get("AP50")),
                 *[_cell(s.per_class.get(c)) for c in classes], *[_cell(s.per_class_ap50.get(c)) for c in classes],
                 _cell(s.metrics.get("P")),
                 _cell(s.metrics.get("mPC")), _cell(s.metrics.get("rPC"))]
        lines.append("| " + " | ".join(cells) + " |")
    groups = sorted({s.group for s in summaries})
    lines += ["", "Mean ± standard deviation over the runs of each group (" + " / ".join(GROUP_PARAMS) + "):", "",
              "| group | runs | AP | AP50 | lowest class AP50 (any run) | mPC | rPC |", "|---|---|---|---|---|---|---|"]
    for group in groups:
        members = [s for s in summaries if s.group == group]
        values = {key: [s.metrics[key] for s in members if key in s.metrics] for key in ("AP", "AP50", "mPC", "rPC")}
        lowest = min((v for s in members for v in s.per_class_ap50.values()), default=None)
        cells = [_spread(values["AP"]), _spread(values["AP50"]), _cell(lowest), _spread(values["mPC"]),
                 _spread(values["rPC"])]
        lines.append(f"| {group} | {len(members)} | " + " | ".join(cells) + " |")
    return "\n".join(lines + _robustness_lines(summaries, groups))


def _coco_c_scope(result: RobustnessResult) -> tuple[tuple[str, ...], tuple[float, ...]]:
    chosen = [s for s in result.settings if s.family == "coco-c"]
    return tuple(dict.fromkeys(s.name for s in chosen)), tuple(sorted({s.severity for s in chosen}))


def _robustness_lines(summaries: list[RunSummary], groups: list[str]) -> list[str]:
    """What mPC covers, and each group's AP per perturbation."""
    robust = [s for s in summaries if s.robustness is not None]
    if not robust:
        return []
    scopes = {_coco_c_scope(s.robustness) for s in robust}
    names, severities = next(iter(scopes))
    lines = ["", f"mPC: COCO-C, {len(names)} corruptions × severities {', '.join(f'{v:g}' for v in severities)}."]
    if len(scopes) > 1:
        lines.append("**Warning: the runs' robustness covers different corruptions or severities; their mPC "
                     "values are not comparable.**")
    for name, reason in sorted({item for s in robust for item in s.robustness.unavailable.items()}):
        lines.append(f"Not run: {name} ({reason}).")
    robust_groups = [g for g in groups if any(s.group == g for s in robust)]
    lines += ["", "AP per perturbation (COCO-C: mean over severities), mean ± std over each group's runs:", "",
              "| perturbation | " + " | ".join(robust_groups) + " |", "|---|" + "---|" * len(robust_groups)]
    rows = dict.fromkeys(_row(s) for r in robust for s in r.robustness.settings if s.family != "clean")
    for row in rows:
        cells = [_spread([ap for r in robust if r.group == group
                          if (ap := _row_ap(r.robustness, row)) is not None]) for group in robust_groups]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def _row(setting: Setting) -> str:
    """A COCO-C corruption is one row over its severities; occlusion and noise, a row a setting."""
    return setting.name if setting.family == "coco-c" else setting.label


def _row_ap(result: RobustnessResult, row: str) -> float | None:
    values = [result.ap[s.label] for s in result.settings if _row(s) == row]
    return statistics.mean(values) if values else None


def ap_figure(summaries: list[RunSummary]) -> Figure:
    """Each run's AP and AP50 as bars side by side, opaque, so that each is in its legend's
    colour (AP drawn over AP50 at partial opacity took a colour of neither)."""
    figure = Figure(figsize=(max(4, 1.2 * len(summaries)), 4), constrained_layout=True)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = list(range(len(summaries)))
    for offset, metric in ((-0.2, "AP"), (0.2, "AP50")):
        axes.bar([x + offset for x in positions], [s.metrics.get(metric, 0.0) for s in summaries], width=0.4,
                 label=metric)
    axes.set_xticks(positions, [s.name for s in summaries], rotation=30)
    axes.set(ylabel="COCO AP", ylim=(0, 1))
    axes.legend()
    return figure


def _bar_chart(summaries: list[RunSummary], path: Path) -> Path:
    figure = ap_figure(summaries)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_bytes_atomic(buffer.getvalue(), path)
    return path


def write_report(summaries: list[RunSummary], out_dir: Path) -> Path:
    """report.md with the tables and the plots beside it."""
    plots = [_bar_chart(summaries, out_dir / "ap.png")]
    robust = {s.name: s.robustness for s in summaries if s.robustness is not None}
    if robust:
        plots.append(plot_robustness(robust, out_dir / "robustness.png"))
    text = "# aploss report\n\n" + markdown(summaries) + "\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots)
    path = out_dir / "report.md"
    write_bytes_atomic(text.encode(), path)
    return path


@dataclass
class TrialCurves:
    """A sweep trial's learning rate and δ at each step, as its schedule sets them (a PBT
    trial's: the schedule of its lineage, the donors' segments included), and the validation APs
    its own run reported."""

    name: str
    steps: list[int]
    lr: list[float]
    delta: list[float]
    val_ap: dict[int, float]
    base_lr: float  # optim.lr its schedule starts from (a PBT trial's lineage's first)
    base_delta: float  # loss.delta.start, likewise
    changes: str  # a PBT trial's perturbations, as the table shows them; "" for a fixed schedule
    drawn: tuple[float, float]  # the lr and δ the trial was drawn with (its run's params)


def _schedule_curves(config: Config, total_steps: int) -> tuple[list[int], list[float], list[float]]:
    """The lr and δ that steps 1..total train with, as the run logs them: step s runs at the lr
    factor and δ progress of the s - 1 steps before it."""
    factor, delta = LearningRateFactor.of(config.optim, total_steps), config.loss.delta.build()
    before = range(total_steps)
    return ([done + 1 for done in before], [config.optim.lr * factor(done) for done in before],
            [delta(done / total_steps) for done in before])


def _changes(config: Config, total_steps: int) -> str:
    moves = [f"lr {lr:.3g} at {round(fraction * total_steps)}" for fraction, lr in config.optim.lr_changes]
    moves += [f"δ {value:.3g} at {round(fraction * total_steps)}" for fraction, value in config.loss.delta.changes]
    return ", ".join(moves)


def sweep_curves(config: Config, sweep: str) -> list[TrialCurves]:
    """The trials of the sweep named `sweep` (its `run.name`) from MLflow: the schedule a PBT
    trial followed is its schedule.yaml; a trial of a fixed schedule shows what it logged."""
    experiment = connection.configure(config)
    client = mlflow.MlflowClient()
    sweep_run = pipeline_runs.sweep_run(experiment, sweep)
    curves = []
    for run in pipeline_runs.trial_runs(experiment, sweep_run):
        history = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
                   for key in ("lr", "delta", "val_ap")}
        if not history["lr"]:
            continue  # a trial that never trained a logged step
        total = max(history["lr"])
        drawn = float(run.data.params["optim.lr"]), float(run.data.params["loss.delta.start"])
        with tempfile.TemporaryDirectory() as directory:
            try:
                path = client.download_artifacts(run.info.run_id, pipeline_runs.SCHEDULE, directory)
            except MlflowException:
                path = None
            schedule = load_config(path) if path else None
        if schedule is None:
            steps = sorted(history["lr"])
            lr, changes = [history["lr"][s] for s in steps], ""
            base_lr, base_delta = drawn
            delta = [history["delta"].get(s, math.nan) for s in steps]
        else:
            (steps, lr, delta), changes = _schedule_curves(schedule, total), _changes(schedule, total)
            base_lr, base_delta = schedule.optim.lr, schedule.loss.delta.start
        curves.append(TrialCurves(run.info.run_name, steps, lr, delta, history["val_ap"], base_lr, base_delta,
                                  changes, drawn))
    if not curves:
        raise UserError(f"sweep {sweep}: no trial has logged a training step yet")
    return sorted(curves, key=lambda trial: trial.name)


def _last_val_ap(trial: TrialCurves) -> float | None:
    return trial.val_ap[max(trial.val_ap)] if trial.val_ap else None


def sweep_markdown(curves: list[TrialCurves]) -> str:
    lines = ["| trial | drawn lr, δ | last val AP | trained from lr (optim.lr), δ (loss.delta.start) | "
             "then (value from step) |", "|---|---|---|---|---|"]
    for trial in curves:
        lines.append(f"| {trial.name} | {trial.drawn[0]:.3g}, {trial.drawn[1]:.3g} | {_cell(_last_val_ap(trial))} | "
                     f"{trial.base_lr:.3g}, {trial.base_delta:.3g} | {trial.changes or '–'} |")
    return "\n".join(lines)


def schedule_figure(curves: list[TrialCurves]) -> Figure:
    """Each trial's lr, δ and validation AP against the step, a colour per trial; the trial with
    the best last validation AP drawn thick."""
    figure = Figure(figsize=(12, 3.6), constrained_layout=True)
    FigureCanvasAgg(figure)
    lr_axes, delta_axes, ap_axes = figure.subplots(1, 3)
    best = max(curves, key=lambda trial: _last_val_ap(trial) or -1.0).name
    for trial in curves:
        width = 2.5 if trial.name == best else 1.0
        lr_line, = lr_axes.plot(trial.steps, trial.lr, linewidth=width, label=trial.name)
        delta_axes.plot(trial.steps, trial.delta, linewidth=width, color=lr_line.get_color())
        validated = sorted(trial.val_ap)
        ap_axes.plot(validated, [trial.val_ap[s] for s in validated], marker="o", linewidth=width,
                     color=lr_line.get_color())
    lr_axes.set(xlabel="step", ylabel="learning rate", yscale="log")
    delta_axes.set(xlabel="step", ylabel="δ")
    ap_axes.set(xlabel="step", ylabel="validation AP (own run)")
    lr_axes.legend(fontsize="small")
    return figure


def write_sweep_report(curves: list[TrialCurves], out_dir: Path, sweep: str) -> Path:
    """<sweep>-schedules.md with the trials' table, and the curves as <sweep>-schedules.png."""
    buffer = io.BytesIO()
    schedule_figure(curves).savefig(buffer, format="png", dpi=100)
    plot = out_dir / f"{sweep}-schedules.png"
    write_bytes_atomic(buffer.getvalue(), plot)
    text = (f"# sweep {sweep}: the schedules its trials followed\n\n{sweep_markdown(curves)}\n\n"
            f"![schedules]({plot.name})\n")
    path = out_dir / f"{sweep}-schedules.md"
    write_bytes_atomic(text.encode(), path)
    return path
