import pytest
import torch
import torch.nn.functional as F

from gppf.lego.layers import (LegoBatchNorm2d, LegoConv2d, LegoIndex, LegoLinear, from_lego_major, lego_gather,
                              to_lego_major)
from gppf.lego.router import lego_channels


def test_conv_only_selected_legos_get_gradient():
    conv = LegoConv2d(in_channels=12, out_channels=16, kernel_size=3, padding=1)
    out_idx = lego_channels(torch.tensor([1, 3]), 4)
    in_idx = lego_channels(torch.tensor([0, 2]), 3)
    x = torch.randn(2, 6, 8, 8)
    y = conv(x, in_idx=in_idx, out_idx=out_idx)
    assert y.shape == (2, 8, 8, 8)
    ref = F.conv2d(x, conv.weight[out_idx][:, in_idx], padding=1)
    torch.testing.assert_close(y, ref)
    y.square().sum().backward()
    g = conv.weight.grad
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask[out_idx[:, None], in_idx[None, :]] = True
    assert g[mask].abs().sum() > 0
    assert g[~mask].abs().sum() == 0


def test_linear_gate_folds_to_identity_in_value():
    lin = LegoLinear(in_features=5, out_features=12)
    idx = lego_channels(torch.tensor([2]), 4)
    x = torch.randn(3, 5)
    gate = torch.ones(4, requires_grad=True)
    y = lin(x, out_idx=idx, gate_out=gate)
    torch.testing.assert_close(y, F.linear(x, lin.weight[idx], lin.bias[idx]))
    y.sum().backward()
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_bn_updates_only_selected_running_stats_and_matches_dense_bn():
    bn = LegoBatchNorm2d(8)
    idx = torch.tensor([2, 3, 6, 7])
    x = torch.randn(4, 4, 5, 5) * 3 + 1
    y = bn(x, idx=idx)
    dense = torch.nn.BatchNorm2d(4)
    torch.testing.assert_close(y, dense(x))
    torch.testing.assert_close(bn.running_mean[idx], dense.running_mean)
    untouched = torch.tensor([0, 1, 4, 5])
    assert torch.equal(bn.running_mean[untouched], torch.zeros(4))
    assert torch.equal(bn.running_var[untouched], torch.ones(4))
    bn.eval()
    dense.eval()
    torch.testing.assert_close(bn(x, idx=idx), dense(x))


# --- lego_gather: gradients accumulate in place into the full-size .grad ---------------------------

