"""AP-loss for one-stage detectors, trained by the paper's error-driven update."""
from aploss.distributed import global_ap_loss
from aploss.engine import APLoss, ap_loss
from aploss.schedules import DeltaSchedule, schedule_from_dict, schedule_to_dict

__all__ = ["APLoss", "DeltaSchedule", "ap_loss", "global_ap_loss", "schedule_from_dict",
           "schedule_to_dict"]
