"""LegoSGD: equal to torch.optim.SGD, while touching only the lego rows a step's routes used."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import gppf
from gppf.lego.layers import LegoConv2d, LegoIndex, LegoLinear, LegoRows, rows_used
from gppf.lego.optim import LegoSGD, _compose, map_as_sgd, skipped_step_map

HYPER = [
    dict(lr=0.1, momentum=0.9, weight_decay=0.05, nesterov=True),
    dict(lr=0.1, momentum=0.9, weight_decay=0.05, nesterov=False),
    dict(lr=0.1, momentum=0.0, weight_decay=0.05, nesterov=False),
    dict(lr=0.1, momentum=0.5, weight_decay=0.0, nesterov=False),
]
TINY = {
    "gppf_r18": dict(legos=4, active=2, width_mult=0.25),
    "gppf_r50": dict(legos=4, active=2, width_mult=0.125),
    "gppf_vit_tiny": dict(legos=6, active=3, depth=2, image_size=32, patch_size=8),
}


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
    return LegoIndex(torch.randperm(legos, generator=gen)[:k].sort().values, width)


def _rows(layer: nn.Module, legos: int, width: int) -> list[LegoRows]:
    """A lone lego layer's declaration: its weight and bias rows are ``legos`` legos of routing point 0."""
    return [LegoRows(param=p, point=0, width=width, legos=legos) for p in (layer.weight, layer.bias) if p is not None]


def _lego_sgd(layer: nn.Module, legos: int, width: int, **hyper: float) -> LegoSGD:
    return LegoSGD(layer.parameters(), lego_params=[d.param for d in _rows(layer, legos, width)], **hyper)


def _prepare(opt: LegoSGD, layer: nn.Module, rows: LegoIndex, legos: int) -> None:
    opt.prepare(rows_used(_rows(layer, legos, rows.width), [rows.idx_K[None]]))


@pytest.mark.parametrize("hyper", HYPER, ids=["nesterov", "momentum", "plain", "no_decay"])
def test_linear_matches_sgd_step_by_step(hyper: dict) -> None:
    ref, lazy = _twins(LegoLinear, in_features=12, out_features=12)
    o_ref = torch.optim.SGD(ref.parameters(), **hyper)
    o_lazy = _lego_sgd(lazy, 4, 3, **hyper)
    s_ref = torch.optim.lr_scheduler.StepLR(o_ref, 3, gamma=0.5)
    s_lazy = torch.optim.lr_scheduler.StepLR(o_lazy, 3, gamma=0.5)
    gen, x = torch.Generator().manual_seed(1), torch.randn(5, 12)
    for _ in range(15):
        rows, cols = _route(gen, 4, 2, 3), _route(gen, 4, 2, 3)
        _prepare(o_lazy, lazy, rows, 4)  # before the forward: the rows it reads are brought up to date
        outs = []
        for layer, opt, sched in ((ref, o_ref, s_ref), (lazy, o_lazy, s_lazy)):
            opt.zero_grad(set_to_none=False)
            y = layer(x[:, cols.channels()], in_idx=cols, out_idx=rows)
            outs.append(y.detach())
            y.square().sum().backward()
            opt.step()
            sched.step()
        _close(outs[1], outs[0])  # the forward read prepared (caught-up) rows
    o_lazy.flush()
    for p_ref, p_lazy in zip(ref.parameters(), lazy.parameters()):
        _close(p_lazy, p_ref)
        if hyper["momentum"]:
            _close(o_lazy.state[p_lazy]["momentum_buffer"], o_ref.state[p_ref]["momentum_buffer"])


@pytest.mark.parametrize("kernel", [dict(fused=True), dict(foreach=True), {}], ids=["fused", "foreach", "default"])
def test_rows_one_step_behind_replay_sgd_bit_for_bit(kernel: dict) -> None:
    """Legos skipped for one step are caught up by replaying SGD's step on their zero gradient: the
    rows a step prepares equal ``torch.optim.SGD``'s bit for bit (a composed map does not), also across
    a learning-rate change. (Rows of 16 floats: the CPU fused kernel rounds a tensor's scalar tail
    differently from its vector body, so tiny views need not match bit for bit.)"""
    ref, lazy = _twins(LegoLinear, in_features=16, out_features=8, bias=False)
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=0.05, nesterov=True, **kernel)
    o_ref, o_lazy = torch.optim.SGD(ref.parameters(), **hyper), _lego_sgd(lazy, 4, 2, **hyper)
    s_ref = torch.optim.lr_scheduler.StepLR(o_ref, 2, gamma=0.5)
    s_lazy = torch.optim.lr_scheduler.StepLR(o_lazy, 2, gamma=0.5)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    # every lego is used again two steps later: one skipped step each time
    seq = [[0, 1], [2, 3]] * 5
    for legos in seq:
        rows = LegoIndex(torch.tensor(legos), 2)
        _prepare(o_lazy, lazy, rows, 4)
        ch = rows.channels()
        assert torch.equal(lazy.weight[ch], ref.weight[ch])
        if o_ref.state:
            bufs = [o.state[layer.weight]["momentum_buffer"][ch] for o, layer in ((o_lazy, lazy), (o_ref, ref))]
            assert torch.equal(*bufs)
        for layer, opt, sched in ((ref, o_ref, s_ref), (lazy, o_lazy, s_lazy)):
            opt.zero_grad(set_to_none=False)
            layer(x, out_idx=rows).square().sum().backward()
            opt.step()
            sched.step()
    assert o_lazy.pending
    o_lazy.flush()
    for p_ref, p_lazy in zip(ref.parameters(), lazy.parameters()):
        _close(p_lazy, p_ref)