def _reference_gather(param, rows=None, cols=None, *, dtype=None, channels_last=False):
    """The previous implementation: index_select with ordinary autograd (then cast / relayout)."""
    out = param if rows is None else param.index_select(0, _channels(rows))
    out = out if cols is None else out.index_select(1, _channels(cols))
    out = out if dtype is None else out.to(dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last and out.dim() == 4 else out


def _channels(index):
    return index.channels() if isinstance(index, LegoIndex) else index


def _selection(kind: str, blocks: bool, shape: tuple[int, ...]):
    rows = LegoIndex(torch.tensor([3, 1]), shape[0] // 4) if kind in ("rows", "both") else None
    cols = LegoIndex(torch.tensor([0, 2]), shape[1] // 4) if kind in ("cols", "both") else None
    if not blocks:
        rows = None if rows is None else rows.channels()
        cols = None if cols is None else cols.channels()
    return rows, cols


def _reference_conv(x, weight, *, out_idx, in_idx, stride, padding, dtype, channels_last, plan=None):
    """Gather with plain autograd, then ``F.conv2d`` (keeps the gathered weight for its backward); a
    lego-major weight (``plan``) is first turned into its ``[O, I, kh, kw]`` form by plain autograd ops."""
    if plan is not None:
        o, _, kh, kw = plan.out_shape
        weight = from_lego_major(weight, (o, weight.shape[0] * plan.width, kh, kw))
    w = _reference_gather(weight, out_idx, in_idx, dtype=dtype, channels_last=channels_last)
    return F.conv2d(x, w, None, stride, padding)


@pytest.mark.parametrize("weights_cl", [False, True], ids=["weights_contiguous", "weights_channels_last"])
@pytest.mark.parametrize("kernel, stride", [(1, 1), (3, 2)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("blocks", [True, False], ids=["lego_index", "channels"])
@pytest.mark.parametrize("kind", ["rows", "cols", "both"])
def test_routed_conv_equals_gather_then_conv(kind, blocks, autocast, channels_last, kernel, stride, weights_cl):
    """The recomputing routed convolution gives bit-identical outputs, input and weight gradients, for
    full-size weights stored contiguous or channels_last (the gradient keeps the weight's layout)."""
    torch.manual_seed(0)
    conv = LegoConv2d(in_channels=16, out_channels=24, kernel_size=kernel, stride=stride, padding=kernel // 2)
    if weights_cl:
        conv.to(memory_format=torch.channels_last)
    ref = torch.nn.Parameter(conv.weight.detach().clone())
    assert ref.stride() == conv.weight.stride()
    rows = LegoIndex(torch.tensor([5, 1]), 4) if kind != "cols" else None
    cols = LegoIndex(torch.tensor([0, 2]), 4) if kind != "rows" else None
    if not blocks:
        rows, cols = (None if i is None else i.channels() for i in (rows, cols))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 8 if cols is not None else 16, 9, 9).to(memory_format=fmt).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    for _ in range(2):  # two backward passes accumulate
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = conv(x, in_idx=cols, out_idx=rows)
            y_ref = _reference_conv(x_ref, ref, out_idx=rows, in_idx=cols, stride=stride, padding=kernel // 2,
                                    dtype=torch.bfloat16 if autocast else None,
                                    # as lego_gather lays it out: blocks as the input, indices as the weight
                                    channels_last=channels_last if blocks else weights_cl)
        g = torch.randn(y.shape)
        (y.float() * g).sum().backward()
        (y_ref.float() * g).sum().backward()
    assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.equal(y, y_ref)
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(conv.weight.grad, ref.grad)
    assert conv.weight.grad.stride() == conv.weight.stride()


@pytest.mark.parametrize("recompute", [True, pytest.param(False, marks=pytest.mark.xfail(strict=True))],
                         ids=["routed_conv2d", "gather_then_conv"])
@pytest.mark.parametrize("in_legos", [None, 4], ids=["stored_OIHW", "lego_major"])
def test_routed_conv_keeps_no_gathered_weight_for_backward(monkeypatch, recompute, in_legos):
    """Until its backward, a routed convolution holds its input only (as a dense conv does), not the
    gathered weight: the tensors autograd saves for it weigh what the dense twin's do."""
    conv = LegoConv2d(in_channels=64, out_channels=64, kernel_size=3, padding=1, in_legos=in_legos)
    idx = LegoIndex(torch.tensor([0, 2]), 16)
    x = torch.randn(2, 32, 4, 4, requires_grad=True)
    dense_w = torch.nn.Parameter(torch.randn(32, 32, 3, 3))
    if not recompute:  # the check itself: it fails for a conv that keeps its gathered weight
        import gppf.lego.layers as layers
        monkeypatch.setattr(layers, "routed_conv2d", _reference_conv)
    saved: dict[str, list[int]] = {"routed": [], "dense": []}
    for name, fn in (("routed", lambda: conv(x, in_idx=idx, out_idx=idx)),
                     ("dense", lambda: F.conv2d(x, dense_w, padding=1))):
        def pack(t, name=name):
            if not isinstance(t, torch.nn.Parameter):  # parameters are stored anyway: count the rest
                saved[name].append(t.numel())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn().sum().backward()
    assert sum(saved["routed"]) == sum(saved["dense"]) == x.numel()


@pytest.mark.parametrize("shape, weights_cl", [((8, 12, 3, 3), False), ((8, 12, 3, 3), True), ((8, 12), False)],
                         ids=["conv", "conv_channels_last", "linear"])
@pytest.mark.parametrize("blocks", [True, False], ids=["lego_index", "channels"])
@pytest.mark.parametrize("kind", ["rows", "cols", "both"])
@pytest.mark.parametrize(("autocast", "direct"), [(False, False), (True, False), (True, True)],
                         ids=["fp32", "bf16_autocast", "bf16_gathered_channels_last"])
def test_gather_accumulates_like_index_select_autograd(kind, blocks, shape, weights_cl, autocast, direct):
    torch.manual_seed(0)
    init = torch.randn(shape)
    new = torch.nn.Parameter(init.contiguous(memory_format=torch.channels_last) if weights_cl else init)
    old = torch.nn.Parameter(new.detach().clone())
    rows, cols = _selection(kind, blocks, shape)
    for _ in range(2):  # two backward passes accumulate (one per task in a SIMT step)
        x_B = torch.randn(5, *(_channels(cols).numel() if cols is not None else shape[1], *shape[2:]))
        kw = dict(dtype=torch.bfloat16, channels_last=True) if direct else {}
        for param, gather in ((new, lego_gather), (old, _reference_gather)):
            w = gather(param, rows, cols, **kw)
            assert w.dtype == (torch.bfloat16 if direct else torch.float32)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = F.conv2d(x_B, w, padding=1) if w.dim() == 4 else F.linear(x_B, w)
            (y.float() * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
    assert new.grad.dtype == torch.float32 and new.grad.shape == new.shape
    assert new.grad.stride() == new.stride()  # the gradient keeps its weight's layout
    assert torch.equal(new.grad, old.grad)
    mask = torch.zeros(shape[:2], dtype=torch.bool)
    row_ch = torch.arange(shape[0]) if rows is None else _channels(rows)
    col_ch = torch.arange(shape[1]) if cols is None else _channels(cols)
    mask[row_ch[:, None], col_ch[None, :]] = True
    assert new.grad[~mask].abs().sum() == 0 and new.grad[mask].abs().sum() > 0


def test_gather_grad_is_persistent_and_matches_param_layout():
    conv = LegoConv2d(in_channels=8, out_channels=8, kernel_size=3, padding=1)
    conv.to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous(), "full-size lego weights take the module's layout"
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    idx = LegoIndex(torch.tensor([1]), 4)
    x = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    conv(x, in_idx=idx, out_idx=idx).sum().backward()
    grad = conv.weight.grad
    assert grad is not None and grad.stride() == conv.weight.stride()
    conv(x, in_idx=idx, out_idx=idx).sum().backward()
    assert conv.weight.grad is grad  # accumulated in place, never replaced


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_gather_rejects_autograd_grad_and_double_backward():
    lin = LegoLinear(in_features=4, out_features=8)
    idx = LegoIndex(torch.tensor([1]), 4)
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="autograd.grad"):
        torch.autograd.grad(lin(x, out_idx=idx).sum(), lin.weight)
    with pytest.raises(RuntimeError, match="double backward"):
        lin(x, out_idx=idx).sum().backward(create_graph=True)


def test_private_engine_query_is_pinned():
    """``_GatherIntoGrad`` relies on ``torch._C._will_engine_execute_node``: fail here if torch drops it.

    Behaviour pinned: in ``autograd.grad`` w.r.t. the lego weight its AccumulateGrad node does not run,
    so the gather raises instead of writing into ``.grad`` behind the caller's back; in ``backward()``
    it runs and the gradient lands in ``.grad``.
    """
    assert callable(getattr(torch._C, "_will_engine_execute_node", None))
    lin = LegoLinear(in_features=4, out_features=8)
    idx = LegoIndex(torch.tensor([1]), 4)
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="autograd.grad"):
        torch.autograd.grad(lin(x, out_idx=idx).sum(), [x, lin.weight])
    assert lin.weight.grad is None
    (gx,) = torch.autograd.grad(lin(x, out_idx=idx).sum(), x)  # the gather is not on x's path: not run
    torch.testing.assert_close(gx, lin.weight[4:].detach().sum(0).expand(3, 4))
    assert lin.weight.grad is None
    lin(x, out_idx=idx).sum().backward()
    expected = torch.zeros(8, 4)
    expected[4:] = x.detach().sum(0)
    torch.testing.assert_close(lin.weight.grad, expected)


def test_gather_of_a_non_leaf_uses_plain_autograd():
    base = torch.randn(8, 6, requires_grad=True)
    idx = LegoIndex(torch.tensor([1]), 4)
    (g,) = torch.autograd.grad(lego_gather(base * 2, idx, None).sum(), base)
    expected = torch.zeros(8, 6)
    expected[4:] = 2
    assert torch.equal(g, expected)


def test_bn_with_lego_index_matches_channel_indices():
    torch.manual_seed(0)
    a, b = LegoBatchNorm2d(8), LegoBatchNorm2d(8)
    for bn in (a, b):
        torch.nn.init.uniform_(bn.weight)
        torch.nn.init.uniform_(bn.bias)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 4, 5, 5)
    gate = torch.ones(4, requires_grad=True)
    idx = LegoIndex(torch.tensor([2, 0]), 2)
    ya, yb = a(x, idx=idx, gate=gate), b(x, idx=idx.channels(), gate=gate)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    (ya * x).sum().backward()
    (yb * x).sum().backward()
    for name in ("weight", "bias"):
        assert torch.equal(getattr(a, name).grad, getattr(b, name).grad)
    torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=0)


@pytest.mark.parametrize("name, kw", [
    ("gppf_r50", dict(legos=8, active=2, width_mult=0.25)),
    ("gppf_vit_tiny", dict(depth=2, image_size=32, patch_size=8)),
])
def test_backbone_gradients_match_index_select(monkeypatch, name, kw):
    """Two tasks' backward passes + router losses under bf16 autocast: same .grad as index_select."""
    import copy

    import gppf
    import gppf.backbones.lego_vit as lego_vit
    import gppf.lego.layers as layers

    def step(model):
        torch.manual_seed(1)
        x = torch.randn(2, 3, 32, 32)
        for task in ("a", "b"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = model.forward_pooled(x, task).float()
            (y * torch.randn_like(y)).sum().backward()
        aux = sum(model.router.aux_losses().values())
        if torch.is_tensor(aux) and aux.requires_grad:
            aux.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    model = gppf.create_backbone(name, tasks=["a", "b"], **kw).train()
    twin = copy.deepcopy(model)
    new = step(model)
    monkeypatch.setattr(layers, "lego_gather", _reference_gather)
    monkeypatch.setattr(layers, "routed_conv2d", _reference_conv)
    monkeypatch.setattr(lego_vit, "lego_gather", _reference_gather)
    old = step(twin)
    assert new.keys() == old.keys()
    for key in new:
        torch.testing.assert_close(new[key], old[key], rtol=0, atol=1e-6, msg=key)


# --- lego-major storage of in-channel legos (LegoConv2d(in_legos=N)) ---------------------------------

@pytest.mark.parametrize("rows", [None, [2, 0]], ids=["all_rows", "row_legos"])
@pytest.mark.parametrize("legos_used", [[3, 0], [1, 2, 3]], ids=["apart_unsorted", "one_run"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_lego_major_conv_equals_conv_of_its_dense_weight(autocast, channels_last, kernel, bias, legos_used, rows):
    """``in_legos=N`` stores ``[N, O, kh * kw * w]``; the routed conv (in-channel legos, optionally also
    row legos) is bit-identical (outputs, input gradient, weight gradient over two backward passes) to
    index_select + conv of the dense weight, and only the used (lego, row) blocks get gradient."""
    torch.manual_seed(0)
    conv = LegoConv2d(in_channels=16, out_channels=6, kernel_size=kernel, padding=kernel // 2, bias=bias, in_legos=4)
    assert conv.weight.shape == (4, 6, kernel * kernel * 4) and conv.weight.is_contiguous()
    dense = conv.dense_weight().detach()
    assert dense.shape == (6, 16, kernel, kernel)
    assert torch.equal(to_lego_major(dense, 4), conv.weight.detach())
    ref = torch.nn.Conv2d(16, 6, kernel, padding=kernel // 2, bias=bias)
    with torch.no_grad():
        ref.weight.copy_(dense)
        if bias:
            torch.nn.init.normal_(conv.bias), ref.bias.copy_(conv.bias)
    idx = LegoIndex(torch.tensor(legos_used), 4)
    out_idx = None if rows is None else LegoIndex(torch.tensor(rows), 2)
    row_ch = torch.arange(6) if rows is None else out_idx.channels()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 4 * len(legos_used), 5, 5).to(memory_format=fmt).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = conv(x, in_idx=idx, out_idx=out_idx)
            bias_ref = None if not bias else ref.bias.index_select(0, row_ch)
            y_ref = F.conv2d(x_ref, ref.weight.index_select(0, row_ch).index_select(1, idx.channels()), bias_ref, 1,
                             kernel // 2)
        g = torch.randn(y.shape)
        (y.float() * g).sum().backward()
        (y_ref.float() * g).sum().backward()
    assert torch.equal(y, y_ref)
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(conv.weight.grad, to_lego_major(ref.weight.grad, 4))
    unused = sorted(set(range(4)) - set(legos_used))
    assert conv.weight.grad[unused].abs().sum() == 0 and conv.weight.grad[legos_used].abs().sum() > 0
    if rows is not None:  # row lego 1 (rows 2, 3) unused
        assert conv.weight.grad[:, 2:4].abs().sum() == 0 and conv.weight.grad[legos_used][:, 4:].abs().sum() > 0
    if bias:
        assert torch.equal(conv.bias.grad, ref.bias.grad)


@pytest.mark.parametrize("cast", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_lego_major_gather_by_index_select_equals_host_runs(cast):
    """The device path (one ``index_select`` / ``index_add_``, no host sync) equals the host's block copies."""
    from gppf.lego.layers import _lego_major_plan, _LegoMajorPlan

    torch.manual_seed(0)
    stored = torch.randn(5, 6, 3 * 3 * 2)
    rows = LegoIndex(torch.tensor([2, 0]), 2)
    host = _lego_major_plan(stored, LegoIndex(torch.tensor([4, 1, 2]), 2), rows, (6, 10, 3, 3))
    # (lego run, row run) pairs: (first in the result, first stored, count)
    assert host.runs == [((0, 4, 1), (0, 4, 2)), ((0, 4, 1), (2, 0, 2)), ((1, 1, 2), (0, 4, 2)), ((1, 1, 2), (2, 0, 2))]
    device = _LegoMajorPlan(host.idx_K, rows.channels(), None, host.out_shape, host.width, host.stored_rows)
    for cl in (False, True):
        a = host.gather(stored, dtype=cast, channels_last=cl)
        b = device.gather(stored, dtype=cast, channels_last=cl)
        assert torch.equal(a, b) and a.stride() == b.stride() and a.shape == (4, 6, 3, 3)
        dense = from_lego_major(stored, (6, 10, 3, 3))
        ref = dense.index_select(0, rows.channels()).index_select(1, torch.tensor([8, 9, 2, 3, 4, 5]))
        assert torch.equal(a, ref.to(a.dtype))
    grads = [torch.zeros_like(stored), torch.zeros_like(stored)]
    g = torch.randn(4, 6, 3, 3).to(cast or torch.float32)
    host.accumulate(grads[0], g), device.accumulate(grads[1], g)
    assert torch.equal(grads[0], grads[1]) and grads[0][[0, 3]].abs().sum() == 0 and grads[0][:, 2:4].abs().sum() == 0
    assert grads[0][[1, 2, 4]][:, [0, 1, 4, 5]].abs().min() > 0


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_block_views_address_views_with_a_storage_offset(channels_last):
    """The gathers' ``as_strided`` block views honour the tensor's storage offset and strides: a
    weight and gradient that are views into larger tensors (and a non-dense gradient) gather and
    accumulate exactly like index_select / index_add, and nothing outside the view is touched."""
    from gppf.lego.layers import _block_plan, _lego_major_plan, _LegoMajorPlan

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fmt3d = torch.channels_last_3d if channels_last else torch.contiguous_format  # base[1]: permuted strides
    base = torch.randn(2, 8, 12, 3, 3).contiguous(memory_format=fmt3d)
    full, rows, cols = base[1], LegoIndex(torch.tensor([3, 0]), 2), LegoIndex(torch.tensor([1, 2]), 3)
    assert full.storage_offset() > 0
    plan = _block_plan(full.shape, rows, cols, full.device)
    ref = full.index_select(0, rows.channels()).index_select(1, cols.channels())
    assert torch.equal(plan.gather(full, channels_last=channels_last), ref)
    grad_base = torch.zeros(2, 8, 12, 3, 3).contiguous(memory_format=fmt3d)
    g = torch.randn(4, 6, 3, 3).contiguous(memory_format=fmt)
    plan.accumulate(grad_base[1], g)
    expect = torch.zeros(8, 12, 3, 3).index_put_((rows.channels()[:, None], cols.channels()[None, :]), g)
    assert torch.equal(grad_base[1], expect) and grad_base[0].abs().sum() == 0

    stored_base = torch.randn(3, 5, 6, 3 * 3 * 2)
    stored, lrows = stored_base[1], LegoIndex(torch.tensor([2, 0]), 2)
    host = _lego_major_plan(stored, LegoIndex(torch.tensor([4, 1, 2]), 2), lrows, (6, 10, 3, 3))
    device = _LegoMajorPlan(host.idx_K, lrows.channels(), None, host.out_shape, host.width, host.stored_rows)
    assert torch.equal(host.gather(stored, channels_last=channels_last), device.gather(stored, channels_last=channels_last))
    grads = [torch.zeros(3, 5, 6, 18), torch.zeros(3, 5, 6, 18)]
    g = torch.randn(1, 6, 1, 3).expand(4, 6, 3, 3)  # a non-dense gradient (as autograd may pass)
    host.accumulate(grads[0][1], g), device.accumulate(grads[1][1], g)
    assert torch.equal(grads[0], grads[1]) and grads[0][1].abs().sum() > 0 and grads[0][[0, 2]].abs().sum() == 0


def test_lego_major_conv_loads_either_state_dict_form_and_refuses_channel_indices():
    torch.manual_seed(0)
    plain = LegoConv2d(in_channels=8, out_channels=3, kernel_size=3, padding=1)
    major = LegoConv2d(in_channels=8, out_channels=3, kernel_size=3, padding=1, in_legos=4)
    major.load_state_dict(plain.state_dict())  # an [O, I, kh, kw] checkpoint (before lego-major storage)
    assert torch.equal(major.dense_weight(), plain.weight)
    twin = LegoConv2d(in_channels=8, out_channels=3, kernel_size=3, padding=1, in_legos=4)
    twin.load_state_dict(major.state_dict())
    assert torch.equal(twin.weight, major.weight)
    x = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(major(x), F.conv2d(x, plain.weight, padding=1), rtol=0, atol=0)  # no route: dense
    with pytest.raises(ValueError, match="whole in-channel legos"):
        major(x[:, :4], in_idx=LegoIndex(torch.tensor([0, 1]), 2).channels())


def test_bn_affine_gradient_is_dense_bn_gradient_at_the_selected_channels():
    """A routed BN's weight/bias gradient (plain autograd) is the dense BN's at the selected channels
    (gate folded in), adds onto an existing gradient there, and leaves the other channels' as they were."""
    torch.manual_seed(0)
    bn = LegoBatchNorm2d(8)
    torch.nn.init.uniform_(bn.weight)
    torch.nn.init.uniform_(bn.bias)
    idx = LegoIndex(torch.tensor([3, 1]), 2)  # channels 6, 7, 2, 3
    ch = idx.channels()
    dense = torch.nn.BatchNorm2d(4)
    dense.load_state_dict({"weight": bn.weight[ch], "bias": bn.bias[ch]}, strict=False)
    before_w, before_b = torch.randn(8), torch.randn(8)
    bn.weight.grad, bn.bias.grad = before_w.clone(), before_b.clone()
    x = torch.randn(4, 4, 5, 5)
    gate = torch.tensor([1.0, 1.0, 1.0, 1.0], requires_grad=True)
    (bn(x, idx=idx, gate=gate) * x).sum().backward()
    (dense(x) * x).sum().backward()
    others = torch.tensor([0, 1, 4, 5])
    for name, before in (("weight", before_w), ("bias", before_b)):
        grad = getattr(bn, name).grad
        torch.testing.assert_close(grad[ch], before[ch] + getattr(dense, name).grad)
        assert torch.equal(grad[others], before[others])
    assert gate.grad is not None and gate.grad.abs().sum() > 0
