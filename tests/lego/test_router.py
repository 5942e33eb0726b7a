import math

import pytest
import torch

from gppf.lego.router import TaskRouter, lego_channels


def make(**kw):
    args = dict(tasks=["a", "b", "c"], num_layers=5, num_legos=8, active=3)
    args.update(kw)
    return TaskRouter(**args)


def test_topk_selects_k_sorted_unique_per_layer():
    r = make()
    route = r("a")
    assert route.idx_LK.shape == (5, 3)
    assert torch.equal(route.idx_LK, route.idx_LK.sort(dim=1).values)
    assert all(len(set(row.tolist())) == 3 for row in route.idx_LK)
    expected = r.logits_TLN[0].detach().topk(3, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(route.idx_LK, expected)


def test_straight_through_gate_is_one_in_value_and_carries_gradient():
    r = make()
    route = r("b")
    assert torch.equal(route.gate_LK.detach(), torch.ones(5, 3))
    route.gate_LK.sum().backward()
    grad = r.logits_TLN.grad
    assert grad[1].abs().sum() > 0  # task b's logits receive gradient
    assert grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0


def test_eval_is_deterministic_and_gate_free():
    r = make(mode="gumbel").eval()
    a, b = r("a"), r("a")
    assert a.gate_LK is None and torch.equal(a.idx_LK, b.idx_LK)


def test_gumbel_explores_and_anneals():
    r = make(mode="gumbel", tau_start=2.0, tau_end=0.1)
    picks = {tuple(r("a").idx_LK[0].tolist()) for _ in range(30)}
    assert len(picks) > 1
    r.set_progress(1.0)
    assert r.tau == pytest.approx(0.1)


def test_fixed_route_overrides_logits_and_validates():
    r = make(fixed_routes={"c": [[0, 1, 2]] * 5})
    assert r("c").idx_LK.tolist() == [[0, 1, 2]] * 5
    assert r("c").gate_LK is None
    with pytest.raises(ValueError, match="shape"):
        r.fix_route("a", [[0, 1]] * 5)
    with pytest.raises(ValueError, match="repeats"):
        r.fix_route("a", [[0, 0, 1]] * 5)
    with pytest.raises(ValueError, match="outside"):
        r.fix_route("a", [[0, 1, 9]] * 5)
    with pytest.raises(KeyError, match="unknown task"):
        r("zzz")


def test_aux_losses_finite_with_gradients_and_right_sign():
    r = make(mi_weight=1.0, balance_weight=1.0)
    losses = r.aux_losses()
    assert set(losses) == {"router_mi", "router_balance"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert r.logits_TLN.grad.abs().sum() > 0
    # decisive, disjoint tasks reach the largest MI possible with 3 tasks: log(3)/log(8)
    r2 = make(mi_weight=1.0)
    with torch.no_grad():
        r2.logits_TLN.zero_()
        for t in range(3):
            r2.logits_TLN[t, :, t] = 50.0
    mi = -r2.aux_losses()["router_mi"].item()
    assert mi == pytest.approx(math.log(3) / math.log(8), rel=1e-3)
    # identical tasks share everything: MI 0
    with torch.no_grad():
        r2.logits_TLN.copy_(r2.logits_TLN[0:1].expand_as(r2.logits_TLN))
    assert -r2.aux_losses()["router_mi"].item() == pytest.approx(0.0, abs=1e-5)


def test_balance_zero_when_uniform_usage():
    r = make(balance_weight=1.0)
    with torch.no_grad():
        r.logits_TLN.zero_()
    assert r.aux_losses()["router_balance"].item() == pytest.approx(0.0, abs=1e-7)


def test_add_task_grows_logits():
    r = make()
    r.add_task("d", init_from="a")
    assert r.logits_TLN.shape[0] == 4 and r.tasks[-1] == "d"
    assert torch.equal(r("d").idx_LK, r("a").idx_LK)


def test_lego_channels():
    assert lego_channels(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]


def test_usage_matrix():
    r = make(fixed_routes={"a": [[0, 1, 2]] * 5})
    u = r.usage_TLN()
    assert u.shape == (3, 5, 8) and u.sum().item() == 3 * 5 * 3
    assert u[0, :, :3].sum().item() == 15
