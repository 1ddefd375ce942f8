"""AP-loss (Chen et al., CVPR 2019 / TPAMI 2020) trained by its error-driven update.

Notation (DEVELOPERS.md): positives P and negatives N among the ranked pairs,
H(x) = clamp(x / (2 delta) + 1/2, 0, 1) (the hard step with H(0) = 1/2 when delta = 0),
rank+(i) = 1 + sum_{k in P, k != i} H(s_k - s_i),  FP(i) = sum_{j in N} H(s_j - s_i),
p_i = rank+(i) / (rank+(i) + FP(i)),  q_i = max{p_k : s_k <= s_i},  loss = 1 - mean q.

Backward differentiates nothing: it hands autograd the paper's update, -(1 - q_i) / |P|
for positive i and (1/|P|) sum_i w_i H(s_j - s_i) / rank(i) for negative j.

How this gets to O(N log P) time and O(N + P) memory without a P x N matrix: as a function
of a negative's score, H(s_j - s_i) is piecewise linear with kinks only at the 2P points
s_i -/+ delta. Cut the line at those points into bins. Inside one bin the positives below
the window (H = 1) and those inside it (H linear) are the same for every score, so
  * the forward needs, per bin, only the count and the sum of the negatives' scores,
    which difference arrays over the sorted positives turn into FP(i) for every i at once;
  * the update of every negative of a bin is one linear function of its score.
Each negative is placed in its bin once (`BinLocator`) and the placement is kept (int16
where the bins allow) so that backward only evaluates the linear functions. Past the
placement everything runs in float64 on per-bin and per-positive arrays, with scores taken
relative to the lowest positive of their cluster (positives chained by gaps of at most
2 delta), so that no sum cancels large magnitudes, whatever the logits' scale. Negatives
below every window (late in training, nearly all of them) cost one comparison. On a CPU the
two passes over the pairs run as fused C++ kernels (`aploss.kernels`), bit for bit the
PyTorch code here, which remains the path on GPUs and where no compiler is found.

Defined on every input:
  * ignored pairs (label -1) have no effect on anything, whatever their value (NaN, inf);
  * +-inf among the ranked pairs gives the exact limits, finite: an infinity is above (or
    below) every finite score, and equal scores tie with H = 1/2, infinities included;
  * a NaN among the ranked pairs gives a NaN loss and NaN updates on every ranked pair (they
    all depend on it through the ranks), on every process; never a silent zero;
  * labels must be exactly -1, 0 or 1 (integer, bool or float tensors), anything else is a
    ValueError; delta must be finite and >= 0, and below HARD_STEP_DELTA it is the hard step;
  * in a global batch the inputs are checked on every process before any collective that
    depends on them, so a bad input anywhere raises the same error on every process.
"""
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from aploss import kernels
from aploss.bin_locator import CELLS_PER_CUT, BinLocator

# Pairs handled per step: bounds the float64 temporaries, and on a CPU keeps them in cache.
_CHUNK_PAIRS = {"cpu": 1 << 17, "cuda": 1 << 24}
# The fused kernel compares a value with the cuts of its cell in the same pass, so a coarser
# grid costs it little, and its table stays small beside the logits.
_FUSED_CELLS_PER_CUT = 16
# A narrower linear part than this (logit units, far below float32's resolution of any trained
# logit) is the hard step: 1 / (2 delta) would overflow for a denormal delta.
HARD_STEP_DELTA = 1e-12
# Infinite scores are ranked as the largest finite float64 of their sign: every finite score
# compares with them as with an infinity, and two equal infinities tie (H = 1/2).
_LARGEST = torch.finfo(torch.float64).max


def fused(device: torch.device) -> bool:
    """Whether the fused CPU kernels (aploss.kernels) take the passes over the pairs."""
    return device.type == "cpu" and kernels.loaded()


