"""LegoSGD: equal to torch.optim.SGD, while touching only the legos a step used."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

import gppf
from gppf.lego.layers import LegoConv2d, LegoIndex, LegoLinear
from gppf.lego.optim import LegoSGD, lazy_cells, mark_lego_param, skipped_step_map

HYPER = [
    dict(lr=0.1, momentum=0.9, weight_decay=0.05, nesterov=True),
    dict(lr=0.1, momentum=0.9, weight_decay=0.05, nesterov=False),
    dict(lr=0.1, momentum=0.0, weight_decay=0.05, nesterov=False),
    dict(lr=0.1, momentum=0.5, weight_decay=0.0, nesterov=False),
]


def _twins(make: type[nn.Module], **kw: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a = make(**kw)
    b = make(**kw)
    b.load_state_dict(a.state_dict())
    return a, b


def _close(actual: Tensor, expected: Tensor, tol: float = 1e-5) -> None:
    """Equal up to float32 rounding relative to the tensor's scale (updates are regrouped in time)."""
    scale = float(expected.detach().abs().max().clamp_min(1.0))
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol)


def _route(gen: torch.Generator, legos: int, k: int, width: int) -> LegoIndex:
    return LegoIndex(torch.randperm(legos, generator=gen)[:k], width)


@pytest.mark.parametrize("hyper", HYPER, ids=["nesterov", "momentum", "plain", "no_decay"])
def test_linear_matches_sgd_step_by_step(hyper: dict) -> None:
    ref, lazy = _twins(LegoLinear, in_features=12, out_features=12)
    o_ref = torch.optim.SGD(ref.parameters(), **hyper)
    o_lazy = LegoSGD(lazy.parameters(), **hyper)
    s_ref = torch.optim.lr_scheduler.StepLR(o_ref, 3, gamma=0.5)
    s_lazy = torch.optim.lr_scheduler.StepLR(o_lazy, 3, gamma=0.5)
    gen, x = torch.Generator().manual_seed(1), torch.randn(5, 12)
    for _ in range(15):
        rows, cols = _route(gen, 4, 2, 3), _route(gen, 4, 2, 3)
        outs = []
        for layer, opt, sched in ((ref, o_ref, s_ref), (lazy, o_lazy, s_lazy)):
            opt.zero_grad(set_to_none=False)
            y = layer(x[:, cols.channels()], in_idx=cols, out_idx=rows)
            outs.append(y.detach())
            y.square().sum().backward()
            opt.step()
            sched.step()
        _close(outs[1], outs[0])  # the forward reads caught-up legos
    o_lazy.flush()
    for p_ref, p_lazy in zip(ref.parameters(), lazy.parameters()):
        _close(p_lazy, p_ref)
        if hyper["momentum"]:
            _close(o_lazy.state[p_lazy]["momentum_buffer"], o_ref.state[p_ref]["momentum_buffer"])


