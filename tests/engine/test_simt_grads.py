"""Steps 3-5 of the SIMT step: one fused norm over the written gradient regions (non-finite check and
clipping), restricted to the lego rows a step used."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import gppf
from gppf.engine.distributed import TaskGroup
from gppf.engine.simt import clip_, total_norm, written_grads
from gppf.engine.trainer import build_run
from gppf.lego.layers import rows_used
from gppf.lego.optim import LegoSGD


def _routed_backward(*, legos: int = 16, active: int = 2) -> tuple[torch.nn.Module, LegoSGD, list]:
    """A GPPF-R18 (width 1/8) with LegoSGD after one backward of task ``a`` on a fixed route."""
    backbone = gppf.create_backbone("gppf_r18", tasks=["a"], legos=legos, active=active, width_mult=0.125)
    backbone.router.fix_route("a", [[1, 5]] * backbone.router.num_layers)
    for block in backbone.blocks:  # undo the zero-init of residual branches: every lego gets a gradient
        torch.nn.init.ones_(block.bn2.weight)
    params = list(backbone.parameters())
    declared = backbone.lego_rows()
    opt = LegoSGD(params, lr=0.1, momentum=0.9, lazy=True, lego_params=declared)
    opt.zero_grad(set_to_none=False)
    for p in params:
        p.grad = torch.zeros_like(p)  # as GradSync: every parameter owns a gradient buffer
    route = backbone.router("a")
    opt.prepare(rows_used(declared, [route.idx_LK]))  # as the SIMT step: the route names the rows
    backbone.forward_pooled(torch.randn(2, 3, 32, 32), "a", route=route).square().sum().backward()
    return backbone, opt, params


def test_written_regions_are_the_used_rows_and_give_the_full_norm():
    backbone, opt, params = _routed_backward()
    regions = written_grads(params, opt)
    full = [p.grad for p in params if p.grad is not None]
    assert total_norm(regions) == pytest.approx(float(torch.nn.utils.get_total_norm(full)), rel=1e-6)
    conv1 = backbone.layer1[0].conv1.weight  # rows: 16 legos of width 4; the route uses legos 1 and 5
    rows = [g for g in regions if g.data_ptr() >= conv1.grad.data_ptr()
            and g.data_ptr() < conv1.grad.data_ptr() + conv1.grad.numel() * conv1.grad.element_size()]
    width = conv1.shape[0] // 16
    assert [g.numel() for g in rows] == [width * conv1[0].numel()] * 2  # one memory run per used lego
    assert conv1.grad[:width].abs().sum() == 0 and conv1.grad[width:2 * width].abs().sum() > 0
    conv2 = backbone.layer1[0].conv2.weight  # in-channels: 16 legos of width 4 stored lego-major; 1 and 5 used
    assert conv2.shape == (16, conv2.shape[1], 9 * width)
    mine = [g for g in regions if conv2.grad.data_ptr() <= g.data_ptr() < conv2.grad.data_ptr() + conv2.grad.nbytes]
    assert [g.data_ptr() for g in mine] == [conv2.grad[1].data_ptr(), conv2.grad[5].data_ptr()]  # one block each
    assert all(g.is_contiguous() and g.numel() == conv2[0].numel() for g in mine)
    assert conv2.grad[0].abs().sum() == 0 and mine[0].abs().sum() > 0
    written, stored = sum(g.numel() for g in regions), sum(g.numel() for g in full)
    assert written < 0.35 * stored  # the unused legos' rows and columns are not visited


def test_norm_of_column_runs_is_exact_and_catches_non_finite():
    """Strided 2-D column views are reduced per row: torch's norm of a whole strided view sums naively
    (2.3M float32 elements: 0.26% off)."""
    torch.manual_seed(0)
    g = torch.randn(512, 1024, 3, 3)
    views = [g.view(512, -1)[:, :256 * 9], g.view(512, -1)[:, 512 * 9:768 * 9]]
    dense = torch.randn(100)
    exact = math.sqrt(sum(float(v.double().square().sum()) for v in views) + float(dense.double().square().sum()))
    assert total_norm(views + [dense]) == pytest.approx(exact, rel=1e-6)
    views[1][7, 3] = math.inf
    assert total_norm(views + [dense]) == math.inf


def test_norm_detects_non_finite_values_in_written_rows():
    backbone, opt, params = _routed_backward()
    conv1 = backbone.layer1[0].conv1.weight
    width = conv1.shape[0] // 16
    conv1.grad[width + 1, 0, 0, 0] = math.inf  # a row of lego 1, which the step wrote
    assert total_norm(written_grads(params, opt)) == math.inf
    conv1.grad[width + 1, 0, 0, 0] = math.nan
    assert math.isnan(total_norm(written_grads(params, opt)))
    assert total_norm([]) == 0.0


def test_clip_matches_clip_grad_norm():
    _, opt, params = _routed_backward()
    reference = [p.grad.clone() for p in params]
    regions = written_grads(params, opt)
    norm = total_norm(regions)
    clip_(regions, norm=norm, max_norm=norm / 4)
    ref_params = []
    for g in reference:
        q = torch.nn.Parameter(torch.zeros_like(g))
        q.grad = g
        ref_params.append(q)
    assert float(torch.nn.utils.clip_grad_norm_(ref_params, norm / 4)) == pytest.approx(norm, rel=1e-6)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    before = [p.grad.clone() for p in params]
    clip_(written_grads(params, opt), norm=norm / 4, max_norm=norm)  # below the limit: untouched
    assert all(torch.equal(a, p.grad) for a, p in zip(before, params))


class _InfGrad(torch.autograd.Function):
    """Identity whose backward returns an infinite gradient (a finite loss, a non-finite gradient)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g * math.inf


