"""aLRP's self-balancing weight of its localisation loss (Oksuz et al., NeurIPS 2020).

The weight starts at `initial` (50 in the release) and, after every `period` training steps (an
epoch in the release), becomes (mean L_loc + mean L_cls) / mean L_loc over those steps. It is
kept in buffers so that it travels with the detector's state: into checkpoints, across a resume,
and from rank 0 to every DDP process (whose means agree anyway: the losses are global).
"""
import torch
from torch import Tensor, nn


class SelfBalance(nn.Module):
    weight: Tensor  # buffers
    sums: Tensor

    def __init__(self, initial: float = 50.0, period: int = 1) -> None:
        super().__init__()
        if not (initial > 0 and period >= 1):
            raise ValueError(f"SelfBalance: need initial > 0 and period >= 1, got {initial} and {period}")
        self.period = period
        self.register_buffer("weight", torch.tensor(float(initial), dtype=torch.float64))
        # Sums over the steps of the current period: classification loss, localisation loss, steps.
        self.register_buffer("sums", torch.zeros(3, dtype=torch.float64))

    def observe(self, classification: Tensor, localisation: Tensor) -> None:
        """Count one training step's (global) losses; at the end of a period, set the weight."""
        self.sums += torch.stack([classification.detach().double().reshape(()),
                                  localisation.detach().double().reshape(()), self.sums.new_ones(())])
        if self.sums[2] >= self.period:
            classification_sum, localisation_sum, _ = self.sums
            if localisation_sum > 0:  # a perfect localisation has nothing to balance
                self.weight.copy_((classification_sum + localisation_sum) / localisation_sum)
            self.sums.zero_()

    def extra_repr(self) -> str:
        return f"period={self.period}"
