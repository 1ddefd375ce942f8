"""The ranking losses (AP, aLRP, Rank & Sort) over the global batch of all processes, as if one
process held it all.

The ranking couples every positive with every negative of the batch, but a negative only
needs the positives' scores, and a positive only needs sums over the negatives. So each
process gathers the positives' scores (a few thousand numbers, in varying counts per
process), places its own negatives locally, and one all-reduce sums the per-positive
false-positive counts. Everything after that (precisions, weights, every pair's update) is
computed identically on every process, and backward is local: no collective in it.
Traffic per step is O(P): 8 bytes per positive gathered (16 where aLRP's localisation error or
RS's target travels beside the score; padded to the largest process's count) and 8 bytes per
positive all-reduced, whatever the number of negatives, after one 4-byte flag that says whether
every process's inputs are valid.

Gradient scale: DistributedDataParallel averages gradients over processes, which would
divide the single-process update by the world size. Backward therefore hands autograd
`world_size` times the update of this process's pairs, so that after DDP's averaging the
parameter update equals that of one process holding the concatenated batch. Loss terms
normalised per process (the box regression) need their own account of the same factor.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from aploss.alrp import ALRPRule
from aploss.engine import LocalBatch, ranked_ap_loss, ranked_loss
from aploss.rank_sort import RankSortRule


@dataclass
class ProcessGroupBatch(LocalBatch):
    """Shares positives and sums partial counts over a torch.distributed process group."""

    group: dist.ProcessGroup | None = None
    bytes_sent: int = 0  # payload this process has contributed to collectives, for benchmarks

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def agree(self, problem: tuple[type[Exception], str] | None, device: torch.device) -> None:
        # One flag per process: raising here alone would leave the others waiting in the next
        # collective until gloo drops the connection (or forever, if the error is caught).
        flag = torch.tensor([0 if problem is None else 1], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self.bytes_sent += flag.element_size()
        if not flag.item():
            return
        problems: list = [None] * self.world_size
        dist.all_gather_object(problems, None if problem is None else (problem[0].__name__, problem[1]),
                               group=self.group)
        rank, (kind, message) = next((rank, found) for rank, found in enumerate(problems) if found is not None)
        raise {"TypeError": TypeError}.get(kind, ValueError)(f"{message} (on rank {rank} of {self.world_size})")

    def gather_positives(self, scores: Tensor) -> tuple[Tensor, int]:
        count = torch.tensor([scores.shape[0]], dtype=torch.int64, device=scores.device)
        gathered_counts = [torch.empty_like(count) for _ in range(self.world_size)]
        dist.all_gather(gathered_counts, count, group=self.group)
        counts = [int(c) for c in gathered_counts]
        # all_gather needs equal sizes (gloo rejects ragged ones): pad to the largest count.
        padded = scores.new_zeros((max(counts), *scores.shape[1:]))
        padded[:scores.shape[0]] = scores
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded, group=self.group)
        self.bytes_sent += count.element_size() + padded.numel() * padded.element_size()
        offset = sum(counts[:dist.get_rank(self.group)])
        return torch.cat([chunk[:n] for chunk, n in zip(gathered, counts)]), offset

    def sum_over_processes(self, partial: Tensor) -> Tensor:
        dist.all_reduce(partial, group=self.group)
        self.bytes_sent += partial.numel() * partial.element_size()
        return partial


def _global(group: dist.ProcessGroup | None, grad_scale: float | None,
            batch: LocalBatch | None) -> tuple[LocalBatch, float]:
    """Where the global batch lives and backward's scale (`global_ap_loss`)."""
    if batch is None:
        initialised = dist.is_available() and dist.is_initialized()
        batch = ProcessGroupBatch(group) if initialised else LocalBatch()
    return batch, float(batch.world_size) if grad_scale is None else float(grad_scale)


def global_ap_loss(logits: Tensor, labels: Tensor, delta: float = 1.0, interpolate: bool = True,
                   group: dist.ProcessGroup | None = None, grad_scale: float | None = None,
                   batch: LocalBatch | None = None) -> Tensor:
    """`ap_loss` ranked over the pairs of every process of `group` as one batch.

    Every process must call it in the same step. The returned loss is the global one (equal
    on every process). `grad_scale` multiplies backward's update and defaults to the world
    size, which undoes DDP's gradient averaging (module docstring). `batch` says where the
    global batch lives: `group`'s processes by default (pass a `ProcessGroupBatch` to read its
    `bytes_sent` afterwards), or this process alone (`LocalBatch`); without either an initialised
    process group or a `batch`, this is `ap_loss`.
    """
    return ranked_ap_loss(logits, labels, delta, interpolate, *_global(group, grad_scale, batch))


def global_alrp_loss(logits: Tensor, labels: Tensor, loc_errors: Tensor, delta: float = 1.0,
                     group: dist.ProcessGroup | None = None, grad_scale: float | None = None,
                     batch: LocalBatch | None = None) -> tuple[Tensor, Tensor]:
    """`alrp_loss` ranked over every process's pairs as one batch, as `global_ap_loss`: each
    positive's localisation error travels with its score, and the localisation loss's gradient
    is scaled as the update is."""
    classification, localisation = ranked_loss(logits, labels, loc_errors, ALRPRule(), delta,
                                               *_global(group, grad_scale, batch))
    return classification, localisation


def global_rs_loss(logits: Tensor, labels: Tensor, targets: Tensor, delta: float = 0.5,
                   group: dist.ProcessGroup | None = None, grad_scale: float | None = None,
                   batch: LocalBatch | None = None) -> tuple[Tensor, Tensor]:
    """`rs_loss` ranked over every process's pairs as one batch, as `global_ap_loss`: each
    positive's target travels with its score."""
    ranking, sorting = ranked_loss(logits, labels, targets, RankSortRule(), delta, *_global(group, grad_scale, batch))
    return ranking, sorting