class LocalBatch:
    """Where the global batch lives, for every loss term normalised by it: here, all in this
    process. `distributed.ProcessGroupBatch` spreads it over a process group: positives are
    gathered for the ranking, counts summed, and each term scaled by the world size."""

    @property
    def world_size(self) -> int:
        return 1

    def agree(self, problem: tuple[type[Exception], str] | None, device: torch.device) -> None:
        """Raise `problem` (an input error found here), on every process if any has one."""
        if problem is not None:
            raise problem[0](problem[1])

    def gather_positives(self, scores: Tensor) -> tuple[Tensor, int]:
        """Every positive score of the batch, and where this process's own begin."""
        return scores, 0

    def sum_over_processes(self, partial: Tensor) -> Tensor:
        return partial


@dataclass
class Ranking:
    """The positives of the batch in ascending score order, and the bins their kinks cut."""

    scores: Tensor          # float64 [P], sorted
    order: Tensor           # sorted position -> position in the gathered positive list
    cluster_start: Tensor   # float64 [P]: lowest score of each positive's cluster
    locator: BinLocator
    below: Tensor           # bin m: positives [0, below[m]) have H = 1
    window: Tensor          # bin m: positives [below[m], window[m]) have H linear
    center: Tensor          # bin m: its scores are summed relative to this (unscored bin: 0)
    delta: float
    tie: float              # H(0): 1/2, or 1 for Rank & Sort's hard step (delta = 0 only)
    positive_bins: Tensor   # the bin of every positive, in score order

    @property
    def unscored_bin(self) -> int:
        """The extra bin that collects positives, ignored pairs and pruned negatives."""
        return self.locator.num_bins


def _rank_positives(positive_scores: Tensor, delta: float, tie: float = 0.5) -> Ranking:
    scores, order = torch.sort(positive_scores, stable=True)
    # A window [s - delta, s + delta] never spans a gap wider than 2 delta, so all the
    # positives in it share one cluster and one reference score.
    gap = scores.diff() > 2 * delta
    starts = torch.cat([gap.new_ones(1), gap]).nonzero().squeeze(1)
    cluster = torch.cat([gap.new_zeros(1), gap]).long().cumsum(0)
    cluster_start = scores[starts][cluster]
    raised, lowered = scores + delta, scores - delta
    cells_per_cut = _FUSED_CELLS_PER_CUT if fused(scores.device) else CELLS_PER_CUT
    locator = BinLocator(torch.unique(torch.cat([lowered, raised])), cells_per_cut)
    # Which positives are below (H = 1) or in the window is constant on each bin: read it
    # at the bin's point, or at the middle of its open interval.
    cuts = locator.cuts
    inside = cuts.new_empty(locator.num_bins)
    inside[1::2] = cuts
    inside[0], inside[-1] = float("-inf"), float("inf")
    inside[2:-1:2] = cuts[:-1] / 2 + cuts[1:] / 2
    below = torch.searchsorted(raised, inside)                 # s_i + delta < s
    window = torch.searchsorted(lowered, inside, right=True)   # s_i - delta <= s
    first_in_window = below.clamp(max=scores.numel() - 1)
    center = torch.where(window > below, cluster_start[first_in_window], 0.0)
    center = torch.cat([center, center.new_zeros(1)])
    return Ranking(scores, order, cluster_start, locator, below, window, center, delta, tie,
                    locator.search(scores))


def positive_step_sums(ranking: Ranking, weights: Tensor | None = None) -> Tensor:
    """sum_{k in P} w_k H(s_k - s_i) for every positive i (score order), k = i included (as H(0) w_i),
    in O(P log P): the positives placed in the bins as the negatives are. Weights must be >= 0."""
    bins = ranking.positive_bins
    size = ranking.unscored_bin + 1
    relative = ranking.scores - ranking.center.index_select(0, bins)
    if weights is None:
        count = torch.bincount(bins, minlength=size).double()
        offset = torch.bincount(bins, weights=relative, minlength=size)
    else:
        count = torch.bincount(bins, weights=weights, minlength=size)
        offset = torch.bincount(bins, weights=weights * relative, minlength=size)
    return _step_sums(ranking, count, offset)


