"""aLRP loss and Rank & Sort loss written directly from their equations in O(P * N).

The references the engine's versions of the two losses are tested against, in the style of
`aploss.reference` (AP-loss): float64, dense P x N pairs, no pruning beyond what the released
code does. Definitions from shared/docs/ranking-losses.md (Oksuz et al., NeurIPS 2020,
kemaloksuz/aLRPLoss; ICCV 2021, kemaloksuz/RankSortLoss). Notation: labels 1 (positive P),
0 (negative N), -1 (ignored: no effect on anything, zero update); H_ij = H(s_j - s_i)
("j ranked above i"); FP(i) = sum_{j in N} H_ij; every update is divided by |P|, and with
|P| = 0 every loss is 0 and the update is zero (the releases never call the loss then).

Per-positive inputs (aLRP's `loc_errors`, RS's `targets`) are either one value per positive,
in the flattened order of the positives, or a tensor of the logits' shape read at the positives
(the two agree where they coincide). Equal scores tie at difference 0 even where both are the
same infinity, as in `aploss.reference`.
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from aploss.reference import difference, step  # aLRP's H is AP-loss's: hard step, H(0) = 1/2, at delta = 0

ALRP_EPS = 1e-5  # aLRP: a positive's update is applied only if FP(i) > this
RS_EPS = 1e-10  # RS: ranking update if FP(i) > this, sorting update if sum_j M_ij > this


def _rs_step(x: Tensor, delta: float) -> Tensor:
    """RS's H_delta; the release switches to the hard step [x >= 0] (H(0) = 1) for delta <= 0."""
    if delta > 0:
        return (x / (2 * delta) + 0.5).clamp(0.0, 1.0)
    return (x >= 0).double()


def _per_positive(values: Tensor, is_pos: Tensor, shape: torch.Size, name: str) -> Tensor:
    flat = values.detach().reshape(-1).double()
    num_pos = int(is_pos.sum())
    if flat.numel() == num_pos:
        return flat
    if values.shape == shape:
        return flat[is_pos]
    raise ValueError(f"{name}: one value per positive ({num_pos}) or the logits' shape {tuple(shape)}, "
                     f"got shape {tuple(values.shape)}")


def _kept_negatives(neg: Tensor, pos: Tensor, delta: float) -> Tensor:
    """Both releases drop negatives with s < min_P s - delta: exact for delta >= 0 (they have H = 0
    for every positive); for RS with delta < 0 it also drops those within |delta| above the lowest
    positive, which the hard step [x >= 0] would have counted. Kept here to match the release."""
    return neg >= pos.min() - delta


@dataclass
class _Pairs:
    """The ranked pairs of one call: positives' scores and per-positive values, the negatives
    that can matter, and where each sits among the logits."""

    pos: Tensor
    neg: Tensor  # the kept negatives
    values: Tensor  # loc_errors or targets, one per positive
    is_pos: Tensor
    is_neg: Tensor
    kept: Tensor  # which negatives are in `neg`
    shape: torch.Size

    def update(self, pos_update: Tensor, neg_update: Tensor) -> Tensor:
        """The per-pair update divided by |P|, in the logits' shape; ignored and dropped pairs 0."""
        update = torch.zeros(self.is_pos.numel(), dtype=torch.float64, device=self.pos.device)
        negatives = torch.zeros(int(self.is_neg.sum()), dtype=torch.float64, device=self.pos.device)
        negatives[self.kept] = neg_update
        update[self.is_pos] = pos_update / self.pos.numel()
        update[self.is_neg] = negatives / self.pos.numel()
        return update.view(self.shape)


def _pairs(logits: Tensor, labels: Tensor, values: Tensor, name: str, delta: float) -> _Pairs | None:
    """The pairs to rank, or None without positives (both losses are then 0, the update zero)."""
    scores = logits.detach().reshape(-1).double()
    flat_labels = labels.reshape(-1)
    is_pos, is_neg = flat_labels == 1, flat_labels == 0
    per_positive = _per_positive(values, is_pos, logits.shape, name)
    pos, neg = scores[is_pos], scores[is_neg]
    if pos.numel() == 0:
        return None
    kept = _kept_negatives(neg, pos, delta)
    return _Pairs(pos, neg[kept], per_positive, is_pos, is_neg, kept, logits.shape)