def test_simt_step_skips_a_non_finite_gradient_and_clears_it(tmp_path, tiny_cfg):
    run = build_run(tiny_cfg(), run_dir=tmp_path, resume=False)
    good = run.step_fn.losses["cls"]
    run.step_fn.losses["cls"] = lambda out, batch: _InfGrad.apply(good(out, batch))
    before = {k: v.clone() for k, v in run.model.state_dict().items() if v.is_floating_point()}
    result = run.step_fn(0)
    assert result.skipped and result.bad_tasks == ["<gradient>"] and math.isfinite(result.task_losses["cls"])
    after = run.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in run.model.parameters())
    run.step_fn.losses["cls"] = good
    assert not run.step_fn(1).skipped


class _Frozen:
    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = False) -> None:
        pass


def _frozen_step_grads(tmp_path, tiny_cfg, clip: float) -> tuple[float, list[torch.Tensor]]:
    run = build_run(tiny_cfg(), run_dir=tmp_path, resume=False)
    step = dataclasses.replace(run.step_fn, optimizer=_Frozen(), scheduler=None, grad_clip=clip)
    result = step(0)
    assert not result.skipped
    return result.grad_norm, [p.grad.clone() for p in run.step_fn.grad_sync.params]


def test_simt_step_reports_the_norm_and_clips_like_clip_grad_norm(tmp_path, tiny_cfg):
    norm, grads = _frozen_step_grads(tmp_path / "a", tiny_cfg, clip=0.0)
    full = float(torch.nn.utils.get_total_norm(grads))
    assert norm == pytest.approx(full, rel=1e-5) and norm > 0
    clipped_norm, clipped = _frozen_step_grads(tmp_path / "b", tiny_cfg, clip=norm / 3)
    assert clipped_norm == pytest.approx(norm, rel=1e-5)
    scale = (norm / 3) / (norm + 1e-6)
    for g, c in zip(grads, clipped):
        torch.testing.assert_close(c, g * scale, rtol=1e-4, atol=1e-9)


