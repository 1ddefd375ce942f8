"""Runs in each spawned process of tests/test_distributed.py; and `spawn_group`, which starts
such processes for the tests."""
import os
import time
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from aploss.distributed import ProcessGroupBatch, global_alrp_loss, global_ap_loss, global_rs_loss

SPAWN_TIMEOUT_S = 120

DELTAS = (0.0, 0.5, 1.0)


def spawn_group(function: Callable, world_size: int, args: tuple) -> None:
    """`function(rank, *args)` in `world_size` spawned processes, killed and failed past
    SPAWN_TIMEOUT_S; a process's exception is raised here."""
    context = mp.start_processes(function, args=args, nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    # join() returns as soon as any one process ends.
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world_size} processes did not finish within {SPAWN_TIMEOUT_S} s")
# aLRP and Rank & Sort, with the per-positive value (localisation error, target) each ranks with.
FAMILY = {"alrp": global_alrp_loss, "rs": global_rs_loss}


def positive_values(total: int, seed: int = 3) -> torch.Tensor:
    """A value in [0, 1] for every pair (read at the positives), on a grid of 1/4 for ties."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(total, generator=g, dtype=torch.float64) * 4).round() / 4


def global_batch(sizes: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The same batch in every process; rank 1's slice has no positives."""
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    logits = -2 + torch.randn(total, generator=g, dtype=torch.float64)
    u = torch.rand(total, generator=g)
    labels = torch.where(u < 0.05, 1, torch.where(u < 0.15, -1, 0))
    if len(sizes) > 1:
        start = sizes[0]
        labels[start:start + sizes[1]].clamp_(max=0)
    return logits, labels


def features_batch(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    total = sum(sizes)
    features = torch.randn(total, 8, generator=g, dtype=torch.float64)
    labels = (torch.rand(total, generator=g) < 0.1).long()
    return features, labels


def ddp_model(outputs: int = 1) -> nn.Module:
    torch.manual_seed(2)
    return nn.Linear(8, outputs).double()


def family_objective(name: str, outputs: torch.Tensor, labels: torch.Tensor, loss) -> torch.Tensor:
    """What a detector backpropagates: aLRP's two terms, its localisation errors from the model;
    RS's two terms, its targets the model's detached output."""
    values = torch.sigmoid(outputs[:, 1])
    if name == "rs":
        values = values.detach()
    first, second = loss(outputs[:, 0], labels, values, 0.5)
    return first + second


def run(rank: int, world_size: int, sizes: list[int], init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
    results = {}

    logits, labels = global_batch(sizes)
    for delta in DELTAS:
        local = logits[start:stop].clone().requires_grad_()
        exchange = ProcessGroupBatch()
        loss = global_ap_loss(local, labels[start:stop], delta, grad_scale=1.0, batch=exchange)
        loss.backward()
        results[delta] = (loss.item(), local.grad.clone(), exchange.bytes_sent)

    values = positive_values(len(logits))
    for name, loss_function in FAMILY.items():
        for delta in DELTAS:
            local = logits[start:stop].clone().requires_grad_()
            local_values = values[start:stop].clone().requires_grad_()
            exchange = ProcessGroupBatch()
            first, second = loss_function(local, labels[start:stop], local_values, delta, grad_scale=1.0,
                                          batch=exchange)
            (first + second).backward()
            results[name, delta] = (first.item(), second.item(), local.grad.clone(), local_values.grad.clone(),
                                    exchange.bytes_sent)

    local = logits[start:stop].clone().requires_grad_()
    loss = global_ap_loss(local, torch.zeros_like(labels[start:stop]))
    loss.backward()
    results["no_positives"] = (loss.item(), local.grad.clone())

    # A bad label on the last rank only: every rank raises the same error, and they stay in step.
    last = rank == world_size - 1
    wrong = labels[start:stop].double()
    if last:
        wrong[0] = 0.5
    try:
        global_ap_loss(logits[start:stop], wrong)
        results["bad_label"] = None
    except ValueError as error:
        results["bad_label"] = str(error)
    poisoned = logits[start:stop].clone()
    if last:
        poisoned[(labels[start:stop] == 0).nonzero()[0]] = float("nan")
    local = poisoned.requires_grad_()
    loss = global_ap_loss(local, labels[start:stop])
    loss.backward()
    results["nan_on_last_rank"] = (loss.item(), local.grad.clone())

    features, feature_labels = features_batch(sizes)
    model = DistributedDataParallel(ddp_model())
    scores = model(features[start:stop]).squeeze(1)
    global_ap_loss(scores, feature_labels[start:stop], 0.5).backward()
    results["ddp"] = [p.grad.clone() for p in model.parameters()]
    for name, loss_function in FAMILY.items():
        model = DistributedDataParallel(ddp_model(2))
        family_objective(name, model(features[start:stop]), feature_labels[start:stop], loss_function).backward()
        results["ddp", name] = [p.grad.clone() for p in model.parameters()]

    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # without it, some runs hang in destroy_process_group
    dist.destroy_process_group()
