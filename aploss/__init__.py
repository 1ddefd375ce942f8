"""Ranking losses for one-stage detectors (AP-loss, aLRP, Rank & Sort), trained by their
error-driven updates over the global batch."""
import importlib

# Where each public name lives, imported on first use: what only reads a config or prints help
# (a config names an architecture or a δ schedule) does not load torch.
_EXPORTS = {
    "ALRPLoss": "aploss.alrp", "alrp_loss": "aploss.alrp",
    "global_alrp_loss": "aploss.distributed", "global_ap_loss": "aploss.distributed",
    "global_rs_loss": "aploss.distributed",
    "APLoss": "aploss.engine", "ap_loss": "aploss.engine",
    "RankSortLoss": "aploss.rank_sort", "rs_loss": "aploss.rank_sort",
    "DeltaSchedule": "aploss.schedules", "schedule_from_dict": "aploss.schedules",
    "schedule_to_dict": "aploss.schedules",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aploss' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
