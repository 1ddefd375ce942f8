"""The aLRP and Rank & Sort references against numbers worked out by hand, and their properties."""
import math

import pytest
import torch

from aploss.ranking_reference import alrp_reference, rs_reference
from aploss.reference import reference_ap_loss

TOL = dict(rtol=1e-12, atol=1e-12)

# Two positives (a at 2.0, b at 0.0) and three negatives (1.0, -0.5, -3.0), flattened order:
LOGITS = torch.tensor([2.0, 1.0, 0.0, -0.5, -3.0], dtype=torch.float64)
LABELS = torch.tensor([1, 0, 1, 0, 0])
LOC_ERRORS = torch.tensor([0.2, 0.6], dtype=torch.float64)  # l(a), l(b) for aLRP
TARGETS = torch.tensor([0.6, 0.9], dtype=torch.float64)  # t(a), t(b) for RS


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float64), **TOL)


def test_alrp_by_hand_delta_1():
    # H(x) = clamp(x/2 + 1/2, 0, 1); loc errors l(a) = 0.2, l(b) = 0.6.
    # a: rank+ = 1 + H(0-2) = 1; FP = H(-1) + H(-2.5) + H(-5) = 0; rank 1; p = 1; no update (FP = 0).
    # b: rank+ = 1 + H(2) = 2; FP = H(1) + H(-0.5) + H(-3) = 1 + 0.25 + 0 = 1.25; rank 3.25; p = 8/13.
    # cls = 1 - (1 + 8/13)/2 = 5/26.
    # g_b = -(H_ba l(a) + FP)/rank = -(0.2 + 1.25)/3.25 = -29/65; negatives H_bj (29/65)/1.25:
    #   at 1.0: 116/325, at -0.5: 0.25 * 116/325 = 29/325, at -3: 0; all / |P| = 2.
    # loc: order a, b: (0.2/1 + (0.2 + 0.6)/3.25)/2 = (13/65 + 16/65)/2 = 29/130.
    cls, loc, update = alrp_reference(LOGITS, LABELS, LOC_ERRORS, delta=1.0)
    close(cls, 5 / 26)
    close(loc, 29 / 130)
    close(update, [0.0, 58 / 325, -29 / 130, 29 / 650, 0.0])
    close(update[LABELS == 0].sum(), -update[LABELS == 1].sum())


def test_alrp_by_hand_small_delta():
    # delta = 0.25: H(x) = clamp(2x + 1/2, 0, 1).
    # a: rank 1, FP 0. b: rank+ = 1 + H(2) = 2; FP = H(1) + H(-0.5) + H(-3) = 1; rank 3.
    # cls = 1 - (1 + 2/3)/2 = 1/6; g_b = -(0.2 + 1)/3 = -0.4; negative at 1.0: 1 * 0.4 / 1 = 0.4; / 2.
    # loc: (0.2/1 + 0.8/3)/2 = 7/30.
    cls, loc, update = alrp_reference(LOGITS, LABELS, LOC_ERRORS, delta=0.25)
    close(cls, 1 / 6)
    close(loc, 7 / 30)
    close(update, [0.0, 0.2, -0.2, 0.0, 0.0])


def test_alrp_loc_loss_orders_ties_by_flattened_index():
    # Two positives tied at 0: rank+ = 1 + H(0) = 1.5 each, FP = 0, rank 1.5.
    # The earlier pair ranks higher: (0.2/1.5 + (0.2 + 0.6)/1.5)/2 = 1/3 (the other order: 7/15).
    _, loc, _ = alrp_reference(torch.zeros(2), torch.ones(2), LOC_ERRORS)
    close(loc, 1 / 3)
    _, loc, _ = alrp_reference(torch.zeros(2), torch.ones(2), LOC_ERRORS.flip(0))
    close(loc, 7 / 15)


