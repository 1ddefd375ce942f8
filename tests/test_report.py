"""The report's tables from run summaries, checked against hand-computed means."""
import statistics

from pipeline.evaluation.robustness import RobustnessResult, Setting
from pipeline.orchestration.report import RunSummary, ap_figure, markdown


def _summary(name: str, loss: str, seed: int, ap: float, noise_ap: float, fog: tuple[float, float],
             severities=(1, 3)) -> RunSummary:
    chosen = [Setting("clean", "clean", 0.0), Setting("noise", "noise", 0.1),
              *[Setting("coco-c", "fog", s) for s in severities]]
    values = {"clean": ap, "noise@0.1": noise_ap, **{f"fog@{s}": v for s, v in zip(severities, fog)}}
    mpc = statistics.mean(fog)
    result = RobustnessResult(values, chosen, ap, mpc, mpc / ap, {"glass_blur": "TypeError: old scikit-image"})
    params = {"loss.classification": loss, "loss.delta.kind": "constant", "model.arch": "retinanet_r18",
              "train.seed": str(seed)}
    return RunSummary(name, params, {"AP": ap, "AP50": 2 * ap, "P": ap, "mPC": mpc, "rPC": mpc / ap}, result,
                      {"cell": ap / 2}, {"cell": ap + 0.1})


def test_report_tables_per_run_per_group_and_per_perturbation():
    runs = [_summary("ap0", "ap", 0, 0.30, 0.28, (0.25, 0.15)), _summary("ap1", "ap", 1, 0.40, 0.36, (0.35, 0.25)),
            _summary("focal0", "focal", 0, 0.50, 0.40, (0.30, 0.10))]
    lines = markdown(runs).splitlines()
    assert "| ap0 | ap | constant | 0 | 0.300 | 0.600 | 0.150 | 0.400 | 0.300 | 0.200 | 0.667 |" in lines
    ap_group, focal_group = "ap / constant / retinanet_r18", "focal / constant / retinanet_r18"
    std = statistics.stdev([0.30, 0.40])
    # The lowest AP50 of any class in any run of the group: whether every seed learnt every class.
    assert (f"| {ap_group} | 2 | 0.350 ± {std:.3f} | 0.700 ± {2 * std:.3f} | 0.400 | 0.250 ± {std:.3f} | "
            f"{statistics.mean([0.2 / 0.3, 0.3 / 0.4]):.3f} ± "
            f"{statistics.stdev([0.2 / 0.3, 0.3 / 0.4]):.3f} |") in lines
    assert "mPC: COCO-C, 1 corruptions × severities 1, 3." in lines
    assert "Not run: glass_blur (TypeError: old scikit-image)." in lines
    assert f"| perturbation | {ap_group} | {focal_group} |" in lines
    assert f"| noise@0.1 | 0.320 ± {statistics.stdev([0.28, 0.36]):.3f} | 0.400 |" in lines
    assert f"| fog | 0.250 ± {std:.3f} | 0.200 |" in lines  # each run's mean over severities, then over runs
    assert not any("Warning" in line for line in lines)


def test_report_warns_when_runs_cover_different_severities():
    runs = [_summary("a", "ap", 0, 0.3, 0.2, (0.2, 0.1)), _summary("b", "focal", 0, 0.3, 0.2, (0.2, 0.1), (3, 5))]
    assert any(line.startswith("**Warning: the runs' robustness covers different")
               for line in markdown(runs).splitlines())


def test_the_ap_chart_draws_each_bar_opaque_in_its_legend_s_colour_beside_the_other():
    # AP was drawn over AP50 at partial opacity: its bars took a colour of neither legend entry.
    axes = ap_figure([_summary("ap0", "ap", 0, 0.30, 0.28, (0.25, 0.15)),
                      _summary("focal0", "focal", 0, 0.50, 0.40, (0.30, 0.10))]).axes[0]
    legend = {text.get_text(): handle.get_facecolor() for text, handle in
              zip(axes.get_legend().get_texts(), axes.get_legend().legend_handles)}
    bars = {container.get_label(): container.patches for container in axes.containers}
    assert sorted(legend) == sorted(bars) == ["AP", "AP50"]
    for metric, patches in bars.items():
        assert all(patch.get_facecolor() == legend[metric] and patch.get_facecolor()[3] == 1 for patch in patches)
    assert [patch.get_height() for patch in bars["AP"]] == [0.30, 0.50]
    assert [patch.get_height() for patch in bars["AP50"]] == [0.60, 1.00]
    for ap, ap50 in zip(bars["AP"], bars["AP50"]):
        assert ap.get_x() + ap.get_width() <= ap50.get_x() + 1e-9  # side by side, not over each other