def _step_sums(ranking: Ranking, count: Tensor, offset: Tensor) -> Tensor:
    """sum_j H(s_j - s_i) for every positive i, from per-bin counts and centred sums (of weights
    and weighted scores, for a weighted sum)."""
    num_pos = ranking.scores.numel()
    count, offset = count[:-1], offset[:-1]
    offset = torch.where(ranking.window > ranking.below, offset, 0.0)

    def spread(values: Tensor) -> Tensor:
        """Difference array over the positives: +values from below[m], -values from window[m]."""
        total = values.new_zeros(num_pos + 1)
        total.index_add_(0, ranking.below, values).index_add_(0, ranking.window, -values)
        return total.cumsum(0)[:num_pos]

    starts_at = count.new_zeros(num_pos + 1).index_add_(0, ranking.below, count)
    fully_above = starts_at.flip(0).cumsum(0).flip(0)[1:]
    in_window = spread(count)
    steps = fully_above + ranking.tie * in_window
    if ranking.delta > 0:
        slope = spread(offset) + in_window * (ranking.cluster_start - ranking.scores)
        # Each pair in a window adds a value in [0, 1]; the clamp removes only rounding.
        steps += (slope / (2 * ranking.delta)).clamp(-0.5 * in_window, 0.5 * in_window)
    return steps


def chunk_pairs(device: torch.device) -> int:
    """How many anchor-class pairs the engine places per step on `device`: an input past it is
    ranked in several chunks (the GPU check makes one that is)."""
    return _CHUNK_PAIRS.get(device.type, _CHUNK_PAIRS["cuda"])


def _clamp_range(ranking: Ranking) -> tuple[float, float]:
    """Scores beyond these have the same H against every positive as the bounds themselves."""
    margin = 2 * ranking.delta + 1.0
    return max(ranking.scores[0].item() - margin, -_LARGEST), min(ranking.scores[-1].item() + margin, _LARGEST)


def _place_negatives(logits: Tensor, labels: Tensor, ranking: Ranking, keep: bool
                     ) -> tuple[Tensor, Tensor, Tensor | None, bool]:
    """Per-bin count and centred sum of the negatives; their bins if `keep`; whether any
    negative is NaN. Positives, ignored pairs and negatives below every window (H = 0
    against every positive) are left in the unscored bin after one comparison."""
    unscored = ranking.unscored_bin
    lowest, highest = _clamp_range(ranking)
    prune_below = ranking.scores[0].item() - ranking.delta
    size = chunk_pairs(logits.device)
    locator = ranking.locator
    if fused(logits.device):
        count, offset, placed, has_nan = torch.ops.aploss.place_negatives(
            logits.contiguous(), labels.contiguous(), locator.cuts, locator.cell_start, locator.low, locator.scale,
            ranking.center, lowest, highest, prune_below, keep, size)
        return count, offset, placed if keep else None, has_nan
    count = torch.zeros(unscored + 1, dtype=torch.float64, device=logits.device)
    offset = torch.zeros_like(count)
    bin_dtype = torch.int16 if unscored <= torch.iinfo(torch.int16).max else torch.int32
    placed = torch.empty(logits.shape, dtype=bin_dtype, device=logits.device) if keep else None
    has_nan = torch.zeros((), dtype=torch.bool, device=logits.device)
    for start in range(0, logits.numel(), size):
        scores = logits[start:start + size].to(torch.float64, copy=True).clamp_(lowest, highest)
        negative = labels[start:start + size] == 0
        has_nan |= (scores.isnan() & negative).any()
        # After the clamp, so that -inf ties with a positive at -inf (both at the lowest float).
        ranked = (negative & (scores >= prune_below)).nonzero().squeeze(1)
        scores = scores.index_select(0, ranked)
        bins = locator.locate(scores)
        count += torch.bincount(bins, minlength=unscored + 1)
        offset += torch.bincount(bins, weights=scores - ranking.center.index_select(0, bins), minlength=unscored + 1)
        if placed is not None:
            placed[start:start + size].fill_(unscored).index_copy_(0, ranked, bins.to(bin_dtype))
    return count, offset, placed, bool(has_nan)


