"""An exponential moving average (EMA) of the weights, which validation and the run's model.pt
use in place of the last step's: a short run from scratch on a small dataset ends on weights
that still jump from batch to batch, and their average over the last ~1 / (1 - decay) steps
detects better (the EMA of YOLO and timm). The decay ramps up over the first steps
(TensorFlow's `num_updates` rule, (1 + n) / (10 + n)), so the random initial weights leave
the average within a few dozen steps instead of hundreds.

Training goes on from the raw weights; the average is a second copy beside them, saved with
every checkpoint so a resumed run averages on exactly as one that was never stopped.
"""
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


class WeightAverage:
    """The EMA of `model`'s floating-point weights and buffers (integer buffers, such as a
    BatchNorm's step count, are the model's own)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"WeightAverage: decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.weights: dict[str, Tensor] = {name: value.detach().clone() for name, value in model.state_dict().items()
                                           if value.is_floating_point()}

    def decay_at(self, updates: int) -> float:
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Moves the average towards `model`'s weights after an optimiser step."""
        self.updates += 1
        keep = self.decay_at(self.updates)
        current = model.state_dict()
        for name, average in self.weights.items():
            average.lerp_(current[name].detach().to(average.dtype), 1 - keep)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """`model` holds the averaged weights inside the block and its own again after it."""
        own = {name: value.clone() for name, value in model.state_dict().items() if name in self.weights}
        model.load_state_dict(self.weights, strict=False)
        try:
            yield
        finally:
            model.load_state_dict(own, strict=False)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["weights"]) != set(self.weights):
            raise ValueError("WeightAverage: the saved average is of another model's weights")
        self.updates = int(state["updates"])
        for name, value in state["weights"].items():
            self.weights[name].copy_(value)
