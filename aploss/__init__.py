"""Ranking losses for one-stage detectors (AP-loss, aLRP, Rank & Sort), trained by their
error-driven updates over the global batch."""
from aploss.alrp import ALRPLoss, alrp_loss
from aploss.distributed import global_alrp_loss, global_ap_loss, global_rs_loss
from aploss.engine import APLoss, ap_loss
from aploss.rank_sort import RankSortLoss, rs_loss
from aploss.schedules import DeltaSchedule, schedule_from_dict, schedule_to_dict

__all__ = ["ALRPLoss", "APLoss", "DeltaSchedule", "RankSortLoss", "alrp_loss", "ap_loss", "global_alrp_loss",
           "global_ap_loss", "global_rs_loss", "rs_loss", "schedule_from_dict", "schedule_to_dict"]
