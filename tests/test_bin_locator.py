"""BinLocator against torch.searchsorted, on the grid path and the binary-search path."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aploss.bin_locator import BinLocator


def expected_bins(cuts, values):
    return torch.searchsorted(cuts, values) + torch.searchsorted(cuts, values, right=True)


def assert_locates(cuts, values):
    cuts = torch.unique(cuts)
    locator = BinLocator(cuts)
    torch.testing.assert_close(locator.locate(values).long(), expected_bins(cuts, values))
    return locator


def test_clustered_cuts_with_values_on_and_between_them():
    g = torch.Generator().manual_seed(0)
    positives = -4.6 + 0.1 * torch.randn(2000, generator=g, dtype=torch.float64)
    cuts = torch.cat([positives - 1, positives + 1])
    values = torch.cat([-4.6 + 0.5 * torch.randn(100_000, generator=g, dtype=torch.float64),
                        cuts, torch.nextafter(cuts, cuts + 1), torch.nextafter(cuts, cuts - 1),
                        torch.tensor([float("inf"), float("-inf"), 1e300, -1e300], dtype=torch.float64)])
    locator = assert_locates(cuts, values)
    assert not locator._use_binary_search


def test_near_duplicate_cuts_fall_back_to_binary_search():
    cuts = torch.cat([torch.tensor([0.0], dtype=torch.float64),
                      1 + torch.arange(20, dtype=torch.float64) * 1e-15])
    locator = assert_locates(cuts, torch.linspace(-1, 2, 1001, dtype=torch.float64))
    assert locator._use_binary_search


def test_single_cut_and_infinite_cuts():
    assert_locates(torch.tensor([0.5], dtype=torch.float64), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    cuts = torch.tensor([float("-inf"), 0.0, float("inf")], dtype=torch.float64)
    assert_locates(cuts, torch.tensor([float("-inf"), -1.0, 0.0, 3.0, float("inf")], dtype=torch.float64))


@given(cuts=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=60),
       values=st.lists(st.floats(allow_nan=False), max_size=60), reuse=st.integers(0, 60))
@settings(max_examples=200, deadline=None)
def test_any_cuts_and_values(cuts, values, reuse):
    cuts_tensor = torch.tensor(cuts, dtype=torch.float64)
    values_tensor = torch.tensor(values + cuts[:reuse], dtype=torch.float64)
    assert_locates(cuts_tensor, values_tensor)