def _no_positives(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    zero = torch.zeros((), dtype=torch.float64, device=logits.device)
    return zero, zero.clone(), torch.zeros(logits.shape, dtype=torch.float64, device=logits.device)


def alrp_reference(logits: Tensor, labels: Tensor, loc_errors: Tensor,
                   delta: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(classification loss, localisation loss, update) of aLRP in float64.

    rank+(i) = 1 + sum_{j in P, j != i} H_ij, rank(i) = rank+(i) + FP(i);
    classification loss 1 - mean_i rank+(i) / rank(i) (no interpolation).
    Update (the logits' shape), for each positive i with FP(i) > 1e-5 only:
      g_i = -(sum_{j in P, j != i} H_ij l(j) + FP(i)) / rank(i),  negative j: g_j += H_ij (-g_i) / FP(i),
    all divided by |P|. Localisation loss: the positives in descending score order, ties broken by
    flattened index (the earlier pair ranks higher; the release's sort leaves ties unordered);
    for positive i, the sum of l over the positives at or above i in that order (i included),
    divided by the same smoothed rank(i) = rank+(i) + FP(i) as above; mean over i.
    The self-balance weight is the caller's; this is the unweighted loss.
    """
    if not delta >= 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    pairs = _pairs(logits, labels, loc_errors, "loc_errors", delta)
    if pairs is None:
        return _no_positives(logits)
    pos, neg, loc = pairs.pos, pairs.neg, pairs.values

    h_pos = step(difference(pos[None, :], pos[:, None]), delta)  # [i, j]: H(s_j - s_i)
    h_pos.fill_diagonal_(0.0)  # j != i
    h_neg = step(difference(neg[None, :], pos[:, None]), delta)  # [i, j]
    rank_plus = 1.0 + h_pos.sum(1)
    false_pos = h_neg.sum(1)
    rank = rank_plus + false_pos
    cls_loss = 1.0 - (rank_plus / rank).mean()

    applied = false_pos > ALRP_EPS
    pos_update = torch.where(applied, -((h_pos * loc[None, :]).sum(1) + false_pos) / rank, 0.0)
    share = torch.where(applied, -pos_update / torch.where(applied, false_pos, 1.0), 0.0)
    neg_update = (h_neg * share[:, None]).sum(0)

    order = torch.sort(pos, descending=True, stable=True).indices  # ties: the earlier pair first
    loc_loss = (torch.cumsum(loc[order], 0) / rank[order]).mean()
    return cls_loss, loc_loss, pairs.update(pos_update, neg_update)


def rs_reference(logits: Tensor, labels: Tensor, targets: Tensor,
                 delta: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """(ranking loss, sorting loss, update) of Rank & Sort in float64.

    With t the positives' targets (IoU) and H including i itself (H(0) = 1/2; 1 for delta <= 0):
      rank+(i) = sum_{j in P} H_ij,  rank(i) = rank+(i) + FP(i),  l_R(i) = FP(i) / rank(i),
      l_S(i) = sum_{j in P} H_ij (1 - t_j) / rank+(i),
      l*_S(i) = sum_{j in P} [t_j >= t_i] H_ij (1 - t_j) / sum_{j in P} [t_j >= t_i] H_ij,
      L_S(i) = l_S(i) - l*_S(i);  losses mean l_R and mean L_S.
    Update (the logits' shape), all divided by |P|:
      if FP(i) > 1e-10: g_i -= l_R(i), negative j: g_j += l_R(i) H_ij / FP(i);
      M_ij = [t_j < t_i] H_ij over positives: if sum_j M_ij > 1e-10: g_i -= L_S(i),
      positive j: g_j += L_S(i) M_ij / sum_k M_ik.
    The update is what the release's backward hands on scaled by the ranking output's incoming
    gradient alone. Positives are the labels' 1s whatever their target (the released ATSS head
    makes a target of exactly 0 a negative before calling the loss).
    """
    pairs = _pairs(logits, labels, targets, "targets", delta)
    if pairs is None:
        return _no_positives(logits)
    pos, neg, t = pairs.pos, pairs.neg, pairs.values

    h_pos = _rs_step(difference(pos[None, :], pos[:, None]), delta)  # [i, j], i itself included
    h_neg = _rs_step(difference(neg[None, :], pos[:, None]), delta)
    rank_plus = h_pos.sum(1)
    false_pos = h_neg.sum(1)
    rank = rank_plus + false_pos
    ranking_error = false_pos / rank

    sorting = h_pos * (1 - t)[None, :]
    current = sorting.sum(1) / rank_plus
    at_or_above = (t[None, :] >= t[:, None]).double()  # [i, j]: t_j >= t_i
    target = (at_or_above * sorting).sum(1) / (at_or_above * h_pos).sum(1)
    sorting_error = current - target

    ranked = false_pos > RS_EPS
    pos_update = torch.where(ranked, -ranking_error, 0.0)
    share = torch.where(ranked, ranking_error / torch.where(ranked, false_pos, 1.0), 0.0)
    neg_update = (h_neg * share[:, None]).sum(0)

    missorted = (1 - at_or_above) * h_pos  # M_ij = [t_j < t_i] H_ij
    denom = missorted.sum(1)
    sorted_ = denom > RS_EPS
    pos_update = pos_update - torch.where(sorted_, sorting_error, 0.0)
    pmf = torch.where(sorted_, sorting_error / torch.where(sorted_, denom, 1.0), 0.0)
    pos_update = pos_update + (missorted * pmf[:, None]).sum(0)

    return ranking_error.mean(), sorting_error.mean(), pairs.update(pos_update, neg_update)
