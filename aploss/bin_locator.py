"""Exact lookup of values among sorted cuts, faster than a binary search.

The AP-loss engine places every negative score among a few thousand cuts.
`torch.searchsorted` does that with a branchy binary search per element, which on a CPU
costs more than the rest of the loss together. Here a uniform grid, much finer than the
cuts, sends each value to a cell. Most cells hold no cut, and there the bin is read off a
table; only values in the few cells that hold cuts compare themselves with those cuts.

The result is exact, not approximate: the cell of a value is computed by the same
monotone float operations as the cell of each cut, so a cut in an earlier cell is
strictly below the value and one in a later cell strictly above it.
"""
import torch
from torch import Tensor

# Grid cells per cut: enough that a cell rarely holds more than a couple of cuts.
_CELLS_PER_CUT = 64
_MAX_CELLS = 1 << 20
# Beyond this many cuts in one cell (near-duplicate scores), a binary search is cheaper.
_MAX_CELL_DEPTH = 8


class BinLocator:
    """Bins of the real line cut at sorted unique u_0 < ... < u_{U-1}.

    Bin 2k+1 is the single point u_k; bin 2k is the open interval (u_{k-1}, u_k), with
    u_{-1} = -inf and u_U = +inf. So a value's bin is #{u < x} + #{u <= x}, in [0, 2U].
    """

    def __init__(self, cuts: Tensor) -> None:
        if cuts.ndim != 1 or cuts.numel() == 0:
            raise ValueError("BinLocator needs a non-empty 1-D tensor of sorted unique cuts")
        self.cuts = cuts
        self.num_bins = 2 * cuts.numel() + 1
        low, high = cuts[0].item(), cuts[-1].item()
        cells = min(_MAX_CELLS, _CELLS_PER_CUT * cuts.numel())
        span = high - low
        scale = (cells - 1) / span if span > 0 else 0.0
        if not (abs(low) + abs(high) < float("inf") and 0 < scale < float("inf")):
            cells, scale = 1, 0.0
        self._low, self._scale, self._cells = low, scale, cells
        cell_of_cut = self._cell(cuts)
        occupancy = torch.bincount(cell_of_cut, minlength=cells)
        cuts_before = occupancy.cumsum(0) - occupancy
        # One int32 per cell: the bin of a value in it (the interval after the cells' earlier
        # cuts), stored as -1 - that bin when the cell itself holds cuts to compare with.
        first_bin = 2 * cuts_before
        self._cell_code = torch.where(occupancy > 0, -1 - first_bin, first_bin).int()
        depth = int(occupancy.max())
        self._use_binary_search = depth > _MAX_CELL_DEPTH
        if not self._use_binary_search:
            # Column t, row c: the t-th cut inside cell c, or NaN (compares false with anything).
            rank_in_cell = torch.arange(cuts.numel(), device=cuts.device) - cuts_before[cell_of_cut]
            self._cell_cuts = cuts.new_full((depth, cells), float("nan"))
            self._cell_cuts[rank_in_cell, cell_of_cut] = cuts

    def _cell(self, values: Tensor) -> Tensor:
        # Clamping before the cast keeps huge values and infinities in the edge cells, and
        # NaN (whose bin is meaningless) in cell 0 rather than at an out-of-range index.
        cell = (values - self._low).mul_(self._scale).clamp_(0, self._cells - 1).nan_to_num_(0.0)
        return cell.int()

    def locate(self, values: Tensor) -> Tensor:
        """Bin index (int32) of every value; `values` must have the cuts' dtype."""
        if self._use_binary_search:
            return (torch.searchsorted(self.cuts, values, out_int32=True)
                    + torch.searchsorted(self.cuts, values, right=True, out_int32=True))
        cell = self._cell(values)
        bins = self._cell_code.index_select(0, cell)
        to_compare = (bins < 0).nonzero().squeeze(1)
        if to_compare.numel():
            cell, values = cell[to_compare], values[to_compare]
            found = -1 - bins[to_compare]
            for column in self._cell_cuts:
                cut = column.index_select(0, cell)
                found += cut < values
                found += cut <= values
            bins[to_compare] = found
        return bins