def _map_power(m: tuple[float, float, float, float], steps: int) -> tuple[float, float, float, float]:
    out = m
    for _ in range(steps - 1):
        out = _compose(m, out)
    return out


@pytest.mark.parametrize("hyper", HYPER, ids=["nesterov", "momentum", "plain", "no_decay"])
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 20, 60])
def test_one_fused_sgd_pass_applies_a_composed_map(hyper: dict, steps: int) -> None:
    """``map_as_sgd``: one fused Nesterov SGD pass on a zero gradient applies the map of ``steps``
    skipped steps (of any SGD variant) within float32 rounding of stepping in float64; maps whose
    momentum coefficient is too small to carry (or without momentum) are refused."""
    m = _map_power(skipped_step_map(**hyper), steps)
    coef = map_as_sgd(m)
    if hyper["momentum"] == 0.0 or m[3] < 1e-3:
        assert coef is None
        return
    assert coef is not None
    gen = torch.Generator().manual_seed(steps)
    w0, v0 = torch.randn(4096, generator=gen), torch.randn(4096, generator=gen) * 0.1
    w, v = w0.clone(), v0.clone()
    lr, mom, wd, damp = coef
    torch._fused_sgd_([w], [torch.zeros_like(w)], [v], weight_decay=wd, momentum=mom, lr=lr, dampening=damp,
                      nesterov=True, maximize=False, is_first_step=False)
    w64, v64 = w0.double(), v0.double()
    for _ in range(steps):  # torch.optim.SGD's update on a zero gradient, in float64
        v64 = hyper["momentum"] * v64 + hyper["weight_decay"] * w64
        d = hyper["weight_decay"] * w64 + (hyper["momentum"] * v64 if hyper["nesterov"] else 0.0)
        w64 = w64 - hyper["lr"] * (d if hyper["nesterov"] else v64)
    for got, want in ((w, w64), (v, v64)):
        torch.testing.assert_close(got.double(), want, atol=1e-6 * float(want.abs().max()), rtol=0)


