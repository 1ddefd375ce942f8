"""Exact lookup of values among sorted cuts, faster than a binary search.

The AP-loss engine places every negative score among a few thousand cuts.
`torch.searchsorted` does that with a branchy binary search per element, which on a CPU
costs more than the rest of the loss together. Here a uniform grid, much finer than the
cuts, sends each value to a cell. Most cells hold no cut, and there the bin is read off a
table; only values in the few cells that hold cuts compare themselves with those cuts.
One cell below the lowest cut and one above the highest catch every value outside the
cuts' range (most negatives, late in training) without a comparison.

The result is exact, not approximate: the cell of a value is computed by the same
monotone float operations as the cell of each cut, so a cut in an earlier cell is
strictly below the value and one in a later cell strictly above it. The fused CPU kernel
(csrc/ranking.cpp) computes cells with the same operations from `cell_start`.
"""
import torch
from torch import Tensor

# Grid cells per cut: enough that a cell rarely holds more than a couple of cuts.
CELLS_PER_CUT = 64
_MAX_CELLS = 1 << 20
# Beyond this many cuts in one cell (near-duplicate scores), a binary search is cheaper.
_MAX_CELL_DEPTH = 8


class BinLocator:
    """Bins of the real line cut at sorted unique u_0 < ... < u_{U-1}.

    Bin 2k+1 is the single point u_k; bin 2k is the open interval (u_{k-1}, u_k), with
    u_{-1} = -inf and u_U = +inf. So a value's bin is #{u < x} + #{u <= x}, in [0, 2U].
    """

    def __init__(self, cuts: Tensor, cells_per_cut: int = CELLS_PER_CUT) -> None:
        if cuts.ndim != 1 or cuts.numel() == 0:
            raise ValueError("BinLocator needs a non-empty 1-D tensor of sorted unique cuts")
        self.cuts = cuts
        self.num_bins = 2 * cuts.numel() + 1
        low, high = cuts[0].item(), cuts[-1].item()
        cells = min(_MAX_CELLS, cells_per_cut * cuts.numel())
        span = high - low
        scale = (cells - 1) / span if span > 0 else 0.0
        if not (abs(low) + abs(high) < float("inf") and 0 < scale < float("inf")):
            cells, scale = 1, 0.0
        self.low, self.scale, self.cells = low, scale, cells
        self._cell_of_cut = self._cell(cuts)
        self._occupancy = torch.bincount(self._cell_of_cut, minlength=cells + 2)
        # Cell c holds cuts [cell_start[c], cell_start[c + 1]).
        self.cell_start = torch.cat([self._occupancy.new_zeros(1), self._occupancy.cumsum(0)]).int()
        self._use_binary_search = int(self._occupancy.max()) > _MAX_CELL_DEPTH
        self._tables: tuple[Tensor, Tensor] | None = None

    def _lookup_tables(self) -> tuple[Tensor, Tensor]:
        """For `locate` (the fused kernel needs only `cell_start`): one int32 per cell, the bin
        of a value in it (the interval after the cells' earlier cuts), stored as -1 - that bin
        when the cell itself holds cuts to compare with; and per cell its cuts, column t the
        t-th, NaN where it has fewer (NaN compares false with anything)."""
        if self._tables is None:
            cuts_before = self.cell_start[:-1].long()
            first_bin = 2 * cuts_before
            cell_code = torch.where(self._occupancy > 0, -1 - first_bin, first_bin).int()
            rank_in_cell = torch.arange(self.cuts.numel(), device=self.cuts.device) - cuts_before[self._cell_of_cut]
            cell_cuts = self.cuts.new_full((int(self._occupancy.max()), self.cells + 2), float("nan"))
            cell_cuts[rank_in_cell, self._cell_of_cut] = self.cuts
            self._tables = cell_code, cell_cuts
        return self._tables

    def _cell(self, values: Tensor) -> Tensor:
        # Cells 1..cells span the cuts; 0 and cells + 1 take what lies beyond them. Clamping
        # before the cast keeps huge values and infinities in the edge cells, and NaN (whose
        # bin is meaningless; with a zero scale, an infinity) in cell 1, where it is compared.
        cell = (values - self.low).mul_(self.scale).add_(1.0).clamp_(0, self.cells + 1).nan_to_num_(1.0)
        return cell.int()

    def search(self, values: Tensor) -> Tensor:
        """`locate` by binary search: for a few values, or cuts too close for the grid."""
        return (torch.searchsorted(self.cuts, values, out_int32=True)
                + torch.searchsorted(self.cuts, values, right=True, out_int32=True))

    def locate(self, values: Tensor) -> Tensor:
        """Bin index (int32) of every value; `values` must have the cuts' dtype."""
        if self._use_binary_search:
            return self.search(values)
        cell_code, cell_cuts = self._lookup_tables()
        cell = self._cell(values)
        bins = cell_code.index_select(0, cell)
        to_compare = (bins < 0).nonzero().squeeze(1)
        if to_compare.numel():
            cell, values = cell[to_compare], values[to_compare]
            found = -1 - bins[to_compare]
            for column in cell_cuts:
                cut = column.index_select(0, cell)
                found += cut < values
                found += cut <= values
            bins[to_compare] = found
        return bins
