"""The AP-loss and its error-driven update, written directly from the equations in O(P * N).

Kept as the independent check of the engine (tests, benchmark): every pairwise H is
evaluated, in float64, over blocks of negatives so that N up to ~1e6 fits in memory.
Infinite scores take their limits: +inf is above every finite score, and equal scores tie
(H(0) = 1/2) even where both are the same infinity.
"""
import torch
from torch import Tensor

_BLOCK_ELEMENTS = 1 << 24  # positives x negatives evaluated at once


def step(x: Tensor, delta: float) -> Tensor:
    """H_delta(x); the hard step with H(0) = 1/2 when delta = 0."""
    if delta > 0:
        return (x / (2 * delta) + 0.5).clamp(0.0, 1.0)
    return (x > 0).double() + 0.5 * (x == 0).double()


def difference(above: Tensor, below: Tensor) -> Tensor:
    """above - below, broadcast, with equal scores tying at 0 even where both are the same infinity."""
    return torch.where(above == below, 0.0, above - below)


def _negative_blocks(negatives: Tensor, num_pos: int):
    block = max(1, _BLOCK_ELEMENTS // max(num_pos, 1))
    for start in range(0, negatives.numel(), block):
        yield start, negatives[start:start + block]


def reference_ap_loss(logits: Tensor, labels: Tensor, delta: float = 1.0,
                      interpolate: bool = True) -> tuple[Tensor, Tensor]:
    """(loss, update) in float64; update has the logits' shape and is what backward hands on."""
    scores = logits.detach().reshape(-1).double()
    flat_labels = labels.reshape(-1)
    update = torch.zeros_like(scores)
    is_pos, is_neg = flat_labels == 1, flat_labels == 0
    pos, neg = scores[is_pos], scores[is_neg]
    num_pos = pos.numel()
    if num_pos == 0:
        return scores.new_zeros(()), update.view(logits.shape)

    # rank+(i) = 1 + sum_{k != i} H(s_k - s_i): subtract the k = i term, H(0) = 1/2.
    rank_plus = 1.0 + step(difference(pos[None, :], pos[:, None]), delta).sum(1) - 0.5
    false_pos = torch.zeros_like(pos)
    for _, block in _negative_blocks(neg, num_pos):
        false_pos += step(difference(block[None, :], pos[:, None]), delta).sum(1)
    rank = rank_plus + false_pos
    precision = rank_plus / rank
    if interpolate:
        at_or_below = pos[None, :] <= pos[:, None]  # [i, k]: s_k <= s_i
        interpolated = torch.where(at_or_below, precision[None, :], -1.0).max(1).values
    else:
        interpolated = precision
    loss = 1.0 - interpolated.mean()

    weight = torch.ones_like(precision)
    raised = interpolated > precision
    weight[raised] = (1 - interpolated[raised]) / (1 - precision[raised])
    neg_update = torch.zeros_like(neg)
    for start, block in _negative_blocks(neg, num_pos):
        pair_terms = step(difference(block[None, :], pos[:, None]), delta) / rank[:, None]
        neg_update[start:start + block.numel()] = (weight[:, None] * pair_terms).sum(0) / num_pos
    update[is_pos] = -(1 - interpolated) / num_pos
    update[is_neg] = neg_update
    return loss, update.view(logits.shape)