def test_rows_further_behind_take_one_fused_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows two or more steps behind are caught up by ``prepare`` in one fused SGD call per map (not
    replayed step by step, not five elementwise passes), and the result equals ``torch.optim.SGD``."""
    ref, lazy = _twins(LegoLinear, in_features=64, out_features=32, bias=False)
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=0.05, nesterov=False, fused=True)
    o_ref, o_lazy = torch.optim.SGD(ref.parameters(), **hyper), _lego_sgd(lazy, 4, 8, **hyper)
    calls: list[tuple[int, float]] = []
    real = gppf.lego.optim._functional_sgd

    def counting(params: list[Tensor], *args: object, **kw: object) -> None:
        calls.append((sum(p.numel() for p in params), kw["dampening"]))  # type: ignore[arg-type]
        real(params, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(gppf.lego.optim, "_functional_sgd", counting)
    monkeypatch.setattr(gppf.lego.optim.torch, "_foreach_mul_", None)  # the five-pass map must not run
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    for legos in [[0, 1], [2, 3], [2, 3], [2, 3], [0, 2], [1, 3]]:  # lego 0 three, lego 1 four steps behind
        rows = LegoIndex(torch.tensor(legos), 8)
        calls.clear()
        _prepare(o_lazy, lazy, rows, 4)
        for layer, opt in ((ref, o_ref), (lazy, o_lazy)):
            opt.zero_grad(set_to_none=False)
            layer(x, out_idx=rows).square().sum().backward()
            opt.step()
        _close(lazy.weight[rows.channels()], ref.weight[rows.channels()])
    # the last prepare: lego 3 (one step behind) replays SGD's step, lego 1 (four behind) takes its map
    # (a Nesterov pass with dampening), then the step updates both
    assert [n for n, _ in calls] == [8 * 64, 8 * 64, 16 * 64]
    assert calls[0][1] == 0.0 and calls[1][1] != 0.0 and calls[2][1] == 0.0


def test_step_writes_only_the_used_rows() -> None:
    conv = LegoConv2d(in_channels=8, out_channels=8, kernel_size=3, padding=1)
    opt = _lego_sgd(conv, 4, 2, lr=0.1, momentum=0.9, weight_decay=0.1)
    rows, cols = LegoIndex(torch.tensor([0, 2]), 2), LegoIndex(torch.tensor([1, 3]), 2)
    used = torch.zeros(8, dtype=torch.bool)
    used[rows.channels()] = True
    x = torch.randn(2, 4, 6, 6)
    for _ in range(2):
        before = conv.weight.detach().clone()
        opt.zero_grad(set_to_none=False)
        _prepare(opt, conv, rows, 4)
        conv(x, in_idx=cols, out_idx=rows).sum().backward()
        assert not conv.weight.grad[~used].any()
        opt.step()
        changed = (conv.weight != before).flatten(1).any(-1)
        assert torch.equal(changed, used)  # unused legos: not read, not written (deferred)
    opt.zero_grad(set_to_none=False)
    assert not conv.weight.grad.any()  # zero_grad cleared exactly what the backward wrote
    assert opt.pending
    weight_before_flush = conv.weight.detach().clone()
    opt.flush()  # two skipped steps of weight decay and momentum for the unused legos
    assert not opt.pending
    a, b, c, _ = skipped_step_map(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=False)
    expected = weight_before_flush * (a * a + b * c)  # v = 0 before: (w, 0) -> map^2 -> w (a^2 + b c)
    torch.testing.assert_close(conv.weight[~used], expected[~used])


def test_step_writes_only_the_used_cells_of_a_lego_major_weight() -> None:
    """A lego-major weight routed on both sides, declared by cells: a step (and its ``zero_grad``)
    touches only the (in lego, out lego) blocks its route reads; a flush then equals SGD."""
    torch.manual_seed(0)
    convs = [LegoConv2d(in_channels=8, out_channels=8, kernel_size=3, padding=1, in_legos=4) for _ in range(2)]
    convs[1].load_state_dict(convs[0].state_dict())
    lazy, ref = convs
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)
    decl = LegoRows(param=lazy.weight, point=0, width=1, legos=4, cell_point=1, cell_width=2)
    opt, o_ref = LegoSGD([lazy.weight], lego_params=[decl], **hyper), torch.optim.SGD([ref.weight], **hyper)
    x = torch.randn(2, 4, 6, 6)
    for step, (ins, outs) in enumerate([([1, 3], [0, 2]), ([1, 3], [0, 2]), ([0, 3], [2, 1])]):
        route = torch.tensor([ins, outs])
        used = torch.from_numpy(rows_used([decl], [route])[lazy.weight]).view(4, 8)  # [in lego, out channel]
        before = lazy.weight.detach().clone()
        for conv, o in ((lazy, opt), (ref, o_ref)):
            o.zero_grad(set_to_none=False)
            if o is opt:
                opt.prepare(rows_used([decl], [route]))
            out = conv(x, in_idx=LegoIndex(route[0], 2), out_idx=LegoIndex(route[1], 2))
            out.square().sum().backward()
            o.step()
        changed = (lazy.weight != before).any(-1)
        if step < 2:  # (the third route's cell (3, out lego 2) was used before: it is also caught up)
            assert torch.equal(changed, used)  # 4 of the 16 blocks read and written
        assert torch.equal(changed & used, used) and (~changed).sum() >= 8
    opt.zero_grad(set_to_none=False)
    assert not lazy.weight.grad.any()  # zero_grad cleared exactly the cells the backwards wrote
    assert opt.pending
    opt.flush()
    torch.testing.assert_close(lazy.weight, ref.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(opt.state[lazy.weight]["momentum_buffer"], o_ref.state[ref.weight]["momentum_buffer"],
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dim", [0, 1], ids=["rows", "columns"])
def test_channels_last_lego_weight_is_updated_on_its_own_memory_runs(dim: int) -> None:
    """A channels_last lego weight (gppf's default layout): the written gradient regions are its
    memory runs (rows: one flat run per lego run; columns: ``[out x kh x kw, run]`` strided views), the
    step changes exactly the used legos and equals torch.optim.SGD."""
    torch.manual_seed(0)
    conv = LegoConv2d(in_channels=16, out_channels=16, kernel_size=3, padding=1).to(memory_format=torch.channels_last)
    ref = LegoConv2d(in_channels=16, out_channels=16, kernel_size=3, padding=1).to(memory_format=torch.channels_last)
    ref.load_state_dict(conv.state_dict())
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)
    declared = [LegoRows(param=conv.weight, point=0, width=1, legos=16, dim=dim)]
    opt, o_ref = LegoSGD(conv.parameters(), lego_params=declared, **hyper), torch.optim.SGD(ref.parameters(), **hyper)
    idx = LegoIndex(torch.tensor([2, 10]), 1)  # channels 2 and 10: two runs, 1/8 of the legos
    kw = dict(out_idx=idx) if dim == 0 else dict(in_idx=idx)
    x = torch.randn(2, 16 if dim == 0 else 2, 6, 6).to(memory_format=torch.channels_last)
    opt.zero_grad(set_to_none=False), o_ref.zero_grad(set_to_none=False)
    opt.prepare(rows_used(declared, [idx.idx_K[None]]))
    for layer in (conv, ref):
        layer(x, **kw).square().sum().backward()
    assert conv.weight.grad.stride() == conv.weight.stride()
    regions = opt.grad_regions(conv.weight)
    base, item = conv.weight.grad.data_ptr(), conv.weight.grad.element_size()
    if dim == 0:  # rows are outermost in memory: each run is one contiguous stretch of 3 x 3 x 16
        assert [(g.shape, (g.data_ptr() - base) // item) for g in regions] == [((144,), 2 * 144), ((144,), 10 * 144)]
    else:  # in-channels are innermost: [16 x 3 x 3 rows, 1 channel] strided views
        assert [(g.shape, g.stride(), (g.data_ptr() - base) // item) for g in regions] == [
            ((144, 1), (16, 1), 2), ((144, 1), (16, 1), 10)]
    before = conv.weight.detach().clone()
    opt.step(), o_ref.step()
    changed = (conv.weight != before).transpose(0, dim).flatten(1).any(-1)
    assert torch.equal(changed.nonzero().flatten(), idx.channels())  # only the used legos moved
    used = idx.channels()
    torch.testing.assert_close(conv.weight.index_select(dim, used), ref.weight.index_select(dim, used), atol=1e-6, rtol=1e-5)
    opt.flush()
    torch.testing.assert_close(conv.weight, ref.weight, atol=1e-6, rtol=1e-5)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def _cols(layer: nn.Module, legos: int, width: int) -> list[LegoRows]:
    """A lone lego layer whose columns (in-channels) are ``legos`` legos; its rows are dense."""
    return [LegoRows(param=layer.weight, point=0, width=width, legos=legos, dim=1)]


@pytest.mark.parametrize("hyper", HYPER, ids=["nesterov", "momentum", "plain", "no_decay"])
def test_column_legos_match_sgd_step_by_step(hyper: dict) -> None:
    ref, lazy = _twins(LegoLinear, in_features=24, out_features=5)  # 8 column legos of width 3
    o_ref = torch.optim.SGD(ref.parameters(), **hyper)
    o_lazy = LegoSGD(lazy.parameters(), lego_params=_cols(lazy, 8, 3), **hyper)
    s_ref = torch.optim.lr_scheduler.StepLR(o_ref, 3, gamma=0.5)
    s_lazy = torch.optim.lr_scheduler.StepLR(o_lazy, 3, gamma=0.5)
    gen, x = torch.Generator().manual_seed(1), torch.randn(5, 24)
    for _ in range(15):
        cols = _route(gen, 8, int(torch.randint(1, 4, (1,), generator=gen)), 3)  # strided or whole
        o_lazy.prepare(rows_used(_cols(lazy, 8, 3), [cols.idx_K[None]]))
        outs = []
        for layer, opt, sched in ((ref, o_ref, s_ref), (lazy, o_lazy, s_lazy)):
            opt.zero_grad(set_to_none=False)
            y = layer(x[:, cols.channels()], in_idx=cols)
            outs.append(y.detach())
            y.square().sum().backward()
            opt.step()
            sched.step()
        _close(outs[1], outs[0])
    assert o_lazy.pending
    o_lazy.flush()
    for p_ref, p_lazy in zip(ref.parameters(), lazy.parameters()):
        _close(p_lazy, p_ref)
        if hyper["momentum"]:
            _close(o_lazy.state[p_lazy]["momentum_buffer"], o_ref.state[p_ref]["momentum_buffer"])


def test_step_writes_only_the_used_columns() -> None:
    """Columns used in a fraction <= 1/8 are updated lazily (strided runs); the rest wait, bit-identical."""
    conv = LegoConv2d(in_channels=32, out_channels=6, kernel_size=3, padding=1)
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)
    opt = LegoSGD(conv.parameters(), lego_params=_cols(conv, 16, 2), **hyper)
    cols = LegoIndex(torch.tensor([1, 5]), 2)
    used = torch.zeros(32, dtype=torch.bool)
    used[cols.channels()] = True
    x = torch.randn(2, 4, 6, 6)
    for step in range(2):
        before = conv.weight.detach().clone()
        buf_before = opt.state[conv.weight].get("momentum_buffer")
        buf_before = None if buf_before is None else buf_before.clone()
        opt.zero_grad(set_to_none=False)
        opt.prepare(rows_used(_cols(conv, 16, 2), [cols.idx_K[None]]))
        conv(x, in_idx=cols).square().sum().backward()
        assert not conv.weight.grad[:, ~used].any()
        regions = opt.grad_regions(conv.weight)  # the two used column runs, as [out, 2 x 3 x 3] views
        assert [g.shape for g in regions] == [(6, 18), (6, 18)]
        assert [g.data_ptr() - conv.weight.grad.data_ptr() for g in regions] == [2 * 9 * 4, 10 * 9 * 4]
        opt.step()
        changed = (conv.weight != before).transpose(0, 1).flatten(1).any(-1)
        assert torch.equal(changed, used)  # unused column legos: not read, not written (deferred)
        if buf_before is not None:  # the momentum of unused columns is bit-identical too
            assert torch.equal(opt.state[conv.weight]["momentum_buffer"][:, ~used], buf_before[:, ~used])
    opt.zero_grad(set_to_none=False)
    assert not conv.weight.grad.any()  # zero_grad cleared exactly the columns the backward wrote
    assert opt.pending
    weight_before_flush = conv.weight.detach().clone()
    opt.flush()  # two skipped steps of weight decay and (zero) momentum for the unused columns
    assert not opt.pending
    a, b, c, _ = skipped_step_map(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)
    expected = weight_before_flush * (a * a + b * c)  # v = 0 before: (w, 0) -> map^2 -> w (a^2 + b c)
    torch.testing.assert_close(conv.weight[:, ~used], expected[:, ~used])
    assert not opt.state[conv.weight]["momentum_buffer"][:, used].eq(0).all()


def test_columns_used_widely_and_up_to_date_are_updated_whole() -> None:
    """Above a fraction 1/8 (fused kernel cheaper than strided passes) an up-to-date column parameter
    takes a whole SGD step, exactly as torch.optim.SGD, and stays up to date."""
    ref, lazy = _twins(LegoConv2d, in_channels=8, out_channels=6, kernel_size=3, padding=1)
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)
    o_ref, o_lazy = torch.optim.SGD(ref.parameters(), **hyper), LegoSGD(lazy.parameters(), lego_params=_cols(lazy, 4, 2), **hyper)
    cols, x = LegoIndex(torch.tensor([0, 2]), 2), torch.randn(2, 4, 6, 6)
    for _ in range(2):
        o_lazy.prepare(rows_used(_cols(lazy, 4, 2), [cols.idx_K[None]]))
        for conv, opt in ((ref, o_ref), (lazy, o_lazy)):
            opt.zero_grad(set_to_none=False)
            conv(x, in_idx=cols).square().sum().backward()
            opt.step()
        assert not o_lazy.pending
        torch.testing.assert_close(lazy.weight, ref.weight, atol=1e-6, rtol=1e-5)  # no flush needed
        assert [g.data_ptr() for g in o_lazy.grad_regions(lazy.weight)] == [lazy.weight.grad.data_ptr()]  # whole


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("columns", ["strided", "auto"])
@pytest.mark.parametrize("name", list(TINY))
def test_backbone_matches_sgd_with_changing_routes(name: str, columns: str, layout: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal to SGD with lego weights stored contiguous or channels_last (gppf's default: row runs are
    then flat memory runs, column runs strided ``[out x kh x kw, run]`` views)."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    if columns == "strided":  # every column lego lazily, whatever fraction a step uses
        monkeypatch.setattr(gppf.lego.optim, "_STRIDED_MAX_FRACTION", 1.0)

    def make() -> nn.Module:
        torch.manual_seed(0)  # steps 0-1: soft search (every lego used), then changing hard top-k routes
        bb = gppf.create_backbone(name, tasks=["a", "b"], **TINY[name],
                                  router={"mode": "soft_topk", "search_until": 0.3, "freeze_at": 1.0})
        # router logits stay put: their unit-RMS gradient would lift float-rounding differences of the two
        # gather paths to visible logit differences; the lego weights are what this test compares
        bb.router.logits_TLN.requires_grad_(False)
        return bb.to(memory_format=fmt)

    ref, lazy = make(), make()
    hyper = dict(lr=0.01, momentum=0.9, weight_decay=1e-2, nesterov=True)
    declared = lazy.lego_rows()
    o_ref = torch.optim.SGD(ref.parameters(), **hyper)
    o_lazy = LegoSGD(lazy.parameters(), lego_params=declared, **hyper)
    assert len(o_lazy.lazy_params) == len(declared) > 0
    x = torch.randn(4, 3, 32, 32).to(memory_format=fmt)
    if name == "gppf_vit_tiny":
        assert {d.dim for d in declared} == {0, 1}  # lego rows and lego columns (out_proj / fc2)
    else:  # lego rows, and the in-channel legos of conv2 / conv3 stored lego-major: one row per lego
        assert {d.dim for d in declared} == {0} and any(d.param.dim() == 3 for d in declared)
    if layout == "channels_last" and name == "gppf_r18":  # its conv1 (3x3, rows) is stored channels_last
        assert any(not d.param.is_contiguous() for d in declared)  # (R50's 3x3 conv2 is lego-major)
    for step in range(6):
        task = "a" if step % 3 else "b"
        ref.router.set_progress(step, 6), lazy.router.set_progress(step, 6)
        route = lazy.router(task)
        o_lazy.prepare(rows_used(declared, [route.idx_LK]))
        outs = []
        for model, opt, r in ((ref, o_ref, None), (lazy, o_lazy, route)):
            opt.zero_grad(set_to_none=False)
            y = model.forward_pooled(x, task, route=r)
            outs.append(y.detach())
            y.square().mean().backward()
            opt.step()
        torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)  # read caught-up legos
    assert o_lazy.pending  # some legos were left unused: their updates are deferred
    o_lazy.flush()
    for (n, p_ref), p_lazy in zip(ref.named_parameters(), lazy.parameters()):
        atol = 1e-5
        torch.testing.assert_close(p_lazy, p_ref, atol=atol, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
        assert ("momentum_buffer" in o_lazy.state[p_lazy]) == ("momentum_buffer" in o_ref.state[p_ref]), n
        if "momentum_buffer" in o_ref.state[p_ref]:  # (parameters outside forward_pooled have none)
            torch.testing.assert_close(o_lazy.state[p_lazy]["momentum_buffer"], o_ref.state[p_ref]["momentum_buffer"],
                                       atol=atol, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    ref.eval(), lazy.eval()
    with torch.no_grad():
        torch.testing.assert_close(lazy.forward_pooled(x, "a"), ref.forward_pooled(x, "a"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(TINY))
def test_declared_rows_are_exactly_where_routes_put_gradient(name: str) -> None:
    """A route's gradient on every declared parameter lies inside ``rows_used`` and reaches each used lego."""
    torch.manual_seed(0)
    bb = gppf.create_backbone(name, tasks=["a"], **TINY[name], router={"mode": "topk_st"})  # hard k of N
    for m in bb.modules():  # undo zero-init residuals: gradient reaches every block
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    route = bb.router("a")
    bb.forward_pooled(torch.randn(2, 3, 32, 32), "a", route=route).square().sum().backward()
    used = rows_used(bb.lego_rows(), [route.idx_LK])
    dims = {d.dim for d in bb.lego_rows()}  # ViT: rows and columns; ResNets: columns stored lego-major, as rows
    assert dims == ({0, 1} if name == "gppf_vit_tiny" else {0})
    cells = [d for d in bb.lego_rows() if d.cell_point is not None]  # R50's conv2: (in lego, out channel) cells
    assert len(cells) == (16 if name == "gppf_r50" else 0)
    for p, mask_R in used.items():
        d = next(d for d in bb.lego_rows() if d.param is p)
        grad = p.grad.movedim(d.dim, 0).reshape(d.units, -1).abs().sum(1)  # per channel (or cell) along dim
        assert 0 < mask_R.sum() < mask_R.size
        assert not grad[torch.from_numpy(~mask_R)].any()  # no gradient outside the declared channels / cells
        per_lego = grad.reshape(d.copies, d.legos, d.width, -1).sum((0, 2, 3))  # each used lego got some gradient
        assert (per_lego[route.idx_LK[d.point]] > 0).all()
        if d.cell_point is not None:  # a route uses k x k of the N x N lego blocks (each cell: some gradient)
            assert mask_R.sum() == route.idx_LK.shape[1] ** 2 * d.cell_width
            assert (grad[torch.from_numpy(mask_R)] > 0).all()


def test_declaring_the_whole_parameter_used_updates_it_whole() -> None:
    ref, lazy = _twins(LegoLinear, in_features=6, out_features=6)
    o_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    o_lazy = _lego_sgd(lazy, 3, 2, lr=0.1, momentum=0.9, weight_decay=0.1)
    x = torch.randn(4, 6)
    rows = LegoIndex(torch.tensor([1]), 2)
    for step in range(4):
        if step == 2:  # a plain use of the full weight: its rows are all used
            o_lazy.prepare({lazy.weight: None, lazy.bias: rows_used(_rows(lazy, 3, 2), [rows.idx_K[None]])[lazy.bias]})
        else:
            _prepare(o_lazy, lazy, rows, 3)
        for layer, opt in ((ref, o_ref), (lazy, o_lazy)):
            opt.zero_grad(set_to_none=False)
            if step == 2:
                (layer.weight.sum() + layer(x, out_idx=rows).sum()).backward()
            else:
                layer(x, out_idx=rows).sum().backward()
            opt.step()
    o_lazy.flush()
    for p_ref, p_lazy in zip(ref.parameters(), lazy.parameters()):
        torch.testing.assert_close(p_lazy, p_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("hyper", HYPER[:2], ids=["nesterov", "momentum"])
def test_no_gradient_yet_means_no_deferred_decay(hyper: dict) -> None:
    """A lego parameter whose ``.grad`` is None for its first steps is skipped by SGD: no decay is charged
    later (before the fix the rows caught up 3 skipped steps of decay: max |diff| 0.066)."""
    torch.manual_seed(0)
    ref_dense, ref_lego = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(6, 3) * 3)
    dense, lego = nn.Parameter(ref_dense.detach().clone()), nn.Parameter(ref_lego.detach().clone())
    o_ref = torch.optim.SGD([ref_dense, ref_lego], **hyper)
    o_lazy = LegoSGD([dense, lego], lego_params=[lego], **hyper)
    decl = [LegoRows(param=lego, point=0, width=2, legos=3)]
    for step in range(6):
        route_LK = torch.tensor([[step % 3]])
        o_lazy.prepare(rows_used(decl, [route_LK]) if step >= 3 else {})
        for d, w, opt in ((ref_dense, ref_lego, o_ref), (dense, lego, o_lazy)):
            opt.zero_grad(set_to_none=True)
            loss = d.square().sum()
            if step >= 3:  # the lego parameter joins only now (its .grad was None until here)
                loss = loss + w[2 * (step % 3):2 * (step % 3) + 2].square().sum()
            loss.backward()
            opt.step()
    o_lazy.flush()
    torch.testing.assert_close(lego, ref_lego, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dense, ref_dense, atol=1e-6, rtol=1e-6)


def test_reading_never_changes_weights_and_state_needs_a_flush() -> None:
    layer = LegoLinear(in_features=4, out_features=4)
    ref = LegoLinear(in_features=4, out_features=4)
    ref.load_state_dict(layer.state_dict())
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=0.1)
    opt, o_ref = _lego_sgd(layer, 2, 2, **hyper), torch.optim.SGD(ref.parameters(), **hyper)
    x, rows = torch.randn(3, 4), LegoIndex(torch.tensor([0]), 2)
    for _ in range(2):
        _prepare(opt, layer, rows, 2)
        for m, o in ((layer, opt), (ref, o_ref)):
            o.zero_grad(set_to_none=False)
            m(x, out_idx=rows).sum().backward()
            o.step()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():  # an eval forward over every lego, and a state_dict: nothing changes
        layer(x)
        layer(x, out_idx=LegoIndex(torch.tensor([1]), 2))
    after = layer.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not torch.equal(after["weight"][2:], ref.weight[2:].detach())  # deferred rows, read as they are
    with pytest.raises(RuntimeError, match="flush"):
        opt.state_dict()
    opt.flush()
    for p, p_ref in zip(layer.parameters(), ref.parameters()):
        torch.testing.assert_close(p, p_ref, atol=1e-6, rtol=1e-5)
    plain = torch.optim.SGD(layer.parameters(), **hyper)
    plain.load_state_dict(opt.state_dict())
    assert all("momentum_buffer" in plain.state[p] for p in layer.parameters())


