"""The engine against the O(P*N) reference written from the equations."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aploss.engine as engine
from aploss import APLoss, ap_loss
from aploss.reference import reference_ap_loss
from tests.synthetic import detection_pairs

TOL = dict(rtol=1e-9, atol=1e-9)


def engine_loss_and_update(logits, labels, delta=1.0, interpolate=True):
    leaf = logits.detach().clone().requires_grad_()
    loss = ap_loss(leaf, labels, delta, interpolate)
    loss.backward()
    return loss.detach(), leaf.grad


def assert_matches_reference(logits, labels, delta=1.0, interpolate=True, tol=TOL):
    loss, update = engine_loss_and_update(logits, labels, delta, interpolate)
    ref_loss, ref_update = reference_ap_loss(logits, labels, delta, interpolate)
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    torch.testing.assert_close(update.double(), ref_update, **tol)
    return loss, update


def random_labels(generator, n, p_pos=0.05, p_ignore=0.1):
    u = torch.rand(n, generator=generator)
    return torch.where(u < p_pos, 1, torch.where(u < p_pos + p_ignore, -1, 0))


@pytest.mark.parametrize("delta", [0.0, 0.05, 0.5, 1.0, 4.0])
@pytest.mark.parametrize("interpolate", [True, False])
def test_random_scores(delta, interpolate):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4000, generator=g, dtype=torch.float64) * 2
    assert_matches_reference(logits, random_labels(g, 4000), delta, interpolate)


@pytest.mark.parametrize("delta", [0.0, 0.25, 1.0])
def test_heavy_ties_including_ties_at_the_kinks(delta):
    g = torch.Generator().manual_seed(2)
    # Scores on a grid of step delta/2: many pairs sit exactly at s_i -/+ delta and at s_i.
    unit = delta / 2 if delta > 0 else 0.5
    logits = torch.randint(-6, 6, (3000,), generator=g).double() * unit
    assert_matches_reference(logits, random_labels(g, 3000, p_pos=0.2), delta)


def test_interpolation_heavy_ranking():
    # Alternating runs of positives and negatives: precision dips and recovers, so many
    # positives have q_i > p_i and their negatives' updates are rescaled.
    logits = torch.linspace(-3, 3, 2000, dtype=torch.float64)
    labels = ((torch.arange(2000) // 37) % 3 == 0).long()
    _, interpolated_update = assert_matches_reference(logits, labels, delta=0.3)
    _, plain_update = assert_matches_reference(logits, labels, delta=0.3, interpolate=False)
    assert not torch.allclose(plain_update, interpolated_update)  # interpolation is exercised


def test_detection_shaped_batch():
    assert_matches_reference(*detection_pairs(torch.Generator().manual_seed(4)))


def test_large_batch_matches_reference():
    g = torch.Generator().manual_seed(5)
    n = 1_000_000
    logits = -4.6 + 0.3 * torch.randn(n, generator=g)
    labels = torch.zeros(n, dtype=torch.int8)
    labels[torch.randperm(n, generator=g)[:150]] = 1
    assert_matches_reference(logits, labels, tol=dict(rtol=1e-6, atol=1e-9))


def test_many_chunks_match_one(monkeypatch):
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(1000, generator=g, dtype=torch.float64)
    labels = random_labels(g, 1000, p_pos=0.1)
    monkeypatch.setattr(engine, "_CHUNK_PAIRS", {"cpu": 37, "cuda": 37})
    assert_matches_reference(logits, labels, delta=0.7)


@given(
    data=st.lists(st.tuples(st.sampled_from([-1, 0, 0, 1]),
                            st.one_of(st.sampled_from([-1.0, -0.5, 0.0, 0.25, 0.5, 2.0]),
                                      st.floats(-8, 8, allow_nan=False))),
                  min_size=0, max_size=200),
    delta=st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.floats(1e-3, 5)),
    interpolate=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_any_label_mix_and_shape(data, delta, interpolate):
    labels = torch.tensor([label for label, _ in data], dtype=torch.int64)
    logits = torch.tensor([score for _, score in data], dtype=torch.float64)
    assert_matches_reference(logits, labels, delta, interpolate)


@given(rows=st.integers(1, 6), cols=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       p_pos=st.floats(0, 1), p_ignore=st.floats(0, 1))
@settings(max_examples=100, deadline=None)
def test_any_shape_and_label_fractions(rows, cols, seed, p_pos, p_ignore):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    labels = random_labels(g, rows * cols, p_pos, p_ignore * (1 - p_pos)).view(rows, cols)
    assert_matches_reference(logits, labels, 0.5)


@pytest.mark.parametrize("delta", [0.0, 1.0])
def test_updates_balance_the_loss(delta):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(5000, generator=g, dtype=torch.float64)
    labels = random_labels(g, 5000)
    loss, update = engine_loss_and_update(logits, labels, delta)
    assert update[labels == 1].sum().item() == pytest.approx(-loss.item(), abs=1e-12)
    assert update[labels == 0].sum().item() == pytest.approx(loss.item(), abs=1e-12)
    assert (update[labels == -1] == 0).all()
    assert (update[labels == 0] >= 0).all() and (update[labels == 1] <= 0).all()


def test_backward_scales_with_incoming_gradient():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(500, generator=g, dtype=torch.float64)
    labels = random_labels(g, 500, p_pos=0.2)
    _, update = engine_loss_and_update(logits, labels)
    leaf = logits.clone().requires_grad_()
    (-2.5 * ap_loss(leaf, labels)).backward()
    torch.testing.assert_close(leaf.grad, -2.5 * update, rtol=1e-12, atol=1e-15)


def test_no_positives_all_ignored_and_empty():
    for labels in (torch.zeros(50, dtype=torch.long), -torch.ones(50, dtype=torch.long)):
        loss, update = engine_loss_and_update(torch.randn(50), labels)
        assert loss.item() == 0.0 and (update == 0).all()
    loss, update = engine_loss_and_update(torch.empty(0, 3), torch.empty(0, 3, dtype=torch.long))
    assert loss.item() == 0.0 and update.shape == (0, 3)


def test_all_positive_is_perfect_precision():
    loss, update = assert_matches_reference(torch.randn(30, dtype=torch.float64),
                                            torch.ones(30, dtype=torch.long))
    assert loss.item() == 0.0 and (update == 0).all()


def test_perfect_and_inverted_rankings():
    labels = torch.tensor([1, 1, 0, 0, 0])
    assert ap_loss(torch.tensor([10.0, 9.0, 0.0, -1.0, -2.0]), labels).item() == 0.0
    inverted = torch.tensor([-10.0, -9.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    # positives ranked 4th and 5th, every gap beyond delta: p = 1/4 and 2/5; interpolation
    # lifts the higher one's precision to the 2/5 found lower in the ranking.
    plain, _ = assert_matches_reference(inverted, labels, interpolate=False)
    assert plain.item() == pytest.approx(1 - (1 / 4 + 2 / 5) / 2, abs=1e-15)
    interpolated, _ = assert_matches_reference(inverted, labels)
    assert interpolated.item() == pytest.approx(1 - 2 / 5, abs=1e-15)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_computed_in_float32_or_better(dtype):
    g = torch.Generator().manual_seed(9)
    logits = (torch.randn(3000, generator=g) * 3).to(dtype)
    labels = random_labels(g, 3000)
    loss, update = engine_loss_and_update(logits, labels)
    assert loss.dtype == torch.float32 and update.dtype == dtype
    ref_loss, ref_update = reference_ap_loss(logits, labels)  # the same rounded scores
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    torch.testing.assert_close(update.double(), ref_update, rtol=1e-2, atol=1e-6)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(60, 40, generator=g, dtype=torch.float64).t()
    labels = random_labels(g, 2400).view(60, 40).t()
    assert not logits.is_contiguous()
    loss, update = assert_matches_reference(logits, labels)
    assert update.shape == logits.shape


def test_huge_logits_stay_exact_and_finite():
    # Far beyond any trained detector's range: no sum may cancel these magnitudes.
    g = torch.Generator().manual_seed(11)
    centers = torch.tensor([-1e30, -1e6, 0.0, 1e6, 1e30], dtype=torch.float64)
    logits = centers[torch.randint(0, 5, (2000,), generator=g)] + torch.randn(2000, generator=g, dtype=torch.float64)
    labels = random_labels(g, 2000, p_pos=0.2)
    loss, update = assert_matches_reference(logits, labels, delta=1.0)
    assert torch.isfinite(update).all()
    float32_logits = torch.tensor([3e38, -3e38, 1e30, 0.0, -1e30, 3e38], dtype=torch.float32)
    loss, update = engine_loss_and_update(float32_logits, torch.tensor([1, 0, 0, 1, 1, 0]))
    assert math.isfinite(loss.item()) and torch.isfinite(update).all()


def test_infinite_and_nan_logits():
    labels = torch.tensor([1, 0, 0, 1, 0])
    inf_logits = torch.tensor([1.0, float("inf"), float("-inf"), 0.0, 0.5], dtype=torch.float64)
    assert_matches_reference(inf_logits, labels)
    nan_logits = torch.tensor([1.0, float("nan"), 0.0, 0.0, 0.5])
    assert math.isnan(ap_loss(nan_logits, labels).item())
    assert math.isnan(ap_loss(nan_logits, torch.tensor([0, 1, 0, 1, 0])).item())


def test_loss_without_grad_matches():
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(1000, generator=g)
    labels = random_labels(g, 1000)
    with torch.no_grad():
        no_grad_loss = ap_loss(logits, labels)
    assert no_grad_loss.item() == engine_loss_and_update(logits, labels)[0].item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inputs_are_left_untouched(dtype):
    g = torch.Generator().manual_seed(14)
    logits = (torch.randn(3000, generator=g) * 4).to(dtype).requires_grad_()
    labels = random_labels(g, 3000)
    before = logits.detach().clone(), labels.clone()
    ap_loss(logits, labels, 0.5).backward()
    assert torch.equal(logits.detach(), before[0]) and torch.equal(labels, before[1])


def test_module_follows_its_delta():
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(800, generator=g, dtype=torch.float64)
    labels = random_labels(g, 800, p_pos=0.1)
    module = APLoss(delta=2.0)
    wide = module(logits, labels)
    module.delta = 0.0
    assert module(logits, labels).item() == pytest.approx(reference_ap_loss(logits, labels, 0.0)[0].item())
    assert wide.item() == pytest.approx(reference_ap_loss(logits, labels, 2.0)[0].item())


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="labels shape"):
        ap_loss(torch.randn(4), torch.zeros(5))
    with pytest.raises(ValueError, match="labels must be exactly 1"):
        ap_loss(torch.randn(4), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="delta"):
        ap_loss(torch.randn(4), torch.zeros(4), delta=-1.0)
    with pytest.raises(ValueError, match="delta"):
        ap_loss(torch.randn(4), torch.zeros(4), delta=float("nan"))
    with pytest.raises(TypeError, match="floating-point"):
        ap_loss(torch.arange(4), torch.zeros(4))


def engine_paths(logits, labels, delta=1.0, interpolate=True, monkeypatch=None):
    """(loss, update) from the fused kernels and from the pure-PyTorch path."""
    fused = engine_loss_and_update(logits, labels, delta, interpolate)
    monkeypatch.setattr(engine, "fused", lambda device: False)
    plain = engine_loss_and_update(logits, labels, delta, interpolate)
    monkeypatch.undo()
    return fused, plain


def late_training(n, num_pos, seed, dtype=torch.float32):
    """Positives well above the negatives: a few negatives within delta of the lowest positive."""
    g = torch.Generator().manual_seed(seed)
    logits = (-6 + torch.randn(n, generator=g)).to(dtype)
    labels = random_labels(g, n, p_pos=num_pos / n, p_ignore=0.05)
    positive = labels == 1
    logits[positive] = (3 + torch.randn(int(positive.sum()), generator=g)).to(dtype)
    return logits, labels


@pytest.mark.skipif(not engine.kernels.loaded(), reason="no C++ compiler: the fused kernels are not built")
@pytest.mark.parametrize("case", ["early", "late", "ties", "wide-bins", "deep-cells", "float64", "bfloat16"])
def test_fused_kernels_equal_the_pytorch_path_bit_for_bit(case, monkeypatch):
    g = torch.Generator().manual_seed(20)
    labels = random_labels(g, 300_000)
    logits = -4.6 + 0.05 * torch.randn(300_000, generator=g)
    delta = 1.0
    if case == "late":
        logits, labels = late_training(300_000, 500, 21)
    elif case == "ties":
        logits, delta = torch.randint(-8, 8, (300_000,), generator=g).float() * 0.25, 0.5
    elif case == "wide-bins":  # more than int16's bins: placements stored as int32
        labels = random_labels(g, 300_000, p_pos=0.04)
        logits = torch.randn(300_000, generator=g) * 50
    elif case == "deep-cells":  # near-duplicate cuts: the binary-search lookup
        logits = 1 + torch.randint(0, 30, (300_000,), generator=g).double() * 1e-13
    elif case == "float64":
        logits = logits.double()
    elif case == "bfloat16":
        logits = logits.bfloat16()
    (fused_loss, fused), (plain_loss, plain) = engine_paths(logits, labels, delta, monkeypatch=monkeypatch)
    assert torch.equal(fused_loss, plain_loss) and torch.equal(fused, plain)
    if case != "bfloat16":
        assert_matches_reference(logits[:20_000].double(), labels[:20_000], delta)


@pytest.mark.skipif(not engine.kernels.loaded(), reason="no C++ compiler: the fused kernels are not built")
def test_fused_result_does_not_depend_on_the_thread_count():
    logits, labels = late_training(600_000, 800, 22)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = engine_loss_and_update(logits, labels)
        torch.set_num_threads(4)
        four = engine_loss_and_update(logits, labels)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], four[0]) and torch.equal(one[1], four[1])


def test_late_training_prunes_unreachable_negatives_exactly():
    logits, labels = late_training(50_000, 200, 23, torch.float64)
    loss, update = assert_matches_reference(logits, labels)
    lowest_positive = logits[labels == 1].min()
    unreachable = (labels == 0) & (logits < lowest_positive - 1.0)
    assert unreachable.float().mean() > 0.9 and (update[unreachable] == 0).all()


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_ignored_pairs_have_no_effect_whatever_their_value(poison):
    g = torch.Generator().manual_seed(24)
    logits = torch.randn(3000, generator=g, dtype=torch.float64)
    labels = random_labels(g, 3000, p_ignore=0.2)
    clean_loss, clean_update = engine_loss_and_update(logits, labels)
    poisoned = torch.where(labels == -1, poison, logits)
    loss, update = engine_loss_and_update(poisoned, labels)
    assert torch.equal(loss, clean_loss) and torch.equal(update, clean_update)
    assert (update[labels == -1] == 0).all()
    # the issue's own case
    loss, update = engine_loss_and_update(torch.tensor([1.0, 0.0, 2.0, float("nan")]), torch.tensor([1, 0, 0, -1]))
    assert math.isfinite(loss.item()) and torch.isfinite(update).all() and update[3] == 0


@pytest.mark.parametrize("where", ["positive", "negative"])
def test_nan_in_a_ranked_pair_gives_nan_loss_and_nan_updates(where):
    labels = torch.tensor([1, 0, 0, 1, -1, 0])
    logits = torch.tensor([1.0, 0.0, 2.0, 1.5, 0.3, -3.0])
    logits[0 if where == "positive" else 1] = float("nan")
    loss, update = engine_loss_and_update(logits, labels)
    assert math.isnan(loss.item())
    assert update[labels >= 0].isnan().all() and update[4] == 0


def test_infinite_scores_give_the_exact_limits_finite():
    inf = float("inf")
    cases = [([inf, 0.0, 2.0, 1.0], [1, 0, 0, 1]),           # a positive above everything
             ([inf, inf, 2.0, -inf], [1, 0, 0, 1]),          # tied with an infinite negative
             ([-inf, 0.0, -inf, 1.0, inf], [1, 0, 0, 1, 1]),  # at the bottom, tied
             ([inf, inf, -inf, -inf, 0.5], [1, 1, 0, 1, 0])]
    for values, label_values in cases:
        for delta in (0.0, 1.0):
            logits = torch.tensor(values, dtype=torch.float64)
            loss, update = assert_matches_reference(logits, torch.tensor(label_values), delta)
            assert math.isfinite(loss.item()) and torch.isfinite(update).all()
    float32 = torch.tensor([inf, -inf, 3e38, 0.0, inf], dtype=torch.float32)
    loss, update = engine_loss_and_update(float32, torch.tensor([1, 0, 0, 1, 0]))
    expected = reference_ap_loss(float32.double(), torch.tensor([1, 0, 0, 1, 0]))
    assert loss.item() == pytest.approx(expected[0].item()) and torch.isfinite(update).all()


def test_labels_must_be_exactly_minus_one_zero_or_one():
    logits = torch.randn(6)
    with pytest.raises(ValueError, match=r"labels must be exactly 1 .* found 0.5"):
        ap_loss(logits, torch.tensor([1.0, 0.5, 0.0, 0.0, -1.0, 0.0]))
    with pytest.raises(ValueError, match="found nan"):
        ap_loss(logits, torch.tensor([1.0, float("nan"), 0.0, 0.0, -1.0, 0.0]))
    integer = torch.tensor([1, 0, 0, 1, -1, 0])
    assert torch.equal(ap_loss(logits, integer.float()), ap_loss(logits, integer))
    assert torch.equal(ap_loss(logits, integer.clamp(min=0).bool()), ap_loss(logits, integer.clamp(min=0)))


@pytest.mark.parametrize("delta", [1e-320, 1e-300, 1e-13])
def test_a_vanishing_delta_is_the_hard_step(delta):
    labels = torch.tensor([1, 1, 0, 0, 1])
    logits = torch.tensor([1.0, 1.0, 2.0, 1.0, 0.5], dtype=torch.float64)  # ties between all kinds
    loss, update = engine_loss_and_update(logits, labels, delta)
    ref_loss, ref_update = reference_ap_loss(logits, labels, 0.0)
    assert torch.isfinite(update).all()
    torch.testing.assert_close(loss.double(), ref_loss, **TOL)
    torch.testing.assert_close(update, ref_update, **TOL)