@dataclass
class _Update:
    """What backward needs: per bin, the negatives' update as a linear function of the score."""

    placed: Tensor          # bin of every pair
    intercept: Tensor       # per bin, the unscored bin last (zero)
    slope: Tensor
    center: Tensor
    lowest: float
    highest: float
    positive_index: Tensor  # where this process's positives are among the pairs
    positive_update: Tensor


def _negative_update(ranking: Ranking, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per bin: sum_i weight_i H(s - s_i) = intercept + slope * (s - center)."""
    cumulative = torch.cat([weight.new_zeros(1), weight.cumsum(0)])
    in_window = cumulative[ranking.window] - cumulative[ranking.below]
    intercept = cumulative[ranking.below] + ranking.tie * in_window
    slope = torch.zeros_like(intercept)
    if ranking.delta > 0:
        relative = weight * (ranking.scores - ranking.cluster_start)
        cumulative_relative = torch.cat([weight.new_zeros(1), relative.cumsum(0)])
        window_relative = cumulative_relative[ranking.window] - cumulative_relative[ranking.below]
        intercept -= window_relative / (2 * ranking.delta)
        slope = in_window / (2 * ranking.delta)
    zero = intercept.new_zeros(1)
    return torch.cat([intercept, zero]), torch.cat([slope, zero])


@dataclass
class Ranked:
    """What a loss's rule sees once the negatives are placed: the global batch's positives ranked,
    and per positive (in `ranking`'s score order) its false positives and its value."""

    ranking: Ranking
    false_positives: Tensor  # FP(i) = sum_{j in N} H(s_j - s_i), float64 [P]
    values: Tensor | None    # the loss's per-positive input (aLRP's loc errors, RS's targets), float64 [P]


@dataclass
class RuleResult:
    """A loss's outputs and its update, per positive in score order, everything divided by |P|."""

    outputs: tuple[Tensor, ...]       # float64 scalars; backward scales the update by the first's gradient
    positive_update: Tensor           # the update of each positive
    negative_weight: Tensor           # c_i: negative j gets sum_i c_i H(s_j - s_i)
    value_gradient: Tensor | None = None  # d outputs[1] / d value_i, for a differentiable value


class RankingRule(Protocol):
    """What one ranking loss computes from the ranked positives (`AveragePrecisionRule`,
    `aploss.alrp.ALRPRule`, `aploss.rank_sort.RankSortRule`)."""

    @property
    def name(self) -> str:
        """The function's name, for error messages."""

    @property
    def num_outputs(self) -> int: ...

    @property
    def value_name(self) -> str | None:
        """The per-positive input's name, None without one."""

    def tie(self, delta: float) -> float:
        """H(0) of the loss's step at this delta."""

    def __call__(self, ranked: Ranked) -> RuleResult: ...


@dataclass(frozen=True)
class AveragePrecisionRule:
    """AP-loss: p_i = rank+(i) / rank(i), q_i = max{p_k : s_k <= s_i}, loss 1 - mean q."""

    interpolate: bool = True
    name = "ap_loss"
    num_outputs = 1
    value_name = None

    def tie(self, delta: float) -> float:
        return 0.5

    def __call__(self, ranked: Ranked) -> RuleResult:
        num_pos = ranked.ranking.scores.numel()
        rank_plus = 0.5 + positive_step_sums(ranked.ranking)  # the own term H(0) = 1/2 made 1
        rank = rank_plus + ranked.false_positives
        precision = rank_plus / rank
        interpolated = precision.cummax(0).values if self.interpolate else precision
        # Rescaling keeps each positive's total push on the negatives at 1 - q_i.
        weight = torch.where(interpolated > precision, (1 - interpolated) / (1 - precision), 1.0)
        return RuleResult((1.0 - interpolated.mean(),), -(1 - interpolated) / num_pos, weight / rank / num_pos)


def _per_positive(values: Tensor, positive_index: Tensor, shape: torch.Size) -> Tensor:
    """One value per positive (flattened order), from either accepted layout (`_value_problem`)."""
    flat = values.detach().reshape(-1)
    if values.shape == shape:
        flat = flat[positive_index]
    return flat.double()


class _RankingLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, values: Tensor | None, positive_index: Tensor,
                rule: RankingRule, delta: float, batch: LocalBatch, grad_scale: float) -> tuple[Tensor, ...]:
        loss_dtype = torch.promote_types(logits.dtype, torch.float32)
        flat_logits, flat_labels = logits.reshape(-1), labels.reshape(-1)
        local_positives = flat_logits[positive_index].double().clamp_(-_LARGEST, _LARGEST)
        shared = local_positives
        if values is not None:  # one gather for both: the values travel beside their scores
            shared = torch.stack([local_positives, _per_positive(values, positive_index, logits.shape)], 1)
        gathered, offset = batch.gather_positives(shared)
        positives = gathered if values is None else gathered[:, 0].contiguous()
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        ctx.update, ctx.nan_labels, ctx.value_gradient = None, None, None
        ctx.values_shape = None if values is None else values.shape
        ctx.values_dtype = None if values is None else values.dtype
        ctx.positive_index = positive_index
        if positives.numel() == 0:
            return tuple(logits.new_zeros((), dtype=loss_dtype) for _ in range(rule.num_outputs))
        if positives.isnan().any():
            return _nan_loss(ctx, flat_labels, loss_dtype, rule.num_outputs)
        ranking = _rank_positives(positives, delta, rule.tie(delta))
        keep = ctx.needs_input_grad[0]
        count, offset_sum, placed, has_nan = _place_negatives(flat_logits, flat_labels, ranking, keep)
        partial_false_positives = _step_sums(ranking, count, offset_sum)
        if has_nan:  # NaN in, NaN out; summing spreads it to every process
            partial_false_positives.fill_(float("nan"))
        false_positives = batch.sum_over_processes(partial_false_positives)
        if false_positives.isnan().any():
            return _nan_loss(ctx, flat_labels, loss_dtype, rule.num_outputs)
        sorted_values = None if values is None else gathered[:, 1][ranking.order]
        result = rule(Ranked(ranking, false_positives, sorted_values))

        def local(per_positive: Tensor) -> Tensor:
            """This process's share of a per-positive array given in score order."""
            gathered_order = torch.empty_like(per_positive)
            gathered_order[ranking.order] = per_positive
            return gathered_order[offset:offset + positive_index.numel()] * grad_scale

        if keep:
            assert placed is not None  # the bins are kept when a gradient is needed
            intercept, slope = _negative_update(ranking, result.negative_weight)
            lowest, highest = _clamp_range(ranking)
            ctx.update = _Update(placed, intercept * grad_scale, slope * grad_scale, ranking.center,
                                 lowest, highest, positive_index, local(result.positive_update))
            ctx.save_for_backward(logits)
        if values is not None and ctx.needs_input_grad[2] and result.value_gradient is not None:
            ctx.value_gradient = local(result.value_gradient)
        return tuple(output.to(loss_dtype) for output in result.outputs)

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor):
        update: _Update | None = ctx.update
        grad = value_grad = None
        if ctx.needs_input_grad[0]:
            if update is None:  # no positives, or a NaN among the ranked pairs
                grad = torch.zeros(ctx.shape, dtype=ctx.dtype, device=grad_outputs[0].device)
                if ctx.nan_labels is not None:
                    grad.view(-1).masked_fill_(ctx.nan_labels >= 0, float("nan"))
            else:
                flat_logits = ctx.saved_tensors[0].reshape(-1)
                grad = _evaluate_update(update, flat_logits, grad_outputs[0].double()).view(ctx.shape)
        if ctx.values_shape is not None and ctx.needs_input_grad[2]:
            value_grad = _value_grad(ctx, grad_outputs[1] if len(grad_outputs) > 1 else None)
        return grad, None, value_grad, None, None, None, None, None