def test_step_without_prepare_raises_and_state_is_per_instance() -> None:
    layer = LegoLinear(in_features=4, out_features=4)
    opt = _lego_sgd(layer, 2, 2, lr=0.1)
    layer(torch.randn(3, 4), out_idx=LegoIndex(torch.tensor([0]), 2)).sum().backward()
    with pytest.raises(RuntimeError, match="prepare"):
        opt.step()
    other = _lego_sgd(layer, 2, 2, lr=0.1, weight_decay=0.1)  # a second optimizer keeps its own books
    _prepare(opt, layer, LegoIndex(torch.tensor([0]), 2), 2)
    opt.step()
    assert opt.pending and not other.pending  # nothing global: the first one's deferred rows are its own
    before = layer.weight.detach().clone()
    other.flush()
    assert torch.equal(layer.weight, before)


def test_rows_used_maps_routes_to_rows_of_each_copy() -> None:
    w = nn.Parameter(torch.zeros(3 * 4 * 2, 5))  # q, k, v copies of 4 legos of 2 rows
    decl = [LegoRows(param=w, point=1, width=2, legos=4, copies=3)]
    used = rows_used(decl, [torch.tensor([[0, 1], [1, 3]]), torch.tensor([[2, 3], [1, 2]])])[w]
    legos = {1, 2, 3}  # the union over both routes at routing point 1
    expected = [c * 8 + lego * 2 + j for c in range(3) for lego in legos for j in range(2)]
    assert np.flatnonzero(used).tolist() == sorted(expected)
    with pytest.raises(ValueError, match="legos"):
        LegoRows(param=w, point=0, width=2, legos=4)
    with pytest.raises(ValueError, match="lego dim 0"):
        LegoRows(param=nn.Parameter(torch.tensor(1.0)), point=0, width=1, legos=1)
    with pytest.raises(ValueError, match="lego dim 1"):
        LegoRows(param=nn.Parameter(torch.zeros(4)), point=0, width=1, legos=4, dim=1)
    cols = LegoRows(param=w, point=0, width=1, legos=5, dim=1)  # the 5 columns: 5 legos of width 1
    assert np.flatnonzero(rows_used([cols], [torch.tensor([[4, 1]])])[w]).tolist() == [1, 4]
    with pytest.raises(ValueError, match="dims 0 and 1"):
        rows_used([decl[0], cols], [])
    with pytest.raises(ValueError, match="dims 0 and 1"):
        LegoSGD([w], lr=0.1, lego_params=[w, cols])
    opt = LegoSGD([w], lr=0.1, lego_params=[w])
    with pytest.raises(ValueError, match="row mask"):
        opt.prepare({w: np.ones(5, dtype=bool)})