def _learning_route_step(run_dir, tiny_cfg, clip: float) -> tuple[float, list[torch.Tensor], torch.Tensor]:
    """One SIMT step (optimizer frozen) whose routes learn: the network's gradients, the router's."""
    run = build_run(tiny_cfg(), run_dir=run_dir, resume=False)
    for block in run.model.backbone.blocks:  # open the zero-initialised residual branches: the task loss
        torch.nn.init.ones_(block.bn2.weight)  # then reaches the router's logits at this very step
    # a small loss: the network's gradient scales with it, the router's (rescaled) does not
    small = {t: (lambda out, batch, f=f: f(out, batch) * 1e-3) for t, f in run.step_fn.losses.items()}
    step = dataclasses.replace(run.step_fn, optimizer=_Frozen(), scheduler=None, grad_clip=clip, losses=small)
    result = step(0)
    assert not result.skipped
    router = run.model.backbone.router.logits_TLN
    network = [p.grad.clone() for p in run.step_fn.grad_sync.params if p is not router]
    return result.grad_norm, network, router.grad.clone()


def test_router_gradient_is_neither_in_the_clipping_norm_nor_clipped(tmp_path, tiny_cfg):
    """The router's gradient is rescaled to unit RMS per routing point (norm sqrt(tasks x points x
    legos) whatever the loss): counted, it would clip the whole network by a constant factor whenever
    routes learn."""
    norm, network, logits = _learning_route_step(tmp_path / "a", tiny_cfg, clip=0.0)
    assert norm == pytest.approx(float(torch.nn.utils.get_total_norm(network)), rel=1e-5) and norm > 0
    assert float(logits.norm()) > 2 * norm  # with it, the norm would be the router's
    _, kept, kept_logits = _learning_route_step(tmp_path / "b", tiny_cfg, clip=1.5 * norm)
    for g, k in zip(network, kept):  # above the network's norm (below the norm with the router's): untouched
        torch.testing.assert_close(k, g, rtol=0, atol=0)
    torch.testing.assert_close(kept_logits, logits, rtol=0, atol=0)
    _, clipped, clipped_logits = _learning_route_step(tmp_path / "c", tiny_cfg, clip=norm / 3)
    scale = (norm / 3) / (norm + 1e-6)
    for g, c in zip(network, clipped):
        torch.testing.assert_close(c, g * scale, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(clipped_logits, logits, rtol=0, atol=0)  # the router's step is its lr's


def test_simt_step_skips_a_non_finite_router_gradient(tmp_path, tiny_cfg):
    run = build_run(tiny_cfg(), run_dir=tmp_path, resume=False)
    for block in run.model.backbone.blocks:
        torch.nn.init.ones_(block.bn2.weight)
    logits = run.model.backbone.router.logits_TLN
    handle = logits.register_hook(lambda g: g * math.nan)
    before = logits.detach().clone()
    result = run.step_fn(0)
    assert result.skipped and result.bad_tasks == ["<gradient>"]
    assert torch.equal(logits.detach(), before) and logits.grad.abs().sum() == 0
    handle.remove()
    assert not run.step_fn(1).skipped


def test_a_task_on_two_ranks_takes_half_the_router_gradient_on_each(tmp_path, tiny_cfg):
    """The gradient sync sums the ranks' router gradients: each rank's share is rescaled to RMS 1/ranks
    (one process: 1), so the router's step does not grow with the number of ranks."""
    rms = {}
    for ranks in [(0,), (0, 1)]:
        run = build_run(tiny_cfg(), run_dir=tmp_path / str(len(ranks)), resume=False)
        for block in run.model.backbone.blocks:
            torch.nn.init.ones_(block.bn2.weight)
        groups = {t: TaskGroup(ranks=ranks, device=torch.device("cpu")) for t in run.step_fn.global_batch}
        step = dataclasses.replace(run.step_fn, optimizer=_Frozen(), scheduler=None, groups=groups)
        assert not step(0).skipped
        rms[len(ranks)] = run.model.backbone.router.logits_TLN.grad.pow(2).mean(-1).sqrt()  # [tasks, points]
    torch.testing.assert_close(rms[1], torch.ones_like(rms[1]), rtol=0, atol=1e-5)
    torch.testing.assert_close(rms[2], torch.full_like(rms[2], 0.5), rtol=0, atol=1e-5)
