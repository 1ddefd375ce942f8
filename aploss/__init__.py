"""AP-loss for one-stage detectors, trained by the paper's error-driven update."""
from aploss.engine import APLoss, ap_loss

__all__ = ["APLoss", "ap_loss"]