def test_rows_used_maps_routes_to_cells_of_both_sides() -> None:
    """A lego-major ``[N, O, inner]`` weight declared by cells: a route uses its own (in lego, out
    channel) pairs, not the product of the union over routes."""
    w = nn.Parameter(torch.zeros(4, 3 * 2, 5))  # 4 in-legos (rows); 3 out-legos of 2 channels
    decl = LegoRows(param=w, point=0, width=1, legos=4, cell_point=1, cell_width=2)
    assert decl.units == 24
    routes = [torch.tensor([[0, 2], [1, 1]]), torch.tensor([[3, 3], [0, 2]])]  # (in legos, out legos)
    used = rows_used([decl], routes)[w]
    expected = {r * 6 + o * 2 + j for r, o in ((0, 1), (2, 1), (3, 0), (3, 2)) for j in range(2)}
    assert np.flatnonzero(used).tolist() == sorted(expected)  # not (1, 0) or (0, 0): no route reads them
    with pytest.raises(ValueError, match="cells"):
        LegoRows(param=w, point=0, width=1, legos=4, cell_point=1, cell_width=4)  # 6 channels: not legos of 4
    with pytest.raises(ValueError, match="cells"):
        LegoRows(param=nn.Parameter(torch.zeros(6, 4, 5).transpose(0, 1)), point=0, width=1, legos=4,
                 cell_point=1, cell_width=2)  # not contiguous
    rows = LegoRows(param=w, point=0, width=1, legos=4)
    with pytest.raises(ValueError, match="by rows and by cells"):
        rows_used([decl, rows], routes)
    with pytest.raises(ValueError, match="by rows and by cells"):
        LegoSGD([w], lr=0.1, lego_params=[decl, rows])
    opt = LegoSGD([w], lr=0.1, lego_params=[decl])
    with pytest.raises(ValueError, match=r"row mask of shape \(24,\)"):
        opt.prepare({w: np.ones(4, dtype=bool)})