def test_step_writes_only_the_used_rows() -> None:
    conv = LegoConv2d(in_channels=8, out_channels=8, kernel_size=3, padding=1)
    opt = LegoSGD(conv.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    rows, cols = LegoIndex(torch.tensor([0, 2]), 2), LegoIndex(torch.tensor([1, 3]), 2)
    used = torch.zeros(8, dtype=torch.bool)
    used[rows.channels()] = True
    x = torch.randn(2, 4, 6, 6)
    for _ in range(2):
        before = conv.weight.detach().clone()
        opt.zero_grad(set_to_none=False)
        conv(x, in_idx=cols, out_idx=rows).sum().backward()
        assert not conv.weight.grad[~used].any()
        opt.step()
        changed = (conv.weight != before).flatten(1).any(-1)
        assert torch.equal(changed, used)  # unused legos: not read, not written (deferred)
    opt.zero_grad(set_to_none=False)
    assert not conv.weight.grad.any()  # zero_grad cleared exactly what the backward wrote
    weight_before_flush = conv.weight.detach().clone()
    opt.flush()  # two skipped steps of weight decay and momentum for the unused legos
    a, b, c, _ = skipped_step_map(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=False)
    expected = weight_before_flush * (a * a + b * c)  # v = 0 before: (w, 0) -> map^2 -> w (a^2 + b c)
    torch.testing.assert_close(conv.weight[~used], expected[~used])


def test_backbone_matches_sgd_with_changing_routes() -> None:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return gppf.create_backbone("gppf_r18", legos=4, active=2, tasks=["a", "b"], width_mult=0.25)

    ref, lazy = make(), make()
    hyper = dict(lr=0.01, momentum=0.9, weight_decay=1e-2, nesterov=True)
    o_ref, o_lazy = torch.optim.SGD(ref.parameters(), **hyper), LegoSGD(lazy.parameters(), **hyper)
    assert len([p for p in lazy.parameters() if lazy_cells(p) is not None]) == 32
    x = torch.randn(8, 3, 64, 64)
    for step in range(6):
        for model, opt in ((ref, o_ref), (lazy, o_lazy)):
            opt.zero_grad(set_to_none=False)
            task = "a" if step % 3 else "b"
            model.forward_pooled(x, task).square().mean().backward()
            opt.step()
    ref.eval(), lazy.eval()
    with torch.no_grad():
        torch.testing.assert_close(lazy.forward_pooled(x, "a"), ref.forward_pooled(x, "a"), atol=1e-4, rtol=1e-4)
    o_lazy.flush()
    for (name, p_ref), p_lazy in zip(ref.named_parameters(), lazy.parameters()):
        torch.testing.assert_close(p_lazy, p_ref, atol=1e-5, rtol=1e-4, msg=name)


def test_dense_use_updates_the_whole_parameter() -> None:
    ref, lazy = _twins(LegoLinear, in_features=6, out_features=6)
    o_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    o_lazy = LegoSGD(lazy.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    x = torch.randn(4, 6)
    rows = LegoIndex(torch.tensor([1]), 2)
    for step in range(4):
        for layer, opt in ((ref, o_ref), (lazy, o_lazy)):
            opt.zero_grad(set_to_none=False)
            if step == 2:  # a plain use of the full weight: ordinary autograd gradient
                (layer.weight.sum() + layer(x, out_idx=rows).sum()).backward()
            else:
                layer(x, out_idx=rows).sum().backward()
            opt.step()
    o_lazy.flush()
    for p_ref, p_lazy in zip(ref.parameters(), lazy.parameters()):
        torch.testing.assert_close(p_lazy, p_ref, atol=1e-6, rtol=1e-5)


def test_state_dict_is_torch_sgd_and_attach_flushes() -> None:
    layer = LegoLinear(in_features=4, out_features=4)
    opt = LegoSGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1).attach(layer)
    x = torch.randn(3, 4)
    for _ in range(2):
        opt.zero_grad(set_to_none=False)
        layer(x, out_idx=LegoIndex(torch.tensor([0]), 2)).sum().backward()
        opt.step()
    stale_row = layer.weight[3].detach().clone()
    weights = layer.state_dict()  # the pre-hook flushes first: saved weights are SGD's
    assert not torch.equal(weights["weight"][3], stale_row)
    plain = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    plain.load_state_dict(opt.state_dict())
    assert all("momentum_buffer" in plain.state[p] for p in layer.parameters())


def test_mark_rejects_a_bad_split() -> None:
    with pytest.raises(ValueError, match="row dimension"):
        mark_lego_param(nn.Parameter(torch.tensor(1.0)))


def test_lazy_off_and_unmarked_parameters_are_plain_sgd() -> None:
    layer = LegoLinear(in_features=4, out_features=4)
    plain = nn.Linear(4, 4)
    opt = LegoSGD(itertools.chain(layer.parameters(), plain.parameters()), lr=0.1, lazy=False)
    assert all(lazy_cells(p) is None for p in itertools.chain(layer.parameters(), plain.parameters()))
    opt.release()


def _sum_of_gathers(layer: LegoLinear, x: Tensor) -> Tensor:
    return layer(x, out_idx=LegoIndex(torch.tensor([0]), 2)).sum()


def test_a_newer_optimizer_takes_over() -> None:
    layer = LegoLinear(in_features=4, out_features=4)
    first = LegoSGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    x = torch.randn(3, 4)
    first.zero_grad(set_to_none=False)
    _sum_of_gathers(layer, x).backward()
    first.step()
    second = LegoSGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    assert lazy_cells(layer.weight) is second._lazy[0]
    assert not first._managed()  # the first optimizer now steps these parameters densely
