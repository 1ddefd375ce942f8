"""Rank & Sort loss (Oksuz et al., ICCV 2021) on the AP-loss engine: exact, for any delta >= 0.

Notation of `aploss.engine`; t_i in [0, 1] is positive i's target (the IoU of its predicted box).
H includes i itself: H(0) = 1/2, and for delta = 0 the release's hard step [x >= 0] (H(0) = 1).
  rank+(i) = sum_{j in P} H_ij,  rank(i) = rank+(i) + FP(i),  l_R(i) = FP(i) / rank(i),
  l_S(i) = sum_{j in P} H_ij (1 - t_j) / rank+(i),
  l*_S(i) = sum_{j in P} [t_j >= t_i] H_ij (1 - t_j) / sum_{j in P} [t_j >= t_i] H_ij,
  L_S(i) = l_S(i) - l*_S(i); the outputs are mean l_R and mean L_S.
Update, all divided by |P|: if FP(i) > 1e-10, g_i -= l_R(i) and each negative j gets
l_R(i) H_ij / FP(i); with M_ij = [t_j < t_i] H_ij, if sum_j M_ij > 1e-10, g_i -= L_S(i) and each
positive j gets L_S(i) M_ij / sum_k M_ik. As in the release, backward scales the update by the
incoming gradient of the first output (the ranking loss) alone: a weight on the sorting loss
changes nothing, and the targets are constants.

Cost: the negatives are placed once (O(N log P)); FP, rank+, l_S and the negatives' update are the
engine's step sums (O(P log P)). The sorting target and M compare every pair of positives by both
score and target, a two-dimensional condition that the bins do not order: O(P^2) time, on a CPU
in the engine's fused kernels (two coarse parallel passes, which a busy machine does not stall),
elsewhere over blocks of rows; O(P) memory beyond a block. No P x N matrix.
"""
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from aploss import engine
from aploss.engine import LocalBatch, Ranked, RuleResult, positive_step_sums, ranked_loss

THRESHOLD = 1e-10  # the release's: ranking update if FP(i) exceeds it, sorting update if sum_j M_ij does
_BLOCK_PAIRS = 1 << 18  # positive pairs compared at once: a few MB of temporaries


def rs_step(difference: Tensor, delta: float) -> Tensor:
    """RS's H: the engine's linear ramp for delta > 0, the hard step [x >= 0] for delta = 0."""
    if delta > 0:
        return (difference / (2 * delta) + 0.5).clamp_(0.0, 1.0)
    return (difference >= 0).double()


@dataclass(frozen=True)
class RankSortRule:
    name = "rs_loss"
    num_outputs = 2
    value_name = "targets"

    def tie(self, delta: float) -> float:
        return 0.5 if delta > 0 else 1.0

    def __call__(self, ranked: Ranked) -> RuleResult:
        ranking, false_positives, targets = ranked.ranking, ranked.false_positives, ranked.values
        assert targets is not None  # value_name: RS ranks with a target per positive
        num_pos = ranking.scores.numel()
        rank_plus = positive_step_sums(ranking)
        ranking_error = false_positives / (rank_plus + false_positives)
        current_sorting = positive_step_sums(ranking, 1 - targets) / rank_plus
        sorting_error, sorting_push = _sorting(ranking.scores, targets, current_sorting, ranking.delta)

        ranked_apart = false_positives > THRESHOLD
        negative_weight = torch.where(ranked_apart, ranking_error / torch.where(ranked_apart, false_positives, 1.0),
                                      0.0) / num_pos
        positive_update = (sorting_push - torch.where(ranked_apart, ranking_error, 0.0)) / num_pos
        return RuleResult((ranking_error.mean(), sorting_error.mean()), positive_update, negative_weight)


def _sorting(scores: Tensor, targets: Tensor, current: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """L_S(i) per positive, and each positive's sorting update: -L_S(i) where it applies, plus
    sum_i L_S(i) M_ij / sum_k M_ik from the positives i it is ranked above with a lower target."""
    if engine.fused(scores.device):
        return torch.ops.aploss.rank_sort_sorting(scores, targets, current, delta, THRESHOLD)
    num_pos = scores.numel()
    sorting_error = torch.empty_like(current)
    push = torch.zeros_like(current)
    rows = max(1, _BLOCK_PAIRS // num_pos)
    for start in range(0, num_pos, rows):
        stop = min(start + rows, num_pos)
        above = rs_step(scores[None, :] - scores[start:stop, None], delta)     # [i, j]: H_ij
        at_or_above_target = targets[None, :] >= targets[start:stop, None]    # [i, j]: t_j >= t_i
        sorted_part = torch.where(at_or_above_target, above, 0.0)
        target = (sorted_part * (1 - targets)[None, :]).sum(1) / sorted_part.sum(1)
        error = current[start:stop] - target
        sorting_error[start:stop] = error
        missorted = above - sorted_part                                         # M_ij
        missorted_sum = missorted.sum(1)
        applies = missorted_sum > THRESHOLD
        share = torch.where(applies, error / torch.where(applies, missorted_sum, 1.0), 0.0)
        push[start:stop] -= torch.where(applies, error, 0.0)
        push += share @ missorted
    return sorting_error, push


def rs_loss(logits: Tensor, labels: Tensor, targets: Tensor, delta: float = 0.5) -> tuple[Tensor, Tensor]:
    """Rank & Sort loss over every pair of `logits` ranked together.

    Args:
        logits: raw scores of any shape; all of them form one ranking.
        labels: same shape; 1 positive, 0 negative, -1 ignored.
        targets: each positive's continuous target in [0, 1] (the IoU of its predicted box), one
            per positive in flattened order, or in the logits' shape (read at the positives).
        delta: half-width of the linear part of H (0.5 in the release; 0 the hard step [x >= 0]).

    Returns:
        (ranking loss, sorting loss), both 0 without positives. Backward hands the logits the
        error-driven update times the ranking loss's incoming gradient (module docstring).
    """
    ranking, sorting = ranked_loss(logits, labels, targets, RankSortRule(), delta, LocalBatch(), 1.0)
    return ranking, sorting


class RankSortLoss(nn.Module):
    """`rs_loss` as a module; `delta` may be changed between steps."""

    def __init__(self, delta: float = 0.5) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, logits: Tensor, labels: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return rs_loss(logits, labels, targets, self.delta)

    def extra_repr(self) -> str:
        return f"delta={self.delta}"