def test_lazy_off_and_undeclared_parameters_are_plain_sgd() -> None:
    layer = LegoLinear(in_features=4, out_features=4)
    plain = nn.Linear(4, 4)
    params = list(itertools.chain(layer.parameters(), plain.parameters()))
    assert LegoSGD(params, lr=0.1, lego_params=[layer.weight], lazy=False).lazy_params == []
    opt = LegoSGD(params, lr=0.1, lego_params=[layer.weight])
    assert opt.lazy_params == [layer.weight]


def test_loaded_state_of_a_channels_last_weight_resumes_exactly() -> None:
    """A checkpoint stores contiguous momentum buffers; loading them for a channels_last weight must give
    the same next steps as never stopping (the fused kernel reads the buffer in the weight's layout:
    before the fix the resumed weight differed by ~1e-2 after one step)."""
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(8, 4, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last)
    grads = [torch.randn(8, 4, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last) for _ in range(4)]

    def run(steps: range, w: nn.Parameter, opt: LegoSGD) -> None:
        for i in steps:
            w.grad = grads[i].clone(memory_format=torch.preserve_format)
            opt.step()

    hyper = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, fused=True)
    ref = nn.Parameter(init.clone(memory_format=torch.preserve_format))
    run(range(4), ref, LegoSGD([ref], **hyper))
    first = nn.Parameter(init.clone(memory_format=torch.preserve_format))
    opt = LegoSGD([first], **hyper)
    run(range(2), first, opt)
    saved = opt.state_dict()
    saved["state"] = {k: {n: v.contiguous().clone() if torch.is_tensor(v) else v for n, v in s.items()}
                      for k, s in saved["state"].items()}  # as a safetensors checkpoint holds them
    resumed = nn.Parameter(first.detach().clone(memory_format=torch.preserve_format))
    opt2 = LegoSGD([resumed], **hyper)
    opt2.load_state_dict(saved)
    run(range(2, 4), resumed, opt2)
    assert resumed.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(resumed.detach(), ref.detach())


