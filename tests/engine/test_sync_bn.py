"""Synchronised BatchNorm (``dist.sync_bn``): two ranks simulated by threads that meet in every
collective equal one BatchNorm over the whole batch (outputs, gradients, running statistics), for dense
BN (2-D and 4-D, channels_last) and for the routed channels of a ``LegoBatchNorm2d``."""
from __future__ import annotations

import threading
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

from gppf.engine.sync_bn import SyncBatchStats, group_batch_norm
from gppf.lego.layers import LegoBatchNorm2d, LegoIndex


class ThreadGroup:
    """A ``TaskGroup`` stand-in for ranks that are threads: ``gather`` / ``sum_`` meet at a barrier."""

    def __init__(self, rank: int, slots: list, barrier: threading.Barrier, calls: list) -> None:
        self.rank, self.slots, self.barrier, self.calls = rank, slots, barrier, calls
        self.device = torch.device("cpu")

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.rank, "gather", t.device))
        self.slots[self.rank] = t.detach().clone()
        self.barrier.wait()
        out = torch.stack(list(self.slots))
        self.barrier.wait()
        return out

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        return t.copy_(self.gather(t).sum(0))


def run_ranks(world: int, fn: Callable[[ThreadGroup, int], Any]) -> tuple[list[Any], list]:
    """Run ``fn(group, rank)`` on ``world`` threads; returns their results and the collective calls."""
    slots, barrier, calls = [None] * world, threading.Barrier(world, timeout=60), []
    results, errors = [None] * world, []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(ThreadGroup(rank, slots, barrier, calls), rank)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, calls


@pytest.mark.parametrize(("shape", "channels_last"), [((6, 4, 5, 5), False), ((6, 4, 5, 5), True), ((7, 3), False)],
                         ids=["BCHW", "BCHW-channels_last", "BC"])
def test_group_batch_norm_on_two_ranks_equals_bn_of_whole_batch(shape, channels_last):
    gen = torch.Generator().manual_seed(0)
    c = shape[1]
    x = torch.randn(shape, generator=gen) * 3 + 5  # large mean: the combination must not cancel
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=gen)
    w0, b0 = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    rm0, rv0 = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
    # the whole batch, one process
    xr, wr, br = x.clone().requires_grad_(), w0.clone().requires_grad_(), b0.clone().requires_grad_()
    rm, rv = rm0.clone(), rv0.clone()
    ref = F.batch_norm(xr, rm, rv, wr, br, training=True, momentum=0.1, eps=1e-5)
    (ref * dy).sum().backward()
    split = [slice(0, 2), slice(2, None)]  # unequal shares (2 and 4 or 5 samples)

    def rank(group: ThreadGroup, r: int) -> dict[str, torch.Tensor]:
        xs = x[split[r]].clone().requires_grad_()
        w, b, m, v = w0.clone().requires_grad_(), b0.clone().requires_grad_(), rm0.clone(), rv0.clone()
        out = group_batch_norm(xs, weight=w, bias=b, running_mean=m, running_var=v, momentum=0.1, eps=1e-5,
                               group=group)  # type: ignore[arg-type]
        (out * dy[split[r]]).sum().backward()
        return {"out": out.detach(), "dx": xs.grad, "dw": w.grad, "db": b.grad, "rm": m, "rv": v}

    got, calls = run_ranks(2, rank)
    torch.testing.assert_close(torch.cat([g["out"] for g in got]), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([g["dx"] for g in got]), xr.grad, rtol=1e-4, atol=1e-5)
    # weight / bias gradients stay local: their sum over ranks (GradSync) is the whole batch's
    torch.testing.assert_close(got[0]["dw"] + got[1]["dw"], wr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[0]["db"] + got[1]["db"], br.grad, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[0]["db"], br.grad)
    for g in got:  # running statistics: global mean and unbiased variance, the same on every rank
        torch.testing.assert_close(g["rm"], rm, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g["rv"], rv, rtol=1e-5, atol=1e-5)
    assert [k for _, k, _ in calls].count("gather") == 4  # per rank: stats forward, grad sums backward


def test_sync_batch_stats_syncs_only_the_routed_channels_of_a_lego_bn():
    gen = torch.Generator().manual_seed(1)
    bn = LegoBatchNorm2d(8)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    idx = LegoIndex(torch.tensor([1, 3]), 2)  # channels 2, 3, 6, 7
    x = torch.randn(6, 4, 3, 3, generator=gen) + 2
    whole = LegoBatchNorm2d(8)
    whole.load_state_dict(bn.state_dict())
    ref = whole(x, idx=idx)
    copies = [LegoBatchNorm2d(8) for _ in range(2)]
    for m in copies:
        m.load_state_dict(bn.state_dict())

    def rank(group: ThreadGroup, r: int) -> torch.Tensor:
        with SyncBatchStats(group):  # type: ignore[arg-type]
            out = copies[r](x[r * 3:(r + 1) * 3], idx=idx)
            copies[r].eval()
            copies[r](x[:1], idx=idx)  # eval mode passes through (no collective)
        return out.detach()

    got, calls = run_ranks(2, rank)
    assert len(calls) == 2  # one forward gather per rank, none at eval (and no backward here)
    torch.testing.assert_close(torch.cat(got), ref.detach(), rtol=1e-5, atol=1e-5)
    routed = idx.channels()
    for m in copies:
        torch.testing.assert_close(m.running_mean, whole.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var, whole.running_var, rtol=1e-5, atol=1e-6)
        untouched = torch.ones(8, dtype=torch.bool)
        untouched[routed] = False
        assert torch.equal(m.running_mean[untouched], torch.zeros(4))  # other legos' statistics untouched
    assert not torch.allclose(whole.running_mean[routed], torch.zeros(4))
