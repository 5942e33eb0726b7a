import math

import pytest
import torch

from gppf.lego.router import TaskRouter, lego_channels, rescale_grad, route_churn


def make(**kw):
    args = dict(tasks=["a", "b", "c"], num_layers=5, num_legos=8, active=3, mode="topk_st")
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
    r.set_progress(10, 100)  # tau anneals over the search phase (search_until=0.2 -> steps 0..20)
    assert r.tau == pytest.approx(2.0 * (0.1 / 2.0) ** 0.5)
    r.set_progress(20, 100)
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


def test_soft_topk_search_weights_every_lego_and_anneals_to_hard_topk():
    r = make(mode="soft_topk", tau_start=1.0, tau_end=0.01, search_until=0.5, freeze_at=1.0)
    with torch.no_grad():
        r.logits_TLN.copy_(torch.arange(8.0).repeat(3, 5, 1) * 0.1)  # legos 5, 6, 7 on top
    r.set_progress(0, 100)
    route = r("a")
    assert route.idx_LK.shape == (5, 8) and route.idx_LK[0].tolist() == list(range(8))
    assert torch.allclose(route.gate_LK.sum(-1), torch.full((5,), 3.0))
    assert (route.gate_LK > 0.05).all()  # every lego softly active at the start
    route.gate_LK[:, 0].sum().backward()  # lego 0 is unselected by top-k, yet its logit learns
    assert r.logits_TLN.grad[0, :, 0].abs().min() > 0
    r.set_progress(49, 100)  # end of the search: tau ~ tau_end, mask ~ hard top-k
    gate = r("a").gate_LK.detach()
    assert torch.allclose(gate[:, 5:], torch.ones(5, 3), atol=0.02) and gate[:, :5].max() < 0.02
    r.set_progress(50, 100)  # after the search: hard top-k with a straight-through gate equal to 1
    route = r("a")
    assert route.idx_LK[0].tolist() == [5, 6, 7] and torch.equal(route.gate_LK.detach(), torch.ones(5, 3))


def test_task_gradient_on_logits_has_unit_rms_per_routing_point():
    r = make()
    route = r("b")
    (route.gate_LK * torch.tensor([1e-6, 2e-6, 3e-6])).sum().backward()  # tiny raw gradient
    rms_L = r.logits_TLN.grad[1].pow(2).mean(-1).sqrt()
    assert torch.allclose(rms_L, torch.ones(5), atol=1e-5)
    x = torch.zeros(4, requires_grad=True)
    (rescale_grad(x, scale=0.5, dims=(0,)) * 0.0).sum().backward()
    assert torch.equal(x.grad, torch.zeros(4))  # a zero gradient stays zero


@pytest.mark.parametrize("mode", ["topk_st", "soft_topk"])
def test_task_gradient_rms_is_grad_rms_for_a_share_of_a_task(mode):
    """A task on R ranks: each rank's share of the gradient is rescaled to 1/R, so their sum is at most 1."""
    r = make(mode=mode)
    route = r("b", grad_rms=0.25)
    (route.gate_LK * torch.rand(route.gate_LK.shape)).sum().backward()
    rms_L = r.logits_TLN.grad[1].pow(2).mean(-1).sqrt()
    assert torch.allclose(rms_L, torch.full((5,), 0.25), atol=1e-6)


def test_aux_loss_gradients_are_the_stated_fraction_of_the_task_gradient():
    r = make(mi_weight=0.1, balance_weight=0.05)
    for name, w in (("router_mi", 0.1), ("router_balance", 0.05)):
        (grad,) = torch.autograd.grad(r.aux_losses()[name], r.logits_TLN)
        rms_L = grad.pow(2).mean(dim=(0, 2)).sqrt()  # near-uniform softmax: raw gradient ~1e-4, rescaled
        assert torch.allclose(rms_L, torch.full((5,), w), rtol=1e-4), name


def test_freeze_snapshots_routes_and_survives_logit_changes_and_reload():
    r = make(freeze_at=30)  # a step (> 1)
    r.set_progress(29, 100)
    assert not r.frozen and r("a").gate_LK is not None
    before = r.routes()
    r.set_progress(30, 100)
    assert r.frozen and r.routes() == before
    with torch.no_grad():
        r.logits_TLN.copy_(-r.logits_TLN)  # reverses every ranking
    assert r.routes() == before and r("a").gate_LK is None
    assert not any(v.requires_grad for v in r.aux_losses().values())
    twin = make()
    twin.load_state_dict(r.state_dict())
    assert twin.frozen and twin.routes() == before
    r.add_task("d")  # a new (transfer) task stays learnable
    assert r("d").gate_LK is not None and r("a").gate_LK is None


def test_freeze_at_fraction_and_old_checkpoints_load_unfrozen():
    r = make(freeze_at=0.75)
    assert r.freeze_step(200) == 150
    state = {k: v for k, v in r.state_dict().items() if k != "frozen_TLK"}
    twin = make()
    twin.load_state_dict(state)
    assert not twin.frozen and twin.routes() == r.routes()


def test_margins_and_route_churn():
    r = make()
    with torch.no_grad():
        r.logits_TLN.zero_()
        r.logits_TLN[0, :, :3] = 2.0  # task a: k-th logit 2, (k+1)-th 0
        r.logits_TLN[1, :, :4] = 1.0  # task b: a four-way tie for 3 places
    m = r.margins()
    assert m["a"] == pytest.approx(2.0) and m["b"] == pytest.approx(0.0)
    prev = {"a": [[0, 1], [2, 3]], "b": [[0, 1], [4, 5]]}
    assert route_churn(prev, {"a": [[1, 0], [2, 3]], "b": [[0, 1], [4, 6]]}) == pytest.approx(0.25)
    assert route_churn(prev, prev) == 0.0
