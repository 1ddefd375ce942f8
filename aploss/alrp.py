"""aLRP loss (Oksuz et al., NeurIPS 2020) on the AP-loss engine: exact, for any delta >= 0.

Notation of `aploss.engine`; l(j) in [0, 1] is positive j's localisation error.
  rank+(i) = 1 + sum_{j in P, j != i} H_ij,  rank(i) = rank+(i) + FP(i),
  classification loss 1 - mean_i rank+(i) / rank(i) (no interpolation),
  update, for positive i with FP(i) > 1e-5 only (the release's threshold):
    g_i = -(sum_{j in P, j != i} H_ij l(j) + FP(i)) / rank(i),  negative j: g_j += H_ij (-g_i) / FP(i),
  all divided by |P|. The localisation loss: the positives in descending score order (ties: the
  earlier pair in flattened order first; the release's sort leaves them unordered), for positive i
  the sum of l over the positives at or above it, i included, divided by rank(i) (constant for the
  gradient); mean over i. Its gradient reaches the localisation errors only.

Cost: the negatives are placed once (O(N log P)), FP and the negatives' update are the engine's;
every positive-positive sum is a weighted step sum over the positives in the same bins
(O(P log P)), and the localisation loss a sort and a cumulative sum. No P x N matrix.
"""
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from aploss.engine import LocalBatch, Ranked, RuleResult, positive_step_sums, ranked_loss

FP_THRESHOLD = 1e-5  # the release updates a positive only if FP(i) exceeds this


@dataclass(frozen=True)
class ALRPRule:
    name = "alrp_loss"
    num_outputs = 2
    value_name = "loc_errors"

    def tie(self, delta: float) -> float:
        return 0.5

    def __call__(self, ranked: Ranked) -> RuleResult:
        ranking, false_positives, loc_errors = ranked.ranking, ranked.false_positives, ranked.values
        assert loc_errors is not None  # value_name: aLRP ranks with a localisation error per positive
        num_pos = ranking.scores.numel()
        # The own term of each step sum is H(0) = 1/2: made 1 in rank+, taken out of the loc sum.
        rank_plus = 0.5 + positive_step_sums(ranking)
        loc_above = positive_step_sums(ranking, loc_errors) - 0.5 * loc_errors
        rank = rank_plus + false_positives
        classification = 1.0 - (rank_plus / rank).mean()

        applied = false_positives > FP_THRESHOLD
        push = torch.where(applied, (loc_above + false_positives) / rank, 0.0) / num_pos
        negative_weight = torch.where(applied, push / torch.where(applied, false_positives, 1.0), 0.0)

        # Score order is ascending with ties in flattened order: a stable sort of the negated
        # scores gives descending order with ties still in flattened order.
        descending = torch.sort(-ranking.scores, stable=True).indices
        inverse_rank = 1.0 / rank[descending]
        localisation = (loc_errors[descending].cumsum(0) * inverse_rank).mean()
        # d localisation / d l(k) = (1/|P|) sum of 1/rank(i) over the i at or below k.
        at_or_below = inverse_rank.flip(0).cumsum(0).flip(0) / num_pos
        value_gradient = torch.empty_like(at_or_below)
        value_gradient[descending] = at_or_below
        return RuleResult((classification, localisation), -push, negative_weight, value_gradient)


def alrp_loss(logits: Tensor, labels: Tensor, loc_errors: Tensor, delta: float = 1.0) -> tuple[Tensor, Tensor]:
    """aLRP loss over every pair of `logits` ranked together.

    Args:
        logits: raw scores of any shape; all of them form one ranking.
        labels: same shape; 1 positive, 0 negative, -1 ignored.
        loc_errors: each positive's localisation error in [0, 1] (the released head: (1 - GIoU) / 2),
            one per positive in flattened order, or in the logits' shape (read at the positives).
        delta: half-width of the linear part of the step H (1 in the release; 0 the hard step).

    Returns:
        (classification loss, localisation loss), both 0 without positives. Backward hands the
        logits the error-driven update times the classification loss's incoming gradient (the
        localisation errors enter it as constants), and the localisation errors the gradient of
        the localisation loss (the ranks constant).
    """
    classification, localisation = ranked_loss(logits, labels, loc_errors, ALRPRule(), delta, LocalBatch(), 1.0)
    return classification, localisation


class ALRPLoss(nn.Module):
    """`alrp_loss` as a module; `delta` may be changed between steps."""

    def __init__(self, delta: float = 1.0) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, logits: Tensor, labels: Tensor, loc_errors: Tensor) -> tuple[Tensor, Tensor]:
        return alrp_loss(logits, labels, loc_errors, self.delta)

    def extra_repr(self) -> str:
        return f"delta={self.delta}"