def test_alrp_update_skipped_at_or_below_fp_threshold():
    # One positive at 0, a negative at -1 + 2h so that H = FP = h, rank 1 + h; the positive's own l
    # never enters: g = -h/(1 + h) if h > 1e-5, the negative gets H (h/(1 + h))/FP = h/(1 + h), else 0.
    for h, applied in [(1e-6, False), (9e-6, False), (2e-5, True)]:
        logits = torch.tensor([0.0, -1.0 + 2 * h], dtype=torch.float64)
        _, _, update = alrp_reference(logits, torch.tensor([1, 0]), torch.tensor([0.7]))
        expected = [-h / (1 + h), h / (1 + h)] if applied else [0.0, 0.0]
        torch.testing.assert_close(update, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-15)


def test_alrp_negatives_far_below():
    torch.manual_seed(0)
    pos = torch.randn(6, dtype=torch.float64)
    logits = torch.cat([pos, pos.min() - 1.0 - torch.rand(20, dtype=torch.float64)])
    labels = torch.cat([torch.ones(6), torch.zeros(20)]).long()
    cls, _, update = alrp_reference(logits, labels, torch.rand(6))
    close(cls, 0.0)
    close(update, torch.zeros(26))


@pytest.mark.parametrize("delta", [1.0, 0.3, 0.0])
def test_alrp_classification_is_non_interpolated_ap_loss(delta):
    # The definitions coincide (rank+ excludes i, rank = rank+ + FP, 1 - mean precision); with
    # l = 0 the update is AP-loss's too wherever every positive has FP = 0 or FP > 1e-5.
    torch.manual_seed(1)
    logits = torch.randn(7, 9, dtype=torch.float64)
    logits[0, :3] = logits[1, 0]  # ties, among positives and between positives and negatives
    labels = (torch.rand(7, 9) < 0.3).long() - (torch.rand(7, 9) < 0.2).long()
    labels[0, :2], labels[1, 0] = 1, 0
    cls, _, update = alrp_reference(logits, labels, torch.zeros(int((labels == 1).sum())), delta)
    ap, ap_update = reference_ap_loss(logits, labels, delta, interpolate=False)
    close(cls, ap)
    close(update, ap_update)


def _ignored_case(seed):
    torch.manual_seed(seed)
    logits = torch.randn(40, dtype=torch.float64)
    labels = (torch.rand(40) < 0.25).long()
    labels[:3] = 1
    ignored = torch.rand(40) < 0.3
    ignored[:3] = False
    labels[ignored] = -1
    wild = logits.clone()
    wild[ignored] = torch.tensor([math.nan, math.inf, -math.inf, 1e300])[torch.arange(int(ignored.sum())) % 4].double()
    per_pos = torch.rand(int((labels == 1).sum()), dtype=torch.float64)
    return logits, wild, labels, ignored, per_pos


@pytest.mark.parametrize("loss, delta", [(alrp_reference, 1.0), (alrp_reference, 0.0),
                                         (rs_reference, 0.5), (rs_reference, 0.0)])
def test_ignored_pairs_never_matter(loss, delta):
    logits, wild, labels, ignored, per_pos = _ignored_case(2)
    first, second, update = loss(wild, labels, per_pos, delta)
    r_first, r_second, r_update = loss(logits[~ignored], labels[~ignored], per_pos, delta)
    close(first, r_first)
    close(second, r_second)
    close(update[~ignored], r_update)
    assert (update[ignored] == 0).all()


def test_rs_by_hand_delta_half():
    # H(x) = clamp(x + 1/2, 0, 1), self term 1/2; targets t(a) = 0.6, t(b) = 0.9.
    # a: rank+ = 0.5 + H(-2) = 0.5; FP = 0; l_R = 0. l_S = 0.5*0.4/0.5 = 0.4; t_j >= 0.6: a (0.5), b (H = 0)
    #    -> l*_S = 0.4; L_S = 0. M_a = 0 (no positive below 0.6): no update.
    # b: rank+ = 0.5 + H(2) = 1.5; FP = H(1) + H(-0.5) + H(-3) = 1; rank 2.5; l_R = 0.4.
    #    l_S = (0.5*0.1 + 1*0.4)/1.5 = 0.3; t_j >= 0.9: b only -> l*_S = 0.1; L_S = 0.2. M_ba = 1.
    # ranking = (0 + 0.4)/2 = 0.2; sorting = (0 + 0.2)/2 = 0.1.
    # g_b = -0.4 - 0.2; negative at 1.0: 0.4 * 1/1; g_a = 0.2 * 1/1; all / 2.
    ranking, sorting, update = rs_reference(LOGITS, LABELS, TARGETS, delta=0.5)
    close(ranking, 0.2)
    close(sorting, 0.1)
    close(update, [0.1, 0.2, -0.3, 0.0, 0.0])
    close(update.sum(), 0.0)