def _value_grad(ctx, grad_output: Tensor | None) -> Tensor:
    """The gradient of the per-positive values, in their own layout: zero without positives or
    where the rule's outputs do not depend on them, NaN after a NaN among the ranked pairs."""
    per_positive = torch.zeros(ctx.positive_index.numel(), dtype=torch.float64, device=ctx.positive_index.device)
    if ctx.nan_labels is not None:
        per_positive.fill_(float("nan"))
    elif ctx.value_gradient is not None and grad_output is not None:
        per_positive = ctx.value_gradient * grad_output.double()
    per_positive = per_positive.to(ctx.values_dtype)
    if ctx.values_shape == ctx.shape:
        grad = torch.zeros(ctx.shape, dtype=ctx.values_dtype, device=per_positive.device)
        grad.view(-1)[ctx.positive_index] = per_positive
        return grad
    return per_positive.view(ctx.values_shape)


def _nan_loss(ctx, flat_labels: Tensor, dtype: torch.dtype, num_outputs: int) -> tuple[Tensor, ...]:
    """A NaN among the ranked pairs: NaN outputs, and NaN for every ranked pair in backward, which
    each depend on it through the ranks (ignored pairs keep a zero), never a silent zero."""
    ctx.nan_labels = flat_labels
    return tuple(flat_labels.new_full((), float("nan"), dtype=dtype) for _ in range(num_outputs))


