import torch
import torch.nn.functional as F

from gppf.lego.layers import LegoBatchNorm2d, LegoConv2d, LegoLinear
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