def test_rs_by_hand_hard_step():
    # delta = 0: H(x) = [x >= 0], self term 1.
    # a: rank+ 1, FP 0, l_S = l*_S = 0.4, L_S = 0.
    # b: rank+ = 1 + 1 = 2; FP = [1 >= 0] + [-0.5 >= 0] + [-3 >= 0] = 1; rank 3; l_R = 1/3.
    #    l_S = (0.1 + 0.4)/2 = 0.25; l*_S = 0.1/1; L_S = 0.15; M_ba = 1.
    # ranking = 1/6; sorting = 0.075; g_a = 0.15/2, negative at 1.0: (1/3)/2, g_b = -(1/3 + 0.15)/2.
    ranking, sorting, update = rs_reference(LOGITS, LABELS, TARGETS, delta=0.0)
    close(ranking, 1 / 6)
    close(sorting, 0.075)
    close(update, [0.075, 1 / 6, -29 / 120, 0.0, 0.0])


def test_rs_hard_step_counts_a_tied_negative_fully():
    # delta = 0, a negative tied with the only positive: FP = [0 >= 0] = 1, rank+ = 1, l_R = 1/2.
    ranking, sorting, update = rs_reference(torch.zeros(2), torch.tensor([1, 0]), torch.tensor([0.5]), 0.0)
    close(ranking, 0.5)
    close(sorting, 0.0)
    close(update, [-0.5, 0.5])


def test_rs_negative_delta_drops_negatives_like_the_release():
    # delta < 0 is the hard step, but the release also drops negatives below min_P s - delta:
    # a negative 0.25 above the only positive counts at delta = 0 and is dropped at delta = -0.5.
    logits, labels, t = torch.tensor([0.0, 0.25]), torch.tensor([1, 0]), torch.tensor([0.5])
    close(rs_reference(logits, labels, t, 0.0)[0], 0.5)
    ranking, _, update = rs_reference(logits, labels, t, -0.5)
    close(ranking, 0.0)
    close(update, [0.0, 0.0])


def test_rs_equal_targets_give_no_sorting_loss():
    torch.manual_seed(3)
    logits = torch.randn(30, dtype=torch.float64)
    labels = (torch.rand(30) < 0.4).long()
    labels[0] = 1
    targets = torch.full((int(labels.sum()),), 0.7, dtype=torch.float64)
    ranking, sorting, update = rs_reference(logits, labels, targets)
    close(sorting, 0.0)
    # Only the ranking update remains: it sums to zero, and no positive is pushed up by another.
    assert ranking > 0
    close(update.sum(), 0.0)
    assert (update[labels == 1] <= 0).all()


def test_targets_may_have_the_logits_shape():
    targets = torch.tensor([0.6, 0.0, 0.9, 0.0, 0.0], dtype=torch.float64)
    close(torch.stack(rs_reference(LOGITS, LABELS, targets)[:2]),
          torch.stack(rs_reference(LOGITS, LABELS, targets[LABELS == 1])[:2]))
    with pytest.raises(ValueError, match="targets"):
        rs_reference(LOGITS, LABELS, torch.tensor([0.6, 0.9, 0.1]))


@pytest.mark.parametrize("loss", [alrp_reference, rs_reference])
def test_no_positives(loss):
    logits = torch.randn(2, 5, dtype=torch.float64)
    labels = torch.tensor([[0, 0, -1, 0, 0], [-1, 0, 0, 0, 0]])
    first, second, update = loss(logits, labels, torch.zeros(0))
    close(first, 0.0)
    close(second, 0.0)
    assert update.shape == logits.shape and (update == 0).all()


def test_alrp_rejects_negative_delta():
    with pytest.raises(ValueError, match="delta"):
        alrp_reference(LOGITS, LABELS, torch.zeros(2), delta=-1.0)
