"""Exact lookup of values among sorted breakpoints, faster than a binary search.

The AP-loss engine places every negative score among a few thousand breakpoints.
`torch.searchsorted` does that with a branchy binary search per element, which on a CPU
costs more than the rest of the loss together. Here a uniform grid over the breakpoints
sends each value to a cell, and only the few breakpoints inside that cell are compared.

The result is exact, not approximate: the cell of a value is computed by the same
monotone float operations as the cell of each breakpoint, so a breakpoint in an earlier
cell is strictly below the value and one in a later cell strictly above it.
"""
import torch
from torch import Tensor

# Grid cells per breakpoint: enough that a cell rarely holds more than a few breakpoints.
_CELLS_PER_BREAKPOINT = 16
_MAX_CELLS = 1 << 20
# Beyond this many breakpoints in one cell (near-duplicate scores), a binary search is cheaper.
_MAX_CELL_DEPTH = 8


class BinLocator:
    """Bins of the real line cut by sorted unique breakpoints u_0 < ... < u_{U-1}.

    Bin 2k+1 is the single point u_k; bin 2k is the open interval (u_{k-1}, u_k), with
    u_{-1} = -inf and u_U = +inf. So a value's bin is #{u < x} + #{u <= x}, in [0, 2U].
    """

    def __init__(self, breakpoints: Tensor) -> None:
        if breakpoints.ndim != 1 or breakpoints.numel() == 0:
            raise ValueError("BinLocator needs a non-empty 1-D tensor of sorted unique breakpoints")
        self.breakpoints = breakpoints
        self.num_bins = 2 * breakpoints.numel() + 1
        low, high = breakpoints[0].item(), breakpoints[-1].item()
        cells = min(_MAX_CELLS, _CELLS_PER_BREAKPOINT * breakpoints.numel())
        span = high - low
        scale = (cells - 1) / span if span > 0 else 0.0
        if not (torch.isfinite(breakpoints[[0, -1]]).all() and 0 < scale < float("inf")):
            cells, scale = 1, 0.0
        self._low, self._scale, self._cells = low, scale, cells
        occupancy = torch.bincount(self._cell(breakpoints), minlength=cells)
        self._first_in_cell = occupancy.cumsum(0) - occupancy
        self._depth = int(occupancy.max())
        padding = breakpoints.new_full((self._depth,), float("inf"))
        self._padded = torch.cat([breakpoints, padding])

    def _cell(self, values: Tensor) -> Tensor:
        # Clamping before the cast keeps huge values and infinities in the edge cells, and
        # NaN (whose bin is meaningless) in cell 0 rather than at an out-of-range index.
        cell = (values - self._low).mul_(self._scale).clamp_(0, self._cells - 1).nan_to_num_(0.0)
        return cell.long()

    def locate(self, values: Tensor) -> Tensor:
        """Bin index (int64) of every value; `values` must have the breakpoints' dtype."""
        if self._depth > _MAX_CELL_DEPTH:
            return (torch.searchsorted(self.breakpoints, values)
                    + torch.searchsorted(self.breakpoints, values, right=True))
        first = self._first_in_cell[self._cell(values)]
        bins = first * 2
        for step in range(self._depth):
            candidate = self._padded[first + step]
            bins += candidate < values
            bins += candidate <= values
        return bins
