"""The metrics of an evaluation as the console shows them."""
import math


def metrics_table(metrics: dict[str, float | None], per_class_ap: dict[str, float | None],
                  per_class_ap50: dict[str, float | None]) -> str:
    """Markdown tables of the COCO metrics and of each class's AP and AP50; a value COCO could not
    compute (None or NaN: no ground truth of that class, or no box of that size) is n/a, and said
    why."""
    def missing(value: float | None) -> bool:
        return value is None or math.isnan(value)

    def shown(value: float | None) -> str:
        return "n/a" if missing(value) else f"{value:.3f}"

    rows = [f"| {name} | {shown(value)} |" for name, value in metrics.items()]
    per_class = [f"| {name} | {shown(ap)} | {shown(per_class_ap50.get(name))} |" for name, ap in per_class_ap.items()]
    table = "\n".join(["| metric | value |", "|---|---|", *rows, "", "| class | AP | AP50 |", "|---|---|---|",
                       *per_class])
    per_class_values = [value for name in per_class_ap for value in (per_class_ap[name], per_class_ap50.get(name))]
    if any(missing(value) for value in (*metrics.values(), *per_class_values)):
        table += "\n(n/a: the split holds no ground truth of that class or size)"
    return table
