"""The global-batch ranking losses in 2 and 3 gloo processes equal one process on the whole batch."""
import math

import pytest
import torch

from aploss import alrp_loss, ap_loss, rs_loss
from tests.distributed_worker import (
    DELTAS,
    ddp_model,
    family_objective,
    features_batch,
    global_batch,
    positive_values,
    run,
    spawn_group,
)


def spawn(world_size: int, sizes: list[int], tmp_path) -> list[dict]:
    spawn_group(run, world_size, (world_size, sizes, str(tmp_path / "init"), str(tmp_path)))
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]


# Rank 1 never has positives; with three processes rank 1 also has no pairs at all.
@pytest.mark.parametrize("sizes", [[3000, 2000], [2500, 0, 3500]], ids=["2-processes", "3-processes"])
def test_global_batch_equals_single_process(sizes, tmp_path):
    results = spawn(len(sizes), sizes, tmp_path)
    logits, labels = global_batch(sizes)
    bounds = torch.tensor([0] + sizes).cumsum(0).tolist()
    num_pos = int((labels == 1).sum())
    for delta in DELTAS:
        whole = logits.clone().requires_grad_()
        expected_loss = ap_loss(whole, labels, delta)
        expected_loss.backward()
        for rank, result in enumerate(results):
            loss, update, bytes_sent = result[delta]
            assert loss == pytest.approx(expected_loss.item(), abs=1e-12)
            torch.testing.assert_close(update, whole.grad[bounds[rank]:bounds[rank + 1]],
                                       rtol=1e-9, atol=1e-12)
            assert bytes_sent <= 64 * num_pos, "AP-loss traffic must stay O(P)"
    values = positive_values(len(logits))
    for name, loss_function in {"alrp": alrp_loss, "rs": rs_loss}.items():
        for delta in DELTAS:
            whole, whole_values = logits.clone().requires_grad_(), values.clone().requires_grad_()
            first, second = loss_function(whole, labels, whole_values, delta)
            (first + second).backward()
            for rank, result in enumerate(results):
                got_first, got_second, update, value_grad, bytes_sent = result[name, delta]
                assert got_first == pytest.approx(first.item(), abs=1e-12)
                assert got_second == pytest.approx(second.item(), abs=1e-12)
                part = slice(bounds[rank], bounds[rank + 1])
                torch.testing.assert_close(update, whole.grad[part], rtol=1e-9, atol=1e-12)
                torch.testing.assert_close(value_grad, whole_values.grad[part], rtol=1e-9, atol=1e-12)
                assert bytes_sent <= 64 * num_pos, f"{name} traffic must stay O(P)"
    for rank, result in enumerate(results):
        loss, update = result["no_positives"]
        assert loss == 0.0 and (update == 0).all()
        assert result["bad_label"] == results[0]["bad_label"]
        assert "labels must be exactly 1" in result["bad_label"] and "found 0.5" in result["bad_label"]
        assert f"(on rank {len(sizes) - 1} of {len(sizes)})" in result["bad_label"]
        # A NaN negative on the last rank reaches every process's positives: NaN loss and updates.
        loss, update = result["nan_on_last_rank"]
        ranked = labels[bounds[rank]:bounds[rank + 1]] >= 0
        assert math.isnan(loss) and update[ranked].isnan().all() and (update[~ranked] == 0).all()


def test_ddp_parameter_update_equals_single_process(tmp_path):
    sizes = [1500, 2500]
    results = spawn(2, sizes, tmp_path)
    features, labels = features_batch(sizes)
    model = ddp_model()
    ap_loss(model(features).squeeze(1), labels, 0.5).backward()
    for result in results:
        for got, expected in zip(result["ddp"], model.parameters()):
            torch.testing.assert_close(got, expected.grad, rtol=1e-9, atol=1e-12)
    for name, loss_function in {"alrp": alrp_loss, "rs": rs_loss}.items():
        model = ddp_model(2)
        family_objective(name, model(features), labels, loss_function).backward()
        for result in results:
            for got, expected in zip(result["ddp", name], model.parameters()):
                torch.testing.assert_close(got, expected.grad, rtol=1e-9, atol=1e-12)