def test_momentum_of_another_shape_is_refused_by_name() -> None:
    """A checkpoint's momentum buffer must have its parameter's shape (e.g. not the [O, I, kh, kw] form of
    a weight now stored lego-major): refused with both shapes, not broadcast or read as flat memory."""
    p = nn.Parameter(torch.randn(4, 3, 18))
    opt = LegoSGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["momentum_buffer"] = torch.zeros(3, 8, 3, 3)
    with pytest.raises(ValueError, match=r"shape \(3, 8, 3, 3\) for a parameter of shape \(4, 3, 18\)"):
        LegoSGD([nn.Parameter(p.detach().clone())], lr=0.1, momentum=0.9).load_state_dict(saved)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_lego_weight_layout_does_not_change_training(autocast: bool) -> None:
    """GPPF-R18 trained a few steps with LegoSGD and changing routes: lego conv weights stored
    channels_last (as ``model.to(memory_format=channels_last)`` leaves them) or contiguous give
    bit-identical weights, gradients and momentum (only the memory order of the copies differs)."""
    from gppf.lego.layers import LegoConv2d

    models = []
    for contiguous_legos in (False, True):
        torch.manual_seed(0)
        bb = gppf.create_backbone("gppf_r18", tasks=["a", "b"], legos=4, active=2, width_mult=0.25,
                                  router={"mode": "topk_st"}).to(memory_format=torch.channels_last)
        if contiguous_legos:
            for m in bb.modules():
                if isinstance(m, LegoConv2d):
                    m.weight.data = m.weight.data.contiguous()
        models.append(bb)
    assert not models[0].layer1[0].conv1.weight.is_contiguous() and models[1].layer1[0].conv1.weight.is_contiguous()
    opts = [LegoSGD(m.parameters(), lego_params=m.lego_rows(), lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
            for m in models]
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    for step in range(4):
        for bb, opt in zip(models, opts):
            opt.zero_grad(set_to_none=False)
            routes = {t: bb.router(t) for t in ("a", "b")}
            opt.prepare(rows_used(bb.lego_rows(), [r.idx_LK for r in routes.values()]))
            for t, r in routes.items():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    y = bb.forward_pooled(x, t, route=r)
                y.float().square().mean().backward()
            opt.step()
    for opt in opts:
        opt.flush()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), name
        if "momentum_buffer" in opts[0].state[a]:
            assert torch.equal(opts[0].state[a]["momentum_buffer"], opts[1].state[b]["momentum_buffer"]), name