def _evaluate_update(update: _Update, flat_logits: Tensor, grad_output: Tensor) -> Tensor:
    intercept = update.intercept * grad_output
    slope = update.slope * grad_output
    if fused(flat_logits.device):
        grad = torch.ops.aploss.evaluate_update(flat_logits.contiguous(), update.placed, intercept, slope,
                                                update.center, update.lowest, update.highest)
    else:
        grad = torch.empty(flat_logits.shape, dtype=flat_logits.dtype, device=flat_logits.device)
        size = chunk_pairs(flat_logits.device)
        for start in range(0, flat_logits.numel(), size):
            bins = update.placed[start:start + size].int()
            scores = flat_logits[start:start + size].to(torch.float64, copy=True)
            # Only an ignored pair can be NaN here (a ranked one makes the loss NaN): zero, as
            # its unscored bin's function says.
            scores.clamp_(update.lowest, update.highest).nan_to_num_(0.0)
            scores -= update.center.index_select(0, bins)
            grad[start:start + size] = scores.mul_(slope.index_select(0, bins)).add_(intercept.index_select(0, bins))
    grad[update.positive_index] = (update.positive_update * grad_output).to(grad.dtype)
    return grad


def _input_problem(logits: Tensor, labels: Tensor, delta: float, name: str) -> tuple[type[Exception], str] | None:
    """What is wrong with the logits, labels or delta, as the exception to raise, or None."""
    if not logits.is_floating_point():
        return TypeError, f"{name}: logits must be a floating-point tensor, got {logits.dtype}"
    if logits.shape != labels.shape:
        return ValueError, (f"{name}: labels shape {tuple(labels.shape)} does not match "
                            f"logits shape {tuple(logits.shape)}")
    if not (delta >= 0 and delta < float("inf")):
        return ValueError, f"{name}: delta must be a finite number >= 0, got {delta}"
    return _label_problem(labels, name)


def _label_problem(labels: Tensor, name: str) -> tuple[type[Exception], str] | None:
    if not labels.numel() or labels.dtype == torch.bool:
        return None
    expected = f"{name}: labels must be exactly 1 (positive), 0 (negative) or -1 (ignored)"
    if labels.is_floating_point() or labels.is_complex():
        wrong = (labels != 1) & (labels != 0) & (labels != -1)
        if wrong.any():
            return ValueError, f"{expected}; found {labels[wrong][0].item()}"
        return None
    low, high = torch.aminmax(labels)
    if low < -1 or high > 1:
        return ValueError, f"{expected}; found values in [{low.item()}, {high.item()}]"
    return None


