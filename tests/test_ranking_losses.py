"""aLRP and Rank & Sort on the engine against their O(P*N) references (aploss.ranking_reference)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aploss.engine as engine
import aploss.rank_sort as rs_module
from aploss import alrp_loss, rs_loss
from aploss.ranking_reference import alrp_reference, rs_reference
from tests.synthetic import detection_pairs

TOL = dict(rtol=1e-9, atol=1e-9)
LOSSES = {"alrp": (alrp_loss, alrp_reference), "rs": (rs_loss, rs_reference)}


def engine_outputs(name, logits, labels, values, delta, weights=(1.0, 1.0)):
    """(first output, second output, logits' update, values' gradient) through autograd."""
    loss = LOSSES[name][0]
    leaf = logits.detach().clone().requires_grad_()
    value_leaf = values.detach().clone().requires_grad_()
    first, second = loss(leaf, labels, value_leaf, delta)
    (weights[0] * first + weights[1] * second).backward()
    return first.detach(), second.detach(), leaf.grad, value_leaf.grad


def assert_matches_reference(name, logits, labels, values, delta, tol=TOL):
    first, second, update, _ = engine_outputs(name, logits, labels, values, delta)
    expected = LOSSES[name][1](logits, labels, values, delta)
    torch.testing.assert_close(first.double(), expected[0], **tol)
    torch.testing.assert_close(second.double(), expected[1], **tol)
    torch.testing.assert_close(update.double(), expected[2], **tol)
    return first, second, update


def random_case(seed, n=3000, p_pos=0.05, p_ignore=0.1, ties=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=g, dtype=torch.float64) * 2
    u = torch.rand(n, generator=g)
    labels = torch.where(u < p_pos, 1, torch.where(u < p_pos + p_ignore, -1, 0))
    values = torch.rand(int((labels == 1).sum()), generator=g, dtype=torch.float64)
    if ties:  # scores on a grid of 1/4: ties between every kind of pair, and at the kinks s +- delta
        logits, values = (logits * 2).round() / 4, (values * 4).round() / 4
    return logits.to(dtype), labels, values


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("delta", [0.0, 0.05, 0.25, 0.5, 1.0, 4.0])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "tie-heavy"])
def test_equal_to_reference(name, delta, ties):
    assert_matches_reference(name, *random_case(1, ties=ties), delta)


@pytest.mark.parametrize("name", LOSSES)
def test_detection_shaped_batch(name):
    # Two images x 3000 anchors x 4 classes near the prior-bias init (every negative within delta
    # of every positive), and the same batch late in training (positives far above most negatives).
    g = torch.Generator().manual_seed(4)
    early, labels = detection_pairs(g)
    values = torch.rand(labels.shape, generator=g, dtype=torch.float64)  # read at the positives
    late = torch.where(labels == 1, 2.0, -6.0) + torch.randn(labels.shape, generator=g, dtype=torch.float64)
    for logits in (early, late):
        assert_matches_reference(name, logits, labels, values, 1.0 if name == "alrp" else 0.5)


@pytest.mark.parametrize("name", LOSSES)
def test_large_float32_batch(name):
    g = torch.Generator().manual_seed(5)
    n = 500_000
    logits = -4.6 + 0.3 * torch.randn(n, generator=g)
    labels = torch.zeros(n, dtype=torch.int8)
    labels[torch.randperm(n, generator=g)[:300]] = 1
    values = torch.rand(300, generator=g)
    assert_matches_reference(name, logits, labels, values.double(), 0.5, tol=dict(rtol=1e-6, atol=1e-9))


@pytest.mark.parametrize("name", LOSSES)
def test_many_chunks_and_blocks_match_one(name, monkeypatch):
    logits, labels, values = random_case(6, n=1000, p_pos=0.1)
    monkeypatch.setattr(engine, "_CHUNK_PAIRS", {"cpu": 37, "cuda": 37})
    assert_matches_reference(name, logits, labels, values, 0.7)
    monkeypatch.setattr(engine, "fused", lambda device: False)  # the path whose blocks these are
    monkeypatch.setattr(rs_module, "_BLOCK_PAIRS", 300)  # RS's positive pairs a few rows at a time
    assert_matches_reference(name, logits, labels, values, 0.7)


@pytest.mark.parametrize("name", LOSSES)
def test_pytorch_path_equals_the_fused_kernels(name, monkeypatch):
    case = random_case(7, n=20_000)
    fused = engine_outputs(name, *case, 0.5)
    monkeypatch.setattr(engine, "fused", lambda device: False)
    plain = engine_outputs(name, *case, 0.5)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", LOSSES)
def test_result_does_not_depend_on_the_thread_count(name):
    case = random_case(14, n=50_000, p_pos=0.02)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = engine_outputs(name, *case, 0.5)
        torch.set_num_threads(4)
        four = engine_outputs(name, *case, 0.5)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, four))


@given(data=st.lists(st.tuples(st.sampled_from([-1, 0, 0, 1]),
                               st.one_of(st.sampled_from([-1.0, -0.5, 0.0, 0.25, 0.5, 2.0]),
                                         st.floats(-8, 8, allow_nan=False)),
                               st.sampled_from([0.0, 0.25, 0.5, 1.0])),
                     min_size=0, max_size=120),
       delta=st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.floats(1e-3, 5)),
       name=st.sampled_from(sorted(LOSSES)))
@settings(max_examples=200, deadline=None)
def test_any_label_mix(data, delta, name):
    labels = torch.tensor([label for label, _, _ in data], dtype=torch.int64)
    logits = torch.tensor([score for _, score, _ in data], dtype=torch.float64)
    values = torch.tensor([value for _, _, value in data], dtype=torch.float64)  # the logits' shape
    assert_matches_reference(name, logits, labels, values, delta)


def test_alrp_localisation_gradient_is_the_references():
    # The localisation loss is linear in the errors (the ranks are constants), so its gradient
    # for error k is the reference's localisation loss with the errors set to the unit vector e_k.
    logits, labels, loc = random_case(8, n=600, p_pos=0.08, ties=True)
    *_, loc_grad = engine_outputs("alrp", logits, labels, loc, 1.0, weights=(0.0, 1.0))
    unit = torch.eye(loc.numel(), dtype=torch.float64)
    expected = torch.stack([alrp_reference(logits, labels, e, 1.0)[1] for e in unit])
    torch.testing.assert_close(loc_grad, expected, **TOL)


def test_alrp_update_follows_the_classification_output_only():
    case = random_case(9, n=2000)
    _, _, update, loc_grad = engine_outputs("alrp", *case, 1.0, weights=(3.0, 0.0))
    _, _, unit_update, _ = engine_outputs("alrp", *case, 1.0, weights=(1.0, 0.0))
    torch.testing.assert_close(update, 3 * unit_update, rtol=1e-12, atol=0)
    assert (loc_grad == 0).all()


def test_rs_update_follows_the_ranking_output_only():
    # The release's backward: the sorting output's incoming gradient is not used.
    case = random_case(10, n=2000)
    _, _, update, targets_grad = engine_outputs("rs", *case, 0.5, weights=(1.0, 7.0))
    _, _, plain, _ = engine_outputs("rs", *case, 0.5, weights=(1.0, 0.0))
    _, _, none, _ = engine_outputs("rs", *case, 0.5, weights=(0.0, 1.0))
    assert torch.equal(update, plain) and (none == 0).all() and (targets_grad == 0).all()


def test_values_in_either_layout_agree():
    logits, labels, values = random_case(11, n=500)
    spread = torch.zeros_like(logits)
    spread[labels == 1] = values
    for name in LOSSES:
        one_each = engine_outputs(name, logits, labels, values, 0.5)
        shaped = engine_outputs(name, logits, labels, spread, 0.5)
        for a, b in zip(one_each[:3], shaped[:3]):
            assert torch.equal(a, b)
        assert torch.equal(shaped[3][labels == 1], one_each[3]) and (shaped[3][labels != 1] == 0).all()


@pytest.mark.parametrize("name", LOSSES)
def test_no_positives_all_ignored_and_empty(name):
    for logits, labels in [(torch.randn(50), torch.zeros(50)), (torch.randn(5), -torch.ones(5)),
                           (torch.randn(0), torch.zeros(0))]:
        first, second, update, value_grad = engine_outputs(name, logits, labels, torch.zeros(0), 1.0)
        assert first == 0 and second == 0 and (update == 0).all() and value_grad.shape == (0,)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_ignored_pairs_have_no_effect_whatever_their_value(name, poison):
    logits, labels, values = random_case(12, p_ignore=0.2)
    clean = engine_outputs(name, logits, labels, values, 0.5)
    poisoned = engine_outputs(name, torch.where(labels == -1, poison, logits), labels, values, 0.5)
    for a, b in zip(clean, poisoned):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", LOSSES)
def test_nan_in_a_ranked_pair_gives_nan_everywhere(name):
    labels = torch.tensor([1, 0, 0, 1, -1, 0])
    logits = torch.tensor([1.0, float("nan"), 2.0, 1.5, 0.3, -3.0])
    first, second, update, value_grad = engine_outputs(name, logits, labels, torch.tensor([0.5, 0.5]), 0.5)
    assert math.isnan(first.item()) and math.isnan(second.item())
    assert update[labels >= 0].isnan().all() and update[4] == 0 and value_grad.isnan().all()


@pytest.mark.parametrize("name", LOSSES)
def test_infinite_scores_give_the_exact_limits(name):
    inf = float("inf")
    for values, label_values in [([inf, 0.0, 2.0, 1.0], [1, 0, 0, 1]), ([inf, inf, 2.0, -inf], [1, 0, 0, 1]),
                                 ([-inf, 0.0, -inf, 1.0, inf], [1, 0, 0, 1, 1])]:
        logits, labels = torch.tensor(values, dtype=torch.float64), torch.tensor(label_values)
        targets = torch.linspace(0.2, 0.9, int((labels == 1).sum()), dtype=torch.float64)
        for delta in (0.0, 1.0):
            first, second, update = assert_matches_reference(name, logits, labels, targets, delta)
            assert math.isfinite(first.item()) and math.isfinite(second.item()) and torch.isfinite(update).all()


def test_bad_inputs_are_named():
    logits, labels = torch.randn(4), torch.tensor([1, 0, 1, 0])
    with pytest.raises(ValueError, match=r"alrp_loss: loc_errors must be in \[0, 1\].*found 1.5"):
        alrp_loss(logits, labels, torch.tensor([0.2, 1.5]))
    with pytest.raises(ValueError, match=r"rs_loss: targets must be in \[0, 1\].*found nan"):
        rs_loss(logits, labels, torch.tensor([float("nan"), 0.5]))
    with pytest.raises(ValueError, match=r"one value per positive \(2\) or have the logits' shape \(4,\)"):
        rs_loss(logits, labels, torch.tensor([0.2, 0.5, 0.1]))
    with pytest.raises(TypeError, match="rs_loss: targets must be a floating-point tensor"):
        rs_loss(logits, labels, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="rs_loss: labels must be exactly 1"):
        rs_loss(logits, torch.tensor([1, 2, 0, 0]), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="alrp_loss: delta"):
        alrp_loss(logits, labels, torch.tensor([0.2, 0.5]), delta=-1.0)
    # Values outside [0, 1] away from the positives are never read.
    spread = torch.tensor([0.5, 7.0, 0.25, float("nan")])
    assert torch.isfinite(torch.stack(rs_loss(logits, labels, spread))).all()


def test_value_gradient_has_the_values_dtype():
    logits, labels, values = random_case(13, n=400)
    loc = values.float().requires_grad_()
    classification, localisation = alrp_loss(logits.float(), labels, loc)
    assert classification.dtype == torch.float32
    grad, = torch.autograd.grad(localisation, loc)
    assert grad.dtype == torch.float32 and (grad > 0).all()
