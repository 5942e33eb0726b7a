"""Loss weighting strategies: static, uncertainty (Kendall 2018), DWA (Liu 2019), registry, state."""
from __future__ import annotations

import math

import pytest
import torch

from gppf.engine.weighting import LOSS_WEIGHTINGS, build_weighting
from gppf.registry import RegistryError

TASKS = ["a", "b"]
STATIC = {"a": 0.5, "b": 2.0}


def test_registry_lists_strategies() -> None:
    assert LOSS_WEIGHTINGS.names() == ["dwa", "static", "uncertainty"]


def test_static_reproduces_configured_weights() -> None:
    w = build_weighting("static", tasks=TASKS, static_weights=STATIC)
    assert w.weights() == STATIC
    assert w.weight("a", torch.tensor(3.0)).item() == 1.5
    assert w.weight("b", torch.tensor(3.0)).item() == 6.0
    loss = torch.tensor(3.0, requires_grad=True)
    w.weight("b", loss).backward()
    assert loss.grad.item() == 2.0


def test_static_weights_must_cover_tasks() -> None:
    with pytest.raises(ValueError, match=r"missing tasks \['b'\]"):
        build_weighting("static", tasks=TASKS, static_weights={"a": 1.0})
    with pytest.raises(ValueError, match="finite"):
        build_weighting("static", tasks=TASKS, static_weights={"a": 1.0, "b": -1.0})


def test_uncertainty_gradient_matches_analytic_form() -> None:
    w = build_weighting("uncertainty", tasks=TASKS, static_weights=STATIC)
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.3, -0.7]))
    loss = torch.tensor(2.5, requires_grad=True)
    term = w.weight("b", loss)
    term.backward()
    s, value = -0.7, 2.5
    assert term.item() == pytest.approx(math.exp(-s) * value + s, rel=1e-6)
    assert loss.grad.item() == pytest.approx(math.exp(-s), rel=1e-6)
    # d/ds [exp(-s) L + s] = 1 - exp(-s) L; the other task's log-variance gets no gradient
    assert w.log_vars.grad.tolist() == pytest.approx([0.0, 1.0 - math.exp(-s) * value], rel=1e-6)
    assert w.weights() == pytest.approx({"a": math.exp(-0.3), "b": math.exp(0.7)})


def test_uncertainty_parameters_reach_the_optimizer() -> None:
    w = build_weighting("uncertainty", tasks=TASKS, static_weights=STATIC, init_log_var=0.5)
    assert [p is w.log_vars for p in w.parameters()] == [True]
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    w.weight("a", torch.tensor(4.0)).backward()
    opt.step()
    expected = 0.5 - 0.1 * (1.0 - math.exp(-0.5) * 4.0)
    assert w.log_vars.tolist() == pytest.approx([expected, 0.5], rel=1e-6)


def test_dwa_weights_hand_computed() -> None:
    w = build_weighting("dwa", tasks=TASKS, static_weights=STATIC, window=2, temperature=2.0)
    steps = [{"a": 1.0, "b": 4.0}, {"a": 3.0, "b": 4.0}, {"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 6.0}]
    for i, losses in enumerate(steps):
        assert w.weights() == {"a": 1.0, "b": 1.0}, f"weights must stay 1 before two windows (step {i})"
        w.observe(losses)
    # window means: a 2 -> 1 (r=0.5), b 4 -> 4 (r=1); w_k = 2 exp(r_k/2) / (exp(0.25) + exp(0.5))
    denom = math.exp(0.25) + math.exp(0.5)
    expected = {"a": 2 * math.exp(0.25) / denom, "b": 2 * math.exp(0.5) / denom}
    assert w.weights() == pytest.approx(expected, rel=1e-12)
    assert sum(w.weights().values()) == pytest.approx(2.0)
    assert w.weight("a", torch.tensor(10.0)).item() == pytest.approx(10 * expected["a"], rel=1e-6)


def test_dwa_ignores_non_finite_and_missing_observations() -> None:
    w = build_weighting("dwa", tasks=TASKS, static_weights=STATIC, window=1, temperature=1.0)
    w.observe({"a": 2.0, "b": float("nan")})
    w.observe({"a": 1.0})
    # b has no finite mean in either window -> r_b = 1; r_a = 0.5
    denom = math.exp(0.5) + math.exp(1.0)
    assert w.weights() == pytest.approx({"a": 2 * math.exp(0.5) / denom, "b": 2 * math.exp(1.0) / denom})


def test_dwa_state_dict_roundtrip_continues_identically() -> None:
    kwargs = dict(tasks=TASKS, static_weights=STATIC, window=3, temperature=2.0)
    w = build_weighting("dwa", **kwargs)
    stream = [{"a": 1.0 + 0.3 * i, "b": 5.0 - 0.4 * i} for i in range(12)]
    for losses in stream[:7]:
        w.observe(losses)
    clone = build_weighting("dwa", **kwargs)
    clone.load_state_dict(w.state_dict())
    assert clone.weights() == w.weights()
    for losses in stream[7:]:
        w.observe(losses)
        clone.observe(losses)
        assert clone.weights() == w.weights()
    assert w.weights() != {"a": 1.0, "b": 1.0}


def test_uncertainty_state_dict_roundtrip() -> None:
    w = build_weighting("uncertainty", tasks=TASKS, static_weights=STATIC)
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.25, -1.5]))
    clone = build_weighting("uncertainty", tasks=TASKS, static_weights=STATIC)
    clone.load_state_dict(w.state_dict())
    assert torch.equal(clone.log_vars, w.log_vars)


def test_unknown_name_lists_available() -> None:
    with pytest.raises(RegistryError) as info:
        build_weighting("dwaa", tasks=TASKS, static_weights=STATIC)
    message = str(info.value)
    assert "did you mean 'dwa'" in message
    assert "available: dwa, static, uncertainty" in message


def test_unknown_option_and_task_are_errors() -> None:
    with pytest.raises(ValueError, match=r"no option\(s\) \['windw'\].*temperature, window"):
        build_weighting("dwa", tasks=TASKS, static_weights=STATIC, windw=3)
    w = build_weighting("static", tasks=TASKS, static_weights=STATIC)
    with pytest.raises(ValueError, match="unknown task 'c'.*a, b"):
        w.weight("c", torch.tensor(1.0))
    with pytest.raises(ValueError, match="unknown task 'c'"):
        w.observe({"c": 1.0})