def _value_problem(values: Tensor | None, positive_index: Tensor, shape: torch.Size,
                   rule: RankingRule) -> tuple[type[Exception], str] | None:
    """The per-positive values: one per positive in flattened order, or the logits' shape (read at
    the positives); in [0, 1], as an IoU or a normalised localisation error is, at every positive."""
    what = f"{rule.name}: {rule.value_name}"
    if values is None or not values.is_floating_point():
        return TypeError, f"{what} must be a floating-point tensor, got {None if values is None else values.dtype}"
    num_pos = positive_index.numel()
    if values.shape == shape:
        values = values.detach().reshape(-1)[positive_index]
    elif values.numel() != num_pos or values.ndim != 1:
        return ValueError, (f"{what} must hold one value per positive ({num_pos}) or have the logits' shape "
                            f"{tuple(shape)}, got shape {tuple(values.shape)}")
    outside = ~((values >= 0) & (values <= 1))  # NaN included
    if outside.any():
        return ValueError, f"{what} must be in [0, 1] at every positive; found {values[outside][0].item()}"
    return None


def ranked_loss(logits: Tensor, labels: Tensor, values: Tensor | None, rule: RankingRule, delta: float,
                batch: LocalBatch, grad_scale: float) -> tuple[Tensor, ...]:
    """The outputs of `rule` over a batch whose positives are shared through `batch`; backward's
    update is multiplied by `grad_scale`. Inputs are checked on every process before any
    collective that depends on them, so a bad one anywhere raises the same error everywhere."""
    delta = float(delta)
    problem = _input_problem(logits, labels, delta, rule.name)
    positive_index = None
    if problem is None:
        # Found once, for the values' check and the forward: each is a pass over every label.
        positive_index = (labels.reshape(-1) == 1).nonzero().squeeze(1)
        if rule.value_name is not None:
            problem = _value_problem(values, positive_index, labels.shape, rule)
    batch.agree(problem, logits.device)
    if labels.is_floating_point() or labels.dtype == torch.bool:
        labels = labels.to(torch.int8)  # exactly -1, 0 and 1 (checked), as the kernels take them
    delta = 0.0 if delta < HARD_STEP_DELTA else delta
    return _RankingLossFunction.apply(logits, labels, values, positive_index, rule, delta, batch, grad_scale)


def ranked_ap_loss(logits: Tensor, labels: Tensor, delta: float, interpolate: bool,
                   batch: LocalBatch, grad_scale: float) -> Tensor:
    """`ap_loss` over a batch whose positives are shared through `batch` (`ranked_loss`)."""
    return ranked_loss(logits, labels, None, AveragePrecisionRule(interpolate), delta, batch, grad_scale)[0]


def ap_loss(logits: Tensor, labels: Tensor, delta: float = 1.0, interpolate: bool = True) -> Tensor:
    """AP-loss over every pair of `logits` ranked together, trained by the error-driven update.

    Args:
        logits: raw scores of any shape; all of them form one ranking (the whole batch).
        labels: same shape; 1 positive, 0 negative, -1 ignored.
        delta: half-width of the linear part of the step H (0 gives the hard step).
        interpolate: use interpolated precision q_i (the released code) rather than p_i.

    Returns:
        1 - mean precision over the positives (0 without positives), as a scalar whose
        backward hands autograd the paper's update times the incoming gradient.
    """
    return ranked_ap_loss(logits, labels, delta, interpolate, LocalBatch(), 1.0)


class APLoss(nn.Module):
    """`ap_loss` as a module; `delta` may be changed between steps (see `aploss.schedules`)."""

    def __init__(self, delta: float = 1.0, interpolate: bool = True) -> None:
        super().__init__()
        self.delta = delta
        self.interpolate = interpolate

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return ap_loss(logits, labels, self.delta, self.interpolate)

    def extra_repr(self) -> str:
        return f"delta={self.delta}, interpolate={self.interpolate}"
